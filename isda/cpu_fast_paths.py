"""ISDA's CPU speed-ups, applied to a built model by one explicit conversion.

The model in :mod:`isda.modeling` is the paper's, in plain PyTorch (``nn.Linear``,
``nn.Dropout``). On the CPU three things make it train about 1.5x faster here
(``benchmarks/cpu_fast_paths.py``, ``docs/benchmarks.md``), none of which changes what is
computed beyond float rounding and the random draw of dropout:

* :class:`~isda.layers.token_linear.TokenLinear`: the transformer's token-heavy ``nn.Linear``
  layers as oneDNN 1x1 convolutions (faster than MKL's fp32 GEMM on AMD CPUs);
* :class:`~isda.layers.dropout.FastDropout` and a fused ReLU + dropout for the feed-forward
  blocks: the compiled counter-based dropout kernel (torch's CPU dropout costs more than the
  Linear layer before it);
* the CPU memory policy (:mod:`isda.utils.cpu_allocator`): a large-block cache, so that the
  large activations re-allocated every iteration cost no page faults and fragment no heap
  (process-wide).

:func:`convert_to_cpu_fast_paths` swaps the classes of the transformer's modules in place, the
way ``nn.SyncBatchNorm.convert_sync_batchnorm`` swaps normalisation layers: parameters, state
dict and optimizer references stay the same object. :func:`convert_to_plain` undoes it (export
uses the plain model). The switch is the config key ``MODEL.CPU_FAST_PATHS`` (default True),
read by the meta-architecture, which converts only when ``MODEL.DEVICE`` is the CPU.
"""
from torch import nn

from .layers.dropout import FastDropout, relu_dropout
from .layers.ms_deform_attn import MSDeformAttn
from .layers.token_linear import TokenLinear
from .modeling.deformable_decoder import DeformableDecoderLayer
from .modeling.deformable_encoder import DeformableEncoderLayer
from .modeling.transformer_blocks import ACTIVATIONS, ActivationDropout
from .utils.cpu_allocator import apply_allocator_policy

__all__ = ["FastActivationDropout", "convert_to_cpu_fast_paths", "convert_to_plain",
           "fast_path_modules"]

#: Modules whose direct ``nn.Linear`` children run over every token (thousands of rows).
TOKEN_LAYER_OWNERS = (MSDeformAttn, DeformableEncoderLayer, DeformableDecoderLayer)


class FastActivationDropout(ActivationDropout):
    """:class:`ActivationDropout` with the compiled dropout; ReLU fused into it."""

    def forward(self, x):
        if self.activation == "relu":
            return relu_dropout(x, self.dropout.p, self.training)
        return self.dropout(ACTIVATIONS[self.activation](x))


_FAST = {nn.Linear: TokenLinear, nn.Dropout: FastDropout, ActivationDropout: FastActivationDropout}
_PLAIN = {fast: plain for plain, fast in _FAST.items()}


def _targets(model: nn.Module):
    """(module, its class swap table key) for every module the conversion concerns."""
    for owner in model.modules():
        if not isinstance(owner, TOKEN_LAYER_OWNERS):
            continue
        for child in owner.children():
            yield child
            if isinstance(child, ActivationDropout):
                yield child.dropout


def convert_to_cpu_fast_paths(model: nn.Module, allocator: bool = True) -> nn.Module:
    """Swap the transformer's Linear / Dropout / activation-dropout modules of ``model`` for
    their CPU fast twins (in place; returns ``model``); ``allocator`` also applies the
    CPU memory policy to this process (:func:`~isda.utils.cpu_allocator.apply_allocator_policy`)."""
    for module in _targets(model):
        fast = _FAST.get(type(module))
        if fast is not None:
            module.__class__ = fast
    if allocator:
        apply_allocator_policy()
    return model


def convert_to_plain(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_to_cpu_fast_paths`: the plain PyTorch modules (in place)."""
    for module in model.modules():
        plain = _PLAIN.get(type(module))
        if plain is not None:
            module.__class__ = plain
    return model


def fast_path_modules(model: nn.Module):
    """Qualified names of the fast-path modules in ``model`` (empty for a plain model)."""
    return [name for name, m in model.named_modules() if type(m) in _PLAIN]
