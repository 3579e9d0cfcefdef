"""NMS-free inference: top-k (query, class) pairs -> scored binary masks at the original size.

Two code paths with the same results, chosen by device (:func:`prefers_channels_last`): on the
CPU, every mask upsampled and resized on its own window; on the GPU, batched calls per chunk of
masks (no per-mask Python loop, no per-mask host syncs).
"""
import math
from typing import Optional

import torch
from torch.nn import functional as F

from detectron2.structures import Boxes, Instances

from .dedup import dedup_sorted


def prefers_channels_last(device) -> bool:
    """Whether ISDA's CPU-tuned layouts and loops apply on ``device``: channels-last images for
    the backbone (oneDNN convolutions) and the per-mask windows in post-processing. True on the
    CPU only; CUDA uses the natural (contiguous NCHW) layout and batched kernels."""
    return torch.device(device).type == "cpu"


def masks_to_boxes(masks):
    """Tight boxes (x0, y0, x1 + 1, y1 + 1) like Detectron2's ``BitMasks.get_bounding_boxes``.
    masks: [M, H, W] bool -> [M, 4] float; empty masks give zero boxes."""
    boxes = torch.zeros(masks.shape[0], 4, dtype=torch.float32, device=masks.device)
    if masks.numel() == 0:
        return boxes
    h, w = masks.shape[-2:]
    rows = masks.any(dim=2)  # [M, H]
    cols = masks.any(dim=1)  # [M, W]
    nonempty = rows.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1) + 1
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1) + 1
    boxes[nonempty] = torch.stack([x0, y0, x1, y1], dim=1)[nonempty].float()
    return boxes


def select_topk(cls_logits, topk=100):
    """Top-k (query, class) pairs of ``cls_logits`` [Q, K] -> (scores [T], query index [T],
    class [T]), unsorted."""
    k = cls_logits.shape[1]
    scores = cls_logits.float().sigmoid().flatten()
    topk = min(topk, scores.numel())
    cls_scores, idx = scores.topk(topk, sorted=False)
    return cls_scores, torch.div(idx, k, rounding_mode="floor"), idx % k


@torch.no_grad()
def isda_postprocess(cls_logits, mask_logits, image_size, output_size, mask_stride=4, topk=100,
                     mask_threshold=0.5, chunk_pixels=1 << 25, cpu_paths=None, dedup="none",
                     dedup_iou=0.5, dedup_sigma=2.0):
    """One image's predictions -> :class:`Instances` at ``output_size``.

    cls_logits: [Q, K]; mask_logits: [Q, h, w] on the padded mask grid (stride ``mask_stride``);
    image_size: (H_in, W_in) unpadded network input; output_size: (H, W) original image.
    ``cpu_paths``, ``dedup*``: see :func:`instances_from_topk`.
    """
    cls_scores, query_idx, classes = select_topk(cls_logits, topk)
    return instances_from_topk(cls_scores, classes, mask_logits[query_idx], image_size,
                               output_size, mask_stride, mask_threshold, chunk_pixels, cpu_paths,
                               dedup=dedup, dedup_iou=dedup_iou, dedup_sigma=dedup_sigma)


def _span(any_mask, margin, n):
    """First and last True index of a 1-d bool tensor widened by ``margin`` (clamped to
    [0, n - 1]), or None."""
    idx = torch.nonzero(any_mask).flatten()
    if idx.numel() == 0:
        return None
    return max(int(idx[0]) - margin, 0), min(int(idx[-1]) + margin, n - 1)


#: default bound of the returned boolean masks, ``MODEL.ISDA.TEST.MAX_MASK_BYTES`` (4 GiB)
MAX_MASK_BYTES = 1 << 32


class MaskMemoryError(MemoryError):
    """The full-size boolean masks of one image would exceed ``MODEL.ISDA.TEST.MAX_MASK_BYTES``."""


