from .meta_arch import ISDA  # noqa: F401
