"""Deformable transformer encoder over the flattened multi-scale maps P3..P6."""
import torch
import torch.utils.checkpoint
from torch import nn

from ..layers.ms_deform_attn import MSDeformAttn
from .transformer_blocks import ActivationDropout


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: multi-scale deformable self-attention, then FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4,
                 n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation_dropout = ActivationDropout(activation, dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask):
        """src, pos: [N, S, C]; reference_points: [N, S, L, 2] -> [N, S, C]."""
        src2 = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                              level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.activation_dropout(self.linear1(src)))
        return self.norm2(src + self.dropout3(src2))


def token_centres(spatial_shapes, valid_ratios):
    """Centre (x, y) of every token of the flattened levels, normalised by the valid (unpadded)
    extent of its level: spatial_shapes [L, 2] (H, W) tensor or list; valid_ratios [N, L, 2]
    (x, y) -> [N, S, 2] (values above 1 on padding)."""
    device = valid_ratios.device
    shapes = spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        # arange + 0.5 (exactly linspace(0.5, n - 0.5, n)) also traces with symbolic sizes
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device) + 0.5,
                                torch.arange(w, dtype=torch.float32, device=device) + 0.5,
                                indexing="ij")
        ref_y = ys.reshape(1, -1) / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = xs.reshape(1, -1) / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)


def encoder_reference_points(spatial_shapes, valid_ratios):
    """Pixel centres of every level (:func:`token_centres`) in the padded frame of each level,
    as the attention op expects: spatial_shapes: [L, 2] (H, W); valid_ratios: [N, L, 2] (x, y)
    -> [N, S, L, 2]."""
    return token_centres(spatial_shapes, valid_ratios)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """A stack of ``num_layers`` :class:`DeformableEncoderLayer`.

    ``checkpoint`` (``MODEL.ISDA.ENCODER_CHECKPOINT``): in training, each layer keeps only its
    input for the backward pass and runs its forward again there (activation checkpointing,
    torch.utils.checkpoint; dropout masks are reproduced from the saved RNG state), trading
    time for the layers' activations (docs/benchmarks.md)."""

    def __init__(self, num_layers=6, checkpoint=False, **layer_kwargs):
        super().__init__()
        self.layers = nn.ModuleList(DeformableEncoderLayer(**layer_kwargs) for _ in range(num_layers))
        self.checkpoint = checkpoint

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask):
        """src, pos: [N, S, C]; padding_mask: [N, S] bool (True = padding) -> [N, S, C]."""
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        recompute = self.checkpoint and self.training and torch.is_grad_enabled()
        out = src
        for layer in self.layers:
            args = (out, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
            out = (torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
                   if recompute else layer(*args))
        return out
