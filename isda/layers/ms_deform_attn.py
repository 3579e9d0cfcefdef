"""Multi-scale deformable attention (Deformable DETR's op and module).

Shapes (the contract shared with Deformable DETR):

* ``value``              ``[N, S, M, D]``      S = sum_l H_l * W_l, M heads, D channels per head
* ``spatial_shapes``     ``[L, 2]`` int64      (H_l, W_l) per level
* ``level_start_index``  ``[L]`` int64         exclusive cumsum of H_l * W_l
* ``sampling_locations`` ``[N, Lq, M, L, P, 2]`` normalised (x, y) in [0, 1]
* ``attention_weights``  ``[N, Lq, M, L, P]``
* output                 ``[N, Lq, M * D]``

Sampling is bilinear with zero padding and ``align_corners=False`` (pixel centres at +0.5),
exactly ``F.grid_sample(value_l, 2 * loc - 1, "bilinear", "zeros", align_corners=False)``.

Two implementations: the compiled extension ``isda._C`` (CPU, and CUDA when built with it) and
the pure-PyTorch :func:`ms_deform_attn_reference`. :func:`ms_deform_attn` picks one according to
the backend switch (:func:`set_backend` or the ``ISDA_MSDA_BACKEND`` environment variable:
``auto`` | ``compiled`` | ``reference``). With ``auto`` a missing extension, or a CUDA tensor with
an extension built without CUDA, falls back to the reference with a single warning.

Validation and device-to-host copies: every call checks the inputs' types, dtypes, devices and
shapes (tensor metadata, free on any device). The checks that need the *values* of
``spatial_shapes`` and ``level_start_index`` (non-negative sizes summing to S, starts equal to the
exclusive cumsum) run on CPU tensors only: on the GPU they would copy to the host and synchronise
every call. The compiled CUDA path therefore makes no device-to-host copy (checked by
``tests/test_gpu.py``). Wrong level metadata on the GPU makes the kernels read out of bounds, so
to debug, turn the value checks on for every device with ``ISDA_MSDA_VALIDATE=1`` or
:func:`set_validation` (``set_validation(True)``, or ``with set_validation(True): ...``). The
reference implementation needs the level sizes on the host anyway (one copy per call).

FLOP counting: fvcore traces the custom autograd Function as the op
``prim::PythonOp.MSDeformAttnFunction``; register :func:`ms_deform_attn_flop_jit` for it, e.g.
``FlopCountAnalysis(model, inputs).set_op_handle(**flop_count_handles())``.
"""
import math
import os
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .token_linear import TokenLinear

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnFunction",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "set_backend",
    "get_backend",
    "set_validation",
    "get_validation",
    "compiled_available",
    "ms_deform_attn_flop_jit",
    "flop_count_handles",
    "TRACED_OP_NAME",
]

#: Name under which ``torch.jit.trace`` (and hence fvcore) records the compiled op.
TRACED_OP_NAME = "prim::PythonOp.MSDeformAttnFunction"

_BACKENDS = ("auto", "compiled", "reference")
_backend = os.environ.get("ISDA_MSDA_BACKEND", "auto").strip().lower() or "auto"
if _backend not in _BACKENDS:
    warnings.warn(f"ISDA_MSDA_BACKEND={_backend!r} is not one of {_BACKENDS}; using 'auto'")
    _backend = "auto"
_warned_fallback = False


# --------------------------------------------------------------------------------------------
# backend switch
# --------------------------------------------------------------------------------------------
class set_backend:
    """Select the implementation: ``"auto"`` (compiled if usable, else reference),
    ``"compiled"`` (error if unusable) or ``"reference"``.

    Takes effect immediately; used as a context manager it restores the previous backend on exit::

        with set_backend("reference"):
            out = attn(...)
    """

    def __init__(self, name: str):
        global _backend
        name = str(name).strip().lower()
        if name not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
        self.previous = _backend
        _backend = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _backend
        _backend = self.previous
        return False


def get_backend() -> str:
    """The current backend name (``auto``, ``compiled`` or ``reference``)."""
    return _backend


def _load_extension():
    try:
        from isda import _C
    except ImportError:
        return None
    if not hasattr(_C, "ms_deform_attn_forward"):
        return None
    return _C


def compiled_available(device: Any = "cpu") -> bool:
    """Whether the compiled op can run on ``device``."""
    ext = _load_extension()
    if ext is None:
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return bool(ext.has_cuda())
    return False


