"""ISDADatasetMapper and the DETR augmentation recipe, on real embedded data."""
import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.structures import BoxMode, polygons_to_bitmask
from pycocotools import mask as mask_util

import isda  # noqa: F401
from isda import add_isda_config
from isda.data.dataset_mapper import BadSampleError, ISDADatasetMapper
from isda.data.transforms import RandomChoice, RandomTranspose, build_isda_augmentation
from isda_helpers import ROOT


def make_cfg(**input_overrides):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "Base-ISDA.yaml"))
    for k, v in input_overrides.items():
        node, key = cfg.INPUT, k
        if "." in k:
            sub, key = k.split(".")
            node = getattr(cfg.INPUT, sub)
        setattr(node, key, v)
    return cfg


def no_aug_cfg():
    """Identity-size pipeline: resize to the image's own short side, no flip, no crop."""
    return make_cfg(RANDOM_FLIP="none", **{"CROP.ENABLED": False})


def test_polygon_annotations_become_exact_bitmasks():
    record = DatasetCatalog.get("voc_sample")[0]
    cfg = no_aug_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (min(record["height"], record["width"]),)
    cfg.INPUT.MAX_SIZE_TRAIN = 10000
    out = ISDADatasetMapper(cfg, is_train=True)(record)
    inst = out["instances"]
    assert out["image"].shape == (3, record["height"], record["width"])
    assert out["image"].dtype == torch.uint8
    assert len(inst) == len(record["annotations"])
    for ann, m, c, box in zip(record["annotations"], inst.gt_masks.tensor, inst.gt_classes,
                              inst.gt_boxes.tensor):
        ref = polygons_to_bitmask(ann["segmentation"], record["height"], record["width"])
        assert torch.equal(m, torch.from_numpy(ref))
        assert int(c) == ann["category_id"]
        ys, xs = np.nonzero(ref)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_rle_crowd_and_flip_on_nuclei():
    record = DatasetCatalog.get("nuclei_val")[0]
    n_crowd = sum(a["iscrowd"] for a in record["annotations"])
    assert n_crowd > 0, "the val split marks nuclei cut by the border as crowd"
    cfg = make_cfg(RANDOM_FLIP="horizontal", **{"CROP.ENABLED": False})
    cfg.INPUT.MIN_SIZE_TRAIN = (128,)
    mapper = ISDADatasetMapper(cfg, is_train=True)
    mapper.augmentations = T.AugmentationList(
        [T.RandomFlip(prob=1.0), T.ResizeShortestEdge((128,), 10000, "choice")])
    inst = mapper(record)["instances"]
    kept = [a for a in record["annotations"] if not a["iscrowd"]]
    assert len(inst) == len(kept)
    for ann, m in zip(kept, inst.gt_masks.tensor):
        ref = mask_util.decode(ann["segmentation"]).astype(bool)[:, ::-1]
        assert torch.equal(m, torch.from_numpy(ref.copy()))


