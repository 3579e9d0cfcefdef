"""Input checks of multi-scale deformable attention (shapes, dtypes, devices, level metadata).

Every call checks the inputs' types, dtypes, devices and shapes (tensor metadata, free on any
device). The checks that need the *values* of ``spatial_shapes`` and ``level_start_index``
(non-negative sizes summing to S, starts equal to the exclusive cumsum) run on CPU tensors only:
on the GPU they would copy to the host and synchronise every call, so the compiled CUDA path
makes no device-to-host copy (checked by ``tests/ops/test_gpu.py``), nor do traced calls
(``torch.compile``, ``torch.export``). Wrong level metadata on the GPU
makes the kernels read out of bounds: to debug, turn the value checks on for every device with
``ISDA_MSDA_VALIDATE=1`` or :class:`set_validation`.
"""
import os

import torch

__all__ = ["set_validation", "get_validation", "validate_inputs", "promoted_dtypes"]

_validate_values = os.environ.get("ISDA_MSDA_VALIDATE", "0").strip().lower() in (
    "1", "true", "yes", "on")


class set_validation:
    """Check the values of ``spatial_shapes``/``level_start_index`` on every device (``True``,
    a debug switch: a device-to-host copy per call on the GPU) or on CPU tensors only (``False``,
    the default unless ``ISDA_MSDA_VALIDATE=1``). Shape, dtype and device checks always run.

    Takes effect immediately; used as a context manager it restores the previous setting on exit.
    """

    def __init__(self, enabled: bool = True):
        global _validate_values
        self.previous = _validate_values
        _validate_values = bool(enabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _validate_values
        _validate_values = self.previous
        return False


def get_validation() -> bool:
    """Whether the value checks also run on non-CPU tensors (see :class:`set_validation`)."""
    return _validate_values


def validate_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Check shapes, dtypes and devices; raise ValueError naming the offending argument.

    The level metadata's values are checked on CPU tensors, elsewhere only when
    :func:`get_validation` is on (they would need a device-to-host copy)."""
    named = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name in ("value", "sampling_locations", "attention_weights"):
        if not named[name].is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {named[name].dtype}")
    for name in ("spatial_shapes", "level_start_index"):
        t = named[name]
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor (int64), got {t.dtype}")
    for name, t in named.items():
        if t.device != value.device:
            raise ValueError(f"{name} is on {t.device} but value is on {value.device}; "
                             "all inputs must be on the same device")
    if value.dim() != 4:
        raise ValueError(f"value must be [N, S, M, D], got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [L, 2], got shape {tuple(spatial_shapes.shape)}")
    L = spatial_shapes.shape[0]
    if level_start_index.shape != (L,):
        raise ValueError(f"level_start_index must be [L] = [{L}] (L from spatial_shapes), "
                         f"got shape {tuple(level_start_index.shape)}")
    N, S, M, _ = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError("sampling_locations must be [N, Lq, M, L, P, 2], got shape "
                         f"{tuple(sampling_locations.shape)}")
    n, lq, m, l, p, _ = sampling_locations.shape
    if (n, m, l) != (N, M, L):
        raise ValueError(f"sampling_locations shape {tuple(sampling_locations.shape)} does not match "
                         f"N={N}, M={M} of value and L={L} of spatial_shapes")
    if attention_weights.shape != (n, lq, m, l, p):
        raise ValueError(f"attention_weights must be [N, Lq, M, L, P] = {[n, lq, m, l, p]}, got "
                         f"shape {tuple(attention_weights.shape)}")
    if (value.device.type != "cpu" and not _validate_values) or _tracing(spatial_shapes):
        return
    shapes = spatial_shapes.detach().cpu().to(torch.int64)
    if (shapes < 0).any():
        raise ValueError(f"spatial_shapes must be non-negative, got {shapes.tolist()}")
    sizes = shapes[:, 0] * shapes[:, 1]
    if int(sizes.sum()) != S:
        raise ValueError(f"value has S={S} positions but spatial_shapes {shapes.tolist()} sums "
                         f"to {int(sizes.sum())}")
    expected = torch.cumsum(sizes, 0) - sizes
    if not torch.equal(level_start_index.detach().cpu().to(torch.int64), expected):
        raise ValueError(f"level_start_index {level_start_index.tolist()} must be the exclusive "
                         f"cumsum of H*W, i.e. {expected.tolist()}")


def _tracing(t) -> bool:
    """Whether ``t`` is being traced by ``torch.compile`` / ``torch.export`` (no values to read:
    the value checks are skipped there)."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def promoted_dtypes(value, sampling_locations, attention_weights):
    """(output dtype, compute dtype): the promoted float type; half/bfloat16 compute in float32."""
    out = torch.promote_types(torch.promote_types(value.dtype, sampling_locations.dtype),
                              attention_weights.dtype)
    compute = torch.float32 if out in (torch.float16, torch.bfloat16) else out
    return out, compute
