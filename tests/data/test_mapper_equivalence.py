"""ISDADatasetMapper's output-sized mask route against the previous per-instance route
(Detectron2's ``transform_instance_annotations`` on each instance, tests/per_instance_mapper.py):
same images, classes, masks (pixel by pixel) and boxes, instance by instance, for fixed seeds;
and the mask work no longer grows with instances x source pixels (issue 30)."""
import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from PIL import Image
from pycocotools import mask as mask_util

import isda  # noqa: F401
from isda import add_isda_config
from isda.data import instance_masks
from isda.data.dataset_mapper import BadSampleError, ISDADatasetMapper
from isda.data.mask_cache import MaskCache
from isda.data.mask_index_map import pil_nearest_indices
from many_instances import many_instance_record
from per_instance_mapper import PerInstanceMapper
from isda_helpers import ROOT


def config(path="configs/nuclei/isda_R18_nuclei.yaml", **opts):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / path))
    cfg.merge_from_list([x for kv in opts.items() for x in kv])
    return cfg


def paper_crop_cfg(**opts):
    """The DETR recipe's crop branch on every sample, with both flips and the transpose, at
    sizes small enough for a test (Base-ISDA's recipe, scaled down)."""
    return config("configs/Base-ISDA.yaml", **{
        "INPUT.RANDOM_FLIP": "both", "INPUT.ISDA.RANDOM_TRANSPOSE": 0.5,
        "INPUT.CROP.PROB": 1.0, "INPUT.CROP.SIZE": [100, 300],
        "INPUT.CROP.PRE_RESIZE_SIZES": (250, 300), "INPUT.MIN_SIZE_TRAIN": (160, 192, 224),
        "INPUT.MAX_SIZE_TRAIN": 400, "MODEL.ISDA.NUM_CLASSES": 20, **opts})


def assert_same_outputs(cfg, record, seeds, **mapper_kw):
    """Both routes under the same seeds: identical outputs; returns the instance counts. RLE
    masks must take the one-gather route (an index map, not the per-mask fallback)."""
    new = ISDADatasetMapper(cfg, is_train=True, **mapper_kw)
    ref = PerInstanceMapper(cfg, is_train=True)
    before = copy.deepcopy(record)
    counts, maps = [], []

    def recording(*args):
        maps.append(compose(*args))
        return maps[-1]

    compose = instance_masks.mask_index_map
    for seed in seeds:
        np.random.seed(seed)
        want = ref(record)
        np.random.seed(seed)
        instance_masks.mask_index_map = recording
        try:
            got = new(record)
        finally:
            instance_masks.mask_index_map = compose
        assert None not in maps, "the RLE masks fell back to the per-mask route"
        assert set(got) == set(want) and "annotations" not in got
        assert torch.equal(got["image"], want["image"])
        g, w = got["instances"], want["instances"]
        assert g.image_size == w.image_size
        assert g.gt_classes.tolist() == w.gt_classes.tolist(), f"seed {seed}"
        assert g.gt_masks.tensor.dtype == w.gt_masks.tensor.dtype == torch.bool
        for k, (gm, wm) in enumerate(zip(g.gt_masks.tensor, w.gt_masks.tensor)):
            assert torch.equal(gm, wm), f"seed {seed}, instance {k}: {(gm != wm).sum()} pixels"
        assert torch.equal(g.gt_boxes.tensor, w.gt_boxes.tensor)
        assert g.gt_boxes.tensor.dtype == w.gt_boxes.tensor.dtype
        counts.append(len(g))
    assert record == before, "the mapper must not modify the dataset record"
    return counts


def test_main_job_crops_on_rle_nuclei():
    record = DatasetCatalog.get("nuclei_train_region")[0]
    counts = assert_same_outputs(config(), record, range(10))
    assert min(counts) > 0 and max(counts) < len(record["annotations"]) / 2  # crops, not all


@pytest.mark.parametrize("index", [0, 1, 2])
def test_paper_crop_on_voc_polygons(index):
    record = DatasetCatalog.get("voc_sample")[index]
    counts = assert_same_outputs(paper_crop_cfg(), record, range(8))
    assert sum(counts) > 0


def test_paper_recipe_unchanged_on_voc_polygons():
    """Base-ISDA's own recipe (800-px multi-scale or the 384-600 crop branch)."""
    record = DatasetCatalog.get("voc_sample")[1]
    assert_same_outputs(config("configs/Base-ISDA.yaml", **{"MODEL.ISDA.NUM_CLASSES": 20}),
                        record, range(4))


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    return many_instance_record(tmp_path_factory.mktemp("many"), n=300, hw=(600, 800))


@pytest.mark.parametrize("cache_mb", [256.0, 0.0])
def test_hundreds_of_rle_and_polygon_instances(many, cache_mb):
    counts = assert_same_outputs(paper_crop_cfg(), many, range(4), mask_cache_mb=cache_mb)
    assert max(counts) > 20


def test_multiscale_branch_and_no_flip_on_many_instances(many):
    cfg = paper_crop_cfg(**{"INPUT.CROP.PROB": 0.0, "INPUT.RANDOM_FLIP": "none",
                            "INPUT.ISDA.RANDOM_TRANSPOSE": 0.0})
    counts = assert_same_outputs(cfg, many, range(2))
    assert min(counts) > 0.95 * len(many["annotations"])  # no crop: only specks vanish


