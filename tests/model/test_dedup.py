"""MODEL.ISDA.TEST.DEDUP: duplicate masks removed (mask NMS) or decayed (Matrix NMS), distinct
touching objects kept, the other detections' scores and order unchanged. Hand-built masks with
hand-computed IoUs."""
import math

import pytest
import torch

from isda.export.postprocess import outputs_to_instances
from isda.modeling.dedup import (check_dedup, dedup_sorted, greedy_mask_nms, mask_ious,
                                 matrix_nms_decay)
from isda.modeling.postprocess import instances_from_topk

pytestmark = pytest.mark.usefixtures("one_thread")

S = 4  # mask stride
ON = 10.0  # mask logit inside a mask (sigmoid 0.9999546)


def _grid(boxes, h=8, w=16):
    """Binary masks [T, h, w] from (row0, row1, col0, col1) half-open boxes."""
    m = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (r0, r1, c0, c1) in enumerate(boxes):
        m[i, r0:r1, c0:c1] = True
    return m


def _logits(binary):
    return torch.where(binary, torch.tensor(ON), torch.tensor(-ON))


# A: 4x4 at cols 0-3; B: A shifted one column (overlap 12 px, union 20: IoU 0.6);
# C: touching A on its right (cols 4-7): IoU(A, C) 0, IoU(B, C) 4 / 28 = 1/7
A, B, C = (0, 4, 0, 4), (0, 4, 1, 5), (0, 4, 4, 8)


def test_mask_ious_by_hand_and_per_class():
    ious = mask_ious(_grid([A, B, C]))
    expected = torch.tensor([[1.0, 0.6, 0.0], [0.6, 1.0, 1 / 7], [0.0, 1 / 7, 1.0]])
    assert torch.allclose(ious, expected)
    per_class = mask_ious(_grid([A, B, C]), torch.tensor([0, 1, 1]))
    assert per_class[0, 1] == 0 and per_class[1, 2] == pytest.approx(1 / 7)
    assert mask_ious(torch.zeros(2, 3, 3, dtype=torch.bool)).sum() == 0  # empty masks: 0


def test_greedy_nms_is_greedy_not_pairwise():
    """A chain: A-B and B-C overlap above 0.5, A-C below: B goes, so C stays (a pairwise rule
    'removed by any higher-scored mask' would remove C too)."""
    # rows 0-1; A cols 0-9, B cols 3-12, C cols 6-15: IoU(A,B) = IoU(B,C) = 14/26, IoU(A,C) = 8/32
    m = _grid([(0, 2, 0, 10), (0, 2, 3, 13), (0, 2, 6, 16)], h=2)
    ious = mask_ious(m)
    assert ious[0, 1] == pytest.approx(14 / 26) and ious[0, 2] == pytest.approx(0.25)
    assert greedy_mask_nms(ious, 0.5).tolist() == [True, False, True]
    assert greedy_mask_nms(ious, 0.55).tolist() == [True, True, True]
    assert greedy_mask_nms(ious, 0.2).tolist() == [True, False, False]


def test_matrix_nms_decay_by_hand():
    """sigma 2: B decays by exp(-2 * 0.6^2); C's factor from A is exp(0) = 1 and from B
    exp(-2 (1/49 - 0.36)) > 1, so C keeps its score."""
    decay = matrix_nms_decay(mask_ious(_grid([A, B, C])), 2.0)
    assert decay.tolist() == pytest.approx([1.0, math.exp(-0.72), 1.0], rel=1e-6)
    idx, scores = dedup_sorted(torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long),
                               _grid([A, B, C]), "matrix_nms", sigma=2.0)
    assert idx.tolist() == [0, 2, 1]  # B falls below C
    assert scores.tolist() == pytest.approx([0.9, 0.7, 0.8 * math.exp(-0.72)], rel=1e-6)


def _run(binary, cls_scores, classes, dedup, image_size=None, **kw):
    h, w = binary.shape[-2:]
    image_size = image_size or (h * S, w * S)
    return instances_from_topk(torch.tensor(cls_scores), torch.tensor(classes), _logits(binary),
                               image_size, image_size, S, dedup=dedup, **kw)


