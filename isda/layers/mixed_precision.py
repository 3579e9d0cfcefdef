"""bf16 inference with chosen submodules kept in fp32 (``MODEL.ISDA.TEST.PRECISION bf16``).

:func:`bf16_autocast` enters ``torch.autocast(device, bfloat16)`` for a model's forward and, while
it is active, runs the listed submodules with autocast off and their floating-point inputs cast
to fp32 (a forward pre-hook / hook pair installed for the duration only). ISDA keeps its
decoder, kernel heads and mask-feature head in fp32: their outputs meet in the dynamic mask
product, a 256-term dot product whose terms largely cancel, and bf16 rounding there (relative
2**-9 per value) moved masks of the trained nuclei model visibly (measured with
``benchmarks/bf16_agreement.py``, in git history at commit 9f954e2; ``docs/benchmarks.md``);
together they are under a fifth of ISDA-R50's inference time.

bf16 is only fast where oneDNN has bf16 kernels for the CPU (x86: AVX-512 or AMX); elsewhere
(e.g. AVX2-only CPUs) torch emulates it and bf16 inference was 5.7x slower than fp32 in
``benchmarks/isda_vs_maskrcnn.py``: the first bf16 forward on such a CPU logs a warning.
"""
import contextlib
import functools
import logging

import torch

__all__ = ["bf16_autocast", "cpu_bf16_is_fast"]

_logger = logging.getLogger(__name__)
_warned_slow_cpu = False


@functools.lru_cache(maxsize=None)  # asked on every bf16 forward: the CPU does not change
def cpu_bf16_is_fast() -> bool:
    """Whether oneDNN has fast bf16 kernels on this CPU (its own check; True when unknown)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def _warn_if_slow_cpu_bf16(device_type) -> None:
    global _warned_slow_cpu
    if device_type != "cpu" or _warned_slow_cpu or cpu_bf16_is_fast():
        return
    _warned_slow_cpu = True
    _logger.warning(
        "MODEL.ISDA.TEST.PRECISION bf16 on a CPU without fast bf16 kernels (torch's CPU "
        "capability: %s; oneDNN needs AVX-512 or AMX for them): bf16 is emulated here and runs "
        "several times slower than fp32 (5.7x measured on an AVX2 CPU): use fp32 on this machine",
        torch.backends.cpu.get_cpu_capability())


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
    _warn_if_slow_cpu_bf16(device_type)
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
