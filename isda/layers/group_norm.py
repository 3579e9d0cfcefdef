"""GroupNorm (optionally fused with the ReLU after it) that keeps its output for the backward pass.

``nn.GroupNorm`` keeps its input for the backward pass, and an in-place ReLU after it keeps its
output as well. Where the next layer keeps the normalised map anyway (the channel mapper's
levels are the mask-feature head's conv inputs) or keeps nothing (an upsampling or a sum
follows the ReLU), keeping the norm's output instead saves one map per norm:
:func:`group_norm_keeping_output` rebuilds the input from the output in the backward pass,
``x = (y - bias) / weight / rstd + mean`` per (image, group), as apex's memory-efficient
LayerNorm does, and runs torch's own GroupNorm backward on it. Same forward values as
``norm(x)`` (and ``relu(norm(x))``); the gradients agree up to float rounding.
"""
import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

__all__ = ["group_norm_keeping_output", "run_keeping_norm_outputs"]

#: smallest |gain| divided by when the input is rebuilt from the output; gains nearer zero are
#: clamped to it (the same rule as the encoder's LayerNorm keeping its output)
_MIN_GAIN = 1e-4


class _GroupNormFromOutput(Function):
    """``group_norm(x)`` (then ``relu`` when ``relu``) keeping the pre-activation output ``y``,
    the per-(image, group) mean and 1 / std instead of ``x``. x: [N, C, *] (any memory format)."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, relu):
        n, c = x.shape[:2]
        hw = x.numel() // (n * c) if n * c else 0
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, groups, eps)
        ctx.save_for_backward(y, weight, bias, mean, rstd)
        ctx.shape = (n, c, hw, groups)
        ctx.relu = relu
        return torch.relu(y) if relu else y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, weight, bias, mean, rstd = ctx.saved_tensors
        n, c, hw, groups = ctx.shape
        # work in the gradient's memory format (no copy of it; the rebuilt input follows it)
        if y.dim() == 4 and not grad.is_contiguous() and grad.is_contiguous(
                memory_format=torch.channels_last):
            fmt = torch.channels_last
        else:
            fmt = torch.contiguous_format
            grad = grad.contiguous()
        if ctx.relu:
            # the ReLU's backward in one pass (torch.where with a comparison took two, 2.4x
            # longer); it keeps the common layout of grad and y
            grad = torch.ops.aten.threshold_backward(grad, y, 0).contiguous(memory_format=fmt)
        gain = torch.where(weight >= 0, weight.clamp(min=_MIN_GAIN), weight.clamp(max=-_MIN_GAIN))
        # x = (y - bias) / gain / rstd + mean = y * a + b per (image, channel), in one pass
        per_image = [n, c] + [1] * (y.dim() - 2)
        mean_c = mean.repeat_interleave(c // groups, dim=1).view(n, c)
        rstd_c = rstd.repeat_interleave(c // groups, dim=1).view(n, c)
        a = (1.0 / (gain[None] * rstd_c)).to(y.dtype)
        b = (mean_c - bias[None] * a).to(y.dtype)
        x = torch.empty_like(grad, memory_format=fmt)
        torch.addcmul(b.view(per_image), y, a.view(per_image), out=x)
        grad_x, grad_w, grad_b = torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, weight, n, c, hw, groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b, None, None, None


def _applies(x, norm):
    return (torch.is_grad_enabled() and x.requires_grad and norm.affine
            and not torch.is_autocast_enabled(x.device.type) and x.dim() >= 3)


def group_norm_keeping_output(x, norm: nn.GroupNorm, relu: bool = False):
    """``norm(x)`` (``relu(norm(x))`` with ``relu``); with gradient, an affine norm and no
    autocast, the backward pass keeps the norm's output (before the ReLU) instead of its input
    (:class:`_GroupNormFromOutput`). x: [N, C, *] -> same shape."""
    if not _applies(x, norm):
        y = norm(x)
        return torch.relu(y) if relu else y
    return _GroupNormFromOutput.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps, relu)


def run_keeping_norm_outputs(layers: nn.Sequential, x):
    """``layers(x)`` with every ``nn.GroupNorm`` (and an ``nn.ReLU`` right after it) run by
    :func:`group_norm_keeping_output`: same values, the modules (and their state-dict keys)
    unchanged."""
    mods = list(layers)
    i = 0
    while i < len(mods):
        m = mods[i]
        if isinstance(m, nn.GroupNorm):
            relu = i + 1 < len(mods) and isinstance(mods[i + 1], nn.ReLU)
            x = group_norm_keeping_output(x, m, relu)
            i += 2 if relu else 1
            continue
        x = m(x)
        i += 1
    return x
