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


_UNLOADED = object()
_extension = _UNLOADED  # the loaded isda._C (None when missing), once asked
_has_cuda = False


def load_extension():
    """The extension ``isda._C`` once it has registered ``torch.ops.isda.ms_deform_attn``, or
    None (not built, or built before the op was a torch operator)."""
    global _extension, _has_cuda
    if _extension is _UNLOADED:
        try:
            from isda import _C
            torch.ops.isda.ms_deform_attn  # noqa: B018  (registered when _C is loaded)
            _extension, _has_cuda = _C, bool(_C.has_cuda())
        except (ImportError, AttributeError, RuntimeError):
            _extension = None
    return _extension


def compiled_available(device: Any = "cpu") -> bool:
    """Whether the compiled op can run on ``device``."""
    if load_extension() is None:
        return False
    dev = torch.device(device)
    return dev.type == "cpu" or (dev.type == "cuda" and _has_cuda)


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