def test_transpose_and_vertical_flip_on_rle_and_polygons():
    """Transposed + vertically flipped samples equal numpy's rot/flip of the decoded masks."""
    for name in ("nuclei_train", "voc_sample"):
        record = DatasetCatalog.get(name)[0]
        cfg = no_aug_cfg()
        mapper = ISDADatasetMapper(cfg, is_train=True)
        mapper.augmentations = T.AugmentationList(
            [T.RandomFlip(prob=1.0, horizontal=False, vertical=True), RandomTranspose(prob=1.0)])
        out = mapper(copy.deepcopy(record))
        h, w = record["height"], record["width"]
        assert out["image"].shape[1:] == (w, h)
        kept = [a for a in record["annotations"] if not a.get("iscrowd", 0)]
        inst = out["instances"]
        assert len(inst) == len(kept)
        for ann, m, box in zip(kept, inst.gt_masks.tensor, inst.gt_boxes.tensor):
            seg = ann["segmentation"]
            ref = (mask_util.decode(seg) if isinstance(seg, dict)
                   else polygons_to_bitmask(seg, h, w)).astype(bool)
            ref = np.ascontiguousarray(ref[::-1, :].T)  # vertical flip, then swap axes
            if name == "voc_sample":  # polygons are rasterised after the transform: edge pixels
                assert (m.numpy() != ref).sum() <= 0.02 * ref.sum() + 4
            else:
                assert torch.equal(m, torch.from_numpy(ref))
            ys, xs = np.nonzero(m.numpy())
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_flip_and_transpose_config_keys():
    cfg = make_cfg(RANDOM_FLIP="both", **{"CROP.ENABLED": False})
    cfg.INPUT.ISDA.RANDOM_TRANSPOSE = 0.5
    augs = build_isda_augmentation(cfg, is_train=True)
    flips = [a for a in augs if isinstance(a, T.RandomFlip)]
    assert [(f.horizontal, f.vertical) for f in flips] == [(True, False), (False, True)]
    assert any(isinstance(a, RandomTranspose) for a in augs)
    with pytest.raises(ValueError, match="INPUT.RANDOM_FLIP"):
        build_isda_augmentation(make_cfg(RANDOM_FLIP="diagonal"), is_train=True)
    cfg.INPUT.ISDA.RANDOM_TRANSPOSE = 1.5
    with pytest.raises(ValueError, match="RANDOM_TRANSPOSE"):
        build_isda_augmentation(cfg, is_train=True)


def test_image_without_annotations_and_degenerate_polygons():
    record = copy.deepcopy(DatasetCatalog.get("voc_sample")[2])
    cfg = no_aug_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (200,)
    mapper = ISDADatasetMapper(cfg, is_train=True)
    empty = dict(record, annotations=[])
    inst = mapper(empty)["instances"]
    assert len(inst) == 0 and inst.gt_masks.tensor.shape[0] == 0
    bad = dict(record, annotations=[
        {"bbox": [0, 0, 5, 5], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
         "segmentation": [[1.0, 1.0, 4.0, 4.0]]},  # two points: not a polygon
        record["annotations"][0],
    ])
    assert len(mapper(bad)["instances"]) == 1


def test_missing_image_names_the_file(tmp_path):
    record = dict(DatasetCatalog.get("voc_sample")[0], file_name=str(tmp_path / "nope.jpg"))
    with pytest.raises(BadSampleError, match="nope.jpg"):
        ISDADatasetMapper(no_aug_cfg(), is_train=True)(record)


def test_test_mode_resizes_and_drops_annotations():
    record = DatasetCatalog.get("voc_sample")[1]
    cfg = make_cfg()
    cfg.INPUT.MIN_SIZE_TEST = 320
    out = ISDADatasetMapper(cfg, is_train=False)(record)
    assert "instances" not in out and "annotations" not in out
    assert min(out["image"].shape[1:]) == 320
    assert (out["height"], out["width"]) == (record["height"], record["width"])


def test_detr_recipe_uses_both_branches_and_bounds_sizes():
    cfg = make_cfg()
    augs = build_isda_augmentation(cfg, is_train=True)
    assert isinstance(augs[0], T.RandomFlip) and isinstance(augs[1], RandomChoice)
    np.random.seed(0)
    image = np.zeros((480, 640, 3), np.uint8)
    crops = 0
    for _ in range(60):
        inp = T.AugInput(image)
        tfms = T.AugmentationList(augs)(inp)
        h, w = inp.image.shape[:2]
        # 640x480 and any 384..600 crop stay under the 1333 cap: the short side is always exact
        assert min(h, w) in range(480, 801, 32)
        assert max(h, w) <= 1333
        if any(isinstance(t, T.CropTransform) for t in tfms.transforms):
            crops += 1
            crop = next(t for t in tfms.transforms if isinstance(t, T.CropTransform))
            assert 384 <= crop.h <= 600 and 384 <= crop.w <= 600
    assert 15 <= crops <= 45, "the crop branch should be taken about half of the time"


