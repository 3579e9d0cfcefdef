#!/usr/bin/env python
"""What ISDA-R50's training-memory recomputations cost in step time and buy in peak memory,
side by side: the shipped model ("recompute": the encoder's sampling locations and value
projection and the decoder's value projection recomputed in the backward pass, GroupNorm
keeping its output) against the same model with those tensors kept ("kept": the former
composition, restored by switching the recomputing paths off in this process only).

    python benchmarks/training_recompute.py              # 800x1216, 2 threads
    python benchmarks/training_recompute.py --quick      # 512x768, fewer repeats

Time: one model, one input, training steps as ISDA's trainer runs them
(``benchmarks/r50_models.train_step``), the two forms alternating on the same model (median ms
each). Memory: training peak RSS of fresh processes (four steps, the CPU allocator policy of
train_net.py; the two forms alternating per repeat; median and min-max). The last stdout line
is one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FORMS = ("recompute", "kept")


def set_form(form):
    """Switches the recomputing paths of this process on ("recompute", as shipped) or off
    ("kept")."""
    from isda.layers import group_norm
    from isda.layers.ms_deform_attn import MSDeformAttn

    if not hasattr(MSDeformAttn, "_shipped_recomputes_value"):
        MSDeformAttn._shipped_recomputes_value = MSDeformAttn._recomputes_value
        group_norm._shipped_applies = group_norm._applies
    if form == "recompute":
        MSDeformAttn._recomputes_value = MSDeformAttn._shipped_recomputes_value
        group_norm._applies = group_norm._shipped_applies
    else:
        MSDeformAttn._recomputes_value = lambda self, x: False
        group_norm._applies = lambda x, norm: False


def memory_worker(form, h, w, threads):
    import isda_vs_maskrcnn as bench
    from r50_models import build, make_input, set_threads, train_step

    set_threads(threads)
    set_form(form)
    model, opt = build("isda")
    sample = make_input(h, w)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = bench._rss_kb("VmRSS")
    for _ in range(bench.MEMORY_PASSES):
        train_step(model, opt, sample)
    return (bench._rss_kb("VmHWM") - base) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="512x768, 2 timed steps, 1 memory repeat")
    p.add_argument("--size", default=None, help="HxW (default 800x1216, 512x768 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--train-repeats", type=int, default=None, help="timed steps per form")
    p.add_argument("--memory-repeats", type=int, default=None, help="fresh processes per form")
    p.add_argument("--_memory-worker", dest="memory_worker", choices=FORMS,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from r50_models import parse_size, set_threads

    from isda.utils.cpu_allocator import allocator_policy, apply_allocator_policy

    h, w = parse_size(args.size or ("512x768" if args.quick else "800x1216"))
    apply_allocator_policy()
    if args.memory_worker:
        print(json.dumps({"peak_mb": memory_worker(args.memory_worker, h, w, args.threads)}))
        return 0

    from r50_models import build, make_input, train_step
    from side_by_side import alternating_medians

    set_threads(args.threads)
    train_repeats = args.train_repeats or (2 if args.quick else 5)
    memory_repeats = args.memory_repeats or (1 if args.quick else 2)
    report = {"size": [h, w], "threads": args.threads, "allocator": allocator_policy(),
              "train_repeats": train_repeats, "memory_repeats": memory_repeats}

    model, opt = build("isda")
    sample = make_input(h, w)

    def step(form):
        def run():
            set_form(form)
            train_step(model, opt, sample)
        return run

    times = alternating_medians({f: step(f) for f in FORMS}, train_repeats)
    set_form("recompute")
    for f in FORMS:
        report[f"train_{f}_ms"] = round(times[f], 1)
    report["train_time_ratio"] = round(times["recompute"] / times["kept"], 3)
    print(f"training step  recompute {times['recompute']:.0f} ms   kept {times['kept']:.0f} ms"
          f"   ratio {report['train_time_ratio']:.3f}", flush=True)
    del model, opt

    peaks = {f: [] for f in FORMS}
    for r in range(memory_repeats):
        for f in (FORMS if r % 2 == 0 else FORMS[::-1]):
            cmd = [sys.executable, os.path.abspath(__file__), "--_memory-worker", f, "--size",
                   f"{h}x{w}", "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks[f].append(json.loads(out.strip().splitlines()[-1])["peak_mb"])
    for f in FORMS:
        report[f"{f}_train_peak_mb"] = round(statistics.median(peaks[f]), 1)
        report[f"{f}_train_peak_mb_spread"] = [round(min(peaks[f]), 1), round(max(peaks[f]), 1)]
    report["train_mem_ratio"] = round(report["recompute_train_peak_mb"]
                                      / report["kept_train_peak_mb"], 3)
    print(f"training peak  recompute {report['recompute_train_peak_mb']:.0f} MB   kept "
          f"{report['kept_train_peak_mb']:.0f} MB", flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
