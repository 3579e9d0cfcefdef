"""``ISDAPredictor``: Detectron2's ``DefaultPredictor`` loading weights with ``ISDACheckpointer``
(so ``MODEL.WEIGHTS`` may be ``.safetensors``, ``.pth`` or ``.pkl``, loaded without running
pickled code), with a checked input.

Input contract of ``ISDAPredictor.__call__``: a numpy ``uint8`` array of shape ``[H, W, 3]``
(values 0..255) in the colour order ``image_format``, with ``H >= 1`` and ``W >= 1``. Anything
else raises ``ValueError`` saying what was given (type, shape, dtype) and how to convert it;
nothing is converted silently:

- 2-D grey arrays and ``[H, W, 1]`` are refused (stack the channel 3 times);
- ``[H, W, 4]`` (RGBA / BGRA) is refused (drop the alpha channel);
- float images are refused (scale to 0..255 and convert to uint8: a [0, 1] float image fed as
  is looks black to the network, which still returns its top-k detections);
- other integer / bool dtypes are refused (convert to uint8);
- empty images (``H == 0`` or ``W == 0``) are refused.

The smallest size is 1x1: the model pads its input to a multiple of 32, so 1x1, 1xN and 2x2
images run (finite scores, masks of the image size; ``tests/engine/test_predictor_inputs.py``). When
``INPUT.MIN_SIZE_TEST`` resizes the image and ``INPUT.MAX_SIZE_TEST`` caps the long side, a very
elongated image (e.g. 1x1000 with 128 / 192) would round its short side to 0 pixels; it is kept
at 1 pixel instead.
"""
import logging

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from .checkpoint import ISDACheckpointer
from .config import with_resolved_device

__all__ = ["ISDAPredictor", "build_isda_predictor", "check_image"]

logger = logging.getLogger(__name__)


def check_image(image, image_format="BGR"):
    """Raise ``ValueError`` unless ``image`` is a numpy uint8 ``[H, W, 3]`` array with
    ``H, W >= 1``; the message names the type / shape / dtype given and the conversion to make."""
    expected = f"a numpy uint8 array of shape [H, W, 3] ({image_format}, values 0..255)"
    if not isinstance(image, np.ndarray):
        shape = getattr(image, "shape", None)
        extra = f" of shape {tuple(shape)}" if shape is not None else ""
        raise ValueError(f"image must be {expected}; got a {type(image).__module__}."
                         f"{type(image).__qualname__}{extra} (convert it with np.asarray; a "
                         f"torch tensor with .cpu().numpy(), then to uint8 [H, W, 3])")
    given = f"got shape {tuple(image.shape)}, dtype {image.dtype}"
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise ValueError(f"image must be {expected}; {given}: a grey image is not converted "
                         f"implicitly, stack it to 3 channels first, e.g. "
                         f"np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)")
    if image.ndim == 3 and image.shape[2] == 4:
        raise ValueError(f"image must be {expected}; {given}: 4 channels (with alpha?), drop the "
                         f"alpha channel first, e.g. image[:, :, :3]")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be {expected}; {given}")
    if image.dtype != np.uint8:
        if np.issubdtype(image.dtype, np.floating):
            if image.size:
                lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
                given += f", values in [{lo:g}, {hi:g}]"
            raise ValueError(f"image must be {expected}; {given}: float images are not accepted, "
                             f"convert to uint8 0..255 first, e.g. for values in [0, 1] "
                             f"(image * 255).round().clip(0, 255).astype(np.uint8)")
        raise ValueError(f"image must be {expected}; {given}: convert to uint8 0..255 first "
                         f"(e.g. image.astype(np.uint8) once its values are in 0..255)")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be {expected} with H >= 1 and W >= 1; {given} (an empty "
                         f"image)")


class ISDAPredictor(DefaultPredictor):
    """Single-image inference like :class:`DefaultPredictor` (same attributes and call), with
    :class:`ISDACheckpointer`, an optional colour order and a checked input image (see the
    module docstring)."""

    def __init__(self, cfg):  # noqa: D107  (DefaultPredictor.__init__ is replaced, not extended)
        self.cfg = with_resolved_device(cfg.clone())  # MODEL.DEVICE auto: CUDA, else the CPU
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        # strict loading (missing / unexpected / mis-shaped parameters, or no weights, raise)
        # unless MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS; see isda/checkpoint.py
        allow_partial = bool(cfg.MODEL.ISDA.get("ALLOW_PARTIAL_WEIGHTS", False))
        # (the keyword only when set: strict is the checkpointer's default)
        options = {"allow_partial": True} if allow_partial else {}
        ISDACheckpointer(self.model, **options).load(cfg.MODEL.WEIGHTS)
        if not cfg.MODEL.WEIGHTS:  # accepted by the checkpointer: say it
            logger.warning("MODEL.WEIGHTS is empty: ISDAPredictor runs a randomly initialised "
                           "model")
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format}")

    def _resize(self, image):
        """``ResizeShortestEdge`` with every side kept >= 1 pixel (its rounding gives 0 for a
        very elongated image once ``MAX_SIZE_TEST`` caps the long side)."""
        tfm = self.aug.get_transform(image)
        if isinstance(tfm, T.ResizeTransform) and min(tfm.new_h, tfm.new_w) < 1:
            tfm = T.ResizeTransform(tfm.h, tfm.w, max(tfm.new_h, 1), max(tfm.new_w, 1),
                                    tfm.interp)
        return tfm.apply_image(image)

    def __call__(self, original_image, image_format="BGR"):
        """original_image: numpy uint8 [H, W, 3] in ``image_format`` ("BGR" as in Detectron2's
        predictor, or "RGB"), H, W >= 1 -> the model's output dict for this image
        ("instances"). Raises ``ValueError`` for any other input (see :func:`check_image`)."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be RGB or BGR, got {image_format}")
        check_image(original_image, image_format)
        with torch.no_grad():
            if image_format != self.input_format:
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            if self.cfg.INPUT.MIN_SIZE_TEST > 0:
                image = self._resize(original_image)
            else:  # MIN_SIZE_TEST 0: native size (as ISDA's small configs use)
                image = original_image
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]


def build_isda_predictor(cfg):
    """An :class:`ISDAPredictor` for ``cfg`` (ISDA keys already added)."""
    return ISDAPredictor(cfg)
