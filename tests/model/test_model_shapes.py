"""Tensor shapes at every stage of ISDA, for odd input sizes and batches of different sizes."""
import pytest
import torch

from isda_helpers import build, small_cfg, synthetic_input

pytestmark = pytest.mark.usefixtures("one_thread")


def _ceil32(x):
    return (x + 31) // 32 * 32


def test_stage_shapes_batch_of_different_odd_sizes():
    cfg = small_cfg()
    model = build(cfg)
    model.eval()
    sizes = [(333, 517), (201, 157)]
    batch = [synthetic_input(h, w, with_targets=False, seed=i) for i, (h, w) in enumerate(sizes)]
    c = cfg.MODEL.ISDA
    with torch.no_grad():
        out = model.forward_features(batch)
    hp, wp = _ceil32(333), _ceil32(517)
    assert out["images"].tensor.shape == (2, 3, hp, wp)
    assert out["images"].image_sizes == sizes
    # P2..P6 at strides 4..64, all HIDDEN_DIM channels
    assert sorted(out["maps"]) == [4, 8, 16, 32, 64]
    for stride, maps_lvl in out["maps"].items():
        assert maps_lvl.shape == (2, c.HIDDEN_DIM, -(-hp // stride), -(-wp // stride))
    tokens = sum(-(-hp // s) * -(-wp // s) for s in (8, 16, 32, 64))
    assert out["memory"].shape == (2, tokens, c.HIDDEN_DIM)
    assert out["hs"].shape == (c.DEC_LAYERS, 2, c.NUM_QUERIES, c.HIDDEN_DIM)
    assert out["logits"].shape == (c.DEC_LAYERS, 2, c.NUM_QUERIES, c.NUM_CLASSES)
    assert out["kernels"].shape == (c.DEC_LAYERS, 2, c.NUM_QUERIES, c.MASK_OUT_DIM)
    ref = out["reference_points"]
    assert ref.shape == (2, c.NUM_QUERIES, 2) and (ref > 0).all() and (ref < 1).all()
    assert out["mask_features"].shape == (2, c.MASK_OUT_DIM, hp // 4, wp // 4)

    with torch.no_grad():
        results = model(batch)
    assert len(results) == 2
    for r, (h, w) in zip(results, sizes):
        inst = r["instances"]
        assert inst.image_size == (h, w)
        assert inst.pred_masks.shape == (c.TEST.TOPK if c.TEST.TOPK < c.NUM_QUERIES * c.NUM_CLASSES
                                         else c.NUM_QUERIES * c.NUM_CLASSES, h, w)
        assert inst.pred_masks.dtype == torch.bool
        assert inst.pred_boxes.tensor.shape == (len(inst), 4)


def test_training_losses_and_original_size_output():
    cfg = small_cfg()
    model = build(cfg)
    batch = [synthetic_input(97, 131, seed=0), synthetic_input(64, 160, num_inst=1, seed=1)]
    losses = model(batch)
    layers = cfg.MODEL.ISDA.DEC_LAYERS
    expected = {"loss_focal", "loss_dice"} | {f"loss_{k}_{l}" for k in ("focal", "dice")
                                             for l in range(layers - 1)}
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())

    # the test-time "height"/"width" (original size) decide the output size
    model.eval()
    x = synthetic_input(97, 131, with_targets=False)
    x.update(height=194, width=262)
    with torch.no_grad():
        inst = model([x])[0]["instances"]
    assert inst.pred_masks.shape[1:] == (194, 262)


def test_targets_soft_and_padded():
    cfg = small_cfg()
    model = build(cfg)
    x = synthetic_input(70, 90, num_inst=2)
    targets = model.prepare_targets([x], (96 // 4, 96 // 4))
    m = targets[0]["masks"]
    assert m.shape == (2, 24, 24)
    assert m.min() >= 0 and m.max() <= 1
    assert (m[:, 18:, :] == 0).all() and (m[:, :, 23:] == 0).all()  # zero padding beyond 70x90
    gt = x["instances"].gt_masks.tensor.float()
    # soft targets keep (about) the area: sum * stride^2 ~ GT area
    assert torch.allclose(m.sum((1, 2)) * 16, gt.sum((1, 2)), rtol=0.15)


def test_padding_masks_reach_encoder_and_decoder():
    """Values at padded positions must not influence valid encoder tokens or the queries."""
    cfg = small_cfg()
    model = build(cfg)
    model.eval()
    batch = [synthetic_input(70, 90, with_targets=False), synthetic_input(128, 192, with_targets=False, seed=1)]
    with torch.no_grad():
        images, pad_mask = model.preprocess_image(batch)
        maps, masks = model.neck(images.tensor, pad_mask)
        levels = (8, 16, 32, 64)
        src, pos, token_mask, shapes, start, ratios = model.flatten_levels(
            [maps[s] for s in levels], [masks[s] for s in levels])
        assert token_mask[0].any() and not token_mask[1].any()
        assert torch.allclose(ratios[1], torch.ones_like(ratios[1]))
        assert (ratios[0] <= 1).all() and (ratios[0] < 1).any()
        noisy = src.clone()
        noisy[token_mask] = torch.randn_like(noisy[token_mask]) * 10
        outs = []
        for s in (src, noisy):
            memory = model.encoder(s, pos, shapes, start, ratios, token_mask)
            hs, _ = model.decoder(memory, shapes, start, ratios, token_mask)
            outs.append((memory, hs))
    valid = ~token_mask
    assert torch.allclose(outs[0][0][valid], outs[1][0][valid], atol=1e-5)
    assert torch.allclose(outs[0][1], outs[1][1], atol=1e-5)
