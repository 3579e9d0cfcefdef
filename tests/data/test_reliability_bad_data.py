"""Bad and odd data through ISDADatasetMapper: each case is handled correctly (checked against
an independent reference built here with PIL / numpy / pycocotools) or raises BadSampleError
naming the file and the annotation."""
import copy
import json
import re

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.structures import BoxMode, polygons_to_bitmask
from PIL import Image
from pycocotools import mask as mask_util

import isda  # noqa: F401
from isda import add_isda_config
from isda.data.dataset_mapper import BadSampleError, ISDADatasetMapper
from isda_helpers import ROOT

from detectron2.config import get_cfg


def mapper(short_side, is_train=True, num_classes=20, max_size=10000):
    """Identity-size pipeline (no flip, no crop) resizing the short side to ``short_side``."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "Base-ISDA.yaml"))
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.MIN_SIZE_TRAIN = (short_side,)
    cfg.INPUT.MAX_SIZE_TRAIN = max_size
    cfg.INPUT.MIN_SIZE_TEST = short_side
    cfg.INPUT.MAX_SIZE_TEST = max_size
    cfg.MODEL.ISDA.NUM_CLASSES = num_classes
    return ISDADatasetMapper(cfg, is_train=is_train)


@pytest.fixture(scope="module")
def voc():
    rec = copy.deepcopy(DatasetCatalog.get("voc_sample")[0])
    return rec, np.asarray(Image.open(rec["file_name"]).convert("RGB"))


def at_native_size(rec, **kw):
    return mapper(min(rec["height"], rec["width"]), **kw)


def poly_masks(rec):
    return [polygons_to_bitmask(a["segmentation"], rec["height"], rec["width"])
            for a in rec["annotations"]]


def test_missing_file_names_it(voc, tmp_path):
    rec = dict(voc[0], file_name=str(tmp_path / "gone.jpg"))
    with pytest.raises(BadSampleError, match=r"gone\.jpg: cannot read image"):
        at_native_size(rec)(rec)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_image_names_it(voc, tmp_path, damage):
    data = open(voc[0]["file_name"], "rb").read()
    bad = tmp_path / f"{damage}.jpg"
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x00junk" * 200)
    rec = dict(voc[0], file_name=str(bad))
    with pytest.raises(BadSampleError, match=rf"{damage}\.jpg: cannot read image"):
        at_native_size(rec)(rec)


def test_grayscale_becomes_three_equal_channels(voc, tmp_path):
    rec, rgb = voc
    gray = Image.fromarray(rgb).convert("L")
    gray.save(tmp_path / "gray.png")
    out = at_native_size(rec)(dict(rec, file_name=str(tmp_path / "gray.png")))
    ref = torch.from_numpy(np.array(gray))
    for c in range(3):
        assert torch.equal(out["image"][c], ref)
    assert len(out["instances"]) == len(rec["annotations"])


def test_rgba_drops_alpha(voc, tmp_path):
    rec, rgb = voc
    alpha = np.full(rgb.shape[:2], 7, np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    out = at_native_size(rec)(dict(rec, file_name=str(tmp_path / "rgba.png")))
    assert torch.equal(out["image"], torch.from_numpy(rgb.transpose(2, 0, 1).copy()))


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    rec = copy.deepcopy(DatasetCatalog.get("nuclei_train")[0])
    img8 = np.asarray(Image.open(rec["file_name"]).convert("L"))
    assert 0 < img8.mean() < 200, "the reference image should not be saturated"
    Image.fromarray(img8.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = at_native_size(rec, num_classes=1)(dict(rec, file_name=str(tmp_path / "deep.png")))
    assert torch.equal(out["image"][0], torch.from_numpy(img8.copy()))  # v*257/257 == v


def test_exif_rotated_jpeg_is_upright(voc, tmp_path):
    rec, rgb = voc
    stored = Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90)  # as a camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    stored.save(tmp_path / "exif.jpg", exif=exif, quality=95)
    out = at_native_size(rec)(dict(rec, file_name=str(tmp_path / "exif.jpg")))
    img = out["image"].permute(1, 2, 0).numpy().astype(np.float64)
    assert img.shape == rgb.shape  # (H, W) of the upright image, not swapped
    assert np.abs(img - rgb).mean() < 3.0  # JPEG noise only
    for m, ref in zip(out["instances"].gt_masks.tensor, poly_masks(rec)):
        assert torch.equal(m, torch.from_numpy(ref))


def test_no_annotations_and_degenerate_polygons(voc):
    rec, _ = voc
    m = at_native_size(rec)
    assert len(m(dict(rec, annotations=[]))["instances"]) == 0
    good = rec["annotations"][0]
    bad = [dict(good, segmentation=[[10.0, 10.0, 50.0, 50.0]]),                # 2 points
           dict(good, segmentation=[[10.0, 10.0, 20.0, 20.0, 30.0, 30.0]]),    # zero area
           dict(good, segmentation=[[5.0, 5.0, 9.0]])]                         # odd length
    out = m(dict(rec, annotations=bad + [good]))["instances"]
    assert len(out) == 1
    assert torch.equal(out.gt_masks.tensor[0], torch.from_numpy(poly_masks(dict(rec, annotations=[good]))[0]))


def test_mask_partly_outside_the_image_is_clipped(voc):
    rec, _ = voc
    h, w = rec["height"], rec["width"]
    poly = [w - 40.0, h - 30.0, w + 60.0, h - 30.0, w + 60.0, h + 50.0, w - 40.0, h + 50.0]
    ann = {"bbox": [w - 40, h - 30, 100, 80], "bbox_mode": BoxMode.XYWH_ABS,
           "category_id": 3, "segmentation": [poly]}
    out = at_native_size(rec)(dict(rec, annotations=[ann]))["instances"]
    pad = 100  # reference: rasterise on a larger canvas, then crop to the image
    big = polygons_to_bitmask([np.asarray(poly) + pad], h + 2 * pad, w + 2 * pad)
    ref = big[pad:pad + h, pad:pad + w]
    assert ref.sum() == 40 * 30
    assert torch.equal(out.gt_masks.tensor[0], torch.from_numpy(ref))
    assert out.gt_boxes.tensor[0].tolist() == [w - 40, h - 30, w, h]


def test_crowd_annotations_are_not_targets(voc):
    rec, _ = voc
    anns = copy.deepcopy(rec["annotations"])
    anns[0]["iscrowd"] = 1
    out = at_native_size(rec)(dict(rec, annotations=anns))["instances"]
    assert out.gt_classes.tolist() == [a["category_id"] for a in anns[1:]]


def test_non_contiguous_category_ids(voc, tmp_path):
    rec, _ = voc
    ids = [3, 17, 42]  # COCO-style sparse ids -> contiguous 0..2 by load_coco_json
    coco = {"images": [{"id": 1, "file_name": rec["file_name"], "height": rec["height"],
                        "width": rec["width"]}],
            "categories": [{"id": i, "name": f"c{i}"} for i in ids],
            "annotations": [{"id": 10 + k, "image_id": 1, "category_id": ids[k % 3],
                             "iscrowd": 0, "area": 1.0,
                             "bbox": a["bbox"], "segmentation": a["segmentation"]}
                            for k, a in enumerate(rec["annotations"])]}
    (tmp_path / "sparse.json").write_text(json.dumps(coco))
    loaded = load_coco_json(str(tmp_path / "sparse.json"), "/", dataset_name="rel_sparse_ids")
    out = at_native_size(rec, num_classes=3)(loaded[0])["instances"]
    assert out.gt_classes.tolist() == [k % 3 for k in range(len(rec["annotations"]))]
    raw = dict(rec, annotations=[dict(rec["annotations"][0], category_id=42, id=77)])
    with pytest.raises(BadSampleError,
                       match=r"2011_000003\.jpg: annotation #0 \(id 77\) has category_id 42, "
                             r"outside \[0, 3\)"):
        at_native_size(rec, num_classes=3)(raw)


def test_unusable_annotations_name_file_and_annotation(voc):
    rec, _ = voc
    good = rec["annotations"][0]
    m = at_native_size(rec)
    nan_poly = dict(good, segmentation=[[1.0, 2.0, float("nan"), 4.0, 5.0, 6.0]])
    with pytest.raises(BadSampleError, match=r"2011_000003\.jpg: annotation #1 \(id \d+\) has non-finite"):
        m(dict(rec, annotations=[good, nan_poly]))
    rle = mask_util.encode(np.asfortranarray(np.ones((10, 10), np.uint8)))  # wrong size
    with pytest.raises(BadSampleError, match=r"2011_000003\.jpg: annotation #0"):
        m(dict(rec, annotations=[dict(good, segmentation=rle)]))
    with pytest.raises(BadSampleError, match=r"2011_000003\.jpg: .*Mismatched image shape"):
        m(dict(rec, height=rec["height"] + 1))


@pytest.fixture(scope="module")
def huge(module_tmp_path_factory):
    """A 4000x6000 JPEG (H x W) upscaled from a real VOC photo, with scaled annotations."""
    src = copy.deepcopy(DatasetCatalog.get("voc_sample")[1])
    h, w = 4000, 6000
    sy, sx = h / src["height"], w / src["width"]
    path = module_tmp_path_factory.mktemp("huge") / "huge.jpg"
    Image.open(src["file_name"]).convert("RGB").resize((w, h), Image.BILINEAR).save(path)
    anns = []
    for a in src["annotations"]:
        seg = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(p)] for p in a["segmentation"]]
        x, y, bw, bh = a["bbox"]
        anns.append(dict(a, segmentation=seg, bbox=[x * sx, y * sy, bw * sx, bh * sy]))
    return dict(src, file_name=str(path), height=h, width=w, annotations=anns)


def test_4000x6000_image_training_sample(huge):
    out = mapper(64, max_size=96)(huge)
    assert tuple(out["image"].shape) == (3, 64, 96)
    inst = out["instances"]
    assert len(inst) == len(huge["annotations"]) and inst.gt_masks.tensor.shape[1:] == (64, 96)


def test_4000x6000_image_train_step_and_inference(huge):
    from detectron2.modeling import build_model

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file("configs/nuclei/isda_R18_tiny.yaml")
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ISDA.NUM_CLASSES", "20",
                         "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1",
                         "MODEL.ISDA.DEC_LAYERS", "1", "MODEL.ISDA.TEST.TOPK", "5"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    losses = model([mapper(64, max_size=96)(huge)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        res = model([mapper(64, is_train=False, max_size=96)(huge)])[0]["instances"]
    assert res.image_size == (4000, 6000)
    assert len(res) <= 5 and tuple(res.pred_masks.shape[1:]) == (4000, 6000)


@pytest.mark.parametrize("scale", [1e9, 3e7, -5.0])
def test_polygon_far_outside_the_image_is_refused_before_rasterising(voc, scale):
    """Coordinates 1e9 used to crash the process (segfault in rasterisation) and 3e7 to take
    4.6 GB; any polygon beyond one image size around the image is a data error naming the file
    and annotation, under both bad-sample policies (BadSampleError is what ``skip`` skips)."""
    rec, _ = voc
    good = rec["annotations"][0]
    far = [[v * scale for v in p] for p in good["segmentation"]]
    with pytest.raises(BadSampleError, match=r"2011_000003\.jpg: annotation #1 \(id \d+\) has polygon "
                                             r"coordinates outside the frame"):
        at_native_size(rec)(dict(rec, annotations=[good, dict(good, segmentation=far)]))


@pytest.mark.parametrize("h, w", [(1, 1), (1, 40), (40, 3)])
def test_degenerate_image_is_a_bad_sample(tmp_path, h, w):
    """A 1x1 image used to fail inside the augmentation with numpy's "At least one stride ... is
    negative" (a ValueError that ``skip`` could not skip); now a BadSampleError naming it."""
    path = tmp_path / f"tiny_{h}x{w}.png"
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)
    rec = {"file_name": str(path), "height": h, "width": w, "image_id": 1, "annotations": [
        {"segmentation": [[0, 0, w, 0, w, h, 0, h]], "category_id": 0, "iscrowd": 0,
         "bbox": [0, 0, w, h], "bbox_mode": BoxMode.XYWH_ABS}]}
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.INPUT.RANDOM_FLIP = "both"
    for is_train in (True, False):
        with pytest.raises(BadSampleError, match=rf"tiny_{h}x{w}\.png: the image is {w}x{h} px"):
            ISDADatasetMapper(cfg, is_train=is_train)(copy.deepcopy(rec))


