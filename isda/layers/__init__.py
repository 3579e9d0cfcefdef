"""ISDA layers: multi-scale deformable attention (compiled op with a pure-PyTorch fallback)."""
from .ms_deform_attn import (
    MSDeformAttn,
    MSDeformAttnFunction,
    flop_count_handles,
    ms_deform_attn,
    ms_deform_attn_flop_jit,
    ms_deform_attn_reference,
    set_backend,
)

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnFunction",
    "flop_count_handles",
    "ms_deform_attn",
    "ms_deform_attn_flop_jit",
    "ms_deform_attn_reference",
    "set_backend",
]
