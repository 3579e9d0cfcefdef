"""NMS-free inference: top-k (query, class) pairs -> scored binary masks at the original size."""
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
    Masks are upsampled in chunks of at most ``chunk_pixels`` output pixels so the peak memory
    beyond the returned boolean masks stays bounded.
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
    per_mask = max(out_h * out_w, pad_h * pad_w)
    chunk = max(1, chunk_pixels // per_mask)
    for s in range(0, topk, chunk):
        m = probs[s:s + chunk, None]
        m = F.interpolate(m, size=(pad_h, pad_w), mode="bilinear", align_corners=False)
        m = m[:, :, :h_in, :w_in]
        m = F.interpolate(m, size=(out_h, out_w), mode="bilinear", align_corners=False)
        out_masks[s:s + chunk] = m[:, 0] > mask_threshold
        del m

    result = Instances((out_h, out_w))
    result.pred_masks = out_masks
    result.scores = final
    result.pred_classes = classes
    result.pred_boxes = Boxes(masks_to_boxes_chunked(out_masks, chunk))
    return result


def masks_to_boxes_chunked(masks, chunk):
    """:func:`masks_to_boxes` over chunks of ``chunk`` masks (bounded temporaries)."""
    if masks.shape[0] == 0:
        return masks_to_boxes(masks)
    return torch.cat([masks_to_boxes(masks[s:s + chunk]) for s in range(0, masks.shape[0], chunk)])
