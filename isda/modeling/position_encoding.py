"""Sine positional encoding of padded feature maps (as in DETR / Deformable DETR)."""
import math

import torch
from torch import nn


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

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=mask.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
