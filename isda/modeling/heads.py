"""Per-query prediction heads, shared by every decoder layer: class Linear and kernel MLP."""
import math

import torch
from torch import nn
from torch.nn import functional as F


def inverse_sigmoid(x, eps=1e-5):
    """Inverse of the sigmoid, with ``x`` clamped to [eps, 1 - eps]."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class ISDAHeads(nn.Module):
    """Class logits and dynamic mask kernels of each query.

    With ``kernel_ref_points`` ("KP") the MLP outputs ``kernel_dim - 2`` values and the kernel ends
    with ``inverse_sigmoid`` of the query's reference point (x, y); without, the MLP outputs all
    ``kernel_dim`` values.
    """

    def __init__(self, hidden_dim=256, num_classes=80, kernel_dim=256, kernel_ref_points=True,
                 prior_prob=0.01):
        super().__init__()
        self.kernel_ref_points = kernel_ref_points
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        mlp_out = kernel_dim - 2 if kernel_ref_points else kernel_dim
        self.kernel_embed = MLP(hidden_dim, hidden_dim, mlp_out, 3)

    def forward(self, hs, reference_points):
        """hs: [..., Q, C] (any leading dims, e.g. [layers, N]); reference_points: [N, Q, 2] ->
        (class logits [..., Q, K], kernels [..., Q, kernel_dim])."""
        logits = self.class_embed(hs)
        kernels = self.kernel_embed(hs)
        if self.kernel_ref_points:
            ref = inverse_sigmoid(reference_points).expand(*kernels.shape[:-1], 2)
            kernels = torch.cat([kernels, ref.to(kernels.dtype)], dim=-1)
        return logits, kernels


def predict_masks(kernels, mask_features):
    """Dynamic 1x1 convolution. kernels: [..., N, Q, D]; mask_features: [N, D, H, W] ->
    mask logits [..., N, Q, H, W] (one batched matmul, no loop over queries)."""
    n, d, h, w = mask_features.shape
    out = torch.matmul(kernels, mask_features.reshape(n, d, h * w))
    return out.reshape(*kernels.shape[:-1], h, w)
