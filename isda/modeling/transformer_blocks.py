"""Pieces shared by the deformable encoder and decoder layers."""
import torch
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from ..layers.token_linear import linear_input_grad

__all__ = ["ACTIVATIONS", "ActivationDropout", "feed_forward", "layer_norm_keeping_output"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}

#: token rows per chunk of the feed-forward block without gradient (inference): the [rows,
#: d_ffn] hidden state then never exists for all tokens at once (83 MB per encoder layer of
#: ISDA-R50 at 800x1216)
INFERENCE_CHUNK_ROWS = 4096


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


def _relu_dropout_with_mask(h, p, seed=None, in_place=False):
    """``dropout(relu(h))``, its uint8 mask (1 where the value is kept and positive) and the
    seed that regenerates the mask from ``h`` (None: keep the mask). The compiled
    counter-based kernel on the CPU when built (the mask is a function of the seed, the element
    index and the sign of ``h``), else torch's random numbers. ``in_place``: with the compiled
    kernel a contiguous ``h`` (a temporary of the caller) becomes the output (no second
    [rows, d_ffn] tensor; the backward pass rebuilds the forward's output this way from ``seed``)."""
    from ..layers.dropout import _draw_seed, _extension, fast_dropout_available

    if fast_dropout_available(h):
        seed = _draw_seed() if seed is None else seed
        ext = _extension()
        if in_place and h.is_contiguous():
            if hasattr(ext, "dropout_forward_"):
                return h, ext.dropout_forward_(h, p, seed, True), seed
            if hasattr(ext, "dropout_mask"):  # an extension built before the in-place kernel
                mask = ext.dropout_mask(h, p, seed, True)
                return h.mul_(mask).mul_(1.0 / (1.0 - p)), mask, seed
        out, mask = ext.dropout_forward(h.contiguous(), p, seed, True)
        return out, mask, seed
    mask = ((torch.rand_like(h) >= p) & (h > 0)).to(torch.uint8)
    return h * mask * (1.0 / (1.0 - p)), mask, None


def _scale_by_mask_(grad, mask, scale):
    """``grad *= mask * scale`` in place (the dropout's backward on a contiguous gradient)."""
    from ..layers.dropout import _extension

    ext = _extension() if grad.device.type == "cpu" and grad.is_contiguous() else None
    if ext is not None and hasattr(ext, "dropout_backward_"):
        ext.dropout_backward_(grad, mask, scale)
        return grad
    return grad.mul_(mask).mul_(scale)


