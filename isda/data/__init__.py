from .datasets import register_builtin  # noqa: F401  (registers the embedded datasets)
from .catalog import register_coco_instances  # noqa: F401,E402  (keeps COCO annotation ids)
