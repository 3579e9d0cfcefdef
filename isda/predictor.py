"""``ISDAPredictor``: Detectron2's ``DefaultPredictor`` loading weights with ``ISDACheckpointer``
(so ``MODEL.WEIGHTS`` may be ``.safetensors``, ``.pth`` or ``.pkl``, loaded without running
pickled code)."""
import torch
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from .checkpoint import ISDACheckpointer

__all__ = ["ISDAPredictor", "build_isda_predictor"]


class ISDAPredictor(DefaultPredictor):
    """Single-image inference like :class:`DefaultPredictor` (same attributes and call), with
    :class:`ISDACheckpointer` and an optional colour order for the input image."""

    def __init__(self, cfg):  # noqa: D107  (DefaultPredictor.__init__ is replaced, not extended)
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        ISDACheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.aug = T.ResizeShortestEdge(
            [cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be RGB or BGR, got {self.input_format}")

    def __call__(self, original_image, image_format="BGR"):
        """original_image: uint8 [H, W, 3] in ``image_format`` ("BGR" as in Detectron2's
        predictor, or "RGB") -> the model's output dict for this image ("instances")."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be RGB or BGR, got {image_format}")
        with torch.no_grad():
            if image_format != self.input_format:
                original_image = original_image[:, :, ::-1]
            height, width = original_image.shape[:2]
            if self.cfg.INPUT.MIN_SIZE_TEST > 0:
                image = self.aug.get_transform(original_image).apply_image(original_image)
            else:  # MIN_SIZE_TEST 0: native size (as ISDA's small configs use)
                image = original_image
            image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
            return self.model([{"image": image, "height": height, "width": width}])[0]


def build_isda_predictor(cfg):
    """An :class:`ISDAPredictor` for ``cfg`` (ISDA keys already added)."""
    return ISDAPredictor(cfg)
