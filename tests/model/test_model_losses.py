"""Focal and dice losses vs hand-written float64 formulas; normaliser and deep supervision."""
import math

import pytest
import torch

from isda.modeling.criterion import (SetCriterion, dice_loss, num_instances_normaliser,
                                     sigmoid_focal_loss)
from isda.modeling.matcher import HungarianMatcher
from isda_helpers import as_kernels, build, small_cfg, synthetic_input


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_focal_loss_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(40, generator=g) > 0.7).double()
    got = sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0)
    for xi, ti, li in zip(x.tolist(), t.tolist(), got.tolist()):
        p = _sig(xi)
        ref = -0.25 * (1 - p) ** 2 * math.log(p) if ti == 1 else -0.75 * p ** 2 * math.log(1 - p)
        assert li == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_dice_loss_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 25, generator=g, dtype=torch.float64)
    t = torch.rand(3, 25, generator=g, dtype=torch.float64)
    got = dice_loss(x, t)
    for i in range(3):
        p = [_sig(v) for v in x[i].tolist()]
        tt = t[i].tolist()
        inter = sum(a * b for a, b in zip(p, tt))
        ref = 1 - 2 * inter / (sum(a * a for a in p) + sum(b * b for b in tt) + 2e-3)
        assert got[i].item() == pytest.approx(ref, rel=1e-9)
    # a perfect, confident prediction has (almost) zero loss
    big = torch.tensor([[30.0, -30.0, 30.0]], dtype=torch.float64)
    assert dice_loss(big, torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)).item() < 1e-3
    # an empty prediction is the worst case (loss 1), not a smoothed local minimum
    t1 = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert dice_loss(torch.full((1, 4), -30.0, dtype=torch.float64), t1).item() > 0.999


def test_normaliser_counts_instances_and_clamps():
    t = [{"labels": torch.zeros(3)}, {"labels": torch.zeros(2)}]
    assert num_instances_normaliser(t, "cpu") == 5
    assert num_instances_normaliser([{"labels": torch.zeros(0)}], "cpu") == 1


def test_criterion_totals_and_deep_supervision():
    g = torch.Generator().manual_seed(2)
    layers, n, q, k, h, w = 3, 2, 5, 2, 6, 7
    logits = torch.randn(layers, n, q, k, generator=g)
    masks = torch.randn(layers, n, q, h, w, generator=g)
    targets = [{"labels": torch.tensor([0, 1]), "masks": torch.rand(2, h, w, generator=g)},
               {"labels": torch.tensor([1]), "masks": torch.rand(1, h, w, generator=g)}]
    matcher = HungarianMatcher()
    crit = SetCriterion(k, matcher, focal_weight=2.0, dice_weight=3.0)
    kernels, features = as_kernels(masks)  # dense masks: kernels over identity features
    losses = crit(logits, kernels, features, targets)
    assert set(losses) == {"loss_focal", "loss_dice", "loss_focal_0", "loss_dice_0",
                           "loss_focal_1", "loss_dice_1"}
    # recompute the last layer by hand from the matcher's assignment
    idx = matcher(logits[-1], kernels[-1], features, targets)
    cls_t = torch.zeros(n, q, k)
    dice = 0.0
    for b, (qi, gi) in enumerate(idx):
        cls_t[b, qi, targets[b]["labels"][gi]] = 1
        dice += dice_loss(masks[-1, b, qi].flatten(1), targets[b]["masks"][gi].flatten(1)).sum()
    focal = sigmoid_focal_loss(logits[-1], cls_t).sum()
    assert losses["loss_focal"].item() == pytest.approx(2.0 * focal.item() / 3, rel=1e-5)
    assert losses["loss_dice"].item() == pytest.approx(3.0 * dice.item() / 3, rel=1e-5)
    crit.deep_supervision = False
    assert set(crit(logits, kernels, features, targets)) == {"loss_focal", "loss_dice"}


def test_batch_without_instances_gives_every_parameter_a_gradient(one_thread):
    """A rank whose images have no instance must still produce a gradient (zero where nothing
    was matched) for every trainable parameter: DistributedDataParallel otherwise fails on the
    next step ("Expected to have finished reduction in the prior iteration") or, with NCCL,
    hangs the other ranks."""
    model = build(small_cfg())
    model.train()
    batch = [synthetic_input(64, 96, num_inst=0, seed=s) for s in range(2)]
    losses = model(batch)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    # nothing matched: the mask branch's gradients are exactly zero, the classifier's are not
    head = dict(model.named_parameters())
    mask_grads = [p.grad for n, p in head.items() if n.startswith("mask_head.")]
    assert mask_grads and all(torch.count_nonzero(g) == 0 for g in mask_grads)
    assert all(torch.isfinite(p.grad).all() for p in head.values() if p.grad is not None)