def _use_compiled(device: torch.device) -> bool:
    global _warned_fallback
    if _backend == "reference":
        return False
    usable = compiled_available(device)
    if _backend == "compiled":
        if not usable:
            raise RuntimeError(
                f"ISDA's compiled deformable attention is not available for device {device}: "
                "build it with `pip install --no-build-isolation -e .` (see docs/troubleshooting.md)"
            )
        return True
    if not usable and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"ISDA's compiled deformable attention is unavailable for device {device}; falling back "
            "to the slower pure-PyTorch grid_sample implementation (see docs/troubleshooting.md)."
        )
    return usable


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
_validate_values = os.environ.get("ISDA_MSDA_VALIDATE", "0").strip().lower() in (
    "1", "true", "yes", "on")


class set_validation:
    """Check the values of ``spatial_shapes``/``level_start_index`` on every device (``True``,
    a debug switch: a device-to-host copy per call on the GPU) or on CPU tensors only (``False``,
    the default unless ``ISDA_MSDA_VALIDATE=1``). Shape, dtype and device checks always run.

    Takes effect immediately; used as a context manager it restores the previous setting on exit.
    """

    def __init__(self, enabled: bool = True):
        global _validate_values
        self.previous = _validate_values
        _validate_values = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _validate_values
        _validate_values = self.previous
        return False


def get_validation() -> bool:
    """Whether the value checks also run on non-CPU tensors (see :class:`set_validation`)."""
    return _validate_values


def _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Check shapes, dtypes and devices; raise ValueError naming the offending argument.

    The level metadata's values are checked on CPU tensors, elsewhere only when
    :func:`get_validation` is on (they would need a device-to-host copy)."""
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("value", "sampling_locations", "attention_weights"):
        if not named[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {named[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        t = named[name]
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}; "
                             "all inputs must be on the same device")
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [L, 2], got shape {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if level_start_index.shape != (L,):
        raise ValueError(f"level_start_index must be [L] = [{L}] (L from spatial_shapes), "
                         f"got shape {tuple(level_start_index.shape)}")
    N, S, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be [N, Lq, M, L, P, 2], got shape "
                         f"{tuple(sampling_locations.shape)}")
    n, lq, m, l, p, _ = sampling_locations.shape
    if (n, m, l) != (N, M, L):
        raise ValueError(f"sampling_locations shape {tuple(sampling_locations.shape)} does not match "
                         f"N={N}, M={M} of value and L={L} of spatial_shapes")
    if attention_weights.shape != (n, lq, m, l, p):
        raise ValueError(f"attention_weights must be [N, Lq, M, L, P] = {[n, lq, m, l, p]}, got "
                         f"shape {tuple(attention_weights.shape)}")
    if value.device.type != "cpu" and not _validate_values:
        return
    shapes = spatial_shapes.detach().cpu().to(torch.int64)
    if (shapes < 0).any():
        raise ValueError(f"spatial_shapes must be non-negative, got {shapes.tolist()}")
    sizes = shapes[:, 0] * shapes[:, 1]
    if int(sizes.sum()) != S:
        raise ValueError(f"value has S={S} positions but spatial_shapes {shapes.tolist()} sums "
                         f"to {int(sizes.sum())}")
    expected = torch.cumsum(sizes, 0) - sizes
    if not torch.equal(level_start_index.detach().cpu().to(torch.int64), expected):
        raise ValueError(f"level_start_index {level_start_index.tolist()} must be the exclusive "
                         f"cumsum of H*W, i.e. {expected.tolist()}")


def _dtypes(value, sampling_locations, attention_weights):
    """(output dtype, compute dtype): the promoted float type; half/bfloat16 compute in float32."""
    out = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                              attention_weights.dtype)
    compute = torch.float32 if out in (torch.float16, torch.bfloat16) else out
    return out, compute


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights):
    """Pure-PyTorch multi-scale deformable attention with ``F.grid_sample``.

    value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L],
    sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D].
    """
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype, _ = _dtypes(value, sampling_locations, attention_weights)
    value = value.to(out_dtype)
    sampling_locations = sampling_locations.to(out_dtype)
    attention_weights = attention_weights.to(out_dtype)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    shapes = spatial_shapes.detach().cpu().tolist()
    starts = level_start_index.detach().cpu().tolist()
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    sampled = []
    for lvl, ((H, W), start) in enumerate(zip(shapes, starts)):
        # [N, H*W, M, D] -> [N*M, D, H, W]
        value_l = value[:, start:start + H * W].permute(0, 2, 3, 1).reshape(N * M, D, H, W)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    # [N*M, D, Lq, L*P] weighted by [N*M, 1, Lq, L*P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * P)
    out = (stacked * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------
# compiled op
# --------------------------------------------------------------------------------------------
class MSDeformAttnFunction(Function):
    """Autograd wrapper of ``isda._C.ms_deform_attn_forward/backward`` (first order only)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        ext = _load_extension()
        out_dtype, compute = _dtypes(value, sampling_locations, attention_weights)
        ctx.in_dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        # half/bfloat16 are upcast here (the extension would do it too) so the saved tensors
        # are ready for the backward; results are cast back to the promoted input dtype.
        value_c = value.to(compute).contiguous()
        loc_c = sampling_locations.to(compute).contiguous()
        attn_c = attention_weights.to(compute).contiguous()
        shapes = spatial_shapes.to(torch.int64).contiguous()
        starts = level_start_index.to(torch.int64).contiguous()
        out = ext.ms_deform_attn_forward(value_c, shapes, starts, loc_c, attn_c)
        ctx.save_for_backward(value_c, shapes, starts, loc_c, attn_c)
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        ext = _load_extension()
        value_c, shapes, starts, loc_c, attn_c = ctx.saved_tensors
        grad_output = grad_output.to(value_c.dtype).contiguous()
        grad_value, grad_loc, grad_attn = ext.ms_deform_attn_backward(
            value_c, shapes, starts, loc_c, attn_c, grad_output)
        dv, dl, da = ctx.in_dtypes
        return grad_value.to(dv), None, None, grad_loc.to(dl), grad_attn.to(da)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    """Multi-scale deformable attention, dispatched to the compiled op or the reference.

    value [N, S, M, D], spatial_shapes [L, 2] int64, level_start_index [L] int64,
    sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D].
    """
    _validate(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _use_compiled(value.device):
        return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
                                          sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)


