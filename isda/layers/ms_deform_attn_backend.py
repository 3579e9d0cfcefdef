"""Which implementation of multi-scale deformable attention runs: the compiled extension
``isda._C`` (CPU, and CUDA when built with it) or the pure-PyTorch reference.

The switch is :func:`set_backend` or the ``ISDA_MSDA_BACKEND`` environment variable: ``auto``
(compiled when usable, else the reference with one warning), ``compiled`` (an error when
unusable: for debugging builds) or ``reference``.
"""
import os
import warnings
from typing import Any

import torch

__all__ = ["set_backend", "get_backend", "compiled_available", "load_extension", "use_compiled"]

_BACKENDS = ("auto", "compiled", "reference")
_backend = os.environ.get("ISDA_MSDA_BACKEND", "auto").strip().lower() or "auto"
if _backend not in _BACKENDS:
    warnings.warn(f"ISDA_MSDA_BACKEND={_backend!r} is not one of {_BACKENDS}; using 'auto'")
    _backend = "auto"
_warned_fallback = False


class set_backend:
    """Select the implementation: ``"auto"`` (compiled if usable, else reference),
    ``"compiled"`` (error if unusable) or ``"reference"``.

    Takes effect immediately; used as a context manager it restores the previous backend on exit::

        with set_backend("reference"):
            out = attn(...)
    """

    def __init__(self, name: str):
        global _backend
        name = str(name).strip().lower()
        if name not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
        self.previous = _backend
        _backend = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _backend
        _backend = self.previous
        return False


def get_backend() -> str:
    """The current backend name (``auto``, ``compiled`` or ``reference``)."""
    return _backend


def load_extension():
    try:
        from isda import _C
    except ImportError:
        return None
    if not hasattr(_C, "ms_deform_attn_forward"):
        return None
    return _C


def compiled_available(device: Any = "cpu") -> bool:
    """Whether the compiled op can run on ``device``."""
    ext = load_extension()
    if ext is None:
        return False
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda":
        return bool(ext.has_cuda())
    return False


def use_compiled(device: torch.device) -> bool:
    """Whether :func:`ms_deform_attn` takes the compiled path for tensors on ``device``."""
    global _warned_fallback
    if _backend == "reference":
        return False
    usable = compiled_available(device)
    if _backend == "compiled":
        if not usable:
            raise RuntimeError(
                f"ISDA's compiled deformable attention is not available for device {device}: "
                "build it with `pip install --no-build-isolation -e .` (see docs/troubleshooting.md)"
            )
        return True
    if not usable and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"ISDA's compiled deformable attention is unavailable for device {device}; falling back "
            "to the slower pure-PyTorch grid_sample implementation (see docs/troubleshooting.md)."
        )
    return usable
