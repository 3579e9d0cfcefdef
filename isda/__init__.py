"""ISDA: position-aware instance segmentation with deformable attention, as a Detectron2 project.

Importing the package registers the ``ISDA`` meta-architecture and the embedded datasets.
"""
from . import data  # noqa: F401  (registers datasets)
from . import modeling  # noqa: F401  (registers the meta-architecture)
from .config import add_isda_config

__version__ = "0.1.0"
__all__ = ["add_isda_config", "__version__"]