# --------------------------------------------------------------------------------------------
# FLOP count for fvcore
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------
class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (Deformable DETR parameterisation and init).

    Args:
        d_model: hidden size C (must be divisible by ``n_heads``).
        n_levels: number of feature levels L.
        n_heads: number of heads M.
        n_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = TokenLinear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = TokenLinear(d_model, n_heads * n_levels * n_points)
        self.value_proj = TokenLinear(d_model, d_model)
        self.output_proj = TokenLinear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start on a ring of n_heads directions (on the unit square's border), the p-th
        # point at distance p+1 pixels, identical for every level.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None):
        """
        Args:
            query: [N, Lq, C].
            reference_points: [N, Lq, L, 2] normalised (x, y) in [0, 1] (top-left (0, 0)), or
                [N, Lq, L, 4] boxes (cx, cy, w, h); offsets are then relative to half the box size.
            input_flatten: [N, S, C] flattened multi-level features.
            input_spatial_shapes: [L, 2] int64 (H, W).
            input_level_start_index: [L] int64.
            input_padding_mask: optional [N, S] bool, True at padding (those values are zeroed).
        Returns:
            [N, Lq, C].
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, M, self.d_model // M)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P)
        weights = F.softmax(weights, -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: normalise by (W, H)
            # offsets are in pixels of each level: scale by 1 / (W, H). One addcmul over rows of
            # L * P * 2 contiguous values (a broadcast over the 6-d layout is ~40x slower on CPU)
            inv_size = 1.0 / input_spatial_shapes.flip(-1).to(offsets.dtype)          # [L, 2]
            inv_size = inv_size[:, None, :].expand(L, P, 2).reshape(1, 1, L * P * 2)
            ref = reference_points[:, :, None, :, None, :].expand(N, Lq, 1, L, P, 2)
            locations = torch.addcmul(ref.reshape(N * Lq, 1, L * P * 2),
                                      offsets.reshape(N * Lq, M, L * P * 2), inv_size)
            locations = locations.view(N, Lq, M, L, P, 2)
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError("reference_points must be [N, Lq, L, 2] or [N, Lq, L, 4], got shape "
                             f"{tuple(reference_points.shape)}")
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations,
                                weights)
        return self.output_proj(output)