def _limit_masks(final, output_size, score_threshold, max_mask_bytes):
    """How many of the sorted instances get full-size masks: those scoring at least
    ``score_threshold``; refuse (:class:`MaskMemoryError`) when their ``[T, H, W]`` booleans
    would exceed ``max_mask_bytes``, before anything of that size is allocated."""
    keep = int((final >= score_threshold).sum()) if score_threshold > 0 else final.shape[0]
    need = keep * int(output_size[0]) * int(output_size[1])
    if max_mask_bytes and need > max_mask_bytes:
        raise MaskMemoryError(
            f"post-processing would need {need / 2**30:.1f} GiB for {keep} full-size masks of "
            f"{output_size[0]}x{output_size[1]} px, more than MODEL.ISDA.TEST.MAX_MASK_BYTES "
            f"({max_mask_bytes / 2**30:.1f} GiB). Keep fewer instances (MODEL.ISDA.TEST."
            "SCORE_THRESHOLD, which the demo sets to --confidence-threshold, or a lower "
            "MODEL.ISDA.TEST.TOPK), downscale the image, or raise the limit if the memory is "
            "there")
    return keep


@torch.no_grad()
def instances_from_topk(cls_scores, classes, mask_logits, image_size, output_size, mask_stride=4,
                        mask_threshold=0.5, chunk_pixels=1 << 25,
                        cpu_paths: Optional[bool] = None, score_threshold: float = 0.0,
                        max_mask_bytes: Optional[int] = MAX_MASK_BYTES, dedup="none",
                        dedup_iou=0.5, dedup_sigma=2.0):
    """Selected pairs (class scores [T], classes [T], their mask logits [T, h, w]) ->
    :class:`Instances` sorted by score = class score x mask score.

    Each mask is upsampled by ``mask_stride`` only on the window around its pixels above the
    threshold: bilinear values never exceed their source pixels, and with an integer factor the
    window's values are bit-identical to those of the full upsampling. The resize to the
    original size is skipped when it is the input size (a same-size bilinear resize is the
    identity), else it is evaluated on the window where the result can exceed the threshold.

    ``cpu_paths`` (default: :func:`prefers_channels_last` of the masks' device): True handles
    mask by mask, each on its own window (:func:`_paste_each_mask`: work in proportion to the
    masks' areas, fastest on the CPU); False handles chunks of at most ``min(chunk_pixels,
    2**23)`` upsampled pixels in batched calls on the union of their masks' windows
    (:func:`_paste_chunks`: no per-mask host syncs, fastest on the GPU; memory beyond the
    returned boolean masks is one chunk). Both give the same masks and boxes.

    ``dedup`` (``MODEL.ISDA.TEST.DEDUP``): "none" (the paper's NMS-free output), "mask_nms" or
    "matrix_nms" (:func:`isda.modeling.dedup.dedup_sorted`, IoU threshold ``dedup_iou``,
    Gaussian ``dedup_sigma``) on the binary masks at the mask stride, cropped to the input.

    Memory: the result holds ``[T, H, W]`` booleans. Only instances scoring at least
    ``score_threshold`` are kept (0: all T); if their masks would take more than
    ``max_mask_bytes`` (None: no limit) :class:`MaskMemoryError` is raised before allocating.
    """
    if cpu_paths is None:
        cpu_paths = prefers_channels_last(mask_logits.device)
    final, classes, probs, binary = _score_and_sort(cls_scores, classes, mask_logits,
                                                    mask_threshold)
    del mask_logits  # (freed here when the caller passed its only reference)
    if dedup != "none":
        # IoUs on the mask grid's cells covering the input (the padding is not image)
        hv, wv = -(-image_size[0] // mask_stride), -(-image_size[1] // mask_stride)
        idx, final = dedup_sorted(final, classes, binary[:, :hv, :wv], dedup, dedup_iou,
                                  dedup_sigma)
        classes, probs, binary = classes[idx], probs[idx], binary[idx]
    keep = _limit_masks(final, output_size, score_threshold, max_mask_bytes)
    if keep < final.shape[0]:
        final, classes, probs, binary = final[:keep], classes[:keep], probs[:keep], binary[:keep]
    topk, (h, w), s = probs.shape[0], probs.shape[-2:], mask_stride
    h_in, w_in = image_size
    out_h, out_w = output_size
    identity = (out_h, out_w) == (h_in, w_in)
    out_masks = torch.zeros(topk, out_h, out_w, dtype=torch.bool, device=probs.device)
    boxes = torch.zeros(topk, 4, dtype=torch.float32, device=probs.device)
    rows_any, cols_any = binary.any(2), binary.any(1)
    margin = 1 if identity else 2  # source pixels of exact values around the thresholded area
    if cpu_paths:
        _paste_each_mask(probs, rows_any, cols_any, s, margin, (h_in, w_in), (out_h, out_w),
                         mask_threshold, out_masks, boxes)
    else:
        _paste_chunks(probs, rows_any, cols_any, s, margin, (h_in, w_in), (out_h, out_w),
                      mask_threshold, out_masks, boxes, chunk_pixels)
    result = Instances((out_h, out_w))
    result.pred_masks = out_masks
    result.scores = final
    result.pred_classes = classes
    result.pred_boxes = Boxes(boxes)
    return result


def _first_last(any_mask):
    """[T, n] bool -> (first [T], last [T]) True index per row as Python lists (last < first
    for a row without any)."""
    n = any_mask.shape[1]
    as_int = any_mask.to(torch.uint8)
    first = as_int.argmax(1)
    last = n - 1 - as_int.flip(1).argmax(1)
    last = torch.where(any_mask.any(1), last, first - 1)
    return first.tolist(), last.tolist()


def _paste_each_mask(probs, rows_any, cols_any, s, margin, image_size, size, threshold,
                     out_masks, boxes):
    """The CPU path: every mask upsampled on its own window (its pixels above ``threshold``
    widened by ``margin`` source pixels: bilinear values never exceed their source pixels, and
    with an integer factor the window's values are bit-identical to those of the full
    upsampling), then thresholded into ``out_masks`` [T, H, W] (output size = input size) or
    resized to the original size on its own output window (:func:`_resize_window`). Boxes come
    from the window's row and column maxima (no pass over the boolean output)."""
    (h, w), (h_in, w_in) = probs.shape[-2:], image_size
    identity = tuple(size) == (h_in, w_in)
    r_first, r_last = _first_last(rows_any)
    c_first, c_last = _first_last(cols_any)
    for j in range(probs.shape[0]):
        if r_last[j] < r_first[j]:
            continue
        ra, rb = max(r_first[j] - margin, 0), min(r_last[j] + margin, h - 1)
        ca, cb = max(c_first[j] - margin, 0), min(c_last[j] + margin, w - 1)
        y0, x0 = ra * s, ca * s
        y1, x1 = min((rb + 1) * s, h_in), min((cb + 1) * s, w_in)
        if y1 <= y0 or x1 <= x0:  # only padding
            continue
        crop = probs[j, ra:rb + 1, ca:cb + 1][None, None]
        up = F.interpolate(crop, size=((rb - ra + 1) * s, (cb - ca + 1) * s), mode="bilinear",
                           align_corners=False)[0, 0, :y1 - y0, :x1 - x0]
        if identity:
            torch.gt(up, threshold, out=out_masks[j, y0:y1, x0:x1])
            _box_from_window(up, threshold, (y0, x0), boxes[j])
            continue
        window = _resize_window(up, size, threshold, (y0, x0), (h_in, w_in))
        if window is None:
            continue
        (wy, wx), win = window
        out_masks[j, wy:wy + win.shape[0], wx:wx + win.shape[1]] = win
        if win.any():
            boxes[j] = masks_to_boxes(win[None])[0] + torch.tensor(
                [wx, wy, wx, wy], dtype=torch.float32, device=boxes.device)


def _box_from_window(values, threshold, origin, box):
    """Tight box (x0, y0, x1 + 1, y1 + 1) of ``values > threshold`` ([h, w] at ``origin``
    (y, x)) written into ``box`` [4]; left as it is when nothing exceeds the threshold."""
    rows = values.amax(1) > threshold
    cols = values.amax(0) > threshold
    r = torch.nonzero(rows).flatten()
    if r.numel() == 0:
        return
    c = torch.nonzero(cols).flatten()
    y0, x0 = origin
    box.copy_(torch.tensor([x0 + int(c[0]), y0 + int(r[0]), x0 + int(c[-1]) + 1,
                            y0 + int(r[-1]) + 1], dtype=box.dtype))


def _paste_chunks(probs, rows_any, cols_any, s, margin, image_size, size, threshold, out_masks,
                  boxes, chunk_pixels):
    """The GPU path: chunks of masks upsampled in one call each on the union of their windows
    (see :func:`_paste_each_mask`), then thresholded (output size = input size) or resized in
    one batched call per chunk (:func:`_resize_chunk`); no per-mask host syncs."""
    topk, (h, w), (h_in, w_in) = probs.shape[0], probs.shape[-2:], image_size
    identity = tuple(size) == (h_in, w_in)
    # at most 8M upsampled pixels (32 MB of floats) per chunk whatever ``chunk_pixels`` says:
    # larger chunks gain no speed but add to the inference peak memory
    chunk = max(1, min(chunk_pixels, 1 << 23) // (h * w * s * s))
    for c0 in range(0, topk, chunk):
        c1 = min(c0 + chunk, topk)
        rspan, cspan = _span(rows_any[c0:c1].any(0), margin, h), _span(cols_any[c0:c1].any(0), margin, w)
        if rspan is None:
            continue
        (ra, rb), (ca, cb) = rspan, cspan
        y0, x0 = ra * s, ca * s
        y1, x1 = min((rb + 1) * s, h_in), min((cb + 1) * s, w_in)
        if y1 <= y0 or x1 <= x0:  # only padding
            continue
        crop = probs[None, c0:c1, ra:rb + 1, ca:cb + 1]
        up = F.interpolate(crop, size=((rb - ra + 1) * s, (cb - ca + 1) * s), mode="bilinear",
                           align_corners=False)[0, :, :y1 - y0, :x1 - x0]
        if identity:
            _paste_thresholded(up, threshold, (y0, x0), out_masks[c0:c1], boxes[c0:c1])
        else:
            _resize_chunk(up, size, threshold, (y0, x0), (h_in, w_in), out_masks[c0:c1],
                          boxes[c0:c1])
        del crop, up  # not alive while the next chunk is upsampled


def _score_and_sort(cls_scores, classes, mask_logits, mask_threshold):
    """Score = class score x mean mask probability inside the mask; -> (scores [T], classes [T],
    probabilities [T, h, w], binary masks [T, h, w]), all sorted by decreasing score."""
    probs = mask_logits.float().sigmoid()
    binary = probs > mask_threshold
    mask_scores = (probs * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
    final = cls_scores * mask_scores
    order = final.argsort(descending=True)
    return final[order], classes[order], probs[order], binary[order]


def _paste_thresholded(up, threshold, origin, out_masks, boxes):
    """Output size = input size: threshold the upsampled window ``up`` [C, h, w] into
    ``out_masks`` [C, H, W] at ``origin`` (y0, x0) and fill ``boxes`` [C, 4] of the non-empty."""
    y0, x0 = origin
    win = out_masks[:, y0:y0 + up.shape[1], x0:x0 + up.shape[2]]
    torch.gt(up, threshold, out=win)
    b = masks_to_boxes(win)  # zero boxes for empty masks
    nonempty = b[:, 2] > 0
    b[:, [0, 2]] += x0
    b[:, [1, 3]] += y0
    boxes.copy_(torch.where(nonempty[:, None], b, boxes))


def _output_window(rows, cols, size, origin, full_size):
    """Output window (y0, y1, x0, x1), inclusive, whose bilinear resize to ``size`` can exceed
    the threshold, given the window-relative indices ``rows``/``cols`` (1-d, sorted, non-empty)
    of the source pixels above it, for a window at ``origin`` of a ``full_size`` map."""
    (oy, ox), (h, w), (out_h, out_w) = origin, full_size, size

    def span(lo, hi, scale, n_out):
        # output i samples source (i + 0.5) * scale - 0.5 between floor() and floor() + 1
        a = int(math.floor((lo - 1 + 0.5) / scale - 0.5)) - 1
        b = int(math.ceil((hi + 1 + 0.5) / scale - 0.5)) + 1
        return max(a, 0), min(b, n_out - 1)

    y0, y1 = span(oy + int(rows[0]), oy + int(rows[-1]), h / out_h, out_h)
    x0, x1 = span(ox + int(cols[0]), ox + int(cols[-1]), w / out_w, out_w)
    return y0, y1, x0, x1


def _window_grid(window, size, origin, full_size, source_shape, device):
    """grid_sample grid [wy, wx, 2] of the output pixels in ``window`` (y0, y1, x0, x1), for a
    source window of ``source_shape`` (hh, ww) at ``origin`` of a ``full_size`` map resized to
    ``size``. Each output pixel's grid value depends only on its own index (same bits whatever
    the window)."""
    y0, y1, x0, x1 = window
    (oy, ox), (h, w), (out_h, out_w), (hh, ww) = origin, full_size, size, source_shape
    # source pixel coordinate of each output pixel, shifted into the window, normalised to it
    py = (torch.arange(y0, y1 + 1, device=device, dtype=torch.float64) + 0.5) * (h / out_h) - 0.5 - oy
    px = (torch.arange(x0, x1 + 1, device=device, dtype=torch.float64) + 0.5) * (w / out_w) - 0.5 - ox
    gy, gx = (2 * py + 1) / hh - 1, (2 * px + 1) / ww - 1
    return torch.stack(torch.meshgrid(gx.float(), gy.float(), indexing="xy"), -1)


def _resize_window(prob, size, threshold, origin=(0, 0), full_size=None):
    """``F.interpolate(full, size, "bilinear") > threshold`` evaluated only on the window of the
    output that can exceed ``threshold`` (bilinear values never exceed their 4 source pixels).

    prob: [hh, ww] window at ``origin`` (y, x) of a ``full_size`` map (default: the whole map),
    exact within one pixel of its values above ``threshold`` ->
    None if nothing exceeds it, else ((y0, x0), bool window of the output).
    """
    full_size = tuple(full_size) if full_size is not None else tuple(prob.shape)
    out_h, out_w = size
    above = prob > threshold
    rows = torch.nonzero(above.any(1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(above.any(0)).flatten()
    y0, y1, x0, x1 = _output_window(rows, cols, size, origin, full_size)
    whole = tuple(prob.shape) == full_size
    if whole and (y1 - y0 + 1) * (x1 - x0 + 1) > out_h * out_w // 2:  # plain resize is faster
        full = F.interpolate(prob[None, None], size=size, mode="bilinear", align_corners=False)
        return (0, 0), full[0, 0] > threshold
    grid = _window_grid((y0, y1, x0, x1), size, origin, full_size, prob.shape, prob.device)
    win = F.grid_sample(prob[None, None], grid[None], mode="bilinear", padding_mode="border",
                        align_corners=False)[0, 0]
    return (y0, x0), win > threshold


def _resize_chunk(up, size, threshold, origin, full_size, out_masks, boxes,
                  max_pixels=1 << 23):
    """The per-mask :func:`_resize_window` loop as batched calls (the GPU path): one output
    window, the union of the masks' windows, resampled for all masks of ``up`` at once.

    up: [T, hh, ww] windows at ``origin`` of ``full_size`` maps; writes the thresholded windows
    into ``out_masks`` [T, H, W] and their tight boxes into ``boxes`` [T, 4] (in place; masks
    and boxes of masks with nothing above the threshold stay empty/zero). At most
    ``max_pixels`` output window pixels are resampled per call.
    """
    above = up > threshold
    rows = torch.nonzero(above.any(2).any(0)).flatten()
    if rows.numel() == 0:
        return
    cols = torch.nonzero(above.any(1).any(0)).flatten()
    y0, y1, x0, x1 = _output_window(rows, cols, size, origin, full_size)
    grid = _window_grid((y0, y1, x0, x1), size, origin, full_size, up.shape[-2:], up.device)
    step = max(1, max_pixels // (grid.shape[0] * grid.shape[1]))
    for a in range(0, up.shape[0], step):
        b = min(a + step, up.shape[0])
        win = F.grid_sample(up[a:b, None], grid[None].expand(b - a, -1, -1, -1), mode="bilinear",
                            padding_mode="border", align_corners=False)[:, 0] > threshold
        out_masks[a:b, y0:y1 + 1, x0:x1 + 1] = win
        bx = masks_to_boxes(win)  # zero boxes for empty masks
        nonempty = bx[:, 2] > 0
        bx[:, [0, 2]] += x0
        bx[:, [1, 3]] += y0
        boxes[a:b] = torch.where(nonempty[:, None], bx, boxes[a:b])
