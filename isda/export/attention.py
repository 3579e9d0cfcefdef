"""Multi-scale deformable attention in an export-friendly form.

:func:`ms_deform_attn_export` is :func:`isda.layers.ms_deform_attn.ms_deform_attn_reference`
(one ``F.grid_sample`` per level: bilinear, zero padding, ``align_corners=False``, which the
ONNX exporter turns into the standard ``GridSample`` operator, opset >= 16) with one difference:
the level sizes are given as a list of ``(H_l, W_l)`` pairs taken from the feature maps'
shapes (Python ints when run eagerly, symbolic sizes under ``torch.export``), not as the
``spatial_shapes`` tensor whose values the reference reads back with ``.tolist()``
(data-dependent: a traced graph would freeze them to the sizes of the example input).

:class:`ExportMSDeformAttn` is :class:`isda.layers.ms_deform_attn.MSDeformAttn` with that
attention: same sub-layers (same state dict), same arithmetic, and the level sizes as a list.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.ms_deform_attn import MSDeformAttn

__all__ = ["ms_deform_attn_export", "ExportMSDeformAttn", "level_sizes_tensor"]


def level_sizes_tensor(shapes: Sequence[Tuple[int, int]], like: torch.Tensor) -> torch.Tensor:
    """``[[W_l, H_l], ...]`` as a float tensor of ``like``'s dtype/device, built from (possibly
    symbolic) sizes: the ``spatial_shapes.flip(-1)`` of the normal model."""
    rows = [torch.stack([torch.scalar_tensor(w, dtype=torch.int64, device=like.device),
                         torch.scalar_tensor(h, dtype=torch.int64, device=like.device)])
            for h, w in shapes]
    return torch.stack(rows).to(like.dtype)


def ms_deform_attn_export(value: torch.Tensor, shapes: Sequence[Tuple[int, int]],
                          sampling_locations: torch.Tensor,
                          attention_weights: torch.Tensor) -> torch.Tensor:
    """value [N, S, M, D] (S = sum of H_l * W_l), shapes [(H_l, W_l)] * L,
    sampling_locations [N, Lq, M, L, P, 2] in [0, 1], attention_weights [N, Lq, M, L, P]
    -> [N, Lq, M * D]. Same computation as ``ms_deform_attn_reference``."""
    n, _, m, d = value.shape
    _, lq, _, num_levels, p, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1] coordinates
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        value_l = values[lvl].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).reshape(n * m, lq, p, 2)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [N*M, D, Lq, P]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # [N*M, D, Lq, L*P]
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * p)
    out = (stacked * weights).sum(-1)  # [N*M, D, Lq]
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()


class ExportMSDeformAttn(nn.Module):
    """:class:`MSDeformAttn` taking the level sizes as a list of ``(H_l, W_l)``.

    Built from a (trained) ``MSDeformAttn`` with :meth:`from_module`: its four ``nn.Linear``
    projections are taken over, under the same names.
    """

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int,
                 sampling_offsets: nn.Linear, attention_weights: nn.Linear,
                 value_proj: nn.Linear, output_proj: nn.Linear):
        super().__init__()
        self.d_model, self.n_levels, self.n_heads, self.n_points = (d_model, n_levels, n_heads,
                                                                    n_points)
        self.sampling_offsets = sampling_offsets
        self.attention_weights = attention_weights
        self.value_proj = value_proj
        self.output_proj = output_proj

    @classmethod
    def from_module(cls, attn: MSDeformAttn) -> "ExportMSDeformAttn":
        out = cls(attn.d_model, attn.n_levels, attn.n_heads, attn.n_points,
                  attn.sampling_offsets, attn.attention_weights, attn.value_proj,
                  attn.output_proj)
        out.train(attn.training)
        return out

    def forward(self, query, reference_points, input_flatten, shapes: List[Tuple[int, int]],
                input_level_start_index=None, input_padding_mask=None):
        """As ``MSDeformAttn.forward`` with ``shapes`` = [(H_l, W_l)] * L in place of
        ``input_spatial_shapes``; ``input_level_start_index`` is not needed (ignored)."""
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        m, num_levels, p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(n, lq, m, num_levels, p, 2)
        weights = self.attention_weights(query).view(n, lq, m, num_levels * p)
        weights = F.softmax(weights, -1).view(n, lq, m, num_levels, p)
        if reference_points.shape[-1] == 2:
            # the normal module's arithmetic: offsets in pixels of each level, divided by (W_l, H_l)
            sizes = level_sizes_tensor(shapes, offsets)  # [L, 2]
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / sizes[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / p * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError("reference_points must be [N, Lq, L, 2] or [N, Lq, L, 4], got shape "
                             f"{tuple(reference_points.shape)}")
        output = ms_deform_attn_export(value, shapes, locations, weights)
        return self.output_proj(output)
