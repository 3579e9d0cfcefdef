"""Pieces shared by the deformable encoder and decoder layers."""
from torch import nn
from torch.nn import functional as F

__all__ = ["ACTIVATIONS", "ActivationDropout"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class ActivationDropout(nn.Module):
    """The hidden step of the feed-forward block: ``dropout(activation(x))``.

    Args:
        activation: "relu" or "gelu".
        p: dropout probability.
    Shapes: any -> the same.
    """

    def __init__(self, activation: str = "relu", p: float = 0.1):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.dropout(ACTIVATIONS[self.activation](x))

    def extra_repr(self) -> str:
        return f"activation={self.activation}"
