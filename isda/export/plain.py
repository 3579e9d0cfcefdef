"""The "plain form" of a built ISDA model for export: the CPU fast paths undone.

A model built on the CPU carries ISDA's CPU speed-ups (``MODEL.CPU_FAST_PATHS``: oneDNN token
Linear layers, the compiled dropout, the fused ReLU + dropout; :mod:`isda.cpu_fast_paths`).
:func:`to_plain` converts a copy back to the paper's plain PyTorch modules with
:func:`isda.cpu_fast_paths.convert_to_plain`, so that tracers (``torch.export``, the ONNX
exporter) see only standard operators. The plain model computes the same function (the fast
Linear differs in summation order only; dropout is the identity in eval mode). The deformable
attention is not touched here: its export-friendly form needs the feature maps' symbolic sizes
(:mod:`isda.export.attention`).
"""
import copy

from torch import nn

from ..cpu_fast_paths import convert_to_plain, fast_path_modules

__all__ = ["to_plain", "plain_linear", "speedup_layers"]


def plain_linear(layer: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` sharing ``layer``'s weight and bias (same Parameter objects)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device="meta")
    out.weight = layer.weight
    out.bias = layer.bias
    out.train(layer.training)
    return out


def speedup_layers(model: nn.Module):
    """Qualified names of the speed-up layers in ``model`` (empty for a plain model)."""
    return fast_path_modules(model)


def to_plain(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` in its plain form (state dict unchanged): a converted deep copy, or ``model``
    itself with ``inplace=True``."""
    return convert_to_plain(model if inplace else copy.deepcopy(model))
