"""End-to-end learning: the tiny ISDA (configs/nuclei/isda_R18_tiny.yaml) overfits the 8
nuclei training tiles on the CPU and reaches mask AP50 >= 90 on them (COCOEvaluator)."""
import time
from pathlib import Path

import pytest
import torch

from detectron2.config import get_cfg

import isda
from plain_loop import build_plain_training, evaluate_segm, plain_step

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "nuclei" / "isda_R18_tiny.yaml"


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
    model, data, opt = build_plain_training(cfg)
    bs = cfg.SOLVER.IMS_PER_BATCH
    g = torch.Generator().manual_seed(cfg.SEED)
    for it in range(1, cfg.SOLVER.MAX_ITER + 1):
        idx = torch.randperm(len(data), generator=g)[:bs].tolist()
        loss, _ = plain_step(model, opt, cfg, [data[i] for i in idx], it)
        if log_every and (it % log_every == 0 or it == cfg.SOLVER.MAX_ITER):
            print(it, f"{loss.item():.3f}", flush=True)
    return model


def test_overfit_nuclei_ap50(tmp_path):
    start = time.time()
    cfg = tiny_cfg()
    model = train_tiny(cfg)
    res = evaluate_segm(model, cfg, tmp_path)
    print(f"nuclei_train segm: AP={res['AP']:.1f} AP50={res['AP50']:.1f} "
          f"({time.time() - start:.0f}s)")
    assert res["AP50"] >= 90.0
