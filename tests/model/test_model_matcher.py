"""Hungarian matcher vs brute force; focal class cost and soft mask IoU vs independent formulas."""
import itertools

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch

from isda.modeling.matcher import HungarianMatcher, focal_class_cost, soft_mask_iou
from isda_helpers import as_kernels


def _brute_force(cost):
    """Minimal total cost over all injective maps of the (fewer) columns to rows."""
    q, g = cost.shape
    best = np.inf
    for rows in itertools.permutations(range(q), g):
        best = min(best, sum(cost[r, c] for c, r in enumerate(rows)))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, h, w = 6, 3, 8, 9
    n_gt = [1, 3, 5, 6][seed % 4]
    logits = torch.randn(1, q, k, generator=g) * 2
    mask_logits = torch.randn(1, q, h, w, generator=g) * 3
    targets = [{"labels": torch.randint(0, k, (n_gt,), generator=g),
                "masks": torch.rand(n_gt, h, w, generator=g)}]
    matcher = HungarianMatcher()
    (qi, gi), = matcher(logits, *as_kernels(mask_logits), targets)
    assert len(qi) == len(gi) == n_gt
    assert len(set(qi.tolist())) == n_gt and sorted(gi.tolist()) == list(range(n_gt))
    iou = soft_mask_iou(mask_logits[0].flatten(1).sigmoid(), targets[0]["masks"].flatten(1))
    cost = matcher.cost(logits[0], targets[0]["labels"], iou).double().numpy()
    assert cost[qi.numpy(), gi.numpy()].sum() == pytest.approx(_brute_force(cost), abs=1e-9)


def test_empty_targets():
    matcher = HungarianMatcher()
    out = matcher(torch.randn(2, 4, 2), *as_kernels(torch.randn(2, 4, 5, 5)),
                  [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 5, 5)}] * 2)
    assert all(len(q) == 0 and len(g) == 0 for q, g in out)


