#!/usr/bin/env python
"""What ``MODEL.CPU_FAST_PATHS`` buys ISDA-R50 on the CPU: training step and inference with the
fast paths on and off, side by side.

    python benchmarks/cpu_fast_paths.py [--size 800x1216] [--threads 2] [--repeats 3]

Layers (TokenLinear + compiled dropout): the converted model and its plain twin (same weights,
:func:`isda.cpu_fast_paths.convert_to_plain`) alternate in one process, medians of the repeats.
The allocator policy is process-wide, so its share is measured apart: the plain model's training
step in fresh processes with ``ISDA_CPU_ALLOCATOR=keep`` and ``=system``, alternated.
Last stdout line: JSON with ``train_speedup`` / ``infer_speedup`` (all fast paths: plain model,
system allocator / fast model, kept memory) and the parts.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from r50_models import (build, build_cfg, infer, make_input, parse_size,  # noqa: E402
                        set_threads, train_step)
from side_by_side import alternating_medians  # noqa: E402


def child_train_ms(size, threads, repeats):
    """Median training-step ms of the plain model in this process (the allocator policy comes
    from ISDA_CPU_ALLOCATOR, applied before the model is built)."""
    from isda.cpu_fast_paths import convert_to_plain
    from isda.utils.cpu_allocator import apply_allocator_policy

    set_threads(threads)
    apply_allocator_policy()
    model, opt = build("isda")
    convert_to_plain(model)
    sample = make_input(*size)
    times = alternating_medians({"plain": lambda: train_step(model, opt, sample)}, repeats)
    return times["plain"]


def allocator_ms(args):
    """{policy: median ms} of the plain model's training step, fresh processes alternated."""
    runs = {"keep": [], "system": []}
    for i in range(2):
        for policy in (("keep", "system") if i % 2 == 0 else ("system", "keep")):
            env = dict(os.environ, ISDA_CPU_ALLOCATOR=policy)
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--size", args.size, "--threads",
                 str(args.threads), "--repeats", str(args.repeats)],
                env=env, capture_output=True, text=True, check=True)
            runs[policy].append(json.loads(out.stdout.strip().splitlines()[-1])["train_ms"])
    return {p: statistics.median(v) for p, v in runs.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="800x1216", help="input height x width")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per variant")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    if args.child:
        print(json.dumps({"train_ms": child_train_ms(size, args.threads, args.repeats)}))
        return

    from isda.cpu_fast_paths import convert_to_plain, fast_path_modules
    from isda.solver import build_isda_optimizer

    set_threads(args.threads)
    fast, fast_opt = build("isda")  # MODEL.CPU_FAST_PATHS is on by default: converted
    assert fast_path_modules(fast), "the default build should hold the CPU fast paths"
    plain = convert_to_plain(copy.deepcopy(fast))
    plain_opt = build_isda_optimizer(build_cfg("isda"), plain)
    sample = make_input(*size)
    infer_ms = alternating_medians({"plain": lambda: infer(plain, sample),
                                    "fast": lambda: infer(fast, sample)}, args.repeats + 2)
    print(f"inference  plain {infer_ms['plain']:.0f} ms  fast {infer_ms['fast']:.0f} ms", flush=True)
    train_ms = alternating_medians({"plain": lambda: train_step(plain, plain_opt, sample),
                                    "fast": lambda: train_step(fast, fast_opt, sample)},
                                   args.repeats)
    print(f"training   plain {train_ms['plain']:.0f} ms  fast {train_ms['fast']:.0f} ms", flush=True)
    alloc = allocator_ms(args)
    print(f"allocator (plain model, training)  system {alloc['system']:.0f} ms  "
          f"keep {alloc['keep']:.0f} ms", flush=True)
    layers_train = train_ms["plain"] / train_ms["fast"]
    alloc_train = alloc["system"] / alloc["keep"]
    report = {
        "size": list(size), "threads": args.threads, "repeats": args.repeats,
        "infer_plain_ms": round(infer_ms["plain"], 1), "infer_fast_ms": round(infer_ms["fast"], 1),
        "train_plain_ms": round(train_ms["plain"], 1), "train_fast_ms": round(train_ms["fast"], 1),
        "train_plain_system_alloc_ms": round(alloc["system"], 1),
        "train_plain_keep_alloc_ms": round(alloc["keep"], 1),
        "layers_train_speedup": round(layers_train, 3),
        "allocator_train_speedup": round(alloc_train, 3),
        "train_speedup": round(layers_train * alloc_train, 3),
        "infer_speedup": round(infer_ms["plain"] / infer_ms["fast"], 3),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
