"""``ISDADatasetMapper``: a Detectron2 dataset dict -> the model's input dict.

Output (training)::

    {"image": uint8 tensor (3, H, W) in cfg.INPUT.FORMAT,
     "instances": Instances(gt_classes (K,), gt_masks BitMasks (K, H, W), gt_boxes (K, 4)),
     "height", "width", "file_name", "image_id"}

Masks may come as polygons or as COCO RLE (compressed or not). Crowd annotations are not
training targets (ISDA has no "ignore" region in its set loss), degenerate polygons (fewer
than 3 points) are dropped, and instances whose mask vanishes after cropping are removed;
images without any instance are kept (all queries learn "no object").
"""
import copy
import logging
from typing import List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances

from .transforms import build_isda_augmentation

logger = logging.getLogger(__name__)


class BadSampleError(RuntimeError):
    """A dataset record that cannot be turned into a training sample (names the file)."""


def _clean_polygons(seg, where: str):
    kept = [p for p in seg if len(p) >= 6 and len(p) % 2 == 0]
    if len(kept) < len(seg):
        logger.debug("%s: dropped %d degenerate polygon part(s)", where, len(seg) - len(kept))
    return kept


def annotations_to_instances(annos: List[dict], image_size, where: str = "") -> Instances:
    """Bit-mask ``Instances`` from transformed annotations; boxes are the masks' tight boxes."""
    h, w = image_size
    masks, classes = [], []
    for ann in annos:
        seg = ann.get("segmentation")
        if seg is None:
            raise BadSampleError(f"{where}: annotation {ann.get('id', '?')} has no 'segmentation'")
        if isinstance(seg, list):
            seg = _clean_polygons(seg, where)
            if not seg:
                continue
            m = utils.polygons_to_bitmask(seg, h, w)
        elif isinstance(seg, np.ndarray):
            m = seg.astype(bool)
        else:
            raise BadSampleError(f"{where}: annotation {ann.get('id', '?')}: unsupported "
                                 f"segmentation type {type(seg).__name__} after transforms")
        if m.shape != (h, w):
            raise BadSampleError(f"{where}: mask shape {m.shape} != image shape {(h, w)}")
        if not m.any():
            continue
        masks.append(m)
        classes.append(int(ann["category_id"]))
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks:
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))
    else:
        inst.gt_masks = BitMasks(torch.zeros((0, h, w), dtype=torch.bool))
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes() if masks else Boxes(torch.zeros((0, 4)))
    return inst


class ISDADatasetMapper:
    """Reads, augments and converts one dataset dict for ISDA (train or test)."""

    @configurable
    def __init__(self, is_train: bool, *, augmentations: List[T.Augmentation], image_format: str):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        logger.info("[ISDADatasetMapper] %s augmentations: %s",
                    "train" if is_train else "test", augmentations)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        return {"is_train": is_train,
                "augmentations": build_isda_augmentation(cfg, is_train),
                "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict.get("file_name", "<no file_name>")
        try:
            image = utils.read_image(file_name, format=self.image_format)
        except Exception as e:  # noqa: BLE001 - re-raised with the file named
            raise BadSampleError(f"{file_name}: cannot read image ({type(e).__name__}: {e})") from e
        utils.check_image_size(dataset_dict, image)

        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict

        annos = []
        for obj in dataset_dict.pop("annotations", []):
            if obj.get("iscrowd", 0):
                continue
            if isinstance(obj.get("segmentation"), list):
                obj["segmentation"] = _clean_polygons(obj["segmentation"], file_name)
                if not obj["segmentation"]:
                    continue
            try:
                annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
            except Exception as e:  # noqa: BLE001
                raise BadSampleError(f"{file_name}: annotation {obj.get('id', '?')} cannot be "
                                     f"transformed ({type(e).__name__}: {e})") from e
        dataset_dict["instances"] = annotations_to_instances(annos, image_shape, file_name)
        return dataset_dict
