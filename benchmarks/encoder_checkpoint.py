#!/usr/bin/env python
"""``MODEL.ISDA.ENCODER_CHECKPOINT``: ISDA-R50's training memory and step time with the encoder
layers recomputed in the backward pass, against the default, side by side; Mask R-CNN R50-FPN's
training peak beside them for scale.

    python benchmarks/encoder_checkpoint.py                  # 800x1216, 2 threads
    python benchmarks/encoder_checkpoint.py --quick          # 512x768, fewer repeats

Time: one model, one input, training steps as ISDA's trainer runs them
(``benchmarks/r50_models.train_step``), the switch toggled on the same model between steps, the
two settings alternating (median ms each). Memory: the training peak RSS of fresh processes
(``isda_vs_maskrcnn.memory_figures``: four steps each, the three processes alternating per
repeat; median and min-max). The last stdout
line is one JSON object.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SWITCH = ["MODEL.ISDA.ENCODER_CHECKPOINT", "True"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="512x768, 2 timed steps, 1 memory repeat")
    p.add_argument("--size", default=None, help="HxW (default 800x1216, 512x768 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed steps per setting")
    p.add_argument("--memory-repeats", type=int, default=None, help="fresh processes per figure")
    args = p.parse_args(argv)

    from r50_models import build, make_input, parse_size, set_threads, train_step
    from side_by_side import alternating_medians

    import isda_vs_maskrcnn as bench

    h, w = parse_size(args.size or ("512x768" if args.quick else "800x1216"))
    set_threads(args.threads)
    train_repeats = args.train_repeats or (2 if args.quick else 5)
    memory_repeats = args.memory_repeats or (1 if args.quick else 3)
    report = {"size": [h, w], "threads": args.threads,
              "train_repeats": train_repeats, "memory_repeats": memory_repeats}

    model, opt = build("isda")
    sample = make_input(h, w)

    def step(checkpoint):
        def run():
            model.encoder.checkpoint = checkpoint
            train_step(model, opt, sample)
        return run

    times = alternating_medians({"default": step(False), "checkpoint": step(True)},
                                train_repeats)
    report["train_default_ms"] = round(times["default"], 1)
    report["train_checkpoint_ms"] = round(times["checkpoint"], 1)
    report["train_time_ratio"] = round(times["checkpoint"] / times["default"], 3)
    print(f"training step  default {times['default']:.0f} ms   checkpoint "
          f"{times['checkpoint']:.0f} ms   ratio {report['train_time_ratio']:.3f}", flush=True)
    del model, opt

    runs = [(k, "train") for k in ("default", "checkpoint", "maskrcnn")]
    peaks = bench.memory_figures(report, runs, h, w, args.threads, memory_repeats,
                                 variants={"default": ("isda", []), "checkpoint": ("isda", SWITCH)})
    peaks = {k: v for (k, _), v in peaks.items()}
    bench.paired_ratio(report, "checkpoint_vs_default_mem", peaks["checkpoint"], peaks["default"])
    bench.paired_ratio(report, "default_train_mem_ratio", peaks["default"], peaks["maskrcnn"])
    bench.paired_ratio(report, "checkpoint_train_mem_ratio", peaks["checkpoint"], peaks["maskrcnn"])
    print(f"training peak  default {report['default_train_peak_mb']:.0f} MB   checkpoint "
          f"{report['checkpoint_train_peak_mb']:.0f} MB   Mask R-CNN "
          f"{report['maskrcnn_train_peak_mb']:.0f} MB", flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
