#!/usr/bin/env python
"""ISDA's compiled CPU dropout against torch's, side by side on the encoder's activations.

    python benchmarks/dropout.py              # [20197, 1024] FFN hidden and [20197, 256] outputs
    python benchmarks/dropout.py --quick

Cases: ReLU + dropout of the FFN hidden state (torch: ``F.dropout(F.relu(x))``; ISDA: the fused
``relu_dropout``) and plain dropout of a residual branch, each forward only and forward +
backward, p = 0.1 (the paper's), alternating the implementations, median of ``--repeats``.
Outputs are written into fresh tensors, as in training. A third case times what the
feed-forward block's backward pass does with the recomputed hidden state and the hidden
state's gradient: before, the mask rebuilt from the seed (``dropout_mask``), then
``mul_(mask).mul_(scale)`` on each (the uint8 mask promoted to float in a temporary copy);
now ``dropout_forward_`` and ``dropout_backward_`` in place ("ffn_backward", on fresh copies
of both tensors in either form). The last stdout line is one JSON object.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from side_by_side import alternating_medians, layer_benchmark_args, report_pair  # noqa: E402


def main(argv=None):
    args = layer_benchmark_args(__doc__, argv)
    from isda.layers.dropout import _extension, dropout, fast_dropout_available, relu_dropout

    tokens = 4096 if args.quick else 20197
    repeats = args.repeats or (5 if args.quick else 15)
    hidden = torch.randn(tokens, 1024, requires_grad=True)
    branch = torch.randn(tokens, 256, requires_grad=True)
    if not fast_dropout_available(hidden):
        raise SystemExit("the optional isda._dropout extension is not built: build it (pip install --no-build-isolation -e .)")
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

            med = alternating_medians({"torch": lambda: run(torch_fn), "isda": lambda: run(isda_fn)},
                                      repeats)
            report_pair(report, f"{name}_{mode}", med, "torch", "isda", f"{name:13s} {mode:7s}")
    ext = _extension()
    h0, g0, p, seed = hidden.detach(), torch.randn_like(hidden), 0.1, 12345

    def mask_then_multiply():
        h, g = h0.clone(), g0.clone()
        mask = ext.dropout_mask(h, p, seed, True)
        h.mul_(mask).mul_(1 / (1 - p))
        g.mul_(mask).mul_(1 / (1 - p))

    def in_place():
        h, g = h0.clone(), g0.clone()
        mask = ext.dropout_forward_(h, p, seed, True)
        ext.dropout_backward_(g, mask, 1 / (1 - p))

    med = alternating_medians({"mask_then_mul": mask_then_multiply, "in_place": in_place}, repeats)
    report_pair(report, "ffn_backward", med, "mask_then_mul", "in_place", "ffn_backward         ")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
