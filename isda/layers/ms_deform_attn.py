"""Multi-scale deformable attention (Deformable DETR's op and module), side by side: the
autograd Function of the compiled op, its pure-PyTorch ``grid_sample`` reference and the module.

Shapes (the contract shared with Deformable DETR):

* ``value``              ``[N, S, M, D]``      S = sum_l H_l * W_l, M heads, D channels per head
* ``spatial_shapes``     ``[L, 2]`` int64      (H_l, W_l) per level
* ``level_start_index``  ``[L]`` int64         exclusive cumsum of H_l * W_l
* ``sampling_locations`` ``[N, Lq, M, L, P, 2]`` normalised (x, y) in [0, 1]
* ``attention_weights``  ``[N, Lq, M, L, P]``
* output                 ``[N, Lq, M * D]``

Sampling is bilinear with zero padding and ``align_corners=False`` (pixel centres at +0.5),
exactly ``F.grid_sample(value_l, 2 * loc - 1, "bilinear", "zeros", align_corners=False)``.

:func:`ms_deform_attn` runs the compiled op or the reference as the backend switch says
(:mod:`~isda.layers.ms_deform_attn_backend`: ``auto`` falls back to the reference when the
extension is missing), after the input checks of :mod:`~isda.layers.ms_deform_attn_checks`
(no device-to-host copy on the GPU). FLOP counting for fvcore:
:mod:`~isda.layers.ms_deform_attn_flops`.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from .ms_deform_attn_backend import (compiled_available, get_backend, load_extension,
                                     set_backend, use_compiled)
from .ms_deform_attn_checks import get_validation, promoted_dtypes, set_validation, validate_inputs
from .ms_deform_attn_flops import TRACED_OP_NAME, flop_count_handles, ms_deform_attn_flop_jit
from .token_linear import linear_input_grad

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnFunction",
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
# compiled op
# --------------------------------------------------------------------------------------------
class MSDeformAttnFunction(Function):
    """Autograd wrapper of ``isda._C.ms_deform_attn_forward/backward`` (first order only)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights):
        ext = load_extension()
        ctx.in_dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        # half/bfloat16 are upcast here (the extension would do it too) so the saved tensors
        # are ready for the backward; results are cast back to the promoted input dtype.
        value_c, shapes, starts, loc_c, attn_c, out_dtype = _op_inputs(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        out = ext.ms_deform_attn_forward(value_c, shapes, starts, loc_c, attn_c)
        ctx.save_for_backward(value_c, shapes, starts, loc_c, attn_c)
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        ext = load_extension()
        value_c, shapes, starts, loc_c, attn_c = ctx.saved_tensors
        grad_output = grad_output.to(value_c.dtype).contiguous()
        grad_value, grad_loc, grad_attn = ext.ms_deform_attn_backward(
            value_c, shapes, starts, loc_c, attn_c, grad_output)
        dv, dl, da = ctx.in_dtypes
        return grad_value.to(dv), None, None, grad_loc.to(dl), grad_attn.to(da)


def _op_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The compiled op's inputs in its compute dtype (the promoted one, half / bfloat16 upcast),
    contiguous, int64 shapes -> (value, shapes, starts, locations, weights, output dtype)."""
    out_dtype, compute = promoted_dtypes(value, sampling_locations, attention_weights)
    return (value.to(compute).contiguous(), spatial_shapes.to(torch.int64).contiguous(),
            level_start_index.to(torch.int64).contiguous(),
            sampling_locations.to(compute).contiguous(),
            attention_weights.to(compute).contiguous(), out_dtype)


def _reads_bf16_value(value, sampling_locations, attention_weights):
    """Whether the compiled CPU forward takes ``value`` as is: bfloat16 value, float32 locations,
    float32 or bfloat16 weights (widened to float32 as the float path does), no gradient
    wanted, and an extension built with that form."""
    return (value.dtype == torch.bfloat16 and value.device.type == "cpu"
            and sampling_locations.dtype == torch.float32
            and attention_weights.dtype in (torch.float32, torch.bfloat16)
            and not (torch.is_grad_enabled() and (value.requires_grad
                                                  or sampling_locations.requires_grad
                                                  or attention_weights.requires_grad))
            and getattr(load_extension(), "forward_reads_bf16_value", False))


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights):
    """Multi-scale deformable attention, dispatched to the compiled op or the reference.

    value [N, S, M, D], spatial_shapes [L, 2] int64, level_start_index [L] int64,
    sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P] -> [N, Lq, M*D].
    """
    validate_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if use_compiled(value.device):
        if _reads_bf16_value(value, sampling_locations, attention_weights):
            # bf16 inference (TEST.PRECISION bf16): the bf16 value projection read as is, the
            # same results as a float32 copy of it (bf16 -> float32 is exact)
            return load_extension().ms_deform_attn_forward(
                value.contiguous(), spatial_shapes.to(torch.int64).contiguous(),
                level_start_index.to(torch.int64).contiguous(), sampling_locations.contiguous(),
                attention_weights.float().contiguous())
        return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
                                          sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights)


class _ProjectedValueAttention(Function):
    """``ms_deform_attn(value_proj(input) masked, ...)`` through the compiled op, keeping
    ``input`` for the backward pass instead of the projected ``value``: the input is kept
    anyway (the encoder's layer input, which its query projections keep; the decoder's
    ``memory``, one tensor for all layers), so the [N, S, C] value is no longer kept per layer.
    The backward pass recomputes the projection (one product) before the op's backward; the
    gradients of the projection are the Linear layer's. The Linear module's own forward
    (nn.Linear or TokenLinear) computes the product."""

    @staticmethod
    def forward(ctx, input_flatten, weight, bias, padding_mask, spatial_shapes, level_start_index,
                sampling_locations, attention_weights, value_proj, n_heads):
        ext = load_extension()
        value = _project_value(value_proj, input_flatten, padding_mask, n_heads)
        validate_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                        attention_weights)
        ctx.in_dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
        value_c, shapes, starts, loc_c, attn_c, out_dtype = _op_inputs(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        out = ext.ms_deform_attn_forward(value_c, shapes, starts, loc_c, attn_c)
        ctx.value_proj, ctx.n_heads, ctx.has_bias = value_proj, n_heads, bias is not None
        ctx.save_for_backward(input_flatten, weight, padding_mask, shapes, starts, loc_c, attn_c)
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        ext = load_extension()
        input_flatten, weight, padding_mask, shapes, starts, loc_c, attn_c = ctx.saved_tensors
        value = _project_value(ctx.value_proj, input_flatten, padding_mask, ctx.n_heads)
        value_c = value.to(loc_c.dtype).contiguous()
        del value
        grad_output = grad_output.to(value_c.dtype).contiguous()
        grad_value, grad_loc, grad_attn = ext.ms_deform_attn_backward(
            value_c, shapes, starts, loc_c, attn_c, grad_output)
        del value_c
        dv, dl, da = ctx.in_dtypes
        grad_input, grad_weight, grad_bias = _linear_grads(
            _masked(grad_value.to(dv).reshape(input_flatten.shape), padding_mask), input_flatten,
            weight, ctx.has_bias, ctx.value_proj)
        return (grad_input, grad_weight, grad_bias, None, None, None, grad_loc.to(dl),
                grad_attn.to(da), None, None)


class _SampledAttention(Function):
    """The encoder's attention core (query projections, softmax, sampling locations, value
    projection and the compiled op) keeping only what the layer keeps anyway: ``query`` and
    ``query_pos`` (the layer input and the positional embedding of all layers; not their sum),
    ``input_flatten`` (the layer input) and the attention weights (which the softmax needs).
    The backward pass recomputes the sum, the sampling offsets, the locations
    (``ref + offsets * inv_size``) and the value projection: two [S, C] x [C, C] products per
    layer; the [N, Lq, M, L, P, 2] locations and the [N, S, C] value are no longer kept (about
    40 MB per encoder layer of ISDA-R50 at 800x1216). Same math as :meth:`MSDeformAttn.forward`;
    the Linear modules' own forward (nn.Linear or TokenLinear) computes the products.
    Reference points without gradient, [N, Lq, L, 2] form only.

    ref_rows: [N * Lq, 1, L * P * 2]; inv_size: [1, 1, L * P * 2]; mlp: (M, L, P)."""

    @staticmethod
    def forward(ctx, query, query_pos, w_off, b_off, w_att, b_att, ref_rows, inv_size,
                input_flatten, w_v, b_v, padding_mask, spatial_shapes, level_start_index, modules,
                mlp):
        ext = load_extension()
        linear_off, linear_att, value_proj = modules
        n, lq = query.shape[:2]
        m, l, p = mlp
        q = query + query_pos
        locations = _locations(linear_off(q), ref_rows, inv_size, (n, lq, m, l, p))
        weights = F.softmax(linear_att(q).view(n, lq, m, l * p), -1).view(n, lq, m, l, p)
        del q
        value = _project_value(value_proj, input_flatten, padding_mask, m)
        validate_inputs(value, spatial_shapes, level_start_index, locations, weights)
        ctx.out_dtypes = (query.dtype, w_off.dtype, w_att.dtype, w_v.dtype)
        value_c, shapes, starts, loc_c, attn_c, out_dtype = _op_inputs(
            value, spatial_shapes, level_start_index, locations, weights)
        del value, locations, weights
        out = ext.ms_deform_attn_forward(value_c, shapes, starts, loc_c, attn_c)
        ctx.modules, ctx.mlp = modules, mlp
        ctx.has_bias = (b_off is not None, b_att is not None, b_v is not None)
        ctx.save_for_backward(query, query_pos, w_off, w_att, ref_rows, inv_size, input_flatten,
                              w_v, padding_mask, shapes, starts, attn_c)
        return out.to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        ext = load_extension()
        (query, query_pos, w_off, w_att, ref_rows, inv_size, input_flatten, w_v, padding_mask,
         shapes, starts, attn_c) = ctx.saved_tensors
        linear_off, linear_att, value_proj = ctx.modules
        m, l, p = ctx.mlp
        n, lq = query.shape[:2]
        compute = attn_c.dtype
        q = query + query_pos
        loc_c = _locations(linear_off(q), ref_rows, inv_size, (n, lq, m, l, p))
        loc_c = loc_c.to(compute).contiguous()
        value_c = _project_value(value_proj, input_flatten, padding_mask, m)
        value_c = value_c.to(compute).contiguous()
        grad_value, grad_loc, grad_attn = ext.ms_deform_attn_backward(
            value_c, shapes, starts, loc_c, attn_c, grad_output.to(compute).contiguous())
        del value_c, loc_c
        dq, d_off, d_att, dv = ctx.out_dtypes
        grad_input, grad_w_v, grad_b_v = _linear_grads(
            _masked(grad_value.reshape(input_flatten.shape), padding_mask), input_flatten, w_v,
            ctx.has_bias[2], value_proj)
        del grad_value
        # locations = ref + offsets * inv_size: d offsets = d locations * inv_size, a per-column
        # scale s; it is applied to the [C_off, C] products below (s_j scales row j of
        # w_off, of grad w_off and grad b_off) instead of to the [rows, C_off] gradient
        g_loc = grad_loc.reshape(n * lq, -1)
        s_off = inv_size.reshape(-1).repeat(m).to(g_loc.dtype)                  # [C_off]
        del grad_loc
        # softmax over each head's L * P weights: d logits = w * (d w - sum(d w * w))
        w = attn_c.view(n * lq, m, l * p)
        ga = grad_attn.view(n * lq, m, l * p)
        g_att = (ga - (ga * w).sum(-1, keepdim=True)).mul_(w).reshape(n * lq, -1)
        del grad_attn, ga
        q2 = q.reshape(n * lq, -1).to(g_loc.dtype)
        grad_q = linear_input_grad(g_loc, w_off.to(g_loc.dtype) * s_off[:, None], linear_off)
        grad_q = grad_q.add_(linear_input_grad(g_att, w_att.to(g_att.dtype), linear_att))
        grad_q = grad_q.reshape(query.shape).to(dq)
        grad_w_off = g_loc.t().mm(q2).mul_(s_off[:, None]).to(d_off)
        grad_w_att = g_att.t().mm(q2).to(d_att)
        grad_b_off = (g_loc.sum(0) * s_off).to(d_off) if ctx.has_bias[0] else None
        grad_b_att = g_att.sum(0).to(d_att) if ctx.has_bias[1] else None
        return (grad_q, grad_q, grad_w_off, grad_b_off, grad_w_att, grad_b_att, None, None,
                grad_input.to(dq), grad_w_v.to(dv), None if grad_b_v is None else grad_b_v.to(dv),
                None, None, None, None, None)


def _level_scaling(reference_points, spatial_shapes, n_points, dtype):
    """For [N, Lq, L, 2] reference points: (ref_rows [N * Lq, 1, L * P * 2] (each row the
    query's reference point repeated for every point), inv_size [1, 1, L * P * 2] (1 / (W, H)
    of each level)): offsets are in pixels of each level."""
    n, lq, l, _ = reference_points.shape
    inv_size = 1.0 / spatial_shapes.flip(-1).to(dtype)                                 # [L, 2]
    inv_size = inv_size[:, None, :].expand(l, n_points, 2).reshape(1, 1, l * n_points * 2)
    ref = reference_points[:, :, None, :, None, :].expand(n, lq, 1, l, n_points, 2)
    return ref.reshape(n * lq, 1, l * n_points * 2), inv_size


def _locations(offsets, ref_rows, inv_size, nlqmlp):
    """Sampling locations [N, Lq, M, L, P, 2] = ref + offsets * inv_size from
    :func:`_level_scaling`'s rows: one addcmul over rows of L * P * 2 contiguous values (a
    broadcast over the 6-d layout is ~40x slower on the CPU)."""
    rows = ref_rows.shape[0]
    loc = torch.addcmul(ref_rows, offsets.reshape(rows, nlqmlp[2], -1), inv_size)
    return loc.view(*nlqmlp, 2)


def _masked(t, padding_mask):
    return t if padding_mask is None else t.masked_fill(padding_mask[..., None], 0.0)


def _linear_grads(grad_out, x, weight, has_bias, module):
    """Gradients of ``F.linear(x, weight, bias)`` (the Linear ``module``) for ``grad_out``
    [..., C_out] -> (input [..., C_in], weight, bias or None)."""
    g = grad_out.reshape(-1, grad_out.shape[-1])
    rows = x.reshape(-1, x.shape[-1]).to(g.dtype)
    grad_x = linear_input_grad(g, weight.to(g.dtype), module).reshape(x.shape)
    grad_w = g.t().mm(rows).to(weight.dtype)
    grad_b = g.sum(0).to(weight.dtype) if has_bias else None
    return grad_x, grad_w, grad_b


def _project_value(value_proj, input_flatten, padding_mask, n_heads):
    """value_proj(input) [N, S, C], zeroed at padding -> [N, S, M, C / M]."""
    value = value_proj(input_flatten)
    if padding_mask is not None:
        value = value.masked_fill(padding_mask[..., None], 0.0)
    n, s, c = value.shape
    return value.view(n, s, n_heads, c // n_heads)


class _QueryProjections(Function):
    """``(sampling_offsets(q), attention_weights(q))`` for ``q = query + query_pos`` that keeps
    ``query`` and ``query_pos`` for the backward pass instead of ``q``: both are kept anyway (the
    encoder's ``query`` is also the value projection's input, ``query_pos`` is one tensor for all
    layers), so the [N, Lq, C] sum is no longer kept per layer; the backward pass recomputes it
    (one addition). Same math as two Linear layers on the sum; the Linear modules' own forward
    (nn.Linear or TokenLinear) computes the products."""

    @staticmethod
    def forward(ctx, query, query_pos, w_off, b_off, w_att, b_att, linear_off, linear_att):
        q = query + query_pos
        ctx.has_bias = (b_off is not None, b_att is not None)
        ctx.save_for_backward(query, query_pos, w_off, w_att)
        return linear_off(q), linear_att(q)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_off, grad_att):
        query, query_pos, w_off, w_att = ctx.saved_tensors
        q = (query + query_pos).reshape(-1, query.shape[-1])
        g_off = grad_off.reshape(-1, grad_off.shape[-1])
        g_att = grad_att.reshape(-1, grad_att.shape[-1])
        grad_q = torch.addmm(g_off.mm(w_off), g_att, w_att).reshape(query.shape)
        grad_w_off, grad_w_att = g_off.t().mm(q), g_att.t().mm(q)
        grad_b_off = g_off.sum(0) if ctx.has_bias[0] else None
        grad_b_att = g_att.sum(0) if ctx.has_bias[1] else None
        return (grad_q, grad_q, grad_w_off, grad_b_off, grad_w_att, grad_b_att, None, None)


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
                input_level_start_index, input_padding_mask=None, query_pos=None):
        """
        Args:
            query: [N, Lq, C]; with ``query_pos`` the attention's query is ``query + query_pos``.
            reference_points: [N, Lq, L, 2] normalised (x, y) in [0, 1] (top-left (0, 0)), or
                [N, Lq, L, 4] boxes (cx, cy, w, h); offsets are then relative to half the box size.
            input_flatten: [N, S, C] flattened multi-level features.
            input_spatial_shapes: [L, 2] int64 (H, W).
            input_level_start_index: [L] int64.
            input_padding_mask: optional [N, S] bool, True at padding (those values are zeroed).
            query_pos: optional [N, Lq, C] positional embedding added to ``query``; passing it
                here instead of the sum lets training keep no copy of the sum.
        Returns:
            [N, Lq, C].
        """
        N, Lq, _ = query.shape
        _, S, _ = input_flatten.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        if self._recomputes_locations(query, query_pos, reference_points, input_flatten):
            return self._encoder_training_forward(query, query_pos, reference_points,
                                                  input_flatten, input_spatial_shapes,
                                                  input_level_start_index, input_padding_mask)
        offsets, weights = self._query_projections(query, query_pos)
        offsets = offsets.view(N, Lq, M, L, P, 2)
        logits = weights.view(N, Lq, M, L * P)
        if logits.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(
                logits.device.type):
            # CPU autocast (unlike CUDA's) runs softmax in bf16: 3x slower there and the weights
            # rounded to 8 bits; take it in float32 as CUDA's autocast does. Other dtypes (a
            # float64 or a half model without autocast) keep their own
            logits = logits.float()
        weights = F.softmax(logits, -1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            ref_rows, inv_size = _level_scaling(reference_points, input_spatial_shapes, P,
                                                offsets.dtype)
            locations = _locations(offsets, ref_rows, inv_size, (N, Lq, M, L, P))
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError("reference_points must be [N, Lq, L, 2] or [N, Lq, L, 4], got shape "
                             f"{tuple(reference_points.shape)}")
        if self._recomputes_value(input_flatten):
            output = _ProjectedValueAttention.apply(
                input_flatten, self.value_proj.weight, self.value_proj.bias, input_padding_mask,
                input_spatial_shapes, input_level_start_index, locations, weights,
                self.value_proj, M)
        else:
            value = _project_value(self.value_proj, input_flatten, input_padding_mask, M)
            output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index,
                                    locations, weights)
        return self.output_proj(output)

    def _recomputes_locations(self, query, query_pos, reference_points, input_flatten):
        """Whether training recomputes the sampling locations and the value projection in the
        backward pass (:class:`_SampledAttention`): as :meth:`_recomputes_value`, and for the
        encoder's form (positional embedding passed apart, [N, Lq, L, 2] reference points
        without gradient, trained offsets)."""
        return (self._recomputes_value(input_flatten) and query_pos is not None
                and query_pos.shape == query.shape and reference_points.shape[-1] == 2
                and not reference_points.requires_grad
                and self.sampling_offsets.weight.requires_grad)

    def _encoder_training_forward(self, query, query_pos, reference_points, input_flatten,
                                  spatial_shapes, level_start_index, padding_mask):
        M, L, P = self.n_heads, self.n_levels, self.n_points
        ref_rows, inv_size = _level_scaling(reference_points, spatial_shapes, P, query.dtype)
        output = _SampledAttention.apply(
            query, query_pos, self.sampling_offsets.weight, self.sampling_offsets.bias,
            self.attention_weights.weight, self.attention_weights.bias, ref_rows, inv_size,
            input_flatten, self.value_proj.weight, self.value_proj.bias, padding_mask,
            spatial_shapes, level_start_index,
            (self.sampling_offsets, self.attention_weights, self.value_proj), (M, L, P))
        return self.output_proj(output)

    def _recomputes_value(self, input_flatten):
        """Whether training keeps the attention's input instead of its value projection
        (:class:`_ProjectedValueAttention`): with gradient, through the compiled op, without
        autocast, and when the projection is trained."""
        return (torch.is_grad_enabled() and self.value_proj.weight.requires_grad
                and use_compiled(input_flatten.device)
                and not torch.is_autocast_enabled(input_flatten.device.type))

    def _query_projections(self, query, query_pos):
        """-> (sampling offsets [N, Lq, M*L*P*2], attention logits [N, Lq, M*L*P]) of
        ``query (+ query_pos)``; with gradient through :class:`_QueryProjections`."""
        if query_pos is None:
            return self.sampling_offsets(query), self.attention_weights(query)
        if (not torch.is_grad_enabled() or query_pos.shape != query.shape
                or torch.is_autocast_enabled(query.device.type)):
            q = query + query_pos
            return self.sampling_offsets(q), self.attention_weights(q)
        return _QueryProjections.apply(
            query, query_pos, self.sampling_offsets.weight, self.sampling_offsets.bias,
            self.attention_weights.weight, self.attention_weights.bias, self.sampling_offsets,
            self.attention_weights)
