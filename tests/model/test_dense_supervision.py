"""Dense supervision of the encoder tokens (MODEL.ISDA.DENSE_LOSS_WEIGHT): the centre assignment
on a hand-built image, the losses against a float64 loop over tokens written from the formulas,
and the option in the model (every parameter trained, inference unchanged)."""
import math

import pytest
import torch

from isda.modeling.dense_supervision import DenseCriterion, centre_assignment
from isda.modeling.heads import ISDAHeads
from isda_helpers import (assert_every_parameter_trained_then_infer, build, small_cfg,
                                synthetic_input)

# a 64 x 64 padded input, masks on the stride-4 grid (16 x 16), levels of strides 8, 16, 32, 64
SHAPES = [(8, 8), (4, 4), (2, 2), (1, 1)]
NUM_TOKENS = 64 + 16 + 4 + 1


def _box_mask(rows, cols):
    """A mask on the 16 x 16 grid covering input pixels rows [r0, r1) x cols [c0, c1)."""
    m = torch.zeros(16, 16)
    m[rows[0] // 4:rows[1] // 4, cols[0] // 4:cols[1] // 4] = 1
    return m


def hand_case():
    """Instances A (20 px square), B (48 x 40 px) and C (8 px, inside B's centre region) and the
    positives worked out by hand (token index -> instance)."""
    a = _box_mask((8, 28), (8, 28))    # centre (18, 18), size 20: level 0 only
    b = _box_mask((16, 64), (24, 64))  # centre y 40, x 44, size 43.8: levels 0 and 1
    c = _box_mask((36, 44), (40, 48))  # centre y 40, x 44, size 8: level 0 only
    # A: level 0 half-extent max(0.2 * 20 / 2, 4) = 4 -> the token centred at (20, 20): (2, 2)
    # B: level 0 rows within 4.8 of 40 -> token rows 4, 5 (centres 36, 44); columns within 4 of 44
    #    -> column 5 (centre 44): tokens 37, 45, both also C's (smaller) -> C's. Level 1 (stride
    #    16, half-extent 8): row 2, column 2 (centre 40, 40) -> 64 + 2 * 4 + 2 = 74
    expected = {18: 0, 37: 2, 45: 2, 74: 1}
    return torch.stack([a, b, c]), expected


def test_centre_assignment_by_hand():
    masks, expected = hand_case()
    valid = torch.ones(NUM_TOKENS, dtype=torch.bool)
    tok, gt = centre_assignment(masks, 4, (64, 64), SHAPES, valid, radius=0.2)
    assert dict(zip(tok.tolist(), gt.tolist())) == expected
    # a padding token is never a positive
    valid[18] = False
    tok, gt = centre_assignment(masks, 4, (64, 64), SHAPES, valid, radius=0.2)
    assert dict(zip(tok.tolist(), gt.tolist())) == {k: v for k, v in expected.items() if k != 18}
    # an instance with an empty mask on the grid, or no instance at all: no positive
    tok, _ = centre_assignment(torch.zeros(1, 16, 16), 4, (64, 64), SHAPES, valid)
    assert len(tok) == 0
    tok, _ = centre_assignment(torch.zeros(0, 16, 16), 4, (64, 64), SHAPES, valid)
    assert len(tok) == 0


def test_large_instance_goes_to_coarse_levels():
    m = torch.ones(1, 16, 16)  # 64 px: levels of stride 16 (64/16 = 4) and 32 (2), not 8 or 64
    tok, _ = centre_assignment(m, 4, (64, 64), SHAPES, torch.ones(NUM_TOKENS, dtype=torch.bool))
    levels = {0 if t < 64 else 1 if t < 80 else 2 if t < 84 else 3 for t in tok.tolist()}
    assert levels == {1, 2}


def _focal64(p_logit, t, alpha=0.25, gamma=2.0):
    p = 1 / (1 + math.exp(-p_logit))
    if t:
        return -alpha * (1 - p) ** gamma * math.log(p)
    return -(1 - alpha) * p ** gamma * math.log(1 - p)


def _dice64(logits, target, eps=1e-3):
    p = [1 / (1 + math.exp(-v)) for v in logits]
    num = 2 * sum(a * b for a, b in zip(p, target))
    return 1 - num / (sum(a * a for a in p) + sum(b * b for b in target) + 2 * eps)


def test_dense_losses_against_float64_loop():
    torch.manual_seed(0)
    masks, expected = hand_case()
    c, d, k = 16, 12, 2
    heads = ISDAHeads(c, k, d, kernel_ref_points=True)
    tokens = torch.randn(2, NUM_TOKENS, c)
    centres = torch.rand(2, NUM_TOKENS, 2)
    feats = torch.randn(2, d, 16, 16)
    pad = torch.zeros(2, NUM_TOKENS, dtype=torch.bool)
    pad[1, 40:] = True  # the second image (no instances) has padding tokens
    labels = torch.tensor([1, 0, 1])
    targets = [{"labels": labels, "masks": masks},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)}]
    crit = DenseCriterion(weight=0.5, focal_weight=2.0, dice_weight=3.0)
    losses = crit(tokens, heads, centres, pad, SHAPES, feats, targets, mask_stride=4)

    # float64 reference, token by token
    with torch.no_grad():
        logits = (tokens.double() @ heads.class_embed.weight.double().t()
                  + heads.class_embed.bias.double())
    focal = 0.0
    for i in range(2):
        for s in range(NUM_TOKENS):
            if pad[i, s]:
                continue
            for cls in range(k):
                pos = i == 0 and s in expected and int(labels[expected[s]]) == cls
                focal += _focal64(float(logits[i, s, cls]), pos)
    dice = 0.0
    for s, g in expected.items():
        with torch.no_grad():
            _, kern = heads(tokens[0, s][None], centres[0, s][None])
        mask_logits = (kern.double() @ feats[0].double().reshape(d, -1))[0].tolist()
        dice += _dice64(mask_logits, masks[g].flatten().tolist())
    n = len(expected)
    assert losses["loss_focal_dense"].item() == pytest.approx(0.5 * 2.0 * focal / n, rel=1e-5)
    assert losses["loss_dice_dense"].item() == pytest.approx(0.5 * 3.0 * dice / n, rel=1e-5)


@pytest.mark.parametrize("two_stage", [False, True])
def test_dense_option_trains_every_parameter(two_stage):
    cfg = small_cfg("MODEL.ISDA.DENSE_LOSS_WEIGHT", 1.0, "MODEL.ISDA.TWO_STAGE", two_stage)
    model = build(cfg)
    assert (model.dense_head is None) == two_stage
    model.train()
    batch = [synthetic_input(64, 96, seed=s) for s in range(2)]
    batch.append(synthetic_input(80, 64, num_inst=0, seed=3))  # an image without instances
    losses = model(batch)
    assert {"loss_focal_dense", "loss_dice_dense"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert_every_parameter_trained_then_infer(model, losses, 10 * 3)


def test_dense_off_builds_nothing_and_negative_weight_fails():
    model = build(small_cfg())
    assert model.dense_criterion is None and model.dense_head is None
    with pytest.raises(ValueError, match="DENSE_LOSS_WEIGHT"):
        build(small_cfg("MODEL.ISDA.DENSE_LOSS_WEIGHT", -1.0))
