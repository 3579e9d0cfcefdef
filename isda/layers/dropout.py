"""Dropout for the transformer's CPU training: the compiled counter-based kernel, with a fused
ReLU + dropout for the feed-forward blocks.

``torch.nn.functional.dropout`` on the CPU draws one Bernoulli sample per element from a
sequential generator: on the encoder's [20197, 1024] FFN activations it costs more than the
Linear layer producing them (``benchmarks/dropout.py``). The kernel in ``isda._dropout`` (an optional extension, ``ops/dropout``) hashes
(seed, element index) instead (splitmix64, 32 bits per element, keep when the word is
>= round(p * 2^32)), multi-threaded and thread-count independent; the seed is drawn from torch's
default generator, so ``torch.manual_seed`` and checkpointed RNG states still reproduce a run.
The backward keeps only the seed (the mask is regenerated from it), or with the fused ReLU a
uint8 mask (torch's dropout keeps a bool mask).

On other devices (CUDA: torch's fused Philox kernel is already fast) or without the extension
the torch ops are used; outputs then differ in the random draw only. The model uses these only
after :func:`isda.cpu_fast_paths.convert_to_cpu_fast_paths` (config key
``MODEL.CPU_FAST_PATHS``).

Shapes: any; the output has the input's shape and dtype.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

__all__ = ["FastDropout", "dropout", "relu_dropout", "fast_dropout_available"]

def _extension():
    try:
        from isda import _dropout
    except ImportError:  # an optional extension: torch's dropout is used without it
        return None
    return _dropout


def fast_dropout_available(tensor: torch.Tensor) -> bool:
    """Whether the compiled kernel serves ``tensor`` (CPU, floating point, extension built)."""
    return (tensor.device.type == "cpu" and tensor.is_floating_point()
            and _extension() is not None)


def _draw_seed() -> int:
    # from torch's default CPU generator: reproducible under torch.manual_seed
    return int(torch.randint(-(2 ** 62), 2 ** 62, (1,), dtype=torch.int64).item())


class _DropoutFunction(Function):
    """The compiled dropout. Without the fused ReLU the backward pass keeps nothing but the
    seed: the mask is a function of (seed, element index) alone, so ``grad * mask * scale`` is
    the same kernel run on the gradient. With the ReLU the mask also depends on the sign of the
    input, and the uint8 mask is kept."""

    @staticmethod
    def forward(ctx, x, p: float, relu: bool):
        seed = _draw_seed()
        out, mask = _extension().dropout_forward(x, p, seed, relu)
        ctx.p, ctx.relu, ctx.seed = p, relu, seed
        ctx.scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(mask if relu else None)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if not ctx.relu:  # regenerate: the forward kernel applied to the gradient
            grad = _extension().dropout_forward(grad_out.contiguous(), ctx.p, ctx.seed, False)[0]
            return grad, None, None
        (mask,) = ctx.saved_tensors
        return _extension().dropout_backward(grad_out, mask, ctx.scale), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Drop-in for ``F.dropout(x, p, training)`` (not in place)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    if fast_dropout_available(x):
        return _DropoutFunction.apply(x, float(p), False)
    return F.dropout(x, p, True)


def relu_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(F.relu(x), p, training)`` in one pass (one uint8 mask saved for backward)."""
    if not training or p == 0.0:
        return F.relu(x)
    if p >= 1.0:
        return torch.zeros_like(x)
    if fast_dropout_available(x):
        return _DropoutFunction.apply(x, float(p), True)
    return F.dropout(F.relu(x), p, True)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` using :func:`dropout` (same constructor, no parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return dropout(x, self.p, self.training)