def _matched_case(n=3, layers=2, q=7, d=5, hw=(6, 4)):
    from isda.modeling.criterion import matched_kernel_masks  # noqa: F401

    g = torch.Generator().manual_seed(5)
    kernels = torch.randn(layers, n, q, d, generator=g)
    feats = torch.randn(n, d, *hw, generator=g)
    # unequal match counts per image and layer, an image without any match, repeated queries
    idx = [
        [(torch.tensor([3, 0, 5]), torch.tensor([0, 1, 2])), (torch.tensor([], dtype=torch.long),) * 2,
         (torch.tensor([6]), torch.tensor([0]))],
        [(torch.tensor([1]), torch.tensor([2])), (torch.tensor([], dtype=torch.long),) * 2,
         (torch.tensor([2, 2, 4, 0]), torch.tensor([0, 1, 2, 3]))],
    ]
    return kernels, feats, idx


def test_matched_kernel_masks_match_float64_rows_and_gradients():
    """Rows per layer in image then match order, values and gradients against a float64 loop."""
    from isda.modeling.criterion import matched_kernel_masks

    kernels, feats, idx = _matched_case()
    k32, f32 = kernels.clone().requires_grad_(), feats.clone().requires_grad_()
    k64, f64 = kernels.double().requires_grad_(), feats.double().requires_grad_()
    got = matched_kernel_masks(k32, f32, idx)
    ref = [torch.cat([torch.stack([k64[l, i, qi] @ f64[i].reshape(f64.shape[1], -1)
                                   for qi in ind[i][0].tolist()])
                      if len(ind[i][0]) else f64.new_zeros(0, f64[0, 0].numel())
                      for i in range(feats.shape[0])])
           for l, ind in enumerate(idx)]
    assert [t.shape[0] for t in got] == [4, 5]
    w = [torch.randn(t.shape, generator=torch.Generator().manual_seed(9 + j), dtype=torch.float64)
         for j, t in enumerate(ref)]
    sum((a.double() * b).sum() for a, b in zip(got, w)).backward()
    sum((a * b).sum() for a, b in zip(ref, w)).backward()
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k32.grad.double(), k64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f32.grad.double(), f64.grad, rtol=1e-5, atol=1e-5)
    assert float(f32.grad[1].abs().sum()) == 0.0  # the image without matches: zero gradient


def test_matched_kernel_masks_backward_writes_one_feature_sized_gradient():
    """The mask features' gradient is written once: a product per image made every image's
    select allocate a zero-filled gradient of the whole batch's features (an extra 59 MB per
    image for ISDA-R50 at 800x1216)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from isda.modeling.criterion import matched_kernel_masks

    kernels, feats, idx = _matched_case(d=64, hw=(40, 30))  # D well above the matches
    kernels.requires_grad_()
    feats.requires_grad_()
    big = feats.numel() * feats.element_size()
    existing = {feats.untyped_storage().data_ptr()}  # views of the features are no new memory

    class Storages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if torch.is_tensor(t) and t.untyped_storage().nbytes() >= big:
                    self.seen.add(t.untyped_storage().data_ptr())
            self.seen -= existing
            return out

    out = matched_kernel_masks(kernels, feats, idx)
    loss = sum(t.sum() for t in out)
    with Storages() as mode:
        loss.backward()
    assert len(mode.seen) == 1, len(mode.seen)


def test_check_finite_reads_channels_last_tensors_without_copying_them():
    from isda.modeling.criterion import check_finite

    feats = torch.randn(1, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    from isda.modeling.criterion import _dense_view

    view = _dense_view(feats)  # what the reduction reads: the same memory, in order
    assert view.is_contiguous() and view.data_ptr() == feats.data_ptr()
    assert sorted(view.flatten().tolist()) == sorted(feats.flatten().tolist())
    check_finite([("mask features", feats)], "test")
    feats[0, 3, 2, 1] = float("nan")
    feats[0, 7, 5, 4] = float("inf")
    with pytest.raises(FloatingPointError, match=r"mask features \[1, 8, 6, 5\]: 1 NaN, 1 inf"):
        check_finite([("mask features", feats)], "test")
    # a non-dense view (every other channel) is still checked
    with pytest.raises(FloatingPointError, match="1 NaN"):
        check_finite([("mask features", feats[:, 1::2])], "test")
