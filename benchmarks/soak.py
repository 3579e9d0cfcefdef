#!/usr/bin/env python
"""Soak test: many CPU training iterations of a small ISDA, resident memory sampled as it goes.

    python benchmarks/soak.py                       # 500 iterations, RSS every 10
    python benchmarks/soak.py --iters 100 --every 5 --out /tmp/soak

Trains through train_net's ``Trainer`` (the same loader, hooks and checkpointer as
``train_net.py``) on the embedded nuclei tiles at a small input size. The target: RSS grows by
less than 50 MB over the last 400 iterations (over the last 80 % when ``--iters`` is not 500).
The last stdout line is a JSON object with the figures.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1",
    "MODEL.ISDA.DEC_LAYERS", "1", "INPUT.MIN_SIZE_TRAIN", "(32, 48)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.CROP.PRE_RESIZE_SIZES", "(48,)", "INPUT.CROP.SIZE", "[32, 48]",
    "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()", "SOLVER.BASE_LR", "0.0005",
    "INPUT.BAD_SAMPLE_POLICY", "skip",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=500, help="training iterations (default 500)")
    parser.add_argument("--every", type=int, default=10, help="sample RSS every N iterations")
    parser.add_argument("--budget-mb", type=float, default=50.0,
                        help="allowed RSS growth over the last 80%% of the run, MB (default 50)")
    parser.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    parser.add_argument("--config-file", default=str(ROOT / "configs/nuclei/isda_R18_tiny.yaml"),
                        help="config trained (default configs/nuclei/isda_R18_tiny.yaml)")
    args = parser.parse_args(argv)

    import train_net
    from detectron2.engine import HookBase

    out = args.out or tempfile.mkdtemp(prefix="isda_soak_")
    cli = train_net.argument_parser().parse_args(
        ["--config-file", args.config_file, *SMALL, "SOLVER.MAX_ITER", str(args.iters),
         "SOLVER.CHECKPOINT_PERIOD", str(max(args.iters // 5, 1)), "OUTPUT_DIR", out])
    cfg = train_net.setup(cli)
    proc = psutil.Process()
    samples = []  # (iteration done, rss MB)

    class RSSSampler(HookBase):
        def after_step(self):
            done = self.trainer.iter + 1
            if done % args.every == 0:
                samples.append((done, proc.memory_info().rss / 2**20))

    trainer = train_net.Trainer(cfg)
    trainer.register_hooks([RSSSampler()])
    trainer.resume_or_load(resume=False)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0

    window = 400 if args.iters == 500 else int(round(args.iters * 0.8))
    start_iter = args.iters - window
    base = [rss for it, rss in samples if it <= start_iter]
    ref = base[-1] if base else samples[0][1]
    growth = samples[-1][1] - ref
    peak = max(rss for _, rss in samples)
    for it, rss in samples:
        print(f"iter {it:5d}  rss {rss:8.1f} MB")
    result = {"iterations": args.iters, "sample_every": args.every, "seconds": round(seconds, 1),
              "s_per_iter": round(seconds / args.iters, 3),
              "rss_start_mb": round(samples[0][1], 1),
              f"rss_at_iter_{start_iter}_mb": round(ref, 1),
              "rss_end_mb": round(samples[-1][1], 1), "rss_peak_mb": round(peak, 1),
              f"growth_last_{window}_iters_mb": round(growth, 1),
              "budget_mb": args.budget_mb, "pass": bool(growth < args.budget_mb),
              "output_dir": out}
    print(json.dumps(result))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
