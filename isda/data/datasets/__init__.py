from . import builtin as register_builtin  # noqa: F401
