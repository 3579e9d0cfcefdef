"""The "plain form" of a built ISDA model: device-specific speed-up layers back to stock PyTorch.

ISDA's CPU speed-ups are drop-in subclasses that keep the parameters and state dict of the
layer they stand for:

* :class:`isda.layers.token_linear.TokenLinear` (an ``nn.Linear`` computed as a oneDNN 1x1
  convolution on large CPU inputs) -> ``nn.Linear`` with the same weight and bias;
* :class:`isda.layers.dropout.FastDropout` (the compiled counter-based dropout) ->
  ``nn.Dropout`` with the same ``p`` (the identity in eval mode);
* where the checkout has ``isda.cpu_fast_paths`` (one explicit conversion to the CPU fast
  paths), its ``convert_to_plain`` runs first (it also undoes the fused ReLU + dropout).

:func:`to_plain` swaps them, so that tracers (``torch.export``, the ONNX exporter) see only
standard operators. The plain model computes the same function: a ``TokenLinear`` and its
``nn.Linear`` differ only in the summation order of the product (float rounding), dropout in
eval mode is the identity in both forms. The multi-scale deformable attention is not touched
here (its export-friendly form needs the feature maps' symbolic sizes: see
:mod:`isda.export.attention`).

Kept in its own file so that it can later be merged with the conversion that applies the CPU
speed-ups (the inverse of this one).
"""
import copy

from torch import nn

from ..layers.dropout import FastDropout
from ..layers.token_linear import TokenLinear

__all__ = ["to_plain", "plain_linear", "plain_dropout", "speedup_layers"]


def plain_linear(layer: nn.Linear) -> nn.Linear:
    """An ``nn.Linear`` sharing ``layer``'s weight and bias (same Parameter objects)."""
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                    device="meta")
    out.weight = layer.weight
    out.bias = layer.bias
    out.train(layer.training)
    return out


def plain_dropout(layer: nn.Dropout) -> nn.Dropout:
    """``nn.Dropout`` with ``layer``'s ``p``, ``inplace`` and train/eval mode."""
    out = nn.Dropout(layer.p, inplace=layer.inplace)
    out.train(layer.training)
    return out


def speedup_layers(model: nn.Module):
    """Qualified names of the speed-up layers in ``model`` (empty for a plain model)."""
    names = [name for name, m in model.named_modules() if type(m) in (TokenLinear, FastDropout)]
    try:
        from ..cpu_fast_paths import fast_path_modules
    except ImportError:
        return names
    return sorted(set(names) | set(fast_path_modules(model)))


def to_plain(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every ``TokenLinear`` replaced by ``nn.Linear`` and every ``FastDropout``
    by ``nn.Dropout``; the state dict (names, shapes, values) is unchanged.

    By default a deep copy is converted and ``model`` is left as it is; ``inplace=True``
    converts ``model`` itself (the new Linear layers then share its Parameters).
    """
    if not inplace:
        model = copy.deepcopy(model)
    try:  # the in-place class swap of ISDA's CPU fast paths, where the checkout has it
        from ..cpu_fast_paths import convert_to_plain
    except ImportError:
        convert_to_plain = None
    if convert_to_plain is not None:
        convert_to_plain(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, TokenLinear):
                setattr(parent, name, plain_linear(child))
            elif isinstance(child, FastDropout):
                setattr(parent, name, plain_dropout(child))
    return model
