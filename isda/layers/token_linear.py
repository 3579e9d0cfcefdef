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
other dtypes). The model uses it only after :func:`isda.cpu_fast_paths.convert_to_cpu_fast_paths`
(config key ``MODEL.CPU_FAST_PATHS``).

Shapes: input [..., C_in] -> [..., C_out].
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenLinear", "token_linear"]

MIN_ROWS = 1024
#: fp32, and bf16 (``MODEL.ISDA.TEST.PRECISION bf16``: under CPU autocast a Linear layer's input
#: may already be bf16; oneDNN's bf16 convolution uses the CPU's AVX512-BF16 / AMX instructions)
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _use_onednn(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES
            and x.dim() >= 2 and x.numel() >= MIN_ROWS * x.shape[-1]
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def token_linear(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through a oneDNN 1x1 convolution for large CPU inputs."""
    if not _use_onednn(x):
        return F.linear(x, weight, bias)
    c_out, c_in = weight.shape
    lead = x.shape[:-1]
    rows = x.reshape(-1, c_in)
    # [R, C_in] rows -> a channels-last [1, C_in, R, 1] view (no copy); the output comes back
    # channels-last, i.e. as contiguous [R, C_out] rows
    y = F.conv2d(rows.view(1, -1, 1, c_in).permute(0, 3, 1, 2), weight.view(c_out, c_in, 1, 1), bias)
    y = y.permute(0, 2, 3, 1)
    return y.reshape(*lead, c_out)


class TokenLinear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`token_linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_linear(x, self.weight, self.bias)
