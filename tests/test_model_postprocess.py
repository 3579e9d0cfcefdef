"""NMS-free inference: sorting, sizes, tight boxes, empty outputs, bounded memory."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from isda.modeling.postprocess import isda_postprocess, masks_to_boxes
from test_model_helpers import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def _random_outputs(q=20, k=3, h=16, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, k, generator=g) * 2, torch.randn(q, h, w, generator=g) * 4


def test_sorted_scores_sizes_and_classes():
    cls, masks = _random_outputs()
    inst = isda_postprocess(cls, masks, image_size=(61, 77), output_size=(122, 154), topk=25)
    assert len(inst) == 25 and inst.image_size == (122, 154)
    assert inst.pred_masks.shape == (25, 122, 154) and inst.pred_masks.dtype == torch.bool
    assert (inst.scores[:-1] >= inst.scores[1:]).all()
    assert inst.pred_classes.min() >= 0 and inst.pred_classes.max() < 3
    assert ((inst.scores >= 0) & (inst.scores <= 1)).all()
    # each score = class prob of its (query, class) x mean mask prob inside the binary mask
    probs = cls.sigmoid()
    for s, c in zip(inst.scores.tolist(), inst.pred_classes.tolist()):
        assert any(abs(s / max(p, 1e-12)) <= 1 + 1e-6 for p in probs[:, c].tolist())


def test_score_formula_single_query():
    cls = torch.tensor([[2.0]])
    m = torch.full((1, 4, 4), -5.0)
    m[0, :2, :2] = 3.0
    inst = isda_postprocess(cls, m, image_size=(16, 16), output_size=(16, 16), topk=100)
    expected = torch.sigmoid(torch.tensor(2.0)) * torch.sigmoid(torch.tensor(3.0))
    assert len(inst) == 1 and torch.isclose(inst.scores[0], expected)
    # the mask covers (about) the top-left quarter of the output
    assert inst.pred_masks[0, :7, :7].all() and not inst.pred_masks[0, 9:, :].any()


def test_boxes_tight_around_masks():
    cls, masks = _random_outputs(q=8, seed=1)
    inst = isda_postprocess(cls, masks, image_size=(64, 80), output_size=(64, 80), topk=8)
    for m, b in zip(inst.pred_masks, inst.pred_boxes.tensor):
        if not m.any():
            assert (b == 0).all()
            continue
        ys, xs = torch.nonzero(m, as_tuple=True)
        assert b.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1,
                              ys.max().item() + 1]
    hand = torch.zeros(2, 5, 6, dtype=torch.bool)
    hand[0, 1:3, 2:5] = True
    assert masks_to_boxes(hand).tolist() == [[2.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 0.0]]


def test_no_confident_detection_and_padding_crop():
    # everything negative: masks empty, boxes zero, scores 0, still well-formed
    cls = torch.full((5, 2), -20.0)
    masks = torch.full((5, 8, 8), -10.0)
    inst = isda_postprocess(cls, masks, image_size=(20, 30), output_size=(40, 60), topk=100)
    assert len(inst) == 10 and not inst.pred_masks.any()
    assert (inst.pred_boxes.tensor == 0).all() and (inst.scores == 0).all()
    # a mask living only in the padding (beyond the 20x16 input) disappears after the crop
    masks = torch.full((1, 8, 8), -10.0)
    masks[0, :, 5:] = 10.0  # columns >= 20 px on the 32x32 padded input
    inst = isda_postprocess(torch.ones(1, 1), masks, image_size=(32, 16), output_size=(32, 16))
    assert not inst.pred_masks.any()
    # zero queries
    inst = isda_postprocess(torch.zeros(0, 2), torch.zeros(0, 8, 8), (20, 20), (20, 20))
    assert len(inst) == 0 and inst.pred_masks.shape == (0, 20, 20)


_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, torch
    torch.set_num_threads(1)
    from isda.modeling.postprocess import isda_postprocess
    g = torch.Generator().manual_seed(0)
    cls = torch.randn(300, 80, generator=g)
    # stride-4 grid of an 800x1216 input: blob-like instances plus a few image-sized masks
    yy, xx = torch.meshgrid(torch.arange(200.0), torch.arange(304.0), indexing="ij")
    cy, cx, r = torch.rand(300, 1, 1, generator=g) * 200, torch.rand(300, 1, 1, generator=g) * 304, torch.rand(300, 1, 1, generator=g) * 40 + 2
    masks = 4 * (1 - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() / r)
    masks[:5] = 3.0
    cls[:5, 0] = 5.0  # the image-sized masks are among the top-100
    torch.sigmoid(torch.randn(1000, 1000))  # warm up the allocator
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    inst = isda_postprocess(cls, masks, image_size=(800, 1200), output_size=(4000, 6000), topk=100)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"increase_kb": after - before, "n": len(inst),
                      "shape": list(inst.pred_masks.shape)}))
""")


def test_peak_memory_bounded_for_huge_original():
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True,
                         timeout=300, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["shape"] == [100, 4000, 6000]
    output_bytes = 100 * 4000 * 6000  # the returned bool masks themselves
    increase = res["increase_kb"] * 1024
    # beyond the result, at most ~600 MB of temporaries (100 float masks would be 9.6 GB)
    assert increase < output_bytes + 600 * 2 ** 20, increase / 2 ** 20


def _naive(cls, masks, image_size, output_size, stride=4, topk=100, thr=0.5):
    """The reference recipe, literally, on all masks at once (small sizes only)."""
    scores, idx = cls.sigmoid().flatten().topk(topk)
    probs = masks[idx // cls.shape[1]].sigmoid()
    b = probs > thr
    final = scores * (probs * b).sum((1, 2)) / b.sum((1, 2)).clamp(min=1)
    up = torch.nn.functional.interpolate(probs[:, None], scale_factor=stride, mode="bilinear",
                                         align_corners=False)[:, :, :image_size[0], :image_size[1]]
    up = torch.nn.functional.interpolate(up, size=output_size, mode="bilinear", align_corners=False)
    order = final.argsort(descending=True)
    return final[order], up[order, 0] > thr


def test_windowed_resize_matches_full_interpolation():
    for seed, (image_size, output_size) in enumerate([((61, 77), (183, 100)), ((64, 80), (50, 41)),
                                                      ((57, 80), (57, 80))]):
        cls, masks = _random_outputs(q=12, seed=seed)
        masks = masks - 3  # sparse masks, some empty
        inst = isda_postprocess(cls, masks, image_size, output_size, topk=15)
        scores, ref = _naive(cls, masks, image_size, output_size, topk=15)
        assert torch.allclose(inst.scores, scores)
        diff = (inst.pred_masks != ref).sum().item()
        assert diff <= 2, diff  # float rounding of sample positions exactly at the threshold
