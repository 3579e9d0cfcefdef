#!/usr/bin/env python
"""What one ISDA-R50 encoder layer keeps for the backward pass, and its training time: the
current layer against the previous composition, side by side.

    python benchmarks/encoder_layer_memory.py            # 800x1216 levels (20197 tokens), 2 threads
    python benchmarks/encoder_layer_memory.py --quick

"current" is ``DeformableEncoderLayer.forward`` as shipped: the attention's query passed as
``src`` + ``query_pos`` (the sum is not kept), post-norms that keep their output, the compiled
dropout regenerating its mask from the seed, the FFN recomputing its hidden state. "previous"
is the composition before these changes, written out here with the same modules: the summed
query, ``nn.LayerNorm`` (keeps its input), the compiled dropout keeping its uint8 mask (the FFN
recomputation is common to both). Both in training mode with ``MODEL.CPU_FAST_PATHS`` modules.
Reported: MB kept per layer (unique storages seen by saved-tensor hooks, parameters and the
layer's inputs excluded) and the median forward + backward time, the two alternating. The last
stdout line is one JSON object.
"""
import json
import sys
from pathlib import Path

import torch
from torch.autograd import Function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from side_by_side import alternating_medians, layer_benchmark_args, report_pair  # noqa: E402

LEVELS_800x1216 = [(100, 152), (50, 76), (25, 38), (13, 19)]
LEVELS_QUICK = [(50, 76), (25, 38), (13, 19), (7, 10)]


class _MaskKeepingDropout(Function):
    """The compiled dropout as it was: the uint8 mask kept for the backward pass."""

    @staticmethod
    def forward(ctx, x, p):
        from isda.layers.dropout import _draw_seed, _extension

        out, mask = _extension().dropout_forward(x, p, _draw_seed(), False)
        ctx.save_for_backward(mask)
        ctx.scale = 1.0 / (1.0 - p)
        return out

    @staticmethod
    def backward(ctx, grad):
        from isda.layers.dropout import _extension

        (mask,) = ctx.saved_tensors
        return _extension().dropout_backward(grad, mask, ctx.scale), None


def previous_forward(layer, src, pos, ref, shapes, starts):
    """The encoder layer's forward before the memory changes (same modules and math)."""
    from isda.modeling.transformer_blocks import feed_forward

    p = layer.dropout1.p
    src2 = layer.self_attn(src + pos, ref, src, shapes, starts, None)
    src = layer.norm1(src + _MaskKeepingDropout.apply(src2, p))
    src2 = feed_forward(src, layer.linear1, layer.activation_dropout, layer.linear2)
    return layer.norm2(src + _MaskKeepingDropout.apply(src2, p))


def current_forward(layer, src, pos, ref, shapes, starts):
    return layer(src, pos, ref, shapes, starts, None)


def kept_mb(fn, layer, inputs):
    """MB of the unique storages the autograd graph of ``fn`` keeps (parameters and the
    layer's inputs excluded)."""
    exclude = {t.untyped_storage().data_ptr() for t in list(layer.parameters()) + list(inputs)}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(layer, *inputs)
    del out
    return sum(seen.values()) / 2 ** 20


def main(argv=None):
    args = layer_benchmark_args(__doc__, argv)
    from isda.cpu_fast_paths import convert_to_cpu_fast_paths
    from isda.layers.dropout import fast_dropout_available
    from isda.modeling.deformable_encoder import DeformableEncoderLayer, encoder_reference_points

    levels = LEVELS_QUICK if args.quick else LEVELS_800x1216
    repeats = args.repeats or (5 if args.quick else 11)
    torch.manual_seed(0)
    layer = convert_to_cpu_fast_paths(DeformableEncoderLayer(256, 1024, 0.1), allocator=False)
    layer.train()
    tokens = sum(h * w for h, w in levels)
    shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    ref = encoder_reference_points(shapes, torch.ones(1, len(levels), 2))
    src = torch.randn(1, tokens, 256, requires_grad=True)
    pos = torch.randn(1, tokens, 256, requires_grad=True)
    if not fast_dropout_available(src):
        raise SystemExit("the compiled dropout (isda._dropout) is not built: run make setup")
    inputs = (src, pos, ref, shapes, starts)
    report = {"tokens": tokens, "threads": args.threads, "repeats": repeats}
    impls = {"previous": previous_forward, "current": current_forward}
    for name, fn in impls.items():
        report[f"{name}_kept_mb"] = round(kept_mb(fn, layer, inputs), 1)
    grad = torch.randn(1, tokens, 256)

    def step(fn):
        out = fn(layer, *inputs)
        torch.autograd.backward(out, grad)
        layer.zero_grad(set_to_none=True)
        src.grad = pos.grad = None

    med = alternating_medians({k: (lambda f=f: step(f)) for k, f in impls.items()}, repeats,
                              warmup=2)
    report_pair(report, "fwdbwd", med, "previous", "current",
                f"encoder layer forward + backward ({tokens} tokens)")
    report["kept_ratio"] = round(report["current_kept_mb"] / report["previous_kept_mb"], 3)
    print(f"kept per layer: previous {report['previous_kept_mb']} MB, current "
          f"{report['current_kept_mb']} MB", flush=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
