"""Predictors for exported ISDA models, called like ``isda.predictor.ISDAPredictor``.

``OnnxPredictor(model_dir)`` runs ``model_dir/model.onnx`` in onnxruntime;
``ExportedProgramPredictor(model_dir)`` runs ``model_dir/model.pt2`` (``torch.export``) in
PyTorch. Both read ``model_dir/export.json`` (written by ``tools/deploy/export_model.py``) and::

    predictor = OnnxPredictor("exported/")
    outputs = predictor(bgr_image)          # numpy uint8 [H, W, 3]
    instances = outputs["instances"]        # pred_masks, scores, pred_classes, pred_boxes

Same input contract as ``ISDAPredictor`` (:func:`isda.predictor.check_image`: uint8 [H, W, 3],
``image_format`` "BGR" by default or "RGB"), same resize (``ResizeShortestEdge`` with the
config's ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, recorded in the sidecar), same
post-processing (:func:`isda.export.postprocess.outputs_to_instances`). One difference: the
exported graph needs a height and width >= 65 (``MIN_SIZE``); a smaller (resized) image is
padded at the bottom / right with the pixel mean up to 65 before the graph and the padding is
cropped from the masks afterwards. The PyTorch model masks its own padding instead, so at those
sizes results differ a little from ``ISDAPredictor``.
"""
import os
from typing import Optional

import numpy as np
import torch

from ..predictor import check_image
from .exporter import FILENAMES, network_input, read_sidecar
from .postprocess import outputs_to_instances

__all__ = ["OnnxPredictor", "ExportedProgramPredictor", "load_predictor"]


class _ExportedPredictor:
    """Pre-processing and post-processing shared by the runtimes (see the module docstring)."""

    fmt = None

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.meta = read_sidecar(model_dir)
        if self.meta.get("format") != self.fmt:
            raise ValueError(f"{model_dir} holds a {self.meta.get('format')!r} export, not "
                             f"{self.fmt!r}")
        self.model_path = os.path.join(model_dir, self.meta.get("file", FILENAMES[self.fmt]))
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"{self.model_path} is missing")
        inp = self.meta["input"]
        self.input_format = inp["channel_order"]
        self.min_size = int(inp["min_size"])
        self.pixel_mean = np.asarray(inp["pixel_mean"], dtype=np.float32)
        self.min_size_test = int(inp["resize"]["min_size_test"])
        self.max_size_test = int(inp["resize"]["max_size_test"])
        self.mask_stride = int(self.meta["mask_stride"])
        self.mask_threshold = float(self.meta["mask_threshold"])
        # TEST.DEDUP (exports before it have no entry: "none", the model's output as it was)
        self.dedup = dict({"method": "none", "iou": 0.5, "sigma": 2.0}, **self.meta.get("dedup", {}))
        self.class_names = self.meta.get("class_names")
        # full-size masks only for instances scoring at least this (the demo: its threshold)
        self.score_threshold = 0.0

    def run(self, image: np.ndarray):
        """float32 [1, 3, h, w] (h, w >= min_size) -> (scores, classes, mask_logits)."""
        raise NotImplementedError

    def check_network_input(self, image) -> None:
        """Refuse what the graph cannot take with an error saying why (onnxruntime failed deep
        in an Add node on a 64 px input): float32 [1, 3, h, w] with h, w >= ``min_size``."""
        shape = tuple(getattr(image, "shape", ()))
        if len(shape) != 4 or shape[:2] != (1, 3):
            raise ValueError(f"{self.model_path}: the graph takes float32 [1, 3, H, W]; got "
                             f"shape {shape}")
        if min(shape[2:]) < self.min_size:
            raise ValueError(
                f"{self.model_path}: the exported graph needs a height and width >= "
                f"{self.min_size} px (its backbone's stride-32 features must be at least 3 "
                f"wide); got {shape[2]}x{shape[3]}. Pad the image (the predictor's __call__ "
                "does it for you)")

    def __call__(self, original_image: np.ndarray, image_format: str = "BGR"):
        """original_image: numpy uint8 [H, W, 3] in ``image_format`` -> {"instances":
        Instances at H x W}. Raises ``ValueError`` for other inputs."""
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be RGB or BGR, got {image_format}")
        check_image(original_image, image_format)
        if image_format != self.input_format:
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        x = network_input(original_image, self.min_size_test, self.max_size_test)
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            padded = np.empty((1, 3, max(h, self.min_size), max(w, self.min_size)), np.float32)
            padded[:] = self.pixel_mean.reshape(1, 3, 1, 1)
            padded[:, :, :h, :w] = x
            x = padded
        scores, classes, mask_logits = self.run(x)
        instances = outputs_to_instances(scores, classes, mask_logits, (h, w), (height, width),
                                         self.mask_stride, self.mask_threshold,
                                         score_threshold=self.score_threshold,
                                         dedup=self.dedup["method"], dedup_iou=self.dedup["iou"],
                                         dedup_sigma=self.dedup["sigma"])
        return {"instances": instances}


class OnnxPredictor(_ExportedPredictor):
    """``model_dir/model.onnx`` in onnxruntime (default: ``CPUExecutionProvider``).

    Args:
        model_dir: an export directory (``model.onnx`` + ``export.json``).
        providers: onnxruntime execution providers.
        num_threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        spinning: let onnxruntime's idle worker threads spin (its default; a little lower
            latency on a dedicated machine). Off by default here: on shared or small machines
            spinning threads take the cores from everything else in the process (PyTorch).
    """

    fmt = "onnx"

    def __init__(self, model_dir: str, providers=("CPUExecutionProvider",),
                 num_threads: Optional[int] = None, spinning: bool = False):
        super().__init__(model_dir)
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = int(num_threads)
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.session = ort.InferenceSession(self.model_path, options, providers=list(providers))
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, image):
        self.check_network_input(image)
        out = dict(zip(self.output_names, self.session.run(None, {self.input_name: image})))
        return out["scores"], out["classes"], out["mask_logits"]


class ExportedProgramPredictor(_ExportedPredictor):
    """``model_dir/model.pt2`` (``torch.export.save``) run in PyTorch."""

    fmt = "torch_export"

    def __init__(self, model_dir: str):
        super().__init__(model_dir)
        self.program = torch.export.load(self.model_path)
        self.module = self.program.module()

    def run(self, image):
        self.check_network_input(image)
        with torch.no_grad():
            return self.module(torch.from_numpy(image))


def load_predictor(model_dir: str):
    """The predictor matching the export in ``model_dir`` (ONNX or ``torch.export``)."""
    fmt = read_sidecar(model_dir).get("format")
    if fmt == "onnx":
        return OnnxPredictor(model_dir)
    if fmt == "torch_export":
        return ExportedProgramPredictor(model_dir)
    raise ValueError(f"{model_dir}: unknown export format {fmt!r}")
