"""Deformable transformer decoder: learned queries, fixed (not refined) reference points.

Optional training-only query groups (``MODEL.ISDA.AUX_GROUPS``, Group DETR / H-DETR): extra sets
of learned queries decoded alongside the model's own, each attending only to its own group in the
self-attention (the groups are folded into the batch there), never used at inference."""
import torch
from torch import nn

from ..layers.ms_deform_attn import MSDeformAttn
from .transformer_blocks import ActivationDropout


class DeformableDecoderLayer(nn.Module):
    """Post-norm layer: self-attention among queries, deformable cross-attention, FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, activation="relu", n_levels=4,
                 n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation_dropout = ActivationDropout(activation, dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index,
                memory_padding_mask, groups=1):
        """tgt, query_pos: [N, Q, C] (Q = groups x queries per group); reference_points:
        [N, Q, L, 2]; memory: [N, S, C]. Self-attention stays within each group of Q / groups
        consecutive queries."""
        n, nq, c = tgt.shape
        q = k = tgt + query_pos
        if groups == 1:
            tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        else:  # block-diagonal attention = the groups as separate batch entries
            fold = lambda x: x.reshape(n * groups, nq // groups, c)  # noqa: E731
            tgt2 = self.self_attn(fold(q), fold(k), fold(tgt), need_weights=False)[0]
            tgt2 = tgt2.reshape(n, nq, c)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                               level_start_index, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.activation_dropout(self.linear1(tgt)))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableDecoder(nn.Module):
    """``num_queries`` learned queries (a 2*C embedding split into position and content) decoded
    by ``num_layers`` :class:`DeformableDecoderLayer`.

    Reference points are ``sigmoid(Linear(query position))`` (x, y) in the valid image frame and
    stay fixed across layers. ``aux_groups`` extra groups of ``num_queries`` queries are decoded
    in training only (their embeddings follow the model's own in ``query_embed``).
    """

    def __init__(self, num_queries=300, num_layers=6, d_model=256, aux_groups=0,
                 two_stage=False, **layer_kwargs):
        super().__init__()
        self.num_queries = num_queries
        self.aux_groups = aux_groups
        self.two_stage = two_stage
        if two_stage:  # positions come from the encoder proposals: content embeddings only
            self.query_embed = nn.Embedding(num_queries * (1 + aux_groups), d_model)
        else:
            self.query_embed = nn.Embedding(num_queries * (1 + aux_groups), 2 * d_model)
            self.reference_points = nn.Linear(d_model, 2)
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(d_model=d_model, **layer_kwargs) for _ in range(num_layers)
        )

    def forward(self, memory, spatial_shapes, level_start_index, valid_ratios, padding_mask,
                proposals=None):
        """memory: [N, S, C]; valid_ratios: [N, L, 2]; proposals (two-stage only): the
        :class:`QuerySelection` output, whose reference_points [N, Q, 2] and query_pos [N, Q, C]
        place every group's queries -> (hidden states [num_layers, N, Q, C], reference points
        [N, Q, 2] in [0, 1]), with Q = num_queries, or (1 + aux_groups) x num_queries in
        training (the model's own first)."""
        n, _, c = memory.shape
        groups = 1 + self.aux_groups if self.training else 1
        embed = self.query_embed.weight[:self.num_queries * groups]
        if self.two_stage:
            if proposals is None:
                raise ValueError("a two-stage decoder needs the encoder proposals")
            tgt = embed[None].expand(n, -1, -1)
            query_pos = proposals["query_pos"].repeat(1, groups, 1)
            reference_points = proposals["reference_points"].repeat(1, groups, 1)
        else:
            query_pos, tgt = embed.split(c, dim=1)
            query_pos = query_pos[None].expand(n, -1, -1)
            tgt = tgt[None].expand(n, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        ref_input = reference_points[:, :, None] * valid_ratios[:, None]
        hs = []
        for layer in self.layers:
            tgt = layer(tgt, query_pos, ref_input, memory, spatial_shapes, level_start_index,
                        padding_mask, groups)
            hs.append(tgt)
        return torch.stack(hs), reference_points
