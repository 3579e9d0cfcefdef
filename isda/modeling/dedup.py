"""Optional duplicate removal at inference (``MODEL.ISDA.TEST.DEDUP``), SOLOv2's lineage.

ISDA is NMS-free: one-to-one matching teaches its queries not to duplicate each other, but only
once it has trained long enough. Short schedules on small data leave duplicates (a second query
on an already found object), which cost AP50 (docs/model.md, "Duplicate removal"). Two methods,
both on the top-k binary masks at the mask stride (before any upsampling), per class:

* ``"mask_nms"``: greedy mask NMS; a mask whose IoU with a kept, higher-scored mask of the
  same class exceeds ``iou_threshold`` is removed; the others keep their scores and order.
* ``"matrix_nms"``: SOLOv2's Matrix NMS (Gaussian kernel): every score is decayed by
  ``min_i exp(-sigma (iou_ij^2 - comp_i^2))`` over the higher-scored masks ``i`` of its class
  (``comp_i``: i's own largest IoU with a higher-scored mask); nothing is removed, the result is
  sorted again by the decayed scores.

The pairwise IoUs are one [T, n] x [n, T] matrix product (``n`` = pixels of the mask grid).
"""
import torch

DEDUP_METHODS = ("none", "mask_nms", "matrix_nms")


def check_dedup(method: str) -> str:
    """``method`` if it is one of :data:`DEDUP_METHODS`, else ``ValueError``."""
    if method not in DEDUP_METHODS:
        raise ValueError(f"MODEL.ISDA.TEST.DEDUP must be one of {DEDUP_METHODS}, got {method!r}")
    return method


def mask_ious(binary: torch.Tensor, classes: torch.Tensor = None) -> torch.Tensor:
    """Pairwise IoUs of binary masks ``binary`` [T, h, w] (bool) -> [T, T] float32; 0 between
    masks of different ``classes`` [T] (when given) and between two empty masks."""
    flat = binary.flatten(1)
    flat = flat[:, flat.any(0)].float()  # [T, n']: only the pixels some mask covers
    inter = flat @ flat.t()  # [T, T]
    area = flat.sum(1)
    union = area[:, None] + area[None, :] - inter
    ious = inter / union.clamp(min=1)
    if classes is not None:
        ious = ious * (classes[:, None] == classes[None, :])
    return ious


def greedy_mask_nms(ious: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS over masks sorted by decreasing score, from their IoUs [T, T] -> keep [T] bool.

    Mask ``j`` is removed when a kept mask ``i < j`` has IoU > ``iou_threshold`` with it. Only the
    rows that overlap anything are visited (one host sync), each with tensor ops."""
    over = (ious > iou_threshold).triu(1)  # over[i, j]: i (higher score) would suppress j
    keep = torch.ones(ious.shape[0], dtype=torch.bool, device=ious.device)
    for i in torch.nonzero(over.any(1)).flatten().tolist():
        keep &= ~(over[i] & keep[i])
    return keep


def matrix_nms_decay(ious: torch.Tensor, sigma: float) -> torch.Tensor:
    """SOLOv2's Matrix NMS (Gaussian kernel) for masks sorted by decreasing score, from their
    IoUs [T, T] -> decay factors [T] in (0, 1] (1 for the highest-scored mask of each class)."""
    upper = ious.triu(1)  # upper[i, j], i < j: IoU with a higher-scored mask
    comp = upper.amax(0)  # [T]: each mask's largest IoU with a higher-scored one
    decay = torch.exp(-sigma * (upper.pow(2) - comp[:, None].pow(2)))  # [i, j]
    # rows i >= j give factors >= 1 and row 0 (comp 0) gives <= 1, so the min is <= 1
    return decay.amin(0)


def dedup_sorted(scores, classes, binary, method="mask_nms", iou_threshold=0.5, sigma=2.0):
    """Detections sorted by decreasing ``scores`` [T] (``classes`` [T], binary masks ``binary``
    [T, h, w]) -> (index [T'] into them, new scores [T']), sorted by decreasing new score.

    ``"none"``: all, unchanged; ``"mask_nms"``: the kept ones, in their order, scores unchanged;
    ``"matrix_nms"``: all, with decayed scores, sorted again (stable)."""
    check_dedup(method)
    t = scores.shape[0]
    if method == "none" or t <= 1:
        return torch.arange(t, device=scores.device), scores
    ious = mask_ious(binary, classes)
    if method == "mask_nms":
        keep = torch.nonzero(greedy_mask_nms(ious, iou_threshold)).flatten()
        return keep, scores[keep]
    decayed = scores * matrix_nms_decay(ious, sigma)
    order = torch.sort(decayed, descending=True, stable=True).indices
    return order, decayed[order]