@pytest.mark.parametrize("cpu_paths", [True, False])
def test_mask_nms_removes_the_duplicate_and_keeps_touching_objects(cpu_paths):
    # sorted by class score: A 0.9, B (duplicate of A) 0.8, C (touches A) 0.7, D far away 0.6
    D = (5, 8, 10, 14)
    binary = _grid([A, B, C, D])
    mask_score = torch.sigmoid(torch.tensor(ON)).item()
    plain = _run(binary, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0], "none", cpu_paths=cpu_paths)
    assert len(plain) == 4
    out = _run(binary, [0.9, 0.8, 0.7, 0.6], [0, 0, 0, 0], "mask_nms", cpu_paths=cpu_paths)
    assert len(out) == 3
    assert out.scores.tolist() == pytest.approx([0.9 * mask_score, 0.7 * mask_score,
                                                 0.6 * mask_score], rel=1e-6)
    # the kept detections are the plain output's 1st, 3rd and 4th, unchanged
    for j, i in enumerate([0, 2, 3]):
        assert out.scores[j] == plain.scores[i]
        assert torch.equal(out.pred_masks[j], plain.pred_masks[i])
        assert torch.equal(out.pred_boxes.tensor[j], plain.pred_boxes.tensor[i])
    # the kept masks are A, C, D at the output size (x4; edges are bilinear blends)
    assert out.pred_masks[0, :14, :14].all() and not out.pred_masks[0, :, 18:].any()
    assert out.pred_masks[1, :14, 18:30].all() and not out.pred_masks[1, :, :14].any()


def test_unsorted_input_same_class_rule_and_threshold():
    # given in arbitrary order: the higher score wins whatever the input order
    binary = _grid([B, A, A])
    out = _run(binary, [0.8, 0.9, 0.95], [0, 0, 1], "mask_nms")
    # A (class 1, 0.95) and A (class 0, 0.9) are different classes: both kept; B (0.8) removed
    assert out.pred_classes.tolist() == [1, 0]
    # IoU(A, B) = 0.6 is not above 0.65: nothing removed
    assert len(_run(binary, [0.8, 0.9, 0.95], [0, 0, 1], "mask_nms", dedup_iou=0.65)) == 3


def test_padding_is_not_counted_in_the_ious():
    """Inside the 16x32 input (grid 4x8) A and A' overlap with IoU 4/12; both also cover the
    same 4x8 cells of the padding, which would make it 36/44 > 0.5."""
    a2 = _grid([(0, 4, 0, 2), (0, 4, 1, 3)])
    a2[:, 4:8, 0:8] = True  # the padded rows of the 8x16 grid
    out = _run(a2, [0.9, 0.8], [0, 0], "mask_nms", image_size=(16, 32))
    assert len(out) == 2


def test_export_post_processing_applies_the_same_dedup():
    binary = _grid([A, B, C])
    out = outputs_to_instances(torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long),
                               _logits(binary), (32, 64), (32, 64), S, 0.5, dedup="mask_nms")
    assert len(out) == 2
    assert len(outputs_to_instances(torch.tensor([0.9, 0.8, 0.7]),
                                    torch.zeros(3, dtype=torch.long), _logits(binary), (32, 64),
                                    (32, 64), S, 0.5)) == 3  # default: none


def test_config_keys_reach_the_model_and_unknown_methods_stop():
    from isda_helpers import build, small_cfg

    cfg = small_cfg()
    assert cfg.MODEL.ISDA.TEST.DEDUP == "none"  # the paper's NMS-free model by default
    assert cfg.MODEL.ISDA.TEST.DEDUP_IOU == 0.5
    model = build(small_cfg("MODEL.ISDA.TEST.DEDUP", "matrix_nms", "MODEL.ISDA.TEST.DEDUP_SIGMA",
                            0.5))
    assert (model.dedup, model.dedup_sigma) == ("matrix_nms", 0.5)
    with pytest.raises(ValueError, match="DEDUP"):
        check_dedup("nms")
    with pytest.raises(ValueError, match="DEDUP"):
        build(small_cfg("MODEL.ISDA.TEST.DEDUP", "nms"))


