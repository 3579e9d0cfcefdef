"""Keep freed tensor memory in the process for CPU training (glibc ``mallopt``).

PyTorch's CPU allocator is plain ``malloc``/``free``. glibc serves every block larger than its
mmap threshold (at most 32 MB) with a fresh ``mmap`` and returns it with ``munmap`` on free, so
each large activation of a training iteration (a [20197, 1024] float encoder FFN activation is
80 MB) is page-faulted and zeroed by the kernel again in every iteration: at 800x1216 that was
1-2 million page faults and seconds of system time per ISDA iteration. With mmap disabled and
trimming raised, freed blocks stay in the heap and are reused without faults.
Measured effect: ``benchmarks/isda_vs_maskrcnn.py`` (it applies this to both models alike) and
``docs/benchmarks.md``.

Costs: the process keeps its peak heap (RSS does not drop after a large step); fragmentation can
add to the peak. Opt out with ``ISDA_CPU_ALLOCATOR=system``. Only glibc (Linux) is affected;
elsewhere this is a no-op. With CUDA tensors it changes nothing that matters.
"""
import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["keep_freed_memory", "allocator_policy"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = None


def allocator_policy() -> str:
    """``"keep"`` (default) or ``"system"`` from ``ISDA_CPU_ALLOCATOR``."""
    value = os.environ.get("ISDA_CPU_ALLOCATOR", "keep").strip().lower() or "keep"
    if value not in ("keep", "system"):
        raise ValueError(f"ISDA_CPU_ALLOCATOR must be 'keep' or 'system', got {value!r}")
    return value


def keep_freed_memory() -> bool:
    """Apply the policy once per process; returns whether glibc was reconfigured."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if allocator_policy() != "keep" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    _applied = bool(ok)
    logging.getLogger(__name__).info(
        "CPU allocator: %s", "freed memory kept in the heap (ISDA_CPU_ALLOCATOR=keep)" if ok
        else "mallopt refused; system default kept")
    return _applied
