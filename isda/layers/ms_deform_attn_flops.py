"""FLOP counting of multi-scale deformable attention for fvcore.

fvcore traces the custom autograd Function as the op ``prim::PythonOp.MSDeformAttnFunction``;
register :func:`ms_deform_attn_flop_jit` for it, e.g.
``FlopCountAnalysis(model, inputs).set_op_handle(**flop_count_handles())``.
"""
from typing import Any, Dict, List

__all__ = ["TRACED_OP_NAME", "ms_deform_attn_flop_jit", "flop_count_handles"]

#: Name under which ``torch.jit.trace`` (and hence fvcore) records the compiled op.
TRACED_OP_NAME = "prim::PythonOp.MSDeformAttnFunction"


def _shape(v) -> List[int]:
    t = v.type()
    sizes = t.sizes() if hasattr(t, "sizes") else None
    return list(sizes) if sizes is not None else []


def ms_deform_attn_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """fvcore handle for ``prim::PythonOp.MSDeformAttnFunction``.

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


def flop_count_handles() -> Dict[str, Any]:
    """``{TRACED_OP_NAME: ms_deform_attn_flop_jit}`` for ``FlopCountAnalysis.set_op_handle``."""
    return {TRACED_OP_NAME: ms_deform_attn_flop_jit}
