"""Queries placed by encoder proposals (``MODEL.ISDA.TWO_STAGE``): every encoder token scores
itself as an object with its own class head; the decoder's queries start at the centres of the
top-scoring tokens (their positional queries are a sine embedding of those points; their content
stays learned: DINO's "mixed" query selection), and the selected tokens' own class logits and mask
kernels get the set loss (two-stage Deformable DETR; Mask DINO supervises the proposals' masks).
Off in the paper's configs, whose queries are learned points."""
import math

import torch
from torch import nn

from .deformable_encoder import token_centres
from .heads import MLP, ISDAHeads
from .position_encoding import sine_features


def point_sine_embedding(points, num_feats, temperature=10000, scale=2 * math.pi):
    """Sine/cosine encoding of points as :class:`PositionEmbeddingSine` encodes pixel centres.

    points: [..., 2] (x, y) in [0, 1] -> [..., 2 * num_feats] (the y features, then the x ones)."""
    pos = sine_features(points.float() * scale, num_feats, temperature)  # [..., 2, F]
    return torch.cat((pos[..., 1, :], pos[..., 0, :]), dim=-1)


class TokenHead(nn.Module):
    """Per-token predictions of the encoder memory: Linear + LayerNorm -> token features for
    ``self.heads`` (class Linear and kernel MLP, as the queries'). Used alone by the dense
    supervision without two-stage (``isda/modeling/dense_supervision.py``)."""

    def __init__(self, d_model, num_classes, kernel_dim, kernel_ref_points):
        super().__init__()
        self.output_proj = nn.Linear(d_model, d_model)
        self.output_norm = nn.LayerNorm(d_model)
        self.heads = ISDAHeads(d_model, num_classes, kernel_dim, kernel_ref_points)

    def token_features(self, memory):
        """memory [N, S, C] -> token features [N, S, C]."""
        return self.output_norm(self.output_proj(memory))

    def forward(self, memory):
        return self.token_features(memory)


class QuerySelection(TokenHead):
    """Encoder proposals: memory [N, S, C] -> the ``num_queries`` best tokens' centres (the
    decoder's reference points and positional queries) and their own predictions."""

    def __init__(self, d_model, num_classes, kernel_dim, kernel_ref_points, num_queries):
        super().__init__(d_model, num_classes, kernel_dim, kernel_ref_points)
        self.num_queries = num_queries
        self.pos_mlp = MLP(d_model, d_model, d_model, 2)

    def forward(self, memory, padding_mask, spatial_shapes, valid_ratios):
        """memory: [N, S, C]; padding_mask: [N, S] bool or None; spatial_shapes: [L, 2];
        valid_ratios: [N, L, 2] -> dict with reference_points [N, Q, 2] (x, y in [0, 1], no
        gradient), query_pos [N, Q, C], logits [N, Q, K] and kernels [N, Q, D] of the selected
        tokens (Q = num_queries; fewer tokens than queries are repeated), and every token's
        features ``tokens`` [N, S, C] for ``self.heads`` (dense supervision)."""
        n, s, c = memory.shape
        tokens = self.token_features(memory)
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
                "kernels": kernels, "tokens": tokens}
