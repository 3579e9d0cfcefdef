"""bf16 inference with chosen submodules kept in fp32 (``MODEL.ISDA.TEST.PRECISION bf16``).

:func:`bf16_autocast` enters ``torch.autocast(device, bfloat16)`` for a model's forward and, while
it is active, runs the listed submodules with autocast off and their floating-point inputs cast
to fp32 (a forward pre-hook / hook pair installed for the duration only). ISDA keeps its
decoder, kernel heads and mask-feature head in fp32: their outputs meet in the dynamic mask
product, a 256-term dot product whose terms largely cancel, and bf16 rounding there (relative
2**-9 per value) moved masks of the trained nuclei model visibly (``benchmarks/bf16_agreement.py``,
``docs/benchmarks.md``); together they are under a fifth of ISDA-R50's inference time.
"""
import contextlib

import torch

__all__ = ["bf16_autocast"]


def _to_fp32(x):
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


@contextlib.contextmanager
def bf16_autocast(device_type, fp32_modules=()):
    """``torch.autocast(device_type, bfloat16)`` (weight cache off: no bf16 copy of the weights
    kept) with ``fp32_modules`` run in fp32 inside it."""
    handles = []
    states = []

    def pre(module, args, kwargs):
        states.append(torch.is_autocast_enabled(device_type))
        torch.set_autocast_enabled(device_type, False)
        return _to_fp32(args), _to_fp32(kwargs)

    def post(module, args, output):
        torch.set_autocast_enabled(device_type, states.pop())

    for m in fp32_modules:
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post))
    try:
        # on an exception inside a module, autocast's own exit restores the enabled state
        with torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False):
            yield
    finally:
        for h in handles:
            h.remove()
