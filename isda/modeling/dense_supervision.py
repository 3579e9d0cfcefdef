"""Dense supervision of the encoder tokens (``MODEL.ISDA.DENSE_LOSS_WEIGHT`` > 0; training only).

Every encoder token near an instance's mass centre, on the levels that suit the instance's size,
is a positive for that instance (SOLO's centre sampling); every other token is a negative. Each
token predicts class logits (sigmoid focal loss over all tokens) and a position-aware mask kernel
(the same heads as the decoder's queries) whose mask gets the dice loss at the positives. This is
the dense, one-to-many supervision that anchor-based detectors get from the first iteration
(Co-DETR's auxiliary dense heads; SOLOv2's own training): the encoder learns where instances are
and the mask features learn from many kernels per instance, while the set prediction keeps one
query per instance. With ``MODEL.ISDA.TWO_STAGE`` the loss trains the very heads that score the
tokens and place the decoder's queries. Off (0) in the paper's configs; nothing runs at inference.
"""
import math

import torch
from torch import nn

from .criterion import dice_loss, sigmoid_focal_loss

# an instance of size s (square root of its area, input pixels) is assigned to every level of
# stride t with SIZE_PER_STRIDE[0] <= s / t < SIZE_PER_STRIDE[1] (the finest level takes all
# smaller instances, the coarsest all larger ones): mostly two neighbouring levels
SIZE_PER_STRIDE = (2.0, 8.0)


@torch.no_grad()
def centre_assignment(masks, mask_stride, padded_size, spatial_shapes, valid_tokens,
                      radius=0.2):
    """Positive tokens of one image's instances.

    masks: [G, h, w] soft instance masks on the mask grid (padded input / ``mask_stride``);
    padded_size: (Hp, Wp) of the padded input; spatial_shapes: [(H_l, W_l)] of the flattened
    levels (finest first, each covering the padded input); valid_tokens: [S] bool (False on
    padding). A token of level l is a positive of instance g when l suits g's size
    (:data:`SIZE_PER_STRIDE`) and the token's centre lies within ``max(radius * box side / 2,
    stride / 2)`` of g's mass centre along both axes (the centre region, at least the token cell
    holding the centre); a token claimed by several instances goes to the smallest.
    Returns (token indices [P], instance indices [P]) int64."""
    device = masks.device
    hp, wp = padded_size
    g = masks.shape[0]
    empty = torch.empty(0, dtype=torch.int64, device=device)
    if g == 0:
        return empty, empty
    m = masks.float()
    h, w = m.shape[-2:]
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * mask_stride
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * mask_stride
    mass = m.sum((1, 2))
    cy = (m.sum(2) * ys).sum(1) / mass.clamp(min=1e-6)
    cx = (m.sum(1) * xs).sum(1) / mass.clamp(min=1e-6)
    inside = m >= 0.5
    rows, cols = inside.any(2), inside.any(1)
    big = float(max(hp, wp))
    box_h = (torch.where(rows, ys, -big).amax(1) - torch.where(rows, ys, big).amin(1)).clamp(min=0)
    box_w = (torch.where(cols, xs, -big).amax(1) - torch.where(cols, xs, big).amin(1)).clamp(min=0)
    box_h, box_w = box_h + mask_stride, box_w + mask_stride  # pixel extents, not centre spans
    area = mass * mask_stride ** 2
    size = area.sqrt()
    present = mass > 0
    shapes = [tuple(int(v) for v in s) for s in
              (spatial_shapes.tolist() if torch.is_tensor(spatial_shapes) else spatial_shapes)]
    owner = torch.full((sum(a * b for a, b in shapes),), -1, dtype=torch.int64, device=device)
    start = 0
    for lvl, (lh, lw) in enumerate(shapes):
        sy, sx = hp / lh, wp / lw
        stride = math.sqrt(sy * sx)
        lo = 0.0 if lvl == 0 else SIZE_PER_STRIDE[0] * stride
        hi = float("inf") if lvl == len(shapes) - 1 else SIZE_PER_STRIDE[1] * stride
        on_level = present & (size >= lo) & (size < hi)  # [G]
        ty = (torch.arange(lh, device=device, dtype=torch.float32) + 0.5) * sy
        tx = (torch.arange(lw, device=device, dtype=torch.float32) + 0.5) * sx
        ry = (radius * box_h / 2).clamp(min=sy / 2)
        rx = (radius * box_w / 2).clamp(min=sx / 2)
        near_y = (ty[None] - cy[:, None]).abs() <= ry[:, None]  # [G, lh]
        near_x = (tx[None] - cx[:, None]).abs() <= rx[:, None]  # [G, lw]
        hit = (near_y[:, :, None] & near_x[:, None, :] & on_level[:, None, None]).flatten(1)
        cand = torch.where(hit, area[:, None], torch.full_like(hit, float("inf"), dtype=area.dtype))
        level_area, level_owner = cand.min(0)  # the smallest instance claiming each token
        owner[start:start + lh * lw] = torch.where(torch.isfinite(level_area), level_owner, -1)
        start += lh * lw
    owner = torch.where(valid_tokens.to(device), owner, -1)
    tokens = (owner >= 0).nonzero().flatten()
    return tokens, owner[tokens]


