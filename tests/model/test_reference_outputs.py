"""Fixed-seed reference outputs of a tiny ISDA, recorded before the speed work: losses,
gradient norms, last-layer logits, mask logits and the post-processed instances must stay within
float tolerance of ``tests/model/isda_reference_outputs.pt``.

Regenerate (only when a change of the model's *results* is intended):

    python tests/model/test_reference_outputs.py --regenerate
"""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from isda_helpers import build, small_cfg, synthetic_input

REFERENCE = Path(__file__).resolve().parent / "isda_reference_outputs.pt"
MODULES = ("backbone", "mapper", "encoder", "decoder", "mask_head", "heads")

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg():
    # frozen here (not taken from small_cfg's defaults alone) so that the reference stays valid
    return small_cfg("MODEL.ISDA.NUM_QUERIES", 12, "MODEL.ISDA.NUM_CLASSES", 3,
                     "MODEL.ISDA.HIDDEN_DIM", 64, "MODEL.ISDA.ENC_LAYERS", 1,
                     "MODEL.ISDA.DEC_LAYERS", 2, "MODEL.ISDA.TEST.TOPK", 20)


def _batch(with_targets):
    """Two images of different odd sizes (padding), three and two instances."""
    a = synthetic_input(70, 101, num_inst=3, seed=11, with_targets=with_targets)
    b = synthetic_input(53, 88, num_inst=2, seed=12, with_targets=with_targets)
    if not with_targets:  # the second image is resized to a larger "original" size
        b["height"], b["width"] = 80, 130
    return [a, b]


def compute_outputs():
    """Run the tiny model once in training mode (losses, gradient norm per module) and once in
    inference mode (network outputs and post-processed instances)."""
    torch.manual_seed(0)
    model = build(_cfg(), seed=0)
    model.train()
    losses = model(_batch(True))
    sum(losses.values()).backward()
    grad_norms = {}
    for name in MODULES:
        grads = [p.grad.flatten() for p in getattr(model, name).parameters() if p.grad is not None]
        grad_norms[name] = torch.cat(grads).norm().item()

    model.eval()
    with torch.no_grad():
        batch = _batch(False)
        feats = model.forward_features(batch)
        from isda.modeling.heads import predict_masks

        mask_logits = predict_masks(feats["kernels"][-1], feats["mask_features"])
        results = model(batch)
    out = {
        "losses": {k: v.item() for k, v in losses.items()},
        "grad_norms": grad_norms,
        "logits": feats["logits"][-1].clone(),
        "mask_logits": mask_logits.clone(),
        "instances": [],
    }
    for r in results:
        inst = r["instances"]
        masks = inst.pred_masks.numpy()
        out["instances"].append({
            "scores": inst.scores.clone(), "classes": inst.pred_classes.clone(),
            "boxes": inst.pred_boxes.tensor.clone(), "shape": tuple(masks.shape),
            "masks_packed": torch.from_numpy(np.packbits(masks.reshape(-1))),
        })
    return out


def _unpack(inst):
    n = int(np.prod(inst["shape"]))
    return torch.from_numpy(np.unpackbits(inst["masks_packed"].numpy())[:n].reshape(inst["shape"]))


@pytest.fixture(scope="module")
def outputs():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return compute_outputs(), torch.load(REFERENCE, weights_only=True)
    finally:
        torch.set_num_threads(before)


def test_reference_file_is_small():
    assert REFERENCE.stat().st_size < 200 * 1024


def test_losses_and_gradients_match(outputs):
    new, ref = outputs
    assert set(new["losses"]) == set(ref["losses"])
    for k, v in ref["losses"].items():
        assert new["losses"][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    for k, v in ref["grad_norms"].items():
        assert new["grad_norms"][k] == pytest.approx(v, rel=1e-3, abs=1e-6), k


def test_network_outputs_match(outputs):
    new, ref = outputs
    torch.testing.assert_close(new["logits"], ref["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new["mask_logits"], ref["mask_logits"], rtol=1e-4, atol=1e-3)


def test_instances_match(outputs):
    new, ref = outputs
    assert len(new["instances"]) == len(ref["instances"])
    for a, b in zip(new["instances"], ref["instances"]):
        assert a["shape"] == b["shape"]
        torch.testing.assert_close(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(a["classes"], b["classes"])
        ma, mb = _unpack(a), _unpack(b)
        # pixels within float rounding of the 0.5 threshold may flip; nothing else may
        assert (ma != mb).float().mean().item() < 1e-3
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1.0)


def test_reference_detects_a_changed_model(outputs):
    """The comparison is sensitive: perturbing one weight changes the outputs beyond tolerance."""
    _, ref = outputs
    torch.manual_seed(0)
    model = build(_cfg(), seed=0).eval()
    with torch.no_grad():
        model.heads.class_embed.bias.add_(0.05)
        logits = model.forward_features(_batch(False))["logits"][-1]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    if "--regenerate" not in sys.argv:
        sys.exit(__doc__)
    torch.set_num_threads(1)
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(compute_outputs(), REFERENCE)
    print(f"wrote {REFERENCE} ({REFERENCE.stat().st_size} bytes)")
