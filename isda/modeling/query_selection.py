"""Queries placed by encoder proposals (``MODEL.ISDA.TWO_STAGE``): every encoder token scores
itself as an object with its own class head; the decoder's queries start at the centres of the
top-scoring tokens (their positional queries are a sine embedding of those points; their content
stays learned: DINO's "mixed" query selection), and the selected tokens' own class logits and mask
kernels get the set loss (two-stage Deformable DETR; Mask DINO supervises the proposals' masks).
Off in the paper's configs, whose queries are learned points."""
import math

import torch
from torch import nn

from .heads import MLP, ISDAHeads


def point_sine_embedding(points, num_feats, temperature=10000, scale=2 * math.pi):
    """Sine/cosine encoding of points as :class:`PositionEmbeddingSine` encodes pixel centres.

    points: [..., 2] (x, y) in [0, 1] -> [..., 2 * num_feats] (the y features, then the x ones)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=points.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos = points.float()[..., None] * scale / dim_t  # [..., 2, F]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-2)
    return torch.cat((pos[..., 1, :], pos[..., 0, :]), dim=-1)


def token_centres(spatial_shapes, valid_ratios):
    """Centre (x, y) of every token of the flattened levels, normalised by the valid (unpadded)
    extent of its level: spatial_shapes [L, 2] (H, W); valid_ratios [N, L, 2] (x, y) ->
    [N, S, 2] (values above 1 on padding)."""
    device = valid_ratios.device
    shapes = spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes
    out = []
    for lvl, (h, w) in enumerate(shapes):
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(1, h * w, 2)
        out.append(grid / valid_ratios[:, None, lvl])
    return torch.cat(out, 1)


class QuerySelection(nn.Module):
    """Encoder proposals: memory [N, S, C] -> the ``num_queries`` best tokens' centres (the
    decoder's reference points and positional queries) and their own predictions."""

    def __init__(self, d_model, num_classes, kernel_dim, kernel_ref_points, num_queries):
        super().__init__()
        self.num_queries = num_queries
        self.output_proj = nn.Linear(d_model, d_model)
        self.output_norm = nn.LayerNorm(d_model)
        self.heads = ISDAHeads(d_model, num_classes, kernel_dim, kernel_ref_points)
        self.pos_mlp = MLP(d_model, d_model, d_model, 2)

    def forward(self, memory, padding_mask, spatial_shapes, valid_ratios):
        """memory: [N, S, C]; padding_mask: [N, S] bool or None; spatial_shapes: [L, 2];
        valid_ratios: [N, L, 2] -> dict with reference_points [N, Q, 2] (x, y in [0, 1], no
        gradient), query_pos [N, Q, C], logits [N, Q, K] and kernels [N, Q, D] of the selected
        tokens (Q = num_queries; fewer tokens than queries are repeated)."""
        n, s, c = memory.shape
        tokens = self.output_norm(self.output_proj(memory))
        scores = self.heads.class_embed(tokens).detach().amax(-1)
        if padding_mask is not None:
            scores = scores.masked_fill(padding_mask, float("-inf"))
        idx = scores.topk(min(self.num_queries, s), dim=1).indices
        if idx.shape[1] < self.num_queries:  # a tiny image: fewer tokens than queries
            idx = idx.repeat(1, math.ceil(self.num_queries / idx.shape[1]))[:, :self.num_queries]
        selected = tokens.gather(1, idx[..., None].expand(-1, -1, c))
        centres = token_centres(spatial_shapes, valid_ratios)
        ref = centres.gather(1, idx[..., None].expand(-1, -1, 2)).clamp(0, 1)
        logits, kernels = self.heads(selected, ref)
        query_pos = self.pos_mlp(point_sine_embedding(ref, c // 2).to(memory.dtype))
        return {"reference_points": ref, "query_pos": query_pos, "logits": logits,
                "kernels": kernels}
