"""Export an ISDA model to ONNX or to a ``torch.export`` program, with any input size.

The model is exported through :class:`isda.export.model.ExportableISDA`. Both formats come from one ``torch.export`` capture
with dynamic height and width (``Dim.DYNAMIC``, min :data:`MIN_SIZE`): the ONNX file is that
program translated by torch's dynamo-based ONNX exporter (needs ``onnxscript``).

Every export directory holds the model file and ``export.json`` (:data:`SIDECAR`), which says how
to feed the graph and read its outputs (see :func:`sidecar` and docs/deployment.md).
"""
import json
import logging
import os
from typing import Optional

import numpy as np
import torch

from .model import INPUT_NAMES, MIN_SIZE, OUTPUT_NAMES, ExportableISDA

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "SIDECAR", "FILENAMES", "dynamic_shapes",
           "export_program", "export_onnx", "sidecar", "write_sidecar", "read_sidecar",
           "export_isda", "network_input", "resized_shape"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MIN_OPSET = 16  # GridSample (bilinear, zeros, align_corners=0) is standard from opset 16
SIDECAR = "export.json"
FILENAMES = {"onnx": "model.onnx", "torch_export": "model.pt2"}
SIDECAR_VERSION = 1


def dynamic_shapes():
    """``dynamic_shapes`` for ``torch.export``: height and width dynamic, at least MIN_SIZE.

    ``Dim.DYNAMIC`` (not a named ``Dim``): the reshape of flattened tokens back to
    ``[H_l, W_l]`` maps records guards such as ``H_l * W_l != W_l`` that hold for every allowed
    size but that the constraint solver cannot prove for products of sizes; ``DYNAMIC`` keeps
    them as checks instead of refusing the export (it still fails if a size would be
    specialised)."""
    dim = torch.export.Dim.DYNAMIC(min=MIN_SIZE)
    return {"image": {2: dim, 3: dim}}


def _example(image: torch.Tensor) -> torch.Tensor:
    """A valid example input for tracing: at least MIN_SIZE a side, height != width (equal
    example sizes could let the tracer tie the two dimensions)."""
    if image.dim() == 3:
        image = image[None]
    h, w = image.shape[-2:]
    if h < MIN_SIZE or w < MIN_SIZE:
        image = torch.nn.functional.pad(image, (0, max(MIN_SIZE - w, 0), 0, max(MIN_SIZE - h, 0)))
        h, w = image.shape[-2:]
    if h == w:  # one column more (one less would go below MIN_SIZE for a padded example)
        image = torch.nn.functional.pad(image, (0, 1, 0, 0))
    return image.float().contiguous()


def export_program(wrapper: ExportableISDA, example: torch.Tensor):
    """``torch.export.export`` of ``wrapper`` with dynamic height and width ->
    ``ExportedProgram`` (run it with ``program.module()(image)``)."""
    with torch.no_grad():
        return torch.export.export(wrapper.eval(), (_example(example),),
                                   dynamic_shapes=dynamic_shapes(), strict=False)


def export_onnx(program, example: torch.Tensor, path: str, opset: int = DEFAULT_OPSET,
                optimize: bool = True) -> str:
    """Translate an ``ExportedProgram`` (from :func:`export_program`) or an
    :class:`ExportableISDA` to an ONNX file at ``path`` (one file, weights inside)."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (GridSample), got {opset}")
    if isinstance(program, ExportableISDA):
        program = export_program(program, example)
    from .opset import NATIVE_OPSET, downgrade

    # the exporter writes opset 18 natively; lower opsets are rewritten by isda.export.opset
    # (onnx's version converter has no adapter for Pad 18 -> 17 and would keep opset 18)
    native = max(int(opset), NATIVE_OPSET)
    torch.onnx.export(program, (_example(example),), path, input_names=INPUT_NAMES,
                      output_names=OUTPUT_NAMES, opset_version=native, dynamo=True,
                      external_data=False, optimize=optimize, verbose=False)
    import onnx

    model = onnx.load(path)
    written = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                  default=None)
    if written != native:
        os.remove(path)
        raise RuntimeError(f"the ONNX exporter could not write opset {native} (it produced "
                           f"opset {written})")
    if opset < native:
        downgrade(model, opset)
    _rename_dims(model, _symbol_names(program))
    onnx.save(model, path)
    return path


def _symbol_names(program):
    """Symbolic size names of the program's image input -> "height" / "width"."""
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == INPUT_NAMES[0]:
            shape = node.meta["val"].shape
            return {str(shape[2]): "height", str(shape[3]): "width"}
    return {}


def _rename_dims(model, names):
    """Readable symbolic dimensions in the ONNX graph (the tracer's s0, s1 -> height, width)."""
    import re

    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(k) for k in names) + r")\b")
    graph = model.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(lambda m: names[m.group(1)], dim.dim_param)


