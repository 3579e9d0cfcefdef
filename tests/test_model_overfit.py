"""End-to-end learning: the tiny ISDA (configs/nuclei/isda_R18_tiny.yaml) overfits the 8
nuclei training tiles on the CPU and reaches mask AP50 >= 90 on them (COCOEvaluator)."""
import os
import time
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model

import isda
from isda.data.minimal_mapper import MinimalInstanceMapper
from test_model_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "nuclei" / "isda_R18_tiny.yaml"


def tiny_cfg(*opts):
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def train_tiny(cfg, log_every=0):
    """AdamW (global L2 gradient clipping) on the un-augmented training tiles, a batch of
    ``IMS_PER_BATCH`` of them per iteration; returns the trained model."""
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    mapper = MinimalInstanceMapper(cfg, is_train=True)
    data = [mapper(d) for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR,
                            weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    bs = cfg.SOLVER.IMS_PER_BATCH
    g = torch.Generator().manual_seed(cfg.SEED)
    model.train()
    for it in range(1, cfg.SOLVER.MAX_ITER + 1):
        # linear warm-up, then x GAMMA at each of SOLVER.STEPS
        lr = cfg.SOLVER.BASE_LR * min(1.0, it / max(1, cfg.SOLVER.WARMUP_ITERS))
        lr *= cfg.SOLVER.GAMMA ** sum(it > s for s in cfg.SOLVER.STEPS)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randperm(len(data), generator=g)[:bs].tolist()
        losses = model([data[i] for i in idx])
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
        opt.step()
        if log_every and (it % log_every == 0 or it == cfg.SOLVER.MAX_ITER):
            print(it, f"{loss.item():.3f}", flush=True)
    return model


def evaluate(model, cfg, output_dir):
    name = cfg.DATASETS.TEST[0]
    mapper = MinimalInstanceMapper(cfg, is_train=False)
    data = [mapper(d) for d in DatasetCatalog.get(name)]
    loader = [[d] for d in data]
    evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=str(output_dir),
                              use_fast_impl=False)
    model.eval()
    return inference_on_dataset(model, loader, evaluator)["segm"]


def test_overfit_nuclei_ap50(tmp_path):
    start = time.time()
    cfg = tiny_cfg()
    model = train_tiny(cfg)
    res = evaluate(model, cfg, tmp_path)
    print(f"nuclei_train segm: AP={res['AP']:.1f} AP50={res['AP50']:.1f} "
          f"({time.time() - start:.0f}s)")
    assert res["AP50"] >= 90.0
