"""``ISDADatasetMapper``: a Detectron2 dataset dict -> the model's input dict.

Output (training)::

    {"image": uint8 tensor (3, H, W) in cfg.INPUT.FORMAT,
     "instances": Instances(gt_classes (K,), gt_masks BitMasks (K, H, W), gt_boxes (K, 4)),
     "height", "width", "file_name", "image_id"}

Masks may come as polygons or as COCO RLE (compressed or not). Crowd annotations are not
training targets (ISDA has no "ignore" region in its set loss), degenerate polygons (fewer
than 3 points) are dropped, and instances whose mask vanishes after cropping are removed;
images without any instance are kept (all queries learn "no object"). The training masks cost
what the output costs, not instances x source pixels (:mod:`isda.data.instance_masks`; RLE
stacks cached per image under ``INPUT.MASK_CACHE_MB``); they equal, pixel for pixel, those of
Detectron2's per-instance ``transform_instance_annotations`` route.

Odd inputs: EXIF orientation is applied, grayscale / RGBA / palette images become
``INPUT.FORMAT`` (alpha is dropped), 16-bit images are scaled to 8 bits (``v / 257``) instead of
being clipped. Data that cannot be used (unreadable or truncated file, size different from the
record, category id outside ``[0, NUM_CLASSES)``, non-finite polygon coordinates, masks of the
wrong size, ...) raises :class:`BadSampleError` naming the file and the annotation;
``INPUT.BAD_SAMPLE_POLICY`` decides whether training stops or skips the sample
(:mod:`isda.engine.loader`).
"""
import copy
import logging
from typing import List, Optional

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from .image_io import read_image  # the one reader of training, evaluation, demo, export
from .instance_masks import rasterise_polygons, transform_polygons, transform_rles
from .mask_cache import MaskCache
from .transforms import build_isda_augmentation

logger = logging.getLogger(__name__)


class BadSampleError(RuntimeError):
    """A dataset record that cannot be turned into a training sample (names the file)."""


def _shapely_errors() -> tuple:
    try:
        from shapely.errors import ShapelyError
    except ImportError:  # shapely missing: the polygon crop itself raises ImportError (not data)
        return ()
    return (ShapelyError,)


#: Exceptions that mean "this sample's data is unusable" (undecodable file, wrong sizes or
#: coordinates, geometry the polygon crop rejects). Anything else - a missing module, a
#: programming error, running out of memory - is not the sample's fault: it propagates whatever
#: ``INPUT.BAD_SAMPLE_POLICY`` says, so ``skip`` cannot silently drop good data.
#: Smallest image side accepted (a 1-pixel image is degenerate: flips of it even break numpy's
#: contiguity checks inside the augmentation).
MIN_IMAGE_SIDE = 4
IMAGE_DATA_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
ANNOTATION_DATA_ERRORS = (ValueError, IndexError, OverflowError) + _shapely_errors()


def _ann_name(ann: dict, index: Optional[int] = None) -> str:
    """``annotation #i (id N)``: its position in the record's list, and its id when known."""
    ann_id = ann.get("id")
    name = "annotation" + (f" #{index}" if index is not None else "")
    return name + (f" (id {ann_id})" if ann_id is not None else "")


def _clean_polygons(seg, where: str, ann_name="annotation"):
    for p in seg:
        if not np.all(np.isfinite(np.asarray(p, dtype=np.float64))):
            raise BadSampleError(f"{where}: {ann_name} has non-finite polygon coordinates")
    kept = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
    if len(kept) < len(seg):
        logger.debug("%s: dropped %d degenerate polygon part(s)", where, len(seg) - len(kept))
    return kept


def _check_segmentation_frame(seg, where: str, ann_name: str, image_hw) -> None:
    """Before any transform: polygon coordinates lie within one image size around the image
    (a polygon far outside it is a unit or coordinate-system error, and rasterising it could take
    unbounded memory), RLE and bit masks have the image's size."""
    h, w = image_hw
    if isinstance(seg, list):
        for p in seg:
            xy = np.asarray(p, dtype=np.float64).reshape(-1)
            xs, ys = xy[0::2], xy[1::2]
            if xs.size and (xs.min() < -w or xs.max() > 2 * w or ys.min() < -h or ys.max() > 2 * h):
                raise BadSampleError(
                    f"{where}: {ann_name} has polygon coordinates outside the frame "
                    f"x in [{-w}, {2 * w}], y in [{-h}, {2 * h}] around the {w}x{h} image "
                    f"(x {xs.min():.4g}..{xs.max():.4g}, y {ys.min():.4g}..{ys.max():.4g})")
    elif isinstance(seg, dict):
        size = seg.get("size")
        if size is None or len(size) != 2 or tuple(int(v) for v in size) != (h, w):
            raise BadSampleError(f"{where}: {ann_name}: RLE size {size} != image size {[h, w]}")
    elif isinstance(seg, np.ndarray) and seg.shape[:2] != (h, w):
        raise BadSampleError(f"{where}: {ann_name}: mask shape {seg.shape} != image size {(h, w)}")


