"""The base everything stands on: package import, registries, the extension, Detectron2 itself
(Mask R-CNN trains and infers on the CPU), COCOEvaluator on real data, and the nuclei conversion."""
import copy
import json
import os
import zipfile

import numpy as np
import pytest
import torch

import isda
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import META_ARCH_REGISTRY, build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
import prepare_datasets as prepare  # tools/setup/


def test_package_imports_and_registers():
    assert callable(isda.add_isda_config)
    assert META_ARCH_REGISTRY.get("ISDA") is not None
    for name in ("nuclei_train", "nuclei_train_region", "nuclei_val", "voc_sample"):
        assert name in DatasetCatalog.list()


def test_extension_loads():
    from isda import _C

    assert isinstance(_C.has_cuda(), bool)


@pytest.fixture(scope="module")
def maskrcnn_cfg():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 20
    cfg.INPUT.MIN_SIZE_TRAIN = (256,)
    cfg.INPUT.MAX_SIZE_TRAIN = 384
    cfg.INPUT.MIN_SIZE_TEST = 256
    cfg.INPUT.MAX_SIZE_TEST = 384
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 200
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    return cfg


def test_maskrcnn_trains_one_step_and_infers_on_cpu(maskrcnn_cfg):
    torch.manual_seed(0)
    cfg = maskrcnn_cfg
    model = build_model(cfg)
    dicts = DatasetCatalog.get("voc_sample")
    batch = [DatasetMapper(cfg, is_train=True)(copy.deepcopy(dicts[0]))]
    assert len(batch[0]["instances"]) > 0
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls"} <= set(losses)
    assert torch.isfinite(total)
    before = model.roi_heads.mask_head.predictor.weight.detach().clone()
    opt.zero_grad()
    total.backward()
    opt.step()
    assert not torch.equal(before, model.roi_heads.mask_head.predictor.weight)

    model.eval()
    test_in = DatasetMapper(cfg, is_train=False)(copy.deepcopy(dicts[1]))
    with torch.no_grad():
        out = model([test_in])[0]["instances"]
    assert out.image_size == (dicts[1]["height"], dicts[1]["width"])
    assert out.has("pred_masks") and out.has("scores")


def _gt_instances(record, meta):
    """Detectron2 predictions equal to the ground truth of one dataset record."""
    from pycocotools import mask as mask_util
    from detectron2.structures import polygons_to_bitmask

    h, w = record["height"], record["width"]
    masks, classes = [], []
    for ann in record["annotations"]:
        seg = ann["segmentation"]
        if isinstance(seg, list):
            m = polygons_to_bitmask(seg, h, w)
        else:
            m = mask_util.decode(seg).astype(bool)
        masks.append(m)
        classes.append(ann["category_id"])  # contiguous ids after load_coco_json
    inst = Instances((h, w))
    inst.pred_masks = torch.from_numpy(np.stack(masks))
    inst.pred_classes = torch.tensor(classes)
    inst.scores = torch.ones(len(masks))
    inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
    return inst


def _evaluate(predictions, tmp_path):
    evaluator = COCOEvaluator("voc_sample", output_dir=str(tmp_path), use_fast_impl=False,
                              tasks=("segm",))
    evaluator.reset()
    dicts = DatasetCatalog.get("voc_sample")
    for record, inst in zip(dicts, predictions):
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": inst}])
    return evaluator.evaluate()["segm"]


