"""Sine positional encoding of padded feature maps (as in DETR / Deformable DETR)."""
import math

import torch
from torch import nn


def sine_features(x, num_feats, temperature=10000):
    """x: [...] scaled positions -> [..., num_feats]: sin (even features) and cos (odd ones) of
    ``x / temperature ** (2 * (i // 2) / num_feats)``."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = x[..., None] / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Normalised sine/cosine encoding of (y, x), ``num_pos_feats`` features per axis.

    Positions are cumulative counts of valid (unpadded) pixels, shifted by ``offset`` (-0.5, pixel
    centres) and normalised by the valid extent to ``[0, scale]``.
    """

    def __init__(self, num_pos_feats=128, temperature=10000, scale=2 * math.pi, offset=-0.5,
                 eps=1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask):
        """mask: [N, H, W] bool, True on padding -> [N, 2*num_pos_feats, H, W]."""
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
        x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale

        pos_x = sine_features(x_embed, self.num_pos_feats, self.temperature)
        pos_y = sine_features(y_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
