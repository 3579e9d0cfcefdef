"""Facts about the environment ISDA runs in."""
import functools


@functools.lru_cache(maxsize=None)
def detectron2_has_compiled_ops() -> bool:
    """True for a native/source Detectron2, False for the registry fallback (placeholder _C)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return not getattr(_C, "ISDA_PLACEHOLDER", False)
