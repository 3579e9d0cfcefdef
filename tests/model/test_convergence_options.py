"""The convergence options (training-only query groups, one-to-many matching) and the schedule
that follows SOLVER.MAX_ITER, against independent references: brute-force assignments, the
decoder run one group at a time, the criterion on explicitly repeated targets, hand-computed
learning rates."""
import itertools
from pathlib import Path

import pytest
import torch
from detectron2.config import get_cfg

import isda
from isda.modeling.criterion import SetCriterion
from isda.modeling.deformable_decoder import DeformableDecoder
from isda.modeling.matcher import HungarianMatcher
from isda.solver import build_isda_lr_scheduler, resolve_schedule
from isda_helpers import (ROOT, assert_every_parameter_trained_then_infer, build, small_cfg,
                                synthetic_input)


def brute_force_one_to_many(cost, repeats):
    """Minimum total cost of giving each target (column) ``repeats`` distinct queries (rows),
    or every query a target when there are fewer queries, by enumeration."""
    q, g = cost.shape
    slots = [j for j in range(g) for _ in range(repeats)]
    best = None
    n = min(q, len(slots))
    for rows in itertools.permutations(range(q), n):
        for cols in itertools.combinations(range(len(slots)), n) if n < len(slots) else [range(n)]:
            total = sum(cost[r, slots[c]] for r, c in zip(rows, cols))
            if best is None or total < best - 1e-9:
                best = total
    return best


@pytest.mark.parametrize("q,g,repeats,seed", [(5, 2, 2, 0), (6, 2, 3, 1), (4, 3, 2, 2),
                                              (5, 1, 4, 3)])
