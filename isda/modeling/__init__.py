"""ISDA's model: the meta-architecture and its parts."""
from .meta_arch import ISDA  # noqa: F401
