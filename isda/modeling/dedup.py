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

The pairwise IoUs are batched matrix products over the blocks of the mask grid where masks meet
(:func:`mask_ious`); no per-mask Python loop.
"""
import torch

DEDUP_METHODS = ("none", "mask_nms", "matrix_nms")


def check_dedup(method: str) -> str:
    """``method`` if it is one of :data:`DEDUP_METHODS`, else ``ValueError``."""
    if method not in DEDUP_METHODS:
        raise ValueError(f"MODEL.ISDA.TEST.DEDUP must be one of {DEDUP_METHODS}, got {method!r}")
    return method


def mask_ious(binary: torch.Tensor, classes: torch.Tensor = None, tile: int = 16) -> torch.Tensor:
    """Pairwise IoUs of binary masks ``binary`` [T, h, w] (bool) -> [T, T] float32; 0 between
    masks of different ``classes`` [T] (when given) and between two empty masks.

    Areas and intersections are counted per ``tile`` x ``tile`` block of the grid, only between
    the masks present in the block: one batched product [B, M, tile^2] x [B, tile^2, M] over the
    B blocks holding a mask, M = the most masks in one block, scattered into [T, T]. Small masks
    (the duplicates' usual case) meet few others, so this costs a fraction of the dense
    [T, h*w] x [h*w, T] product. Counts are exact (integers in float32)."""
    t, h, w = binary.shape
    ny, nx = -(-h // tile), -(-w // tile)
    if (ny * tile, nx * tile) != (h, w):
        binary = torch.nn.functional.pad(binary, (0, nx * tile - w, 0, ny * tile - h))
    # (the one pass over all the pixels; torch's bool sums are several times slower than this)
    occupied = binary.view(t, ny, tile, nx, tile).any(4).any(2)  # [T, ny, nx]
    occupied = occupied.permute(1, 2, 0).reshape(ny * nx, t)  # [K blocks, T]
    counts = occupied.sum(1)
    blocks_idx = torch.nonzero(counts).flatten()  # [B] blocks holding any mask
    inter = torch.zeros(t * t, dtype=torch.float32, device=binary.device)
    area = torch.zeros(t, dtype=torch.float32, device=binary.device)
    if blocks_idx.numel():
        occupied = occupied[blocks_idx]
        m = int(counts[blocks_idx].max())
        # per block, the indices of its masks first (stable sort), padded to m
        order = torch.sort(occupied.to(torch.uint8), dim=1, descending=True,
                           stable=True).indices[:, :m]  # [B, m]
        present = torch.gather(occupied, 1, order)  # [B, m]
        ar = torch.arange(tile, device=binary.device)
        rows = (blocks_idx // nx)[:, None] * tile + ar  # [B, tile]
        cols = (blocks_idx % nx)[:, None] * tile + ar
        blocks = binary[order[:, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        blocks = (blocks & present[:, :, None, None]).flatten(2).float()  # [B, m, tile^2]
        area.index_add_(0, order.flatten(), blocks.sum(2).flatten())
        pairs = order[:, :, None] * t + order[:, None, :]  # [B, m, m] flat index into [T, T]
        inter.index_add_(0, pairs.flatten(), (blocks @ blocks.transpose(1, 2)).flatten())
    inter = inter.view(t, t)
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