def test_rle_masks_are_decoded_once_per_image(monkeypatch):
    """The previous route decoded every RLE to a full-image mask on every visit (95 decodes per
    sample of the main job); now one decode call per image, then the cache."""
    calls = []
    decode = mask_util.decode

    def counting(rle):
        calls.append(len(rle) if isinstance(rle, list) else 1)
        return decode(rle)

    monkeypatch.setattr(mask_util, "decode", counting)
    record = DatasetCatalog.get("nuclei_train_region")[0]
    mapper = ISDADatasetMapper(config(), is_train=True)
    for seed in range(5):
        np.random.seed(seed)
        mapper(copy.deepcopy(record))  # a fresh copy each time, as Detectron2's loader gives
    assert len(calls) == 1 and calls[0] == len(record["annotations"])
    assert len(mapper.mask_cache) == 1 and mapper.mask_cache.hits == 4


def test_without_cache_only_instances_reaching_the_crop_are_decoded(monkeypatch):
    decoded = []
    decode = mask_util.decode
    monkeypatch.setattr(mask_util, "decode",
                        lambda rle: decoded.append(len(rle)) or decode(rle))
    record = DatasetCatalog.get("nuclei_train_region")[0]
    mapper = ISDADatasetMapper(config(**{"INPUT.MASK_CACHE_MB": 0.0}), is_train=True)
    np.random.seed(0)
    out = mapper(record)
    assert len(decoded) == 1 and len(out["instances"]) <= decoded[0] < len(record["annotations"])


def test_cache_limit_evicts_oldest_first():
    cache = MaskCache(limit_mb=1.0)  # 1 MiB
    stack = lambda: np.zeros((4, 256, 256), bool)  # noqa: E731 - 256 KiB each
    boxes = np.zeros((4, 4))
    for key in "abcd":
        assert cache.put(key, stack(), boxes)
    assert len(cache) == 3 and cache.get("a") is None and cache.get("d") is not None
    assert cache.bytes <= 2 ** 20
    assert not cache.put("huge", np.zeros((20, 256, 256), bool), boxes)  # above the limit
    with pytest.raises(ValueError, match="INPUT.MASK_CACHE_MB"):
        MaskCache(-1)


@pytest.mark.parametrize("size, new_size", [(352, 144), (128, 192), (176, 176), (7, 1000),
                                            (1333, 97), (500, 499), (3, 2)])
def test_nearest_indices_match_pil_resize_of_an_image(size, new_size):
    """Independent reference: PIL's NEAREST resize of a random 8-bit image, both axes."""
    rng = np.random.default_rng(size)
    image = rng.integers(0, 256, (size, 9), dtype=np.uint8)
    rows = np.asarray(Image.fromarray(image).resize((9, new_size), Image.NEAREST))
    assert np.array_equal(rows, image[pil_nearest_indices(size, new_size, 0)])
    cols = np.asarray(Image.fromarray(image.T.copy()).resize((new_size, 9), Image.NEAREST))
    assert np.array_equal(cols, image.T[:, pil_nearest_indices(size, new_size, 1)])


def test_bad_rle_names_file_and_annotation_with_its_id():
    record = copy.deepcopy(DatasetCatalog.get("nuclei_train_region")[0])
    record["annotations"][3]["segmentation"] = mask_util.encode(
        np.asfortranarray(np.ones((10, 10), np.uint8)))
    record["annotations"][3]["id"] = 4242
    with pytest.raises(BadSampleError, match=r"train_region\S*\.png: annotation #3 \(id 4242\)"
                                             r": RLE size \[10, 10\]"):
        ISDADatasetMapper(config(), is_train=True)(record)
    record["annotations"][3].pop("id")
    record["annotations"][3]["segmentation"] = np.zeros((3, 3))
    with pytest.raises(BadSampleError, match=r"annotation #3: mask shape"):
        ISDADatasetMapper(config(), is_train=True)(record)


@pytest.mark.parametrize("name", ["nuclei_train", "voc_sample"])
def test_other_transforms_fall_back_to_each_mask(name):
    """A transform that is not a pixel selection (a rotation) runs on each decoded mask / each
    polygon, as Detectron2 does: still the same outputs."""
    from detectron2.data import transforms as T

    record = DatasetCatalog.get(name)[0]
    cfg = paper_crop_cfg()
    new, ref = ISDADatasetMapper(cfg, is_train=True), PerInstanceMapper(cfg, is_train=True)
    for m in (new, ref):
        m.augmentations = T.AugmentationList([T.RandomFlip(prob=1.0), T.RandomRotation([10, 30]),
                                              T.ResizeShortestEdge((96,), 1000, "choice")])
    for seed in range(2):
        np.random.seed(seed)
        want = ref(record)["instances"]
        np.random.seed(seed)
        got = new(record)["instances"]
        assert len(got) == len(want) > 0
        assert torch.equal(got.gt_masks.tensor, want.gt_masks.tensor)
        assert torch.equal(got.gt_boxes.tensor, want.gt_boxes.tensor)