def test_blockwise_ious_equal_pairwise_counts():
    """Random blobs and a few large masks on a grid that is no multiple of the block size:
    every IoU equals the one counted pair by pair with & and |."""
    g = torch.Generator().manual_seed(0)
    h, w, t = 37, 53, 30
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx = torch.randint(0, h, (t,), generator=g), torch.randint(0, w, (t,), generator=g)
    r = torch.randint(1, 12, (t,), generator=g)
    binary = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) < r[:, None, None] ** 2
    binary[3] = True  # whole grid
    binary[4] = False  # empty
    classes = torch.randint(0, 2, (t,), generator=g)
    got = mask_ious(binary, classes, tile=8)
    for i in range(t):
        for j in range(t):
            inter = (binary[i] & binary[j]).sum().item()
            union = (binary[i] | binary[j]).sum().item()
            iou = inter / union if union else 0.0
            expected = iou if classes[i] == classes[j] else 0.0
            assert got[i, j].item() == pytest.approx(expected, abs=1e-6), (i, j)


def test_paper_configs_are_nms_free():
    from pathlib import Path

    from detectron2.config import get_cfg

    import isda

    root = Path(__file__).resolve().parents[2]
    paths = [root / "configs" / "Base-ISDA.yaml"] + sorted((root / "configs" / "coco").glob("*.yaml"))
    assert len(paths) > 1
    for path in paths:
        cfg = isda.add_isda_config(get_cfg())
        cfg.merge_from_file(str(path))
        assert cfg.MODEL.ISDA.TEST.DEDUP == "none", path.name


def test_exported_predictor_follows_the_sidecar_dedup(tmp_path):
    """sidecar() records TEST.DEDUP; a predictor reading that sidecar removes the duplicate
    (the runtime is replaced by fixed outputs: the post-processing is what is checked)."""
    from types import SimpleNamespace

    import numpy as np

    from isda.export.exporter import sidecar, write_sidecar
    from isda.export.onnx_predictor import _ExportedPredictor
    from isda_helpers import small_cfg

    cfg = small_cfg("INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128)
    wrapper = SimpleNamespace(topk=3, mask_stride=S, mask_threshold=0.5, num_classes=1,
                              decoder=SimpleNamespace(num_queries=3), dedup="mask_nms",
                              dedup_iou=0.5, dedup_sigma=2.0)
    meta = sidecar(cfg, wrapper, "onnx", opset=17)
    assert meta["dedup"] == {"method": "mask_nms", "iou": 0.5, "sigma": 2.0}
    write_sidecar(meta, str(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"")

    class Fixed(_ExportedPredictor):
        fmt = "onnx"

        def run(self, image):
            # a 96x128 image is the network input as it is: a 24x32 mask grid
            assert image.shape[-2:] == (96, 128)
            return (np.array([0.9, 0.8, 0.7], np.float32), np.zeros(3, np.int64),
                    _logits(_grid([A, B, C], h=24, w=32)).numpy())

    out = Fixed(str(tmp_path))(np.zeros((96, 128, 3), np.uint8))["instances"]
    assert len(out) == 2  # B, the duplicate of A, removed; C (touching A) kept
    meta.pop("dedup")  # an export made before the key: no duplicate removal
    write_sidecar(meta, str(tmp_path))
    assert len(Fixed(str(tmp_path))(np.zeros((96, 128, 3), np.uint8))["instances"]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_result():
    g = torch.Generator().manual_seed(1)
    binary = torch.rand(40, 30, 45, generator=g) > 0.7
    binary[:, :, :20] = False  # blocks without masks
    scores = torch.rand(40, generator=g).sort(descending=True).values
    classes = torch.randint(0, 2, (40,), generator=g)
    for method in ("mask_nms", "matrix_nms"):
        cpu = dedup_sorted(scores, classes, binary, method, 0.3)
        dev = dedup_sorted(scores.cuda(), classes.cuda(), binary.cuda(), method, 0.3)
        assert torch.equal(cpu[0], dev[0].cpu())
        assert torch.allclose(cpu[1], dev[1].cpu(), atol=1e-6)
