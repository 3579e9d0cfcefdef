"""Hungarian matching of queries to ground-truth instances (focal class cost + soft mask IoU)."""
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn


def focal_class_cost(logits, tgt_labels, alpha=0.25, gamma=2.0):
    """Focal-loss matching cost. logits: [Q, K]; tgt_labels: [G] -> [Q, G]."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos[:, tgt_labels] - neg[:, tgt_labels]


def soft_mask_iou(pred, target, eps=1e-6):
    """Soft IoU between probability masks. pred: [Q, P]; target: [G, P] (values in [0, 1]) ->
    [Q, G] = sum(p*t) / (sum(p) + sum(t) - sum(p*t))."""
    inter = pred @ target.t()
    union = pred.sum(-1)[:, None] + target.sum(-1)[None, :] - inter
    return inter / union.clamp(min=eps)


def soft_mask_iou_from_kernels(kernels, features, target, chunk=4096, eps=1e-6):
    """:func:`soft_mask_iou` of ``sigmoid(kernels @ features)`` with ``target`` without ever
    holding the [Q, P] logits: the pixels are processed in chunks of ``chunk`` columns (logits,
    sigmoid and both sums per chunk, cache-sized), which saves the full-size writes and reads and
    the large allocation of the dense form.

    kernels: [Q, D]; features: [D, P] (any strides); target: [G, P] -> [Q, G]."""
    q, p = kernels.shape[0], features.shape[1]
    inter = kernels.new_zeros(q, target.shape[0])
    pred_sum = kernels.new_zeros(q)
    for p0 in range(0, p, chunk):
        prob = (kernels @ features[:, p0:p0 + chunk]).sigmoid_()
        inter.addmm_(prob, target[:, p0:p0 + chunk].t())
        pred_sum += prob.sum(-1)
    union = pred_sum[:, None] + target.sum(-1)[None, :] - inter
    return inter / union.clamp(min=eps)


class HungarianMatcher(nn.Module):
    """Cost = ``cost_class`` * focal class cost + ``cost_mask`` * (1 - soft mask IoU), solved per
    image with ``scipy.optimize.linear_sum_assignment``."""

    def __init__(self, cost_class=2.0, cost_mask=3.0, focal_alpha=0.25, focal_gamma=2.0):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.alpha = focal_alpha
        self.gamma = focal_gamma

    def cost(self, logits, labels, iou):
        """logits: [Q, K]; labels: [G]; iou: soft mask IoU [Q, G] -> cost [Q, G]."""
        c_cls = focal_class_cost(logits.float(), labels, self.alpha, self.gamma)
        return self.cost_class * c_cls + self.cost_mask * (1 - iou)

    @torch.no_grad()
    def soft_ious(self, all_kernels, mask_features, targets, chunk=2048):
        """The soft mask IoUs of several sets of queries (decoder layers, proposals) with each
        image's targets, all sets of an image in one chunked product (a [sum Q, D] x [D, chunk]
        product per chunk uses the CPU's GEMM better than one per layer: 7 x 300 queries at
        800x1216, 20-30 % less time). all_kernels: list of [N, Q_j, D] -> per set, per image
        [Q_j, G] (None for an image without targets)."""
        n, d = mask_features.shape[:2]
        feats = mask_features.reshape(n, d, -1)
        out = [[None] * n for _ in all_kernels]
        for i, t in enumerate(targets):
            if len(t["labels"]) == 0:
                continue
            stacked = torch.cat([k[i] for k in all_kernels]).float()
            iou = soft_mask_iou_from_kernels(stacked, feats[i].float(),
                                             t["masks"].flatten(1).float(), chunk=chunk)
            for j, part in enumerate(iou.split([k.shape[1] for k in all_kernels])):
                out[j][i] = part
        return out

    @torch.no_grad()
    def forward(self, logits, kernels, mask_features, targets, repeats=1, ious=None):
        """logits: [N, Q, K]; mask logits given as kernels [N, Q, D] applied to mask features
        [N, D, H, W] (:func:`soft_mask_iou_from_kernels`: the [N, Q, H, W] logits are never
        materialised); targets: list of dicts with "labels" [G] and "masks" [G, H, W] -> list
        of (query indices, target indices) int64 pairs. ``repeats`` > 1: one-to-many matching,
        every target matched to up to ``repeats`` queries (the assignment of ``repeats`` copies
        of each target; the indices returned are the original targets'). ``ious``: per image
        the soft mask IoUs [Q, G] computed beforehand (:meth:`soft_ious`), or None."""
        n, d = mask_features.shape[:2]
        feats = mask_features.reshape(n, d, -1)

        def cost(i, t):
            iou = None if ious is None else ious[i]
            if iou is None:
                iou = soft_mask_iou_from_kernels(kernels[i].float(), feats[i].float(),
                                                 t["masks"].flatten(1).float())
            return self.cost(logits[i], t["labels"], iou)

        return self._assign(targets, cost, repeats)

    @staticmethod
    def _assign(targets, cost_fn, repeats=1):
        out = []
        for i, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64)
                out.append((empty, empty))
                continue
            c = cost_fn(i, t).cpu()
            num_targets = c.shape[1]
            if repeats > 1:
                c = c.repeat(1, repeats)
            q, g = linear_sum_assignment(c.numpy())
            g = torch.as_tensor(g, dtype=torch.int64) % num_targets
            out.append((torch.as_tensor(q, dtype=torch.int64), g))
        return out
