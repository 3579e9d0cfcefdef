"""The one image reader of ISDA: training, evaluation, the demo, the predictor's file helper and
the export's sample image all read files through :func:`read_image`.

It is Detectron2's ``read_image`` (EXIF orientation, conversion to ``format``) except for
images with more than 8 bits: Detectron2 clips them at 255 (a 16-bit microscopy tile comes out
almost all white), here they are scaled to 0..255:

- 16-bit (PNG / TIFF ``I;16``, or ``I`` holding values above 255): ``round(v / 257)``;
- 32-bit integer holding values up to 255: unchanged;
- 32-bit float (TIFF ``F``): values within [0, 1] (normalised data) are multiplied by 255;
  values up to 255 are kept; larger ones are treated as 16-bit data (``/ 257``); values outside
  those ranges are clipped, with a warning naming the file.
"""
import logging

import numpy as np
from PIL import Image
from detectron2.data import detection_utils as utils

__all__ = ["read_image"]

logger = logging.getLogger(__name__)


def _to_8bit(image: Image.Image, file_name: str) -> Image.Image:
    a = np.asarray(image, dtype=np.float64)
    finite = a[np.isfinite(a)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 0.0
    if image.mode == "F" and 0.0 <= lo and hi <= 1.0:
        scale = 1.0 / 255.0  # normalised float data
    elif image.mode.startswith("I;16") or hi > 255:
        scale = 257.0  # 16-bit data: full range -> 0..255
    else:
        scale = 1.0
    if lo < 0 or hi / scale > 255.5 or finite.size != a.size:
        logger.warning("%s: %s image with values in [%g, %g]%s: clipped to 0..255 after "
                       "scaling by 1/%g", file_name, image.mode, lo, hi,
                       " and non-finite values" if finite.size != a.size else "", scale)
    a = np.nan_to_num(a / scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def read_image(file_name: str, format: str = "BGR") -> np.ndarray:
    """uint8 [H, W, C] array of ``file_name`` in ``format`` (as Detectron2's ``read_image``),
    with images of more than 8 bits scaled rather than clipped (see the module docstring)."""
    with open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()
    image = utils._apply_exif_orientation(image)
    if image.mode.startswith("I") or image.mode == "F":
        image = _to_8bit(image, file_name)
    array = utils.convert_PIL_to_numpy(image, format)
    # PIL's buffer is read-only: a writable copy, else torch warns in every resize of fvcore
    return array if array.flags.writeable else array.copy()
