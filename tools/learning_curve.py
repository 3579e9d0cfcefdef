#!/usr/bin/env python
"""Mask AP of a small ISDA on its training images at several iterations (CPU, one thread).

    python tools/learning_curve.py --config-file configs/nuclei/isda_R18_tiny.yaml \\
        --evals 50,80,110 MODEL.ISDA.MASK_FEATURE_SOURCE encoder SEED 1

Full-batch AdamW on the un-augmented ``DATASETS.TRAIN`` images (linear warm-up, global
gradient-norm clipping), evaluated on ``DATASETS.TEST[0]`` with Detectron2's COCOEvaluator.
Used for the measurements in docs/model.md.
"""
import argparse
import contextlib
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.evaluation import COCOEvaluator, inference_on_dataset  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import isda  # noqa: E402
from isda.data.minimal_mapper import MinimalInstanceMapper  # noqa: E402


def evaluate(model, cfg):
    name = cfg.DATASETS.TEST[0]
    mapper = MinimalInstanceMapper(cfg, is_train=False)
    loader = [[mapper(d)] for d in DatasetCatalog.get(name)]
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=out,
                                  use_fast_impl=False)
        model.eval()
        return inference_on_dataset(model, loader, evaluator)["segm"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="configs/nuclei/isda_R18_tiny.yaml")
    p.add_argument("--evals", default="50,80,110", help="iterations after which to evaluate")
    p.add_argument("opts", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)

    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + args.opts)
    evals = sorted(int(x) for x in args.evals.split(","))

    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    mapper = MinimalInstanceMapper(cfg, is_train=True)
    data = [mapper(d) for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR,
                            weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    start, eval_time = time.time(), 0.0
    for it in range(1, evals[-1] + 1):
        model.train()
        losses = model(data)
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
        for group in opt.param_groups:
            group["lr"] = cfg.SOLVER.BASE_LR * min(1.0, it / max(1, cfg.SOLVER.WARMUP_ITERS))
        opt.step()
        if it % 10 == 0:
            print(f"iter {it} loss {loss.item():.3f} focal {losses['loss_focal'].item():.3f} "
                  f"dice {losses['loss_dice'].item():.3f}", flush=True)
        if it in evals:
            t = time.time()
            res = evaluate(model, cfg)
            eval_time += time.time() - t
            print(f"EVAL iter {it}: AP {res['AP']:.1f} AP50 {res['AP50']:.1f} AP75 "
                  f"{res['AP75']:.1f} (train {time.time() - start - eval_time:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
