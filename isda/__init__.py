"""ISDA: position-aware instance segmentation with deformable attention, as a Detectron2 project.

Importing the package registers the ``ISDA`` meta-architecture and the embedded datasets.
"""
import warnings

# Detectron2 (v0.6 and current main) and fvcore script a few helpers with torch.jit.script when
# their modules are imported (box_regression, fvcore.nn's focal losses); recent torch deprecates
# that API with a FutureWarning per call. Harmless here: silence that one warning while these
# imports run (a later torch.jit.script call of the user's still warns).
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning)
    from . import data  # noqa: F401  (registers datasets)
    from . import modeling  # noqa: F401  (registers the meta-architecture)
    from .config import add_isda_config

__version__ = "0.1.0"
__all__ = ["add_isda_config", "__version__"]