def test_cost_is_weighted_sum_of_float64_formulas():
    g = torch.Generator().manual_seed(1)
    q, k, n, p = 5, 4, 3, 30
    logits = torch.randn(q, k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    ml = torch.randn(q, 5, 6, generator=g, dtype=torch.float64)
    tm = torch.rand(n, 5, 6, generator=g, dtype=torch.float64)
    iou = soft_mask_iou(ml.flatten(1).float().sigmoid(), tm.flatten(1).float())
    cost = HungarianMatcher(cost_class=2.0, cost_mask=3.0).cost(logits.float(), labels,
                                                                iou).double()
    expected = np.zeros((q, n))
    for i in range(q):
        for j in range(n):
            s = 1 / (1 + np.exp(-logits[i, labels[j]].item()))
            pos = 0.25 * (1 - s) ** 2 * -np.log(s)
            neg = 0.75 * s ** 2 * -np.log(1 - s)
            pm = 1 / (1 + np.exp(-ml[i].numpy()))
            t = tm[j].numpy()
            inter = (pm * t).sum()
            iou = inter / (pm.sum() + t.sum() - inter)
            expected[i, j] = 2.0 * (pos - neg) + 3.0 * (1 - iou)
    np.testing.assert_allclose(cost.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_focal_class_cost_prefers_confident_correct_class():
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    c = focal_class_cost(logits, torch.tensor([0, 1]))
    assert c[0, 0] < c[1, 0] and c[1, 1] < c[0, 1]


def test_soft_iou_float64_soft_masks():
    g = torch.Generator().manual_seed(2)
    a = torch.rand(4, 50, generator=g, dtype=torch.float64)
    b = torch.rand(3, 50, generator=g, dtype=torch.float64)
    iou = soft_mask_iou(a, b)
    for i in range(4):
        for j in range(3):
            inter = float((a[i] * b[j]).sum())
            assert iou[i, j].item() == pytest.approx(inter / (float(a[i].sum() + b[j].sum()) - inter),
                                                     rel=1e-12)


def test_soft_iou_equals_coco_iou_on_binary_masks():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(5, 20, 24, generator=g) > 0.6
    b = torch.rand(4, 20, 24, generator=g) > 0.4
    a[0] = b[0]  # one exact match
    ours = soft_mask_iou(a.flatten(1).float(), b.flatten(1).float()).numpy()
    enc = lambda m: mask_util.encode(np.asfortranarray(m.numpy().transpose(1, 2, 0).astype(np.uint8)))
    coco = mask_util.iou(enc(a), enc(b), [0] * 4)
    np.testing.assert_allclose(ours, coco, rtol=1e-6)
    assert ours[0, 0] == pytest.approx(1.0)


def test_chunked_kernel_iou_equals_dense_float64():
    """soft_mask_iou_from_kernels (chunked, no dense logits) against the dense float64 formula
    written out here, on a channels-last feature map with a chunk size that does not divide P."""
    from isda.modeling.matcher import soft_mask_iou_from_kernels

    g = torch.Generator().manual_seed(5)
    kernels = torch.randn(7, 6, generator=g, dtype=torch.float64)
    feats = torch.randn(1, 6, 9, 11, generator=g, dtype=torch.float64)
    feats = feats.contiguous(memory_format=torch.channels_last).reshape(6, 99)
    target = (torch.rand(3, 99, generator=g, dtype=torch.float64) > 0.6).to(torch.float64)
    prob = 1 / (1 + torch.exp(-(kernels @ feats)))
    inter = torch.einsum("qp,gp->qg", prob, target)
    ref = inter / (prob.sum(1)[:, None] + target.sum(1)[None] - inter)
    out = soft_mask_iou_from_kernels(kernels, feats, target, chunk=10)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_matching_kernels_equals_matching_their_dense_masks():
    from isda.modeling.heads import predict_masks
    from isda.modeling.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 12, 3, generator=g)
    kernels = torch.randn(2, 12, 8, generator=g)
    feats = torch.randn(2, 8, 10, 14, generator=g)
    targets = [{"labels": torch.tensor([0, 2, 1]), "masks": (torch.rand(3, 10, 14, generator=g) > 0.5).float()},
               {"labels": torch.tensor([], dtype=torch.int64), "masks": torch.zeros(0, 10, 14)}]
    m = HungarianMatcher()
    dense = m(logits, *as_kernels(predict_masks(kernels, feats)), targets)
    lazy = m(logits, kernels, feats, targets)
    for (q1, g1), (q2, g2) in zip(dense, lazy):
        assert torch.equal(q1, q2) and torch.equal(g1, g2)


def test_soft_ious_of_several_query_sets_equal_dense_float64():
    """HungarianMatcher.soft_ious (all sets of an image in one chunked product) against the
    dense float64 formula per set; an image without targets gives None; matching with them
    gives the matcher's own result."""
    from isda.modeling.matcher import HungarianMatcher

    g = torch.Generator().manual_seed(8)
    sets = [torch.randn(2, q, 6, generator=g, dtype=torch.float64) for q in (5, 7, 3)]
    feats = torch.randn(2, 6, 9, 11, generator=g, dtype=torch.float64)
    feats = feats.contiguous(memory_format=torch.channels_last)
    masks = (torch.rand(4, 9, 11, generator=g) > 0.5).to(torch.float64)
    targets = [{"labels": torch.tensor([0, 1, 1, 2]), "masks": masks},
               {"labels": torch.tensor([], dtype=torch.int64), "masks": torch.zeros(0, 9, 11)}]
    m = HungarianMatcher()
    out = m.soft_ious(sets, feats, targets, chunk=10)
    t = masks.flatten(1)
    for j, k in enumerate(sets):
        prob = 1 / (1 + torch.exp(-(k[0] @ feats[0].reshape(6, -1))))
        inter = prob @ t.t()
        ref = inter / (prob.sum(1)[:, None] + t.sum(1)[None] - inter)
        torch.testing.assert_close(out[j][0].double(), ref, rtol=1e-6, atol=1e-6)
        assert out[j][1] is None
        logits = torch.randn(2, k.shape[1], 3, generator=g)
        with_ious = m(logits, k.float(), feats.float(), targets, ious=out[j])
        own = m(logits, k.float(), feats.float(), targets)
        for (q1, g1), (q2, g2) in zip(with_ious, own):
            assert torch.equal(q1, q2) and torch.equal(g1, g2)
