"""The process's CPU memory policy for training and inference on the CPU.

PyTorch's CPU allocator is plain ``malloc``/``free``, and glibc serves large tensors in one of
two ways, both bad for a training loop that frees and re-allocates the same large activations
every iteration:

* its default maps every block above its mmap threshold afresh and unmaps it on free: each
  large activation is page-faulted and zeroed again in every iteration (at 800x1216, 1-2 million
  page faults and +35 % step time for ISDA-R50);
* with mmap off (the ``"keep"`` policy) freed blocks stay in one heap and are reused without
  faults, but the heap fragments: small long-lived objects land between large transient tensors,
  and ISDA-R50's training peak RSS at 800x1216 was 1.6-2.1 GB above what mmap-per-block needs.

The ``"cache"`` policy (the default) installs ISDA's large-block cache as torch's CPU allocator
(``ops/cpu_allocator/block_cache.cpp``, extension ``isda._cpu_cache``): blocks of at least
``ISDA_CPU_CACHE_MIN_KB`` (default 1024) are mapped on their own, rounded up to a size class
(at most 12.5 % slack) and kept on free for the next tensor of the same class; a tensor of
another class takes the pages of idle blocks (a larger one cut to size, or smaller ones moved
together by ``mremap``), so the process grows only when no idle block is left; idle blocks beyond
``ISDA_CPU_CACHE_MB`` (default :data:`DEFAULT_CACHE_MB`) go back to the system, least recently
freed first. Smaller blocks stay with glibc. ``ISDA_CPU_CACHE_HUGEPAGES=1`` advises transparent
huge pages for newly mapped blocks of 2 MB and more (off by default: it speeds up mapping
afresh, a limit of 0, by about a sixth but not the default limit; benchmarks/cpu_allocator.py).
Where the extension was not built (or off Linux), ``"cache"`` falls back to ``"keep"``. Measured effect: ``docs/benchmarks.md``.

``ISDA_CPU_ALLOCATOR``: ``cache`` (default), ``keep`` or ``system`` (glibc untouched). The
policy is process-wide and applied once (tensors allocated before keep their allocator). With
CUDA tensors it changes nothing that matters.
"""
import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["apply_allocator_policy", "allocator_policy", "block_cache_stats", "POLICIES",
           "DEFAULT_CACHE_MB"]

POLICIES = ("cache", "keep", "system")
#: idle large blocks kept for reuse (MB): above ISDA-R50's per-iteration turnover of large
#: blocks at 800x1216 (about 1.2 GB freed at the end of a training step and needed again in the
#: next), so a step faults in almost no pages; the peak is not raised by it, as a request of
#: another size takes idle blocks' pages first (docs/benchmarks.md: 512 MB cost 5-15 % of a step
#: in page faults for the same peak within 1.5 %)
DEFAULT_CACHE_MB = 2048
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied = None


def allocator_policy() -> str:
    """The requested policy: ``ISDA_CPU_ALLOCATOR`` (default ``"cache"``)."""
    value = os.environ.get("ISDA_CPU_ALLOCATOR", "cache").strip().lower() or "cache"
    if value not in POLICIES:
        raise ValueError(f"ISDA_CPU_ALLOCATOR must be one of {', '.join(POLICIES)}; got {value!r}")
    return value


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _block_cache_module():
    try:
        from isda import _cpu_cache
    except ImportError:
        return None
    return _cpu_cache


def _install_block_cache() -> bool:
    module = _block_cache_module()
    if module is None:
        return False
    min_kb = max(_env_int("ISDA_CPU_CACHE_MIN_KB", 1024), 4)
    limit_mb = _env_int("ISDA_CPU_CACHE_MB", DEFAULT_CACHE_MB)
    huge = _env_int("ISDA_CPU_CACHE_HUGEPAGES", 0)
    if huge > 1:
        raise ValueError(f"ISDA_CPU_CACHE_HUGEPAGES must be 0 or 1, got {huge}")
    return bool(module.install(min_kb << 10, limit_mb << 20, bool(huge)))


def _keep_in_heap() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1


def apply_allocator_policy() -> str:
    """Apply :func:`allocator_policy` once per process; returns the policy in effect:
    ``"cache"``, ``"keep"`` or ``"system"`` (also when a request could not be applied)."""
    global _applied
    if _applied is not None:
        return _applied
    requested = allocator_policy()
    _applied = "system"
    if requested != "system" and sys.platform.startswith("linux"):
        if requested == "cache" and _install_block_cache():
            _applied = "cache"
        elif _keep_in_heap():
            _applied = "keep"
    logging.getLogger(__name__).info("CPU allocator: %s (ISDA_CPU_ALLOCATOR=%s)", _applied, requested)
    return _applied


def block_cache_stats():
    """The large-block cache's counters (dict: in_use_bytes, cached_bytes, peak_in_use_bytes,
    hits, misses, released, min_bytes, cache_limit), or None when it is not installed."""
    module = _block_cache_module()
    if module is None or not module.installed():
        return None
    return dict(module.stats())
