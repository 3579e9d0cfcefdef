"""FLOP counting of ISDA's attention ops for fvcore (multiply-adds, fvcore's convention).

fvcore traces the compiled op as ``isda::ms_deform_attn``
and the decoder's self-attention as ``aten::scaled_dot_product_attention``, neither of which it
counts by itself: register the handles of :func:`flop_count_handles`, e.g.
``FlopCountAnalysis(model, inputs).set_op_handle(**flop_count_handles())``.
"""
from typing import Any, Dict, List

__all__ = ["TRACED_OP_NAME", "ms_deform_attn_flop_jit", "sdpa_flop_jit", "flop_count_handles"]

#: Name under which ``torch.jit.trace`` (and hence fvcore) records the compiled op.
TRACED_OP_NAME = "isda::ms_deform_attn"


def _shape(v) -> List[int]:
    t = v.type()
    sizes = t.sizes() if hasattr(t, "sizes") else None
    return list(sizes) if sizes is not None else []


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``isda::ms_deform_attn``.

    Counts multiply-adds (fvcore's convention): per sample point and channel, 4 for the bilinear
    corners plus 1 for the attention weight, i.e. ``5 * N * Lq * M * L * P * D``.
    Inputs are (value, spatial_shapes, level_start_index, sampling_locations, attention_weights).
    """
    value_shape = _shape(inputs[0])
    loc_shape = _shape(inputs[3])
    if len(value_shape) != 4 or len(loc_shape) != 6:
        return 0
    N, _, M, D = value_shape
    _, Lq, _, L, P, _ = loc_shape
    return 5 * N * Lq * M * L * P * D


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: the query-key and
    attention-value products, q [.., L, E], k [.., S, E], v [.., S, Ev] -> ``B L S (E + Ev)``."""
    q, k, v = (_shape(inputs[i]) for i in range(3))
    batch = 1
    for d in q[:-2]:
        batch *= d
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def flop_count_handles() -> Dict[str, Any]:
    """fvcore op handles of the deformable attention op and scaled-dot-product attention, for
    ``FlopCountAnalysis.set_op_handle``."""
    return {TRACED_OP_NAME: ms_deform_attn_flop_jit,
            "aten::scaled_dot_product_attention": sdpa_flop_jit}