def _check_category(ann: dict, where: str, num_classes: Optional[int], name: str) -> int:
    if "category_id" not in ann:
        raise BadSampleError(f"{where}: {name} has no 'category_id'")
    c = int(ann["category_id"])
    if c < 0 or (num_classes is not None and c >= num_classes):
        raise BadSampleError(
            f"{where}: {name} has category_id {c}, outside [0, {num_classes}): "
            "dataset category ids must be mapped to contiguous ids (Detectron2's load_coco_json "
            "does it) and MODEL.ISDA.NUM_CLASSES must cover them")
    return c


def _cache_key(file_name: str, source_hw, rles: List[dict]):
    """Content key of an image's RLE stack; None (no caching) for RLEs without string counts."""
    counts = tuple(r.get("counts") for r in rles)
    if not all(isinstance(c, (str, bytes)) for c in counts):
        return None
    return file_name, tuple(source_hw), counts


def _tight_boxes(masks: np.ndarray) -> np.ndarray:
    """Non-empty masks (K, H, W) bool -> their tight boxes (K, 4) float32, XYXY with exclusive
    ends (what ``BitMasks.get_bounding_boxes`` gives, in numpy)."""
    k, h, w = masks.shape
    boxes = np.zeros((k, 4), np.float32)
    if k:
        cols, rows = masks.any(axis=1), masks.any(axis=2)  # (K, W), (K, H)
        boxes[:, 0], boxes[:, 2] = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
        boxes[:, 1], boxes[:, 3] = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
    return boxes


def _name_bad_rle(rles: List[dict], names: List[str], where: str) -> None:
    """Decode the RLEs one by one; raise :class:`BadSampleError` naming the first that fails."""
    for rle, name in zip(rles, names):
        try:
            mask_util.decode(rle)
        except ANNOTATION_DATA_ERRORS as e:
            raise BadSampleError(f"{where}: {name} cannot be transformed "
                                 f"({type(e).__name__}: {e})") from e