def _recording(mapper):
    """Wrap ``mapper.augmentations`` so the TransformList of each call is kept."""
    calls, augs = [], mapper.augmentations

    def run(aug_input):
        calls.append(augs(aug_input))
        return calls[-1]

    mapper.augmentations = run
    return calls


@pytest.mark.parametrize("index", [0, 1, 2])
def test_paper_crop_on_polygons_matches_cropped_raster(index):
    """The COCO recipe's crop branch on polygon data (fvcore crops polygons with shapely): each
    instance equals its full-size rasterised mask cut by the same crop (independent path)."""
    record = DatasetCatalog.get("voc_sample")[index]
    short = min(record["height"], record["width"])
    cfg = make_cfg(RANDOM_FLIP="none", MIN_SIZE_TRAIN=(160,), MAX_SIZE_TRAIN=10000,
                   **{"CROP.ENABLED": True, "CROP.PROB": 1.0, "CROP.TYPE": "absolute",
                      "CROP.SIZE": [160, 200], "CROP.PRE_RESIZE_SIZES": (short,)})
    mapper = ISDADatasetMapper(cfg, is_train=True)
    calls = _recording(mapper)
    for seed in range(4):
        np.random.seed(seed)
        out = mapper(copy.deepcopy(record))
        crops = [t for t in calls[-1].transforms if isinstance(t, T.CropTransform)]
        assert len(crops) == 1 and out["image"].shape == (3, 160, 200)
        expected = []
        for ann in record["annotations"]:
            full = polygons_to_bitmask(ann["segmentation"], record["height"], record["width"])
            cut = calls[-1].apply_segmentation(full.astype(np.uint8)).astype(bool)
            if cut.sum() >= 30:  # slivers at the crop border may round away in either path
                expected.append(cut)
        got = [m.numpy() for m in out["instances"].gt_masks.tensor if m.sum() >= 30]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert (g & e).sum() / (g | e).sum() >= 0.9


def test_missing_module_is_not_bad_data(monkeypatch):
    """A missing dependency (here shapely, which the polygon crop imports) stops training under
    both bad-sample policies: it is never counted as a bad sample and skipped."""
    from isda.engine.loader import RobustMapDataset

    records = DatasetCatalog.get("voc_sample")
    cfg = make_cfg(**{"CROP.ENABLED": True, "CROP.PROB": 1.0})
    monkeypatch.setitem(__import__("sys").modules, "shapely.geometry", None)
    for policy in ("raise", "skip"):
        dataset = RobustMapDataset(records, ISDADatasetMapper(cfg, is_train=True), seed=0,
                                   policy=policy)
        with pytest.raises(ImportError, match="shapely"):
            dataset[(0, 0)]


def test_training_reads_a_float_tiff_in_0_1_as_the_demo_does(tmp_path):
    """Training read images with its own copy of the reader, which turned a float32 TIFF holding
    0..1 into a black image while the demo (isda.data.image_io) scaled it: one reader now."""
    from PIL import Image

    values = np.linspace(0, 1, 24 * 32, dtype=np.float32).reshape(24, 32)
    path = tmp_path / "float.tif"
    Image.fromarray(values, "F").save(path)
    record = {"file_name": str(path), "height": 24, "width": 32, "image_id": 0,
              "annotations": [{"bbox": [4, 4, 8, 8], "bbox_mode": BoxMode.XYWH_ABS,
                               "category_id": 0, "iscrowd": 0,
                               "segmentation": [[4, 4, 12, 4, 12, 12, 4, 12]]}]}
    cfg = no_aug_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN = (24,)
    cfg.INPUT.FORMAT = "RGB"
    image = ISDADatasetMapper(cfg, is_train=True)(record)["image"]
    expected = torch.from_numpy(np.rint(values.astype(np.float64) * 255).astype(np.uint8))
    assert torch.equal(image[0], expected)
