"""``nn.Linear`` for the transformer's token-heavy layers, computed by oneDNN on the CPU.

On CPUs where PyTorch's fp32 GEMM goes through MKL's generic path (AMD EPYC with AVX-512, for
example), the same product written as a 1x1 convolution over a [1, C_in, rows, 1] channels-last
view runs in oneDNN's AVX-512 kernels: measured 2.3-2.5x faster forward and 1.3x faster forward +
backward for the encoder's [20197, 256] x [256, 1024] layers (``benchmarks/token_linear.py``),
with the bias added inside the kernel instead of being copied into the output first. Same fp32
arithmetic, different summation order (results agree to float rounding).

:class:`TokenLinear` is a drop-in subclass of ``nn.Linear`` (same parameters, state dict and
initialisation); it takes the convolution path for float32 or bfloat16 CPU inputs with at least
``MIN_ROWS`` rows when oneDNN is available, and ``F.linear`` otherwise (GPU, small inputs,
other dtypes). In training its backward pass computes the input's gradient the same way (a
product with the transposed weight, :func:`linear_input_grad`) and the weight's with ``mm``
(oneDNN's own convolution backward was 1.3-1.6x slower than the two products here). The model
uses it only after :func:`isda.cpu_fast_paths.convert_to_cpu_fast_paths`
(config key ``MODEL.CPU_FAST_PATHS``).

Shapes: input [..., C_in] -> [..., C_out].
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function
from torch.autograd.function import once_differentiable

__all__ = ["TokenLinear", "token_linear", "linear_input_grad"]

MIN_ROWS = 1024
#: fp32, and bf16 (``MODEL.ISDA.TEST.PRECISION bf16``: under CPU autocast a Linear layer's input
#: may already be bf16; oneDNN's bf16 convolution uses the CPU's AVX512-BF16 / AMX instructions)
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _use_onednn(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
            and x.dim() >= 2 and x.numel() >= MIN_ROWS * x.shape[-1]
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    c_out, c_in = weight.shape
    lead = x.shape[:-1]
    rows = x.reshape(-1, c_in)
    # [R, C_in] rows -> a channels-last [1, C_in, R, 1] view (no copy); the output comes back
    # channels-last, i.e. as contiguous [R, C_out] rows
    y = F.conv2d(rows.view(1, -1, 1, c_in).permute(0, 3, 1, 2), weight.view(c_out, c_in, 1, 1), bias)
    y = y.permute(0, 2, 3, 1)
    return y.reshape(*lead, c_out)


class _TokenLinearFunction(Function):
    """``F.linear`` through oneDNN whose backward pass also runs the input's gradient through
    oneDNN (:func:`linear_input_grad`) and the weight's as one ``mm``. Keeps what ``F.linear``
    keeps (the input and the weight)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return _onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = token_linear(g, weight.t().contiguous()).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = g.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b


def token_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through a oneDNN 1x1 convolution for large CPU inputs."""
    if not _use_onednn(x):
        return F.linear(x, weight, bias)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias))
    # under autocast (AMP training) the convolution's own autograd keeps autocast's casts
    if needs_grad and not torch.is_autocast_enabled(x.device.type) and x.dtype == weight.dtype:
        return _TokenLinearFunction.apply(x, weight, bias)
    return _onednn_linear(x, weight, bias)


def linear_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, module: nn.Module):
    """The gradient of a Linear layer's input, ``grad_out @ weight``: grad_out [..., C_out],
    weight [C_out, C_in] -> [..., C_in]. For a :class:`TokenLinear` ``module`` (the CPU fast
    path) it is :func:`token_linear` with the transposed weight (oneDNN; 1.2-1.6x faster than
    MKL's ``mm`` at the encoder's sizes, ``benchmarks/token_linear.py``), else ``matmul``."""
    if isinstance(module, TokenLinear):
        return token_linear(grad_out, weight.t().contiguous())
    return grad_out.matmul(weight)


class TokenLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`token_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_linear(x, self.weight, self.bias)