def test_one_to_many_assignment_is_optimal(q, g, repeats, seed):
    cost = torch.rand(q, g, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    targets = [{"labels": torch.zeros(g, dtype=torch.long)}]
    (qi, gi), = HungarianMatcher._assign(targets, lambda i, t: cost, repeats)
    assert len(set(qi.tolist())) == len(qi)  # a query gets at most one target
    counts = torch.bincount(gi, minlength=g)
    assert counts.max() <= repeats and len(qi) == min(q, g * repeats)
    got = float(cost[qi, gi].sum())
    assert got == pytest.approx(brute_force_one_to_many(cost.numpy(), repeats), abs=1e-9)


def test_grouped_decoder_equals_each_group_alone():
    """Self-attention inside each group only: decoding all groups at once gives what the same
    layers give to each group's queries on their own; at inference only the first group."""
    torch.manual_seed(0)
    c, q, groups = 32, 6, 3
    dec = DeformableDecoder(q, 2, c, aux_groups=groups - 1, d_ffn=64, dropout=0.0, n_levels=2,
                            n_heads=4, n_points=2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    start = torch.tensor([0, 48])
    memory = torch.randn(2, 60, c)
    ratios = torch.ones(2, 2, 2)
    dec.train()
    hs, ref = dec(memory, shapes, start, ratios, None)
    assert hs.shape == (2, 2, q * groups, c) and ref.shape == (2, q * groups, 2)
    for g in range(groups):
        alone = DeformableDecoder(q, 2, c, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4,
                                  n_points=2)
        state = dec.state_dict()
        state["query_embed.weight"] = state["query_embed.weight"][g * q:(g + 1) * q]
        alone.load_state_dict(state)
        alone.eval()
        hs_g, ref_g = alone(memory, shapes, start, ratios, None)
        torch.testing.assert_close(hs[:, :, g * q:(g + 1) * q], hs_g, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref[:, g * q:(g + 1) * q], ref_g)
    dec.eval()
    hs_eval, _ = dec(memory, shapes, start, ratios, None)
    assert hs_eval.shape == (2, 2, q, c)
    torch.testing.assert_close(hs_eval, hs[:, :, :q], rtol=1e-5, atol=1e-5)


def _random_case(seed, n=2, q=7, k=2, d=8, hw=(6, 5), layers=2, num_gt=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, n, q, k, generator=g)
    kernels = torch.randn(layers, n, q, d, generator=g)
    feats = torch.randn(n, d, *hw, generator=g)
    targets = [{"labels": torch.randint(0, k, (m,), generator=g),
                "masks": (torch.rand(m, *hw, generator=g) > 0.5).float()} for m in num_gt]
    return logits, kernels, feats, targets


@pytest.mark.parametrize("repeats", [1, 3])
def test_aux_group_losses_equal_criterion_on_repeated_targets(repeats):
    """An extra group's losses = the plain criterion's losses for that group's queries against
    targets repeated ``repeats`` times (every GT instance then has ``repeats`` copies to match)."""
    own, aux = _random_case(0), _random_case(1)
    logits = torch.cat([own[0], aux[0]], 2)
    kernels = torch.cat([own[1], aux[1]], 2)
    feats, targets = own[2], own[3]
    q = own[0].shape[2]
    grouped = SetCriterion(2, HungarianMatcher(), num_queries=q, aux_groups=1,
                           aux_repeats=repeats, aux_weight=0.5)
    losses = grouped(logits, kernels, feats, targets)
    plain = SetCriterion(2, HungarianMatcher())
    ref_own = plain(own[0], own[1], feats, targets)
    repeated = [{"labels": t["labels"].repeat(repeats), "masks": t["masks"].repeat(repeats, 1, 1)}
                for t in targets]
    ref_aux = plain(aux[0], aux[1], feats, repeated)
    for k, v in ref_own.items():
        torch.testing.assert_close(losses[k], v)
        name = k.replace("loss_focal", "loss_focal_aux").replace("loss_dice", "loss_dice_aux")
        torch.testing.assert_close(losses[name], 0.5 * ref_aux[k])
    assert len(losses) == 2 * len(ref_own)


def test_groups_train_every_parameter_and_infer_with_own_queries():
    cfg = small_cfg("MODEL.ISDA.AUX_GROUPS", 2, "MODEL.ISDA.AUX_GROUP_REPEATS", 2)
    model = build(cfg)
    model.train()
    losses = model([synthetic_input(64, 96, seed=s) for s in range(2)])
    assert {"loss_focal_aux", "loss_dice_aux", "loss_focal_aux_0"} <= set(losses)
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    # the extra groups' embeddings are trained too
    assert model.decoder.query_embed.weight.grad[10:].abs().sum() > 0
    model.eval()
    with torch.no_grad():
        out = model([synthetic_input(64, 96, with_targets=False)])
    # top-k over the model's own 10 queries x 3 classes only (30 < TOPK 100; all 30 queries of
    # the three groups would give 90)
    assert len(out[0]["instances"]) == 10 * 3


def test_schedule_follows_max_iter():
    cfg = small_cfg("SOLVER.MAX_ITER", 600, "SOLVER.WARMUP_FRACTION", 0.02,
                    "SOLVER.STEP_FRACTIONS", (0.8,), "SOLVER.BASE_LR", 1e-3,
                    "SOLVER.WARMUP_FACTOR", 0.001, "SOLVER.GAMMA", 0.1)
    r = resolve_schedule(cfg)
    assert r.SOLVER.WARMUP_ITERS == 12 and tuple(r.SOLVER.STEPS) == (480,)
    cfg.SOLVER.MAX_ITER = 1000
    assert resolve_schedule(cfg).SOLVER.STEPS == (800,)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_isda_lr_scheduler(cfg, opt)  # MAX_ITER 1000: warm-up 20, step at 800
    lrs = []
    for _ in range(1000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Detectron2's linear warm-up: factor 0.001 -> 1 over the warm-up iterations
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx(1e-3 * (0.001 * (1 - 0.5) + 0.5))
    assert lrs[20] == pytest.approx(1e-3) and lrs[799] == pytest.approx(1e-3)
    assert lrs[800] == pytest.approx(1e-4) and lrs[999] == pytest.approx(1e-4)
    # a run too short for its fractions (the custom-dataset guide's 2-iteration test used to stop
    # with "Milestone must be smaller than total number of updates")
    for max_iter, steps in ((2, (1,)), (1, ())):
        cfg.SOLVER.MAX_ITER = max_iter
        assert resolve_schedule(cfg).SOLVER.STEPS == steps
        build_isda_lr_scheduler(cfg, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1))
    # no fractions: Detectron2's own keys untouched
    plain = small_cfg("SOLVER.STEPS", (7,), "SOLVER.WARMUP_ITERS", 3)
    assert resolve_schedule(plain) is plain
    with pytest.raises(ValueError, match="STEP_FRACTIONS"):
        resolve_schedule(small_cfg("SOLVER.STEP_FRACTIONS", (1.5,)))


def _merged(path):
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def test_paper_configs_keep_the_paper_model():
    for path in sorted((ROOT / "configs" / "coco").glob("*.yaml")):
        cfg = _merged(path)
        assert cfg.MODEL.ISDA.AUX_GROUPS == 0, path.name
        assert not cfg.MODEL.ISDA.TWO_STAGE and cfg.MODEL.ISDA.DENSE_LOSS_WEIGHT == 0, path.name
        assert cfg.SOLVER.WARMUP_FRACTION == 0 and cfg.SOLVER.STEP_FRACTIONS == (), path.name


def test_scratch_config_builds_and_follows_max_iter():
    cfg = _merged(ROOT / "configs" / "custom" / "isda_R18_scratch.yaml")
    assert cfg.MODEL.ISDA.NUM_CLASSES == 1 and cfg.MODEL.ISDA.NUM_QUERIES >= 100
    assert cfg.MODEL.ISDA.AUX_GROUPS >= 1 and cfg.SOLVER.BACKBONE_MULTIPLIER == 1.0
    assert cfg.MODEL.ISDA.TWO_STAGE and cfg.MODEL.ISDA.DENSE_LOSS_WEIGHT > 0
    # the schedule is set by fractions only: changing MAX_ITER moves warm-up and decay
    for max_iter in (300, 3000):
        cfg.SOLVER.MAX_ITER = max_iter
        r = resolve_schedule(cfg)
        assert r.SOLVER.STEPS[-1] < max_iter and r.SOLVER.STEPS[0] > max_iter // 2
        assert 1 <= r.SOLVER.WARMUP_ITERS < max_iter // 10
    cfg.MODEL.DEVICE = "cpu"
    model = build(cfg)
    model.train()
    losses = model([synthetic_input(96, 128, num_classes=1, seed=s) for s in range(2)])
    assert all(torch.isfinite(v) for v in losses.values())
    assert {"loss_focal_enc", "loss_focal_dense", "loss_focal_aux"} <= set(losses)


# --------------------------------------------------------------------------------------------
# queries placed by encoder proposals (MODEL.ISDA.TWO_STAGE)
# --------------------------------------------------------------------------------------------
def test_token_centres_by_hand():
    from isda.modeling.deformable_encoder import token_centres

    shapes = torch.tensor([[2, 4], [1, 2]])
    ratios = torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 1.0], [0.5, 1.0]]])  # (x, y)
    c = token_centres(shapes, ratios)
    assert c.shape == (2, 10, 2)
    # level 0, row 1, column 2 of image 0: x = 2.5 / 4, y = 1.5 / 2
    torch.testing.assert_close(c[0, 6], torch.tensor([0.625, 0.75]))
    # image 1 has only the left half valid: x measured in the valid width
    torch.testing.assert_close(c[1, 6], torch.tensor([1.25, 0.75]))
    torch.testing.assert_close(c[1, 8], torch.tensor([0.5, 0.5]))  # level 1, column 0