class ISDADatasetMapper:
    """Reads, augments and converts one dataset dict for ISDA (train or test).

    Training masks cost what the output costs: RLE stacks are decoded once per image and kept
    in a per-process cache of ``mask_cache_mb`` megabytes (``INPUT.MASK_CACHE_MB``), and only
    the instances that reach the augmented image are moved (:mod:`isda.data.instance_masks`).
    """

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List[T.Augmentation], image_format: str,
                 num_classes: Optional[int] = None, mask_cache_mb: float = 256.0):
        """``num_classes``: when given, training annotations must have ``0 <= category_id <
        num_classes`` (otherwise :class:`BadSampleError`)."""
        self.is_train = is_train
        self.num_classes = num_classes
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.mask_cache = MaskCache(mask_cache_mb)
        logger.info("[ISDADatasetMapper] %s augmentations: %s",
                    "train" if is_train else "test", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"is_train": is_train,
                "augmentations": build_isda_augmentation(cfg, is_train),
                "image_format": cfg.INPUT.FORMAT,
                "num_classes": cfg.MODEL.ISDA.NUM_CLASSES if "ISDA" in cfg.MODEL else None,
                "mask_cache_mb": cfg.INPUT.get("MASK_CACHE_MB", 256.0)}

    def __call__(self, dataset_dict: dict) -> dict:
        annotations = dataset_dict.get("annotations", [])
        # the annotations are only read: no deep copy of them
        dataset_dict = copy.deepcopy({k: v for k, v in dataset_dict.items()
                                      if k != "annotations"})
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            image = read_image(file_name, format=self.image_format)
        except IMAGE_DATA_ERRORS as e:
            raise BadSampleError(f"{file_name}: cannot read image ({type(e).__name__}: {e})") from e
        try:
            utils.check_image_size(dataset_dict, image)
        except utils.SizeMismatchError as e:
            raise BadSampleError(f"{file_name}: {e}") from e
        if min(image.shape[:2]) < MIN_IMAGE_SIDE:
            raise BadSampleError(f"{file_name}: the image is {image.shape[1]}x{image.shape[0]} "
                                 f"px; images need at least {MIN_IMAGE_SIDE} px on each side")

        source_hw = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if self.is_train:
            dataset_dict["instances"] = self._instances(annotations, transforms, source_hw,
                                                        image_shape, file_name)
        return dataset_dict

    def _instances(self, annotations, transforms, source_hw, image_shape, file_name) -> Instances:
        """Training targets: bit-mask ``Instances`` (gt_classes, gt_masks, gt_boxes = the masks'
        tight boxes) of the non-crowd annotations that keep pixels after ``transforms``."""
        where = file_name
        entries = []  # (position in the record, annotation, segmentation, name)
        for i, ann in enumerate(annotations):
            if ann.get("iscrowd", 0):
                continue
            name = _ann_name(ann, i)
            seg = ann.get("segmentation")
            if isinstance(seg, list):
                seg = _clean_polygons(seg, where, name)
                if not seg:
                    continue
            _check_segmentation_frame(seg, where, name, source_hw)
            if "segmentation" in ann and not isinstance(seg, (list, dict)):
                raise BadSampleError(f"{where}: {name} cannot be transformed: segmentation of "
                                     f"type {type(seg).__name__}; supported are polygons (a "
                                     "list of [x0, y0, x1, y1, ...]) and COCO RLE (a dict)")
            entries.append((i, ann, seg, name))
        classes = []
        for i, ann, seg, name in entries:
            if seg is None:
                raise BadSampleError(f"{where}: {name} has no 'segmentation'")
            classes.append(_check_category(ann, where, self.num_classes, name))

        def naming(positions):
            def on_error(j, exc):
                if isinstance(exc, ANNOTATION_DATA_ERRORS):
                    raise BadSampleError(f"{where}: {entries[positions[j]][3]} cannot be "
                                         f"transformed ({type(exc).__name__}: {exc})") from exc
            return on_error

        parts_pos, parts = [], []
        poly_pos = [k for k, e in enumerate(entries) if isinstance(e[2], list)]
        if poly_pos:
            polygons = [[np.asarray(p).reshape(-1, 2) for p in entries[k][2]] for k in poly_pos]
            moved = transform_polygons(polygons, transforms, naming(poly_pos))
            kept_pos, kept = [], []
            for k, instance_parts in zip(poly_pos, moved):
                seg = _clean_polygons([p.reshape(-1) for p in instance_parts], where,
                                      entries[k][3])
                if seg:
                    kept_pos.append(k)
                    kept.append(seg)
            parts_pos.append(np.asarray(kept_pos, np.int64))
            parts.append(rasterise_polygons(kept, image_shape))
        rle_pos = [k for k, e in enumerate(entries) if isinstance(e[2], dict)]
        if rle_pos:
            rles = [entries[k][2] for k in rle_pos]
            try:
                index, masks = transform_rles(rles, transforms, source_hw, image_shape,
                                              self.mask_cache,
                                              _cache_key(file_name, source_hw, rles))
            except ANNOTATION_DATA_ERRORS as e:
                _name_bad_rle(rles, [entries[k][3] for k in rle_pos], where)
                raise BadSampleError(f"{where}: the RLE annotations cannot be transformed "
                                     f"({type(e).__name__}: {e})") from e
            parts_pos.append(np.asarray(rle_pos, np.int64)[index])
            parts.append(masks)

        h, w = image_shape
        if len(parts) == 1:
            positions, masks = parts_pos[0], parts[0]
        elif parts:
            positions = np.concatenate(parts_pos)
            order = np.argsort(positions, kind="stable")
            positions, masks = positions[order], np.concatenate(parts)[order]
        else:
            positions, masks = np.zeros(0, np.int64), np.zeros((0, h, w), bool)
        nonempty = masks.any(axis=(1, 2))
        if not nonempty.all():
            positions, masks = positions[nonempty], masks[nonempty]
        inst = Instances((h, w))
        inst.gt_classes = torch.tensor([classes[k] for k in positions.tolist()], dtype=torch.int64)
        inst.gt_masks = BitMasks(torch.from_numpy(np.ascontiguousarray(masks)))
        inst.gt_boxes = Boxes(torch.from_numpy(_tight_boxes(masks)))
        return inst
