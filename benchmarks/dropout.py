#!/usr/bin/env python
"""ISDA's compiled CPU dropout against torch's, side by side on the encoder's activations.

    python benchmarks/dropout.py              # [20197, 1024] FFN hidden and [20197, 256] outputs
    python benchmarks/dropout.py --quick

Cases: ReLU + dropout of the FFN hidden state (torch: ``F.dropout(F.relu(x))``; ISDA: the fused
``relu_dropout``) and plain dropout of a residual branch, each forward only and forward +
backward, p = 0.1 (the paper's), alternating the implementations, median of ``--repeats``.
Outputs are written into fresh tensors, as in training. The last stdout line is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from isda.layers.dropout import dropout, fast_dropout_available, relu_dropout
    from isda.utils.cpu_allocator import keep_freed_memory

    keep_freed_memory()  # both implementations allocate their outputs alike

    tokens = 4096 if args.quick else 20197
    repeats = args.repeats or (5 if args.quick else 15)
    hidden = torch.randn(tokens, 1024, requires_grad=True)
    branch = torch.randn(tokens, 256, requires_grad=True)
    if not fast_dropout_available(hidden):
        raise SystemExit("isda._C has no dropout kernel: build it (pip install --no-build-isolation -e .)")
    cases = {
        "relu_dropout": (hidden, lambda x: F.dropout(F.relu(x), 0.1, True),
                         lambda x: relu_dropout(x, 0.1, True)),
        "dropout": (branch, lambda x: F.dropout(x, 0.1, True), lambda x: dropout(x, 0.1, True)),
    }
    report = {"tokens": tokens, "threads": args.threads, "repeats": repeats}
    for name, (x, torch_fn, isda_fn) in cases.items():
        grad = torch.randn_like(x)
        for mode in ("fwd", "fwdbwd"):
            def run(fn):
                if mode == "fwd":
                    with torch.no_grad():
                        fn(x)
                else:
                    torch.autograd.grad(fn(x), x, grad)

            times = {"torch": [], "isda": []}
            for i in range(repeats + 1):
                order = ("torch", "isda") if i % 2 == 0 else ("isda", "torch")
                for impl in order:
                    t0 = time.perf_counter()
                    run(torch_fn if impl == "torch" else isda_fn)
                    if i > 0:
                        times[impl].append(time.perf_counter() - t0)
            t_torch = statistics.median(times["torch"]) * 1e3
            t_isda = statistics.median(times["isda"]) * 1e3
            report[f"{name}_{mode}_torch_ms"] = round(t_torch, 2)
            report[f"{name}_{mode}_isda_ms"] = round(t_isda, 2)
            report[f"{name}_{mode}_speedup"] = round(t_torch / t_isda, 2)
            print(f"{name:13s} {mode:7s} torch {t_torch:8.2f} ms   isda {t_isda:8.2f} ms   "
                  f"speedup {t_torch / t_isda:5.2f}x", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
