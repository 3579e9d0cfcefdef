#!/usr/bin/env python
"""What torch's own tools give ISDA on the CPU, each side by side with the plain eager model in
one run (last stdout line JSON):

    python benchmarks/torch_tools.py compile      # torch.compile (inductor) per part, eager vs compiled
    python benchmarks/torch_tools.py checkpoint   # MODEL.ISDA.ENCODER_CHECKPOINT off / on
    python benchmarks/torch_tools.py allocator    # glibc / jemalloc / tcmalloc preloaded, ISDA and Mask R-CNN
    python benchmarks/torch_tools.py allocator --size 512x768 --steps 3   # shorter

Models: ``--model r50`` is ISDA-R50 (configs/Base-ISDA.yaml, 80 classes, batch 1, default size
800x1216), ``--model main`` the main job's small ISDA (configs/nuclei/isda_R18_nuclei.yaml,
batch 8 at 176x176). Times are medians over ``--steps`` steps after one warm-up step; memory is
the peak RSS (VmHWM) a fresh process adds over its RSS once model, optimizer and input exist.
The allocators are Debian's ``libjemalloc2`` (with the settings Intel publishes for PyTorch) and
``libtcmalloc-minimal4``, preloaded with LD_PRELOAD exactly as docs/benchmarks.md shows.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIB = "/usr/lib/x86_64-linux-gnu"
#: LD_PRELOAD / environment of each allocator (Intel's jemalloc settings for PyTorch)
ALLOCATORS = {
    "glibc": {},
    "jemalloc": {"LD_PRELOAD": f"{LIB}/libjemalloc.so.2",
                 "MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                                "dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000"},
    "tcmalloc": {"LD_PRELOAD": f"{LIB}/libtcmalloc_minimal.so.4"},
}
PARTS = ("encoder", "decoder", "mask_head", "backbone")


def build(model_name, isda_opts=()):
    """-> (model, optimizer, batch: list of input dicts with instances)."""
    import torch
    from isda_vs_maskrcnn import build as build_r50
    from isda_vs_maskrcnn import make_input

    if model_name in ("r50", "maskrcnn"):
        model, opt = build_r50("isda" if model_name == "r50" else "maskrcnn", isda_opts=isda_opts)
        return model, opt, None
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import isda
    from isda.solver import build_isda_optimizer

    torch.manual_seed(0)
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(HERE.parent / "configs/nuclei/isda_R18_nuclei.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *isda_opts])
    model = build_model(cfg).eval()
    batch = [make_input(176, 176, seed=i, num_objects=12) for i in range(8)]
    for b in batch:
        b["instances"].gt_classes.zero_()
    return model, build_isda_optimizer(cfg, model), batch


def step_fn(model_name, mode, model, opt, batch, size):
    from isda_vs_maskrcnn import infer, make_input, train_step

    if batch is None:
        batch = [make_input(*size)]
    if mode == "infer":
        import torch

        def run():
            with torch.no_grad():
                model([{k: b[k] for k in ("image", "height", "width")} for b in batch])
        return run
    if len(batch) == 1:
        return lambda: train_step(model, opt, batch[0])
    return lambda: _train_batch(model, opt, batch)


def _train_batch(model, opt, batch):
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0):
        loss = sum(model(batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()


def median_ms(fn, steps):
    fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def worker(args):
    """One (model, pass, options) measurement in this fresh process -> JSON line."""
    model, opt, batch = build(args.model, args.isda_opts)
    fn = step_fn(args.model, args.mode, model, opt, batch, args.size)
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the build does not count
        f.write("5")
    base = rss_kb("VmRSS")
    ms = median_ms(fn, args.steps)
    print(json.dumps({"ms": round(ms, 1), "peak_mb": round((rss_kb("VmHWM") - base) / 1024, 1)}))


def in_subprocess(args, model, mode, env=None, isda_opts=()):
    cmd = [sys.executable, __file__, "_worker", "--model", model, "--mode", mode,
           "--size", f"{args.size[0]}x{args.size[1]}", "--steps", str(args.steps),
           "--threads", str(args.threads), "--isda-opts", *isda_opts]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env={**os.environ, **(env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])


def side_by_side(args, variants):
    """variants: {label: (model, mode, env, isda_opts)}, run in fresh processes, the order
    reversed every other round; -> {label: {"ms": median, "peak_mb": median}}."""
    runs = {k: [] for k in variants}
    labels = list(variants)
    for i in range(args.rounds):
        for label in (labels if i % 2 == 0 else labels[::-1]):
            runs[label].append(in_subprocess(args, *variants[label]))
            print(f"  round {i + 1} {label}: {runs[label][-1]}", flush=True)
    return {k: {f: statistics.median(r[f] for r in v) for f in ("ms", "peak_mb")}
            for k, v in runs.items()}


def run_compile(args, report):
    """Eager, then each part compiled in turn (cumulative), one model, same weights."""
    import torch

    model, opt, batch = build(args.model, args.isda_opts)
    fn = step_fn(args.model, args.mode, model, opt, batch, args.size)
    report["eager_ms"] = round(median_ms(fn, args.steps), 1)
    print(f"  eager {report['eager_ms']} ms", flush=True)
    for part in PARTS:
        setattr(model, part, torch.compile(getattr(model, part)))
        t0 = time.perf_counter()
        fn()  # compiles
        report[f"compile_s_{part}"] = round(time.perf_counter() - t0, 1)
        report[f"compiled_upto_{part}_ms"] = round(median_ms(fn, args.steps), 1)
        print(f"  + {part}: compile {report[f'compile_s_{part}']} s, "
              f"{report[f'compiled_upto_{part}_ms']} ms", flush=True)
    report["compiled_ratio"] = round(report["compiled_upto_backbone_ms"] / report["eager_ms"], 3)
    report["compile_s_total"] = round(sum(report[f"compile_s_{p}"] for p in PARTS), 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("compile", "checkpoint", "allocator", "_worker"))
    p.add_argument("--model", default="r50", choices=("r50", "main", "maskrcnn"))
    p.add_argument("--mode", default=None, choices=("train", "infer"),
                   help="compile: which pass (default train); others measure both")
    p.add_argument("--size", default="800x1216", help="HxW of the R50 input")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isda-opts", nargs="*", default=[])
    args = p.parse_args(argv)
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    if args.what == "_worker":
        return worker(args)
    report = {"what": args.what, "model": args.model, "size": list(args.size),
              "threads": args.threads, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if args.what == "compile":
        args.mode = args.mode or "train"
        report["mode"] = args.mode
        run_compile(args, report)
    elif args.what == "checkpoint":
        for mode in ("train",):
            res = side_by_side(args, {
                "off": (args.model, mode, None, args.isda_opts),
                "on": (args.model, mode, None,
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
            variants = {f"{m}_{mode}_{a}": (m, mode, env, args.isda_opts)
                        for m in models for a, env in ALLOCATORS.items()}
            res = side_by_side(args, variants)
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
