#!/usr/bin/env python
"""TokenLinear (oneDNN 1x1 convolution) against F.linear (MKL GEMM) on the encoder's shapes.

    python benchmarks/token_linear.py            # 20197 tokens (800x1216 input), 2 threads
    python benchmarks/token_linear.py --quick

For each of the encoder's layer shapes (256->1024, 1024->256, 256->256, 256->128): forward, and
forward + backward (input, weight and bias gradients), median of ``--repeats``, alternating the
implementations. Forward + backward also times the convolution's own autograd
(``conv_backward``: oneDNN's convolution backward, TokenLinear's backward before it computed
the input gradient as a oneDNN product with the transposed weight and the weight gradient as
one ``mm``). The last stdout line is one JSON object.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from side_by_side import alternating_medians, layer_benchmark_args, report_pair  # noqa: E402

SHAPES = ((256, 1024), (1024, 256), (256, 256), (256, 128))


def main(argv=None):
    args = layer_benchmark_args(__doc__, argv)
    from isda.layers.token_linear import _onednn_linear, _use_onednn, token_linear

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
        for mode in ("fwd", "fwdbwd"):
            impls = {"linear": F.linear, "token_linear": token_linear}
            if mode == "fwdbwd":
                impls["conv_backward"] = _onednn_linear
            def run(fn, mode=mode, x=x, w=w, b=b, gy=gy):
                if mode == "fwd":
                    with torch.no_grad():
                        fn(x, w, b)
                else:
                    torch.autograd.grad(fn(x, w, b), [x, w, b], gy)

            med = alternating_medians({k: (lambda f=f: run(f)) for k, f in impls.items()},
                                      repeats, warmup=2)
            report_pair(report, f"{c_in}x{c_out}_{mode}", med, "linear", "token_linear",
                        f"{c_in:5d} -> {c_out:5d} {mode:7s}")
            if mode == "fwdbwd":
                report_pair(report, f"{c_in}x{c_out}_{mode}_vs_conv", med, "conv_backward",
                            "token_linear", f"{c_in:5d} -> {c_out:5d} {mode:7s}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
