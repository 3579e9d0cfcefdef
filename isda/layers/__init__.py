"""ISDA layers: multi-scale deformable attention (compiled op with a pure-PyTorch fallback).

The op function lives in the submodule (``isda.layers.ms_deform_attn.ms_deform_attn``); it is not
re-exported here so that ``isda.layers.ms_deform_attn`` keeps naming the submodule.
"""
from .ms_deform_attn import (
    MSDeformAttn,
    flop_count_handles,
    ms_deform_attn_flop_jit,
    ms_deform_attn_reference,
    set_backend,
)

__all__ = [
    "MSDeformAttn",
    "flop_count_handles",
    "ms_deform_attn_flop_jit",
    "ms_deform_attn_reference",
    "set_backend",
]
