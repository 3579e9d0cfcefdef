"""Export of ISDA models (ONNX, ``torch.export``) and runtimes for the exported files.

* :mod:`isda.export.attention` - deformable attention with symbolic level sizes (grid_sample);
* :mod:`isda.export.model` - :class:`ExportableISDA`, the traceable image -> top-k outputs;
* :mod:`isda.export.exporter` - ``torch.export`` / ONNX export with dynamic height and width,
  the JSON sidecar;
* :mod:`isda.export.postprocess` - raw graph outputs -> Detectron2 ``Instances``;
* :mod:`isda.export.onnx_predictor` - :class:`OnnxPredictor` / :class:`ExportedProgramPredictor`.

See docs/deployment.md. ``onnxruntime``, ``onnx`` and ``onnxscript`` are imported only where
needed.
"""
from .exporter import export_isda, export_onnx, export_program, read_sidecar
from .model import MIN_SIZE, ExportableISDA
from .onnx_predictor import ExportedProgramPredictor, OnnxPredictor, load_predictor
from .postprocess import outputs_to_instances

__all__ = ["ExportableISDA", "MIN_SIZE", "export_isda", "export_onnx",
           "export_program", "read_sidecar", "outputs_to_instances", "OnnxPredictor",
           "ExportedProgramPredictor", "load_predictor"]
