"""Raw outputs of an exported ISDA graph -> Detectron2 ``Instances``.

The graph (:class:`isda.export.model.ExportableISDA`) ends after the top-k selection and the
dynamic mask convolution. :func:`outputs_to_instances` does the rest of ISDA's inference, and
does it with the model's own function
(:func:`isda.modeling.postprocess.instances_from_topk`), so an exported model and the PyTorch
model post-process identically:

1. mask probabilities ``sigmoid(mask_logits)``, binary masks ``> MASK_THRESHOLD``;
2. mask score = mean probability inside the binary mask; score = class score x mask score;
3. sort by score (decreasing); with ``dedup`` (the model's ``TEST.DEDUP``, recorded in the
   export's JSON sidecar) the duplicate removal of :mod:`isda.modeling.dedup` (default
   "none": no NMS, the paper's model);
4. upsample the masks by ``MASK_STRIDE`` (bilinear), crop the padding to the network input
   size ``image_size``, resize (bilinear) to the original ``output_size`` and threshold at
   ``MASK_THRESHOLD``; boxes are the masks' tight boxes (empty mask -> zero box).

Contract (one image):

* ``scores``: float32 ``[T]`` sigmoid class scores of the selected (query, class) pairs;
* ``classes``: int64 ``[T]`` class indices;
* ``mask_logits``: float32 ``[T, Hp / s, Wp / s]`` on the padded mask grid;
* ``image_size``: ``(H, W)`` of the image given to the graph (after any resize);
* ``output_size``: ``(height, width)`` of the original image (the masks' size);
* result: ``Instances`` with ``pred_masks`` bool ``[T, height, width]``, ``scores`` ``[T]``,
  ``pred_classes`` ``[T]``, ``pred_boxes`` (XYXY) - as ``ISDA.forward`` returns.
"""
from typing import Sequence, Union

import numpy as np
import torch
from detectron2.structures import Instances

from ..modeling.postprocess import instances_from_topk

__all__ = ["outputs_to_instances", "check_outputs"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _tensor(x: ArrayLike) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def check_outputs(scores: torch.Tensor, classes: torch.Tensor, mask_logits: torch.Tensor) -> None:
    """Raise ``ValueError`` for outputs that break the contract (shapes) and
    ``FloatingPointError`` for NaN / inf values (as ``ISDA.forward`` refuses them)."""
    t = scores.shape[0] if scores.dim() == 1 else -1
    if scores.dim() != 1 or classes.shape != (t,) or mask_logits.dim() != 3 \
            or mask_logits.shape[0] != t:
        raise ValueError("expected scores [T], classes [T], mask_logits [T, h, w]; got "
                         f"{tuple(scores.shape)}, {tuple(classes.shape)}, "
                         f"{tuple(mask_logits.shape)}")
    for name, x in (("scores", scores), ("mask logits", mask_logits)):
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"the exported model returned non-finite {name}")


@torch.no_grad()
def outputs_to_instances(scores: ArrayLike, classes: ArrayLike, mask_logits: ArrayLike,
                         image_size: Sequence[int], output_size: Sequence[int] = None,
                         mask_stride: int = 4, mask_threshold: float = 0.5,
                         score_threshold: float = 0.0, dedup: str = "none",
                         dedup_iou: float = 0.5, dedup_sigma: float = 2.0) -> Instances:
    """The graph's outputs (numpy arrays or tensors) for one image -> ``Instances`` at
    ``output_size`` (default: ``image_size``). ``mask_stride`` and ``mask_threshold`` are the
    model's (``MODEL.ISDA.MASK_STRIDE``, ``MODEL.ISDA.TEST.MASK_THRESHOLD``; the export's JSON
    sidecar records them), and so are ``dedup*`` (``MODEL.ISDA.TEST.DEDUP*``, sidecar "dedup").
    ``score_threshold``: full-size masks only for instances scoring at least this
    (``MODEL.ISDA.TEST.SCORE_THRESHOLD``)."""
    scores, classes, mask_logits = _tensor(scores), _tensor(classes), _tensor(mask_logits)
    check_outputs(scores, classes, mask_logits)
    image_size = (int(image_size[0]), int(image_size[1]))
    output_size = image_size if output_size is None else (int(output_size[0]),
                                                          int(output_size[1]))
    return instances_from_topk(scores.float(), classes.long(), mask_logits.float(), image_size,
                               output_size, int(mask_stride), float(mask_threshold),
                               score_threshold=float(score_threshold), dedup=str(dedup),
                               dedup_iou=float(dedup_iou), dedup_sigma=float(dedup_sigma))
