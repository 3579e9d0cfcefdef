"""NMS-free inference: top-k (query, class) pairs -> scored binary masks at the original size."""
import math

import torch
from torch.nn import functional as F

from detectron2.structures import Boxes, Instances


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


@torch.no_grad()
def isda_postprocess(cls_logits, mask_logits, image_size, output_size, mask_stride=4, topk=100,
                     mask_threshold=0.5, chunk_pixels=1 << 25):
    """One image's predictions -> :class:`Instances` at ``output_size``.

    cls_logits: [Q, K]; mask_logits: [Q, h, w] on the padded mask grid (stride ``mask_stride``);
    image_size: (H_in, W_in) unpadded network input; output_size: (H, W) original image.
    Memory beyond the returned boolean masks stays bounded: the upsampling to the padded input
    runs in chunks of at most ``chunk_pixels`` pixels, and the resize to the original size is
    evaluated per mask only on the window where the mask can exceed the threshold.
    """
    q, k = cls_logits.shape
    scores = cls_logits.float().sigmoid().flatten()
    topk = min(topk, scores.numel())
    cls_scores, idx = scores.topk(topk, sorted=False)
    query_idx = torch.div(idx, k, rounding_mode="floor")
    classes = idx % k

    probs = mask_logits[query_idx].float().sigmoid()  # [T, h, w]
    binary = probs > mask_threshold
    mask_scores = (probs * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp(min=1)
    final = cls_scores * mask_scores
    order = final.argsort(descending=True)
    final, classes, probs = final[order], classes[order], probs[order]

    h_in, w_in = image_size
    out_h, out_w = output_size
    pad_h, pad_w = probs.shape[-2] * mask_stride, probs.shape[-1] * mask_stride
    out_masks = torch.zeros(topk, out_h, out_w, dtype=torch.bool, device=probs.device)
    boxes = torch.zeros(topk, 4, dtype=torch.float32, device=probs.device)
    chunk = max(1, chunk_pixels // (pad_h * pad_w))
    for s in range(0, topk, chunk):
        m = F.interpolate(probs[s:s + chunk, None], size=(pad_h, pad_w), mode="bilinear",
                          align_corners=False)[:, 0, :h_in, :w_in]
        for j in range(m.shape[0]):
            window = _resize_window(m[j], (out_h, out_w), mask_threshold)
            if window is None:
                continue
            (y0, x0), win = window
            out_masks[s + j, y0:y0 + win.shape[0], x0:x0 + win.shape[1]] = win
            boxes[s + j] = masks_to_boxes(win[None])[0] + torch.tensor(
                [x0, y0, x0, y0], dtype=torch.float32, device=boxes.device)
            if not win.any():
                boxes[s + j] = 0
        del m

    result = Instances((out_h, out_w))
    result.pred_masks = out_masks
    result.scores = final
    result.pred_classes = classes
    result.pred_boxes = Boxes(boxes)
    return result


def _resize_window(prob, size, threshold):
    """``F.interpolate(prob, size, "bilinear") > threshold`` evaluated only on the window of the
    output that can exceed ``threshold`` (bilinear values never exceed their 4 source pixels).

    prob: [h, w] -> None if the mask is empty, else ((y0, x0), bool window [hh, ww]).
    """
    h, w = prob.shape
    out_h, out_w = size
    above = prob > threshold
    rows = torch.nonzero(above.any(1)).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(above.any(0)).flatten()
    sy, sx = h / out_h, w / out_w

    def span(lo, hi, scale, n_out):
        # output i samples source (i + 0.5) * scale - 0.5 between floor() and floor() + 1
        a = int(math.floor((lo - 1 + 0.5) / scale - 0.5)) - 1
        b = int(math.ceil((hi + 1 + 0.5) / scale - 0.5)) + 1
        return max(a, 0), min(b, n_out - 1)

    y0, y1 = span(int(rows[0]), int(rows[-1]), sy, out_h)
    x0, x1 = span(int(cols[0]), int(cols[-1]), sx, out_w)
    if (y1 - y0 + 1) * (x1 - x0 + 1) > out_h * out_w // 2:  # large mask: plain resize is faster
        full = F.interpolate(prob[None, None], size=size, mode="bilinear", align_corners=False)
        return (0, 0), full[0, 0] > threshold
    dev = prob.device
    gy = (2 * (torch.arange(y0, y1 + 1, device=dev, dtype=torch.float64) + 0.5) / out_h - 1)
    gx = (2 * (torch.arange(x0, x1 + 1, device=dev, dtype=torch.float64) + 0.5) / out_w - 1)
    grid = torch.stack(torch.meshgrid(gx.float(), gy.float(), indexing="xy"), -1)  # [hh, ww, 2]
    win = F.grid_sample(prob[None, None], grid[None], mode="bilinear", padding_mode="border",
                        align_corners=False)[0, 0]
    return (y0, x0), win > threshold
