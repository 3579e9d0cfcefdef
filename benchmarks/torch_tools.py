#!/usr/bin/env python
"""What torch's own tools give ISDA on the CPU, each side by side with the eager default:

    python benchmarks/torch_tools.py compile      # torch.compile (inductor) per part, cumulative
    python benchmarks/torch_tools.py checkpoint   # MODEL.ISDA.ENCODER_CHECKPOINT off / on
    python benchmarks/torch_tools.py allocator    # glibc / jemalloc / tcmalloc, ISDA and Mask R-CNN
    python benchmarks/torch_tools.py checkpoint --size 256x384 --steps 1 --rounds 1   # smoke test

Times: medians over --steps after a warm-up step; memory: the peak RSS a fresh process adds
once model and input exist. Allocators (LD_PRELOAD): Debian's libjemalloc2 with Intel's settings
for PyTorch, libtcmalloc-minimal4. The last stdout line is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import time

from isda_vs_maskrcnn import (build, in_processes, make_input, medians_ms, parse_size,
                              peak_mb, set_threads, train_step)

LIB = "/usr/lib/x86_64-linux-gnu"
ALLOCATORS = {
    "glibc": {},
    "jemalloc": {"LD_PRELOAD": f"{LIB}/libjemalloc.so.2",
                 "MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                                "dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000"},
    "tcmalloc": {"LD_PRELOAD": f"{LIB}/libtcmalloc_minimal.so.4"},
}
PARTS = ("encoder", "decoder", "mask_head", "backbone")


def step(args, isda_opts):
    """-> (model, one training step or inference of ``args.mode`` as a callable)."""
    import torch

    model, opt = build({"r50": "isda"}.get(args.model, args.model), isda_opts=isda_opts)
    batch = [make_input(*args.size)]
    if args.model == "main":  # batch 8 at 176x176, one class
        batch = [make_input(176, 176, seed=i, num_objects=12) for i in range(8)]
        for b in batch:
            b["instances"].gt_classes.zero_()
    if args.mode == "train":
        return model, lambda: train_step(model, opt, batch)

    def run():
        with torch.no_grad():
            model([{k: b[k] for k in ("image", "height", "width")} for b in batch])
    return model, run


def worker(args):
    """One measurement in this fresh process -> JSON line."""
    _, fn, ms = *step(args, args.isda_opts), []
    peak = peak_mb(lambda: ms.append(medians_ms({"": fn}, args.steps)[""]))  # (not the build)
    print(json.dumps({"ms": round(ms[0], 1), "peak_mb": peak}))


def side_by_side(args, variants):
    """{label: (model, mode, env, isda_opts)} -> {label: {"ms": median, "peak_mb": median}}."""
    runs = in_processes({k: ([__file__, "_worker", "--model", model, "--mode", mode, "--size",
                              "x".join(map(str, args.size)), "--steps", args.steps, "--threads",
                              args.threads, "--isda-opts", *opts], env)
                         for k, (model, mode, env, opts) in variants.items()}, args.rounds)
    return {k: {f: statistics.median(r[f] for r in v) for f in ("ms", "peak_mb")}
            for k, v in runs.items()}


def run_compile(args, report):
    """Eager, then each part compiled in turn (cumulative), one model, same weights."""
    import torch

    model, fn = step(args, args.isda_opts)
    report["eager_ms"] = round(medians_ms({"": fn}, args.steps)[""], 1)
    for part in PARTS:
        setattr(model, part, torch.compile(getattr(model, part)))
        t0 = time.perf_counter()
        fn()  # compiles
        report[f"compile_s_{part}"] = round(time.perf_counter() - t0, 1)
        report[f"compiled_upto_{part}_ms"] = round(medians_ms({"": fn}, args.steps)[""], 1)
        print(f"  eager {report['eager_ms']} ms, + {part}: compile {report[f'compile_s_{part}']}"
              f" s, {report[f'compiled_upto_{part}_ms']} ms", flush=True)
    report["compiled_ratio"] = round(report["compiled_upto_backbone_ms"] / report["eager_ms"], 3)
    report["compile_s_total"] = round(sum(report[f"compile_s_{p}"] for p in PARTS), 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("compile", "checkpoint", "allocator", "_worker"),
                   help="the tool measured")
    p.add_argument("--model", default="r50", choices=("r50", "main", "maskrcnn"),
                   help="ISDA-R50, the main job's ISDA or Mask R-CNN R50-FPN (default r50)")
    p.add_argument("--mode", default="train", choices=("train", "infer"),
                   help="compile: which pass (default train); checkpoint: train;\n"
                        "allocator: both")
    p.add_argument("--size", default="800x1216", help="HxW of the R50 input")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--isda-opts", nargs="*", default=[], help="KEY VALUE overrides for ISDA")
    args = p.parse_args(argv)
    args.size = parse_size(args.size)
    set_threads(args.threads)
    if args.what == "_worker":
        return worker(args)
    import torch

    report = {"what": args.what, "model": args.model, "size": list(args.size),
              "threads": args.threads, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.what == "compile":
        report["mode"] = args.mode
        run_compile(args, report)
    elif args.what == "checkpoint":
        res = side_by_side(args, {
            "off": (args.model, "train", {}, args.isda_opts),
            "on": (args.model, "train", {},
                   [*args.isda_opts, "MODEL.ISDA.ENCODER_CHECKPOINT", "True"])})
        report.update({f"{k}_{f}": v[f] for k, v in res.items() for f in v})
        report["time_ratio"] = round(res["on"]["ms"] / res["off"]["ms"], 3)
        report["memory_ratio"] = round(res["on"]["peak_mb"] / res["off"]["peak_mb"], 3)
    else:
        missing = [a for a, env in ALLOCATORS.items()
                   if env and not os.path.exists(env["LD_PRELOAD"])]
        if missing:
            sys.exit(f"not installed: {missing} (apt-get install libjemalloc2 libtcmalloc-minimal4)")
        models = [args.model, "maskrcnn"] if args.model == "r50" else [args.model]
        for mode in ("train", "infer"):
            res = side_by_side(args, {f"{m}_{mode}_{a}": (m, mode, env, args.isda_opts)
                                      for m in models for a, env in ALLOCATORS.items()})
            for label, v in res.items():
                report[f"{label}_ms"], report[f"{label}_peak_mb"] = v["ms"], v["peak_mb"]
            for m in models:
                for a in ("jemalloc", "tcmalloc"):
                    ref, new = res[f"{m}_{mode}_glibc"], res[f"{m}_{mode}_{a}"]
                    report[f"{m}_{mode}_{a}_time_ratio"] = round(new["ms"] / ref["ms"], 3)
                    report[f"{m}_{mode}_{a}_mem_ratio"] = round(new["peak_mb"] / ref["peak_mb"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
