from .datasets import register_builtin  # noqa: F401  (registers the embedded datasets)
