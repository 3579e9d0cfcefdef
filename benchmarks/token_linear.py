#!/usr/bin/env python
"""TokenLinear (oneDNN 1x1 convolution) against F.linear (MKL GEMM) on the encoder's shapes.

    python benchmarks/token_linear.py            # 20197 tokens (800x1216 input), 2 threads
    python benchmarks/token_linear.py --quick

For each of the encoder's layer shapes (256->1024, 1024->256, 256->256, 256->128): forward, and
forward + backward (input, weight and bias gradients), median of ``--repeats``, alternating the
two implementations. The last stdout line is one JSON object.
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

SHAPES = ((256, 1024), (1024, 256), (256, 256), (256, 128))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None)
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    from isda.layers.token_linear import _use_onednn, token_linear
    from isda.utils.cpu_allocator import keep_freed_memory

    keep_freed_memory()
    tokens = 4096 if args.quick else 20197
    repeats = args.repeats or (5 if args.quick else 11)
    report = {"tokens": tokens, "threads": args.threads, "repeats": repeats}
    g = torch.Generator().manual_seed(0)
    for c_in, c_out in SHAPES:
        x = torch.randn(tokens, c_in, generator=g, requires_grad=True)
        w = torch.randn(c_out, c_in, generator=g, requires_grad=True)
        b = torch.randn(c_out, generator=g, requires_grad=True)
        gy = torch.randn(tokens, c_out, generator=g)
        if not _use_onednn(x):
            raise SystemExit("oneDNN path unavailable (no mkldnn in this torch, or disabled)")
        impls = {"linear": F.linear, "token_linear": token_linear}
        for mode in ("fwd", "fwdbwd"):
            times = {k: [] for k in impls}
            for i in range(repeats + 2):
                for name in (list(impls) if i % 2 == 0 else list(impls)[::-1]):
                    fn = impls[name]
                    t0 = time.perf_counter()
                    if mode == "fwd":
                        with torch.no_grad():
                            fn(x, w, b)
                    else:
                        torch.autograd.grad(fn(x, w, b), [x, w, b], gy)
                    if i >= 2:
                        times[name].append(time.perf_counter() - t0)
            t_ref = statistics.median(times["linear"]) * 1e3
            t_new = statistics.median(times["token_linear"]) * 1e3
            key = f"{c_in}x{c_out}_{mode}"
            report[f"{key}_linear_ms"] = round(t_ref, 2)
            report[f"{key}_token_linear_ms"] = round(t_new, 2)
            report[f"{key}_speedup"] = round(t_ref / t_new, 2)
            print(f"{c_in:5d} -> {c_out:5d} {mode:7s} F.linear {t_ref:8.2f} ms   TokenLinear "
                  f"{t_new:8.2f} ms   speedup {t_ref / t_new:5.2f}x", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