class _ReluFeedForward(Function):
    """``linear2(dropout(relu(linear1(x))))`` that keeps only ``x`` for the backward pass (not
    the [rows, d_ffn] hidden state, its dropped-out copy or, with the compiled dropout, the
    mask): the hidden state is recomputed from ``x`` there (one more ``linear1`` product) and
    the compiled kernel's mask from its seed (torch's dropout: the uint8 mask is kept). Same
    math as the modules; the Linear modules' own forward (nn.Linear or TokenLinear) computes
    the products in the forward pass and the recomputation."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, linear1, linear2, p):
        h = linear1(x)
        mask = seed = None
        if p > 0:
            a, mask, seed = _relu_dropout_with_mask(h, p, in_place=True)  # h: our temporary
            if seed is not None:
                mask = None  # regenerated in the backward pass
        else:
            a = F.relu(h)
        del h
        y = linear2(a)
        ctx.linear1, ctx.linear2, ctx.p, ctx.seed = linear1, linear2, p, seed
        ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
        ctx.save_for_backward(x, w1, w2, mask)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, w1, w2, mask = ctx.saved_tensors
        with torch.no_grad():
            h = ctx.linear1(x)  # recomputed: the same product as in the forward pass
        h = h.reshape(-1, h.shape[-1]).contiguous()
        scale = None
        if ctx.seed is not None:  # the compiled kernel's output and mask, rebuilt from its seed
            a, mask, _ = _relu_dropout_with_mask(h, ctx.p, ctx.seed, in_place=True)
            scale = 1.0 / (1.0 - ctx.p)
        elif mask is not None:  # torch's random numbers: the kept mask (kept and positive)
            mask, scale = mask.reshape(h.shape), 1.0 / (1.0 - ctx.p)
            a = h.mul_(mask).mul_(scale)
        else:  # no dropout
            mask = h > 0
            a = h.clamp_(min=0)
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_w2 = g.t().mm(a)
        grad_b2 = g.sum(0) if ctx.has_b2 else None
        del a, h
        grad_h = linear_input_grad(g, w2, ctx.linear2).contiguous()
        if scale is not None:
            _scale_by_mask_(grad_h, mask, scale)
        else:
            grad_h.mul_(mask)
        del mask
        x2 = x.reshape(-1, x.shape[-1])
        grad_w1 = grad_h.t().mm(x2)
        grad_b1 = grad_h.sum(0) if ctx.has_b1 else None
        grad_x = linear_input_grad(grad_h, w1, ctx.linear1).reshape(x.shape)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


def feed_forward(x, linear1, activation_dropout, linear2):
    """The transformer's feed-forward block ``linear2(activation_dropout(linear1(x)))``.

    With gradient and a ReLU activation, the [rows, d_ffn] hidden state is recomputed in the
    backward pass instead of being kept (:class:`_ReluFeedForward`); without gradient, it is
    computed in chunks of :data:`INFERENCE_CHUNK_ROWS` token rows. Same values as the plain
    composition (float rounding aside)."""
    if torch.is_grad_enabled():
        # autocast (e.g. AMP training): the backward pass would not recompute in the forward's
        # precision, so the plain composition runs
        if activation_dropout.activation != "relu" or torch.is_autocast_enabled(x.device.type):
            return linear2(activation_dropout(linear1(x)))
        p = activation_dropout.dropout.p if activation_dropout.training else 0.0
        return _ReluFeedForward.apply(x, linear1.weight, linear1.bias, linear2.weight,
                                      linear2.bias, linear1, linear2, float(p))
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] <= INFERENCE_CHUNK_ROWS:
        return linear2(activation_dropout(linear1(x)))
    parts = [linear2(activation_dropout(linear1(r))) for r in rows.split(INFERENCE_CHUNK_ROWS)]
    return torch.cat(parts).reshape(*x.shape[:-1], parts[0].shape[-1])


#: smallest |gain| divided by when the LayerNorm input is rebuilt from its output (as apex's
#: memory-efficient LayerNorm does); gains nearer zero are clamped to it
_MIN_GAIN = 1e-4


class _LayerNormFromOutput(Function):
    """``layer_norm(x)`` over the last dim that keeps its output (and the per-row mean and
    1 / std) for the backward pass instead of its input: in a post-norm layer the output is kept
    anyway by the next block, so the [rows, C] input no longer is. The backward pass rebuilds the
    input as ``(y - bias) / weight / rstd + mean`` and runs torch's LayerNorm backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)
        ctx.save_for_backward(y, weight, bias, mean, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        y, weight, bias, mean, rstd = ctx.saved_tensors
        gain = torch.where(weight >= 0, weight.clamp(min=_MIN_GAIN), weight.clamp(max=-_MIN_GAIN))
        x = (y - bias).div_(gain).div_(rstd).add_(mean)
        grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
            grad_y.contiguous(), x, (x.shape[-1],), mean, rstd, weight, bias,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
        return grad_x, grad_w, grad_b, None


def layer_norm_keeping_output(x, norm: nn.LayerNorm):
    """``norm(x)``; with gradient (and an affine LayerNorm over the last dim, no autocast) the
    backward pass keeps the output instead of the input (:class:`_LayerNormFromOutput`): for
    post-norm layers whose output the next block keeps. Same values as ``norm(x)``."""
    if (not torch.is_grad_enabled() or not norm.elementwise_affine or norm.bias is None
            or len(norm.normalized_shape) != 1 or torch.is_autocast_enabled(x.device.type)):
        return norm(x)
    return _LayerNormFromOutput.apply(x, norm.weight, norm.bias, norm.eps)