def test_point_embedding_matches_the_pixel_encoding():
    """A point at a pixel centre is encoded like that pixel by the maps' sine encoding."""
    from isda.modeling.position_encoding import PositionEmbeddingSine
    from isda.modeling.query_selection import point_sine_embedding

    h, w, f = 5, 7, 16
    maps = PositionEmbeddingSine(f, eps=0.0)(torch.zeros(1, h, w, dtype=torch.bool))[0]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    points = torch.stack(((xs + 0.5) / w, (ys + 0.5) / h), -1)
    torch.testing.assert_close(point_sine_embedding(points, f), maps.permute(1, 2, 0),
                               rtol=1e-5, atol=1e-5)


def test_query_selection_takes_the_best_tokens():
    from isda.modeling.deformable_encoder import token_centres
    from isda.modeling.query_selection import QuerySelection

    torch.manual_seed(0)
    sel = QuerySelection(8, 2, 6, True, num_queries=3)
    shapes = torch.tensor([[3, 4], [2, 2]])
    ratios = torch.ones(2, 2, 2)
    memory = torch.randn(2, 16, 8)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1, :4] = True  # padding tokens are never chosen
    out = sel(memory, pad, shapes, ratios)
    with torch.no_grad():
        tokens = torch.nn.functional.layer_norm(memory @ sel.output_proj.weight.t()
                                                + sel.output_proj.bias, (8,),
                                                sel.output_norm.weight, sel.output_norm.bias)
        scores = (tokens @ sel.heads.class_embed.weight.t() + sel.heads.class_embed.bias).amax(-1)
    centres = token_centres(shapes, ratios)
    for i in range(2):
        order = [j for j in scores[i].argsort(descending=True).tolist() if not pad[i, j]][:3]
        torch.testing.assert_close(out["reference_points"][i], centres[i, order])
    assert out["logits"].shape == (2, 3, 2) and out["kernels"].shape == (2, 3, 6)
    assert out["query_pos"].shape == (2, 3, 8)
    # fewer tokens than queries (a tiny image): tokens repeat, nothing fails
    few = QuerySelection(8, 2, 6, True, num_queries=40)(memory, None, shapes, ratios)
    assert few["reference_points"].shape == (2, 40, 2)


@pytest.mark.parametrize("groups", [0, 1])
def test_two_stage_trains_every_parameter(groups):
    cfg = small_cfg("MODEL.ISDA.TWO_STAGE", True, "MODEL.ISDA.AUX_GROUPS", groups,
                    "MODEL.ISDA.AUX_GROUP_REPEATS", 2)
    model = build(cfg)
    model.train()
    losses = model([synthetic_input(64, 96, seed=s) for s in range(2)])
    assert {"loss_focal_enc", "loss_dice_enc"} <= set(losses)
    assert ("loss_focal_aux" in losses) == bool(groups)
    assert_every_parameter_trained_then_infer(model, losses, 10 * 3)
