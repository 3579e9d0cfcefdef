"""NMS-free inference: sorting, sizes, tight boxes, empty outputs, bounded memory."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from isda.modeling.postprocess import isda_postprocess, masks_to_boxes

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


def _probs64(cls, masks, image_size, output_size, stride=4, topk=40):
    """The reference recipe's mask probabilities in float64, in output order: [T, H, W]."""
    scores, idx = cls.sigmoid().flatten().topk(topk)
    probs = masks[idx // cls.shape[1]].sigmoid()
    b = probs > 0.5
    final = scores * (probs * b).sum((1, 2)) / b.sum((1, 2)).clamp(min=1)
    up = torch.nn.functional.interpolate(probs[:, None].double(), scale_factor=stride,
                                         mode="bilinear", align_corners=False)
    up = up[:, :, :image_size[0], :image_size[1]]
    up = torch.nn.functional.interpolate(up, size=output_size, mode="bilinear", align_corners=False)
    return up[final.argsort(descending=True), 0]


@pytest.mark.parametrize("image_size,output_size,chunk_pixels", [
    ((61, 77), (183, 100), 1 << 25),   # upscale, one chunk
    ((64, 80), (50, 41), 1 << 25),     # downscale
    ((57, 80), (57, 80), 1 << 25),     # identity (no resize)
    ((61, 77), (300, 420), 20000),     # several chunks, masks spanning most of the output
])
def test_gpu_style_paths_give_the_cpu_masks(image_size, output_size, chunk_pixels):
    """The GPU branch (natural layout, one batched resize per chunk) forced on CPU tensors gives
    the scores, classes, masks and boxes of the CPU branch (channels-last, per-mask resize).
    The two layouts' bilinear kernels round differently (1 ulp), so a pixel may flip only where
    the exact probability is within float rounding of the threshold."""
    flipped = 0
    for seed in range(3):
        cls, masks = _random_outputs(q=30, k=3, h=16, w=20, seed=10 + seed)
        masks = masks - 2 * seed  # dense to sparse masks, some empty
        kw = dict(image_size=image_size, output_size=output_size, topk=40,
                  chunk_pixels=chunk_pixels)
        cpu = isda_postprocess(cls, masks, cpu_paths=True, **kw)
        gpu = isda_postprocess(cls, masks, cpu_paths=False, **kw)
        assert torch.equal(gpu.scores, cpu.scores) and torch.equal(gpu.pred_classes, cpu.pred_classes)
        assert cpu.pred_masks.any() or seed > 0
        diff = gpu.pred_masks != cpu.pred_masks
        exact = _probs64(cls, masks, image_size, output_size)
        assert ((exact[diff] - 0.5).abs() < 1e-6).all(), seed
        flipped += int(diff.sum())
        for m, b_gpu, b_cpu in zip(gpu.pred_masks, gpu.pred_boxes.tensor, cpu.pred_boxes.tensor):
            if not m.any():
                assert (b_gpu == 0).all()
                continue
            ys, xs = torch.nonzero(m, as_tuple=True)  # tight around the GPU-branch mask
            assert b_gpu.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1,
                                      ys.max().item() + 1]
            assert (b_gpu - b_cpu).abs().max() <= 1
    assert flipped <= 10


def test_batched_resize_equals_per_mask_resize():
    """Same input layout: the batched window resize of the GPU branch is bit-identical to the
    per-mask windowed resize of the CPU branch (the grid of an output pixel does not depend on
    the window it is evaluated in)."""
    from isda.modeling.postprocess import _resize_chunk, _resize_window

    g = torch.Generator().manual_seed(3)
    up = (torch.randn(9, 40, 52, generator=g) * 3 - 2).sigmoid()
    up[4] = 0.1  # nothing above the threshold
    origin, full, size = (8, 12), (70, 90), (173, 151)
    masks = torch.zeros(9, *size, dtype=torch.bool)
    boxes = torch.zeros(9, 4)
    _resize_chunk(up, size, 0.5, origin, full, masks, boxes, max_pixels=5000)  # several calls
    for j in range(9):
        window = _resize_window(up[j], size, 0.5, origin, full)
        ref = torch.zeros(size, dtype=torch.bool)
        if window is not None:
            (wy, wx), win = window
            ref[wy:wy + win.shape[0], wx:wx + win.shape[1]] = win
        assert torch.equal(masks[j], ref), j
        assert torch.equal(boxes[j], masks_to_boxes(ref[None])[0]), j
    assert not masks[4].any() and masks.any()


def test_default_path_follows_the_device():
    from isda.modeling.postprocess import prefers_channels_last

    assert prefers_channels_last("cpu") and prefers_channels_last(torch.device("cpu"))
    assert not prefers_channels_last("cuda") and not prefers_channels_last("cuda:1")
    # on CPU tensors the default (None) is the CPU branch, bit for bit
    cls, masks = _random_outputs(q=12, seed=4)
    a = isda_postprocess(cls, masks, (61, 77), (183, 100), topk=15)
    b = isda_postprocess(cls, masks, (61, 77), (183, 100), topk=15, cpu_paths=True)
    assert torch.equal(a.pred_masks, b.pred_masks) and torch.equal(a.scores, b.scores)


@pytest.mark.parametrize("output_size", [(200, 304), (150, 228)])
def test_cpu_path_upsamples_each_mask_on_its_own_window(monkeypatch, output_size):
    """Small masks spread over the image: the CPU path upsamples every mask only around itself
    (the union window of a chunk of masks spanned the whole map: 5x the time on scattered
    masks), with the same masks and boxes as the literal recipe."""
    import isda.modeling.postprocess as pp

    h, w, q = 50, 76, 12
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    g = torch.Generator().manual_seed(3)
    centres = torch.rand(q, 2, generator=g) * torch.tensor([h - 1.0, w - 1.0])
    dist = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2).sqrt()
    masks = (2.5 - dist) * 2  # discs of radius 2.5 source pixels
    cls = torch.randn(q, 2, generator=g)
    upsampled = []
    real = torch.nn.functional.interpolate

    def counting(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        if kwargs.get("mode") == "bilinear" and out.shape[-2] > x.shape[-2]:
            upsampled.append(out.shape[-2] * out.shape[-1] * out.shape[0] * out.shape[1])
        return out

    monkeypatch.setattr(pp.F, "interpolate", counting)
    inst = isda_postprocess(cls, masks, (200, 304), output_size, topk=q, cpu_paths=True)
    monkeypatch.setattr(pp.F, "interpolate", real)
    # each disc: at most (2 * 2.5 + 1 + 2 margins + 1)^2 source pixels, upsampled x4
    assert sum(upsampled) <= q * (10 * 4) ** 2, sum(upsampled)
    scores, ref = _naive(cls, masks, (200, 304), output_size, topk=q)
    assert torch.allclose(inst.scores, scores)
    assert (inst.pred_masks != ref).sum().item() <= 2
    for m, b in zip(inst.pred_masks, inst.pred_boxes.tensor):
        assert torch.equal(b, masks_to_boxes(m[None])[0])
    assert inst.pred_masks.flatten(1).any(1).sum() >= q - 2  # the discs are found