def resized_shape(h: int, w: int, min_size: int, max_size: int):
    """The network input size for an ``h x w`` original: Detectron2's ``ResizeShortestEdge``
    (``min_size`` 0: unchanged), every side kept >= 1 (as ``ISDAPredictor`` does)."""
    if min_size <= 0:
        return h, w
    from detectron2.data.transforms import ResizeShortestEdge

    new_h, new_w = ResizeShortestEdge.get_output_shape(h, w, min_size, max_size)
    return max(new_h, 1), max(new_w, 1)


def network_input(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """uint8 ``[H, W, 3]`` (already in the model's channel order) -> float32 ``[1, 3, h, w]``
    resized like ``ISDAPredictor`` (Detectron2's ``ResizeTransform``, PIL bilinear)."""
    from detectron2.data.transforms import ResizeTransform

    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, min_size, max_size)
    if (new_h, new_w) != (h, w):
        from PIL import Image

        image = ResizeTransform(h, w, new_h, new_w, Image.BILINEAR).apply_image(image)
    return np.ascontiguousarray(image.astype(np.float32).transpose(2, 0, 1)[None])


def sidecar(cfg, wrapper: ExportableISDA, fmt: str, opset: Optional[int] = None,
            class_names=None) -> dict:
    """The JSON description of an export: input format, where normalisation happens, outputs
    and post-processing parameters, class names."""
    model_cfg = cfg.MODEL
    data = {
        "version": SIDECAR_VERSION,
        "format": fmt,
        "file": FILENAMES[fmt],
        "input": {
            "name": INPUT_NAMES[0],
            "shape": [1, 3, "height", "width"],
            "dtype": "float32",
            "channel_order": cfg.INPUT.FORMAT,
            "value_range": "0..255 (uint8 values as float)",
            "min_size": MIN_SIZE,
            "normalization": "inside the graph: (image - pixel_mean) / pixel_std",
            "pixel_mean": [float(v) for v in model_cfg.PIXEL_MEAN],
            "pixel_std": [float(v) for v in model_cfg.PIXEL_STD],
            "padding": "inside the graph: zeros (after normalisation) to a multiple of 32, "
                       "masked like the model's padding",
            "resize": {"outside the graph": "ResizeShortestEdge",
                       "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
                       "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST)},
        },
        "outputs": {
            "scores": "float32 [T]: sigmoid class scores of the top-T (query, class) pairs, "
                      "sorted decreasing",
            "classes": "int64 [T]: class indices",
            "mask_logits": "float32 [T, ceil(height/32)*32/mask_stride, "
                           "ceil(width/32)*32/mask_stride]: mask logits on the padded grid",
        },
        "output_names": OUTPUT_NAMES,
        "postprocess": "outside the graph: isda.export.postprocess.outputs_to_instances "
                       "(mask score, final sort, duplicate removal (dedup), upsampling, crop, "
                       "resize, threshold, boxes)",
        "dedup": {"method": str(wrapper.dedup), "iou": float(wrapper.dedup_iou),
                  "sigma": float(wrapper.dedup_sigma)},
        "topk": int(wrapper.topk),
        "mask_stride": int(wrapper.mask_stride),
        "mask_threshold": float(wrapper.mask_threshold),
        "num_classes": int(wrapper.num_classes),
        "num_queries": int(wrapper.decoder.num_queries),
        "class_names": list(class_names) if class_names is not None else None,
        "weights": os.path.basename(cfg.MODEL.WEIGHTS) if cfg.MODEL.WEIGHTS else "",
        "torch_version": torch.__version__,
    }
    if fmt == "onnx":
        data["opset"] = int(opset)
    return data


def write_sidecar(data: dict, output_dir: str) -> str:
    path = os.path.join(output_dir, SIDECAR)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def read_sidecar(model_dir: str) -> dict:
    path = os.path.join(model_dir, SIDECAR)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir} has no {SIDECAR}: not an ISDA export directory "
                                "(tools/deploy/export_model.py writes one)")
    with open(path) as f:
        return json.load(f)


def export_isda(cfg, model, fmt: str, output_dir: str, example: torch.Tensor,
                opset: int = DEFAULT_OPSET, class_names=None, program=None) -> dict:
    """Export ``model`` (a built ISDA with its weights) as ``fmt`` ("onnx" | "torch_export")
    into ``output_dir``; ``example`` is a float [1, 3, H, W] network input (any valid size).
    A ``program`` from an earlier :func:`export_program` of the same model can be passed to
    skip the capture. -> the sidecar dict (also written to ``output_dir/export.json``)."""
    if fmt not in FILENAMES:
        raise ValueError(f"format must be one of {sorted(FILENAMES)}, got {fmt!r}")
    os.makedirs(output_dir, exist_ok=True)
    wrapper = ExportableISDA(model)
    if program is None:
        program = export_program(wrapper, example)
    path = os.path.join(output_dir, FILENAMES[fmt])
    if fmt == "onnx":
        export_onnx(program, example, path, opset)
    else:
        torch.export.save(program, path)
    data = sidecar(cfg, wrapper, fmt, opset if fmt == "onnx" else None, class_names)
    write_sidecar(data, output_dir)
    logger.info("exported %s to %s", fmt, path)
    return data