class DenseCriterion(nn.Module):
    """Focal loss of every valid token's class logits and dice loss of the positives' masks
    (:func:`centre_assignment`), normalised by the number of positives, weighted by
    ``weight`` x the set losses' focal / dice weights -> ``loss_focal_dense``,
    ``loss_dice_dense``. At most ``max_positives`` positives per image get a mask (a random
    subset: bounds the cost on images with hundreds of instances)."""

    def __init__(self, weight=1.0, focal_weight=2.0, dice_weight=3.0, focal_alpha=0.25,
                 focal_gamma=2.0, radius=0.2, max_positives=512):
        super().__init__()
        self.weight = weight
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.alpha = focal_alpha
        self.gamma = focal_gamma
        self.radius = radius
        self.max_positives = max_positives

    def forward(self, tokens, heads, centres, padding_mask, spatial_shapes, mask_features,
                targets, mask_stride):
        """tokens: [N, S, C] per-token features for ``heads`` (:class:`ISDAHeads`); centres:
        [N, S, 2] token centres in the valid frame (the kernels' reference points); padding_mask:
        [N, S] bool (True = padding); mask_features: [N, D, h, w]; targets: per image
        {"labels": [G], "masks": [G, h, w]} -> dict of two scalar losses."""
        n = tokens.shape[0]
        h, w = mask_features.shape[-2:]
        padded = (h * mask_stride, w * mask_stride)
        logits = heads.class_embed(tokens).float()  # [N, S, K]
        cls_target = torch.zeros_like(logits)
        kernel_rows, mask_rows = [], []
        num_pos = 0
        for i in range(n):
            t = targets[i]
            tok, gt = centre_assignment(t["masks"], mask_stride, padded, spatial_shapes,
                                        ~padding_mask[i], self.radius)
            cls_target[i, tok, t["labels"][gt]] = 1.0
            num_pos += len(tok)
            if len(tok) > self.max_positives:
                keep = torch.randperm(len(tok), device=tok.device)[:self.max_positives]
                tok, gt = tok[keep], gt[keep]
            _, kernels = heads(tokens[i, tok], centres[i, tok])
            kernel_rows.append(kernels @ mask_features[i].reshape(mask_features.shape[1], -1))
            mask_rows.append(t["masks"][gt].flatten(1))
        valid = (~padding_mask).float()[..., None]
        focal = (sigmoid_focal_loss(logits, cls_target, self.alpha, self.gamma) * valid).sum()
        src, tgt = torch.cat(kernel_rows).float(), torch.cat(mask_rows).float()
        # an image without instances still runs its (empty) product: every parameter stays in
        # the graph (DistributedDataParallel)
        dice = dice_loss(src, tgt).sum() / src.shape[0] if src.shape[0] else src.sum() * 0.0
        return {"loss_focal_dense": self.weight * self.focal_weight * focal / max(num_pos, 1),
                "loss_dice_dense": self.weight * self.dice_weight * dice}
