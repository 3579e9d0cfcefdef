#!/usr/bin/env python
"""The CPU forward of multi-scale deformable attention with a bf16 value (bf16 inference):
the value read as is, against a float32 copy made first (the path before the mixed form).

    python benchmarks/ms_deform_attn_bf16.py [--quick] [--threads 2] [--repeats N]

Encoder shape of an 800x1216 input (S = Lq = 20197, M = 8, D = 32, L = 4, P = 4), the
locations float32 and the attention weights bf16, as ``MODEL.ISDA.TEST.PRECISION bf16`` gives
them. Both forms give the same output bit for bit (checked). Last line: JSON with the medians
and ``speedup`` (float copy / as is).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import alternating_medians, layer_benchmark_args, report_pair  # noqa: E402


def main(argv=None):
    args = layer_benchmark_args(__doc__, argv)
    repeats = args.repeats or (5 if args.quick else 15)
    from ms_deform_attn import make_inputs
    from isda.layers.ms_deform_attn import load_extension

    if load_extension() is None:
        sys.exit("isda._C (torch.ops.isda.ms_deform_attn) is not built: pip install -e .")
    op = torch.ops.isda.ms_deform_attn
    value, shapes, starts, loc, attn, _ = make_inputs("encoder", 1, False)
    value, attn = value.to(torch.bfloat16), attn.to(torch.bfloat16)

    def float_copy():  # what the op did with a bf16 value before: cast, then the float kernel
        return op(value.float(), shapes, starts, loc, attn.float())

    def as_is():
        return op(value, shapes, starts, loc, attn.float())

    same = torch.equal(float_copy(), as_is())
    times = alternating_medians({"float_copy": float_copy, "as_is": as_is}, repeats)
    report = {"threads": args.threads, "repeats": repeats, "bit_identical": same}
    report_pair(report, "encoder_forward", times, "float_copy", "as_is",
                f"encoder forward, bf16 value (same output: {same})")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
