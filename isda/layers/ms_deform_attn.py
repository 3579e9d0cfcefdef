"""Multi-scale deformable attention (Deformable DETR's op and module), side by side: the
compiled op as a torch operator (``torch.ops.isda.ms_deform_attn``), its pure-PyTorch
``grid_sample`` reference and the module.

Shapes (the contract shared with Deformable DETR):

* ``value``              ``[N, S, M, D]``      S = sum_l H_l * W_l, M heads, D channels per head
* ``spatial_shapes``     ``[L, 2]`` int64      (H_l, W_l) per level
* ``level_start_index``  ``[L]`` int64         exclusive cumsum of H_l * W_l
* ``sampling_locations`` ``[N, Lq, M, L, P, 2]`` normalised (x, y) in [0, 1]
* ``attention_weights``  ``[N, Lq, M, L, P]``
* output                 ``[N, Lq, M * D]``

Sampling is bilinear with zero padding and ``align_corners=False`` (pixel centres at +0.5),
exactly ``F.grid_sample(value_l, 2 * loc - 1, "bilinear", "zeros", align_corners=False)``.

The extension ``isda._C`` registers the operators ``isda::ms_deform_attn`` and
``isda::ms_deform_attn_backward`` with CPU (and CUDA) kernels (``ops/csrc/bindings.cpp``); their
fake kernels (output shapes, for ``torch.compile`` / ``torch.export``) and the autograd formula
(``torch.library.register_autograd``) are registered here. :func:`ms_deform_attn` runs the
operator or the reference as the backend switch says
(:mod:`~isda.layers.ms_deform_attn_backend`: ``auto`` falls back to the reference when the
extension is missing), after the input checks of :mod:`~isda.layers.ms_deform_attn_checks`
(no device-to-host copy on the GPU). FLOP counting for fvcore:
:mod:`~isda.layers.ms_deform_attn_flops`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .ms_deform_attn_backend import compiled_available, get_backend, load_extension, set_backend, use_compiled
from .ms_deform_attn_checks import get_validation, promoted_dtypes, set_validation, validate_inputs
from .ms_deform_attn_flops import TRACED_OP_NAME, flop_count_handles, ms_deform_attn_flop_jit

__all__ = [
    "MSDeformAttn",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    # re-exported from the backend, checks and FLOP modules
    "set_backend",
    "get_backend",
    "set_validation",
    "get_validation",
    "compiled_available",
    "ms_deform_attn_flop_jit",
    "flop_count_handles",
    "TRACED_OP_NAME",
]


# --------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------
def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights):
    """Pure-PyTorch multi-scale deformable attention with ``F.grid_sample``.

    value [N, S, M, D], spatial_shapes [L, 2], level_start_index [L],
    sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D].
    """
    validate_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    out_dtype, _ = promoted_dtypes(value, sampling_locations, attention_weights)
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
# compiled op: fake kernels and autograd of torch.ops.isda.*
# --------------------------------------------------------------------------------------------
def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    # the locations' dtype: the value's, or float32 for the CPU's bf16-value form
    n, lq, m = sampling_locations.shape[:3]
    return sampling_locations.new_empty((n, lq, m * value.shape[3]))


def _fake_backward(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, grad_output):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    """First order only: the gradients of value, sampling locations and attention weights."""
    value, shapes, starts, locations, weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.isda.ms_deform_attn_backward(
        value, shapes, starts, locations, weights, grad_output)
    return grad_value, None, None, grad_loc, grad_attn


if load_extension() is not None:
    torch.library.register_fake("isda::ms_deform_attn")(_fake_forward)
    torch.library.register_fake("isda::ms_deform_attn_backward")(_fake_backward)
    torch.library.register_autograd("isda::ms_deform_attn", _backward,
                                    setup_context=_setup_context)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    """Multi-scale deformable attention, dispatched to the compiled op or the reference.

    value [N, S, M, D], spatial_shapes [L, 2] int64, level_start_index [L] int64,
    sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D]
    in the promoted dtype of the three float inputs. The op computes float16 / bfloat16 in
    float32; a bfloat16 value with float32 locations (bf16 autocast on the CPU) is read as is.
    """
    validate_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not use_compiled(value.device):
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                        sampling_locations, attention_weights)
    dtype, _ = promoted_dtypes(value, sampling_locations, attention_weights)
    if not (value.dtype == torch.bfloat16 and dtype == torch.float32
            and value.device.type == "cpu"):
        value = value.to(dtype)
    return torch.ops.isda.ms_deform_attn(
        value, spatial_shapes.to(torch.int64), level_start_index.to(torch.int64),
        sampling_locations.to(dtype), attention_weights.to(dtype))


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
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
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
            query: [N, Lq, C] (with the positional embedding already added).
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
        logits = self.attention_weights(query).view(N, Lq, M, L * P)
        if logits.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
                logits.device.type):
            # CPU autocast (unlike CUDA's) runs softmax in bf16: 3x slower there and the weights
            # rounded to 8 bits; take it in float32 as CUDA's autocast does. Other dtypes (a
            # float64 or a half model without autocast) keep their own
            logits = logits.float()
        weights = F.softmax(logits, -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divided by its (W, H), in the reference
            # points' precision (not in autocast's bf16)
            sizes = input_spatial_shapes.flip(-1)[None, None, None, :, None, :]
            offsets = offsets.to(torch.promote_types(offsets.dtype, reference_points.dtype))
            locations = reference_points[:, :, None, :, None, :] + offsets / sizes
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError("reference_points must be [N, Lq, L, 2] or [N, Lq, L, 4], got shape "
                             f"{tuple(reference_points.shape)}")
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations,
                                weights)
        return self.output_proj(output)