def test_coco_evaluator_perfect_and_wrong_predictions(tmp_path):
    dicts = DatasetCatalog.get("voc_sample")
    meta = MetadataCatalog.get("voc_sample")
    assert sum(len(d["annotations"]) for d in dicts) == 12
    assert "_background_" not in meta.thing_classes
    perfect = [_gt_instances(d, meta) for d in dicts]
    res = _evaluate(perfect, tmp_path / "perfect")
    assert res["AP"] == pytest.approx(100.0)
    assert res["AP50"] == pytest.approx(100.0)

    wrong = []
    for inst in perfect:
        w = Instances(inst.image_size)
        w.pred_masks = torch.roll(inst.pred_masks, shifts=inst.image_size[1] // 3, dims=2)
        w.pred_classes = inst.pred_classes
        w.scores = inst.scores
        w.pred_boxes = BitMasks(w.pred_masks).get_bounding_boxes()
        wrong.append(w)
    res_wrong = _evaluate(wrong, tmp_path / "wrong")
    assert res_wrong["AP"] < 50.0


def _stardist_label_image():
    import tifffile

    wheel = sorted(prepare.cache_root().glob("stardist-*.whl"))[0]
    with zipfile.ZipFile(wheel) as zf:
        return tifffile.imread(zf.open("stardist/data/images/mask2d.tif")).astype(np.int64)


@pytest.mark.parametrize("split", ["nuclei_train", "nuclei_train_region", "nuclei_val"])
def test_nuclei_conversion_round_trips(split):
    """Decoded RLE masks reproduce the original label image inside each region."""
    from pycocotools import mask as mask_util

    lab = _stardist_label_image()
    data = json.loads((prepare.datasets_root() / "nuclei" / f"{split}.json").read_text())
    by_image = {img["id"]: img for img in data["images"]}
    covered = np.zeros_like(lab, dtype=bool)
    rebuilt = {i: np.zeros((im["height"], im["width"]), np.int64) for i, im in by_image.items()}
    for ann in data["annotations"]:
        m = mask_util.decode(ann["segmentation"]).astype(bool)
        canvas = rebuilt[ann["image_id"]]
        assert not (canvas[m] > 0).any(), "instances overlap"
        canvas[m] = ann["instance_label"]
        assert ann["area"] == m.sum()
    for i, im in by_image.items():
        r0, r1, c0, c1 = im["region"]
        np.testing.assert_array_equal(rebuilt[i], lab[r0:r1, c0:c1])
        covered[r0:r1, c0:c1] = True
    if split.startswith("nuclei_train"):
        assert covered[:, :352].all() and not covered[:, 352:].any()
        assert len(by_image) == (8 if split == "nuclei_train" else 1)
    else:
        assert covered[:, 384:].all() and not covered[:, :384].any()
        assert len(by_image) == 4
        # crowd iff at most half of the nucleus lies in the region (not the tile)
        for ann in data["annotations"]:
            label = ann["instance_label"]
            inside = int((lab[:, 384:] == label).sum())
            total = int((lab == label).sum())
            assert ann["iscrowd"] == int(2 * inside <= total)
    # the union of all splits never covers the guard band
    assert len(np.unique(lab)) - 1 == 125


@pytest.mark.parametrize("split", ["nuclei3d_train", "nuclei3d_val"])
def test_nuclei3d_slices_round_trip(split):
    """Each image is one z-slice of stardist's 3-D label stack (decoded RLE masks reproduce it);
    held-out slices mark as crowd exactly the nuclei that also appear in a training slice."""
    import tifffile
    from detectron2.data import DatasetCatalog
    from pycocotools import mask as mask_util

    wheel = sorted(prepare.cache_root().glob("stardist-*.whl"))[0]
    with zipfile.ZipFile(wheel) as zf:
        stack = tifffile.imread(zf.open("stardist/data/images/mask3d.tif")).astype(np.int64)
    data = json.loads((prepare.datasets_root() / "nuclei3d" / f"{split}.json").read_text())
    zs = [im["z"] for im in data["images"]]
    assert zs == (list(range(0, 20)) if split.endswith("train") else list(range(24, 31)))
    in_training = set(np.unique(stack[:20]).tolist()) - {0}
    for im in data["images"]:
        rebuilt = np.zeros(stack.shape[1:], np.int64)
        for ann in (a for a in data["annotations"] if a["image_id"] == im["id"]):
            m = mask_util.decode(ann["segmentation"]).astype(bool)
            rebuilt[m] = ann["instance_label"]
            expected_crowd = split.endswith("val") and ann["instance_label"] in in_training
            assert ann["iscrowd"] == int(expected_crowd)
        np.testing.assert_array_equal(rebuilt, stack[im["z"]])
    assert len(DatasetCatalog.get(split)) == len(zs)


def test_prepare_rebuilds_corrupt_file(tmp_path, monkeypatch):
    """A corrupted cached file is detected by its checksum and the dataset rebuilt."""
    src = prepare.datasets_root()
    monkeypatch.setenv("ISDA_DATASETS", str(tmp_path))
    # reuse downloaded archives to stay offline and fast
    (tmp_path / ".downloads").mkdir()
    for f in (src / ".downloads").glob("*"):
        (tmp_path / ".downloads" / f.name).symlink_to(f)
    folder = prepare.prepare("nuclei")
    victim = folder / "nuclei_val.json"
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    assert not prepare.manifest_ok(folder, "nuclei")
    prepare.prepare("nuclei")
    assert victim.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nuclei-")]


def test_embedded_datasets_ignore_detectron2_datasets(tmp_path):
    """Setting DETECTRON2_DATASETS (Detectron2's COCO location, which most users have) used to
    move where the embedded datasets were looked for: FileNotFoundError for nuclei_val."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ISDA_DATASETS"}
    env["DETECTRON2_DATASETS"] = str(tmp_path)
    code = ("import isda; from detectron2.data import DatasetCatalog; "
            "print(len(DatasetCatalog.get('nuclei_val')), len(DatasetCatalog.get('voc_sample')))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["4", "3"]
