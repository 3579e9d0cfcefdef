#!/usr/bin/env python
"""Mask AP of a small ISDA on its training images at several iterations (CPU, one thread).

    python tools/learning_curve.py --config-file configs/nuclei/isda_R18_tiny.yaml \\
        --evals 50,80,110 MODEL.ISDA.MASK_FEATURE_SOURCE encoder SEED 1

Full-batch AdamW on the un-augmented ``DATASETS.TRAIN`` images (``isda.engine.plain_loop``:
linear warm-up, global gradient-norm clipping), evaluated on ``DATASETS.TEST[0]`` with Detectron2's COCOEvaluator.
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

import isda  # noqa: E402
from plain_loop import build_plain_training, evaluate_segm, plain_step  # noqa: E402  (tools/)


def evaluate(model, cfg):
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        return evaluate_segm(model, cfg, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="configs/nuclei/isda_R18_tiny.yaml",
                   help="config trained (default configs/nuclei/isda_R18_tiny.yaml)")
    p.add_argument("--evals", default="50,80,110", help="iterations after which to evaluate")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)

    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu"] + args.opts)
    evals = sorted(int(x) for x in args.evals.split(","))

    model, data, opt = build_plain_training(cfg)
    start, eval_time = time.time(), 0.0
    for it in range(1, evals[-1] + 1):
        loss, losses = plain_step(model, opt, cfg, data, it)
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