def _register_json(tmp_path, name, text):
    from detectron2.data import MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    json_file = tmp_path / f"{name}.json"
    json_file.write_text(text)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    return json_file


@pytest.mark.parametrize("case, expected", [
    ("not_json", r"it is not valid JSON: Expecting value at line 1, column 1"),
    ("no_height", r"image #1 \(id 8\) lacks 'height'"),
    ("no_images", r"it has no 'images' list"),
])
def test_unloadable_dataset_json_names_dataset_file_and_field(tmp_path, case, expected):
    """A JSON that is not JSON, or an image without ``height``, used to stop training with a bare
    ``JSONDecodeError`` / ``KeyError: 'height'``; the error now names the dataset, the file and
    what is wrong in it."""
    from isda.data.catalog import DatasetLoadError, dataset_dicts

    good = {"id": 7, "file_name": "a.jpg", "height": 10, "width": 12}
    texts = {
        "not_json": "this is not json {",
        "no_height": json.dumps({"images": [good, {"id": 8, "file_name": "b.jpg", "width": 5}],
                                 "annotations": [], "categories": [{"id": 1, "name": "x"}]}),
        "no_images": json.dumps({"annotations": [], "categories": []}),
    }
    name = f"isda_test_bad_json_{case}"
    json_file = _register_json(tmp_path, name, texts[case])
    with pytest.raises(DatasetLoadError) as info:
        dataset_dicts(["voc_sample", name])
    message = str(info.value)
    assert message.startswith(f"dataset '{name}' ({json_file}): ")
    assert re.search(expected, message), message
