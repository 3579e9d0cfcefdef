"""The mapper's previous annotation route, kept only as a reference for the tests and
``benchmarks/data_pipeline.py``: each instance goes through Detectron2's
``transform_instance_annotations`` on its own (an RLE is decoded to a full-image mask, then
cropped / resized / flipped), the record is deep-copied, and polygons are rasterised one by one.
:class:`PerInstanceMapper` reads and augments the image exactly like ``ISDADatasetMapper`` (it
reuses its ``__call__``) and differs only in how the annotations become ``Instances``."""
import copy
from typing import List, Optional

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.structures import BitMasks, Boxes, Instances

from isda.data.dataset_mapper import (ANNOTATION_DATA_ERRORS, BadSampleError, ISDADatasetMapper,
                                      _ann_name, _check_category, _check_segmentation_frame,
                                      _clean_polygons)


def per_instance_annotations_to_instances(annos: List[dict], image_size, where: str,
                                          num_classes: Optional[int]) -> Instances:
    """Bit-mask ``Instances`` from transformed annotations; boxes are the masks' tight boxes."""
    h, w = image_size
    masks, classes = [], []
    for ann in annos:
        name = _ann_name(ann, ann["_index"])
        seg = ann.get("segmentation")
        if seg is None:
            raise BadSampleError(f"{where}: {name} has no 'segmentation'")
        category = _check_category(ann, where, num_classes, name)
        if isinstance(seg, list):
            seg = _clean_polygons(seg, where, name)
            if not seg:
                continue
            m = utils.polygons_to_bitmask(seg, h, w)
        elif isinstance(seg, np.ndarray):
            m = seg.astype(bool)
        else:
            raise BadSampleError(f"{where}: {name}: unsupported segmentation type "
                                 f"{type(seg).__name__} after transforms")
        if m.shape != (h, w):
            raise BadSampleError(f"{where}: {name}: mask shape {m.shape} != image shape {(h, w)}")
        if not m.any():
            continue
        masks.append(m)
        classes.append(category)
    inst = Instances((h, w))
    inst.gt_classes = torch.tensor(classes, dtype=torch.int64)
    if masks:
        inst.gt_masks = BitMasks(torch.from_numpy(np.stack(masks)))
    else:
        inst.gt_masks = BitMasks(torch.zeros((0, h, w), dtype=torch.bool))
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes() if masks else Boxes(torch.zeros((0, 4)))
    return inst


class PerInstanceMapper(ISDADatasetMapper):
    """``ISDADatasetMapper`` with the previous per-instance annotation route (reference only)."""

    def __call__(self, dataset_dict: dict) -> dict:
        return super().__call__(copy.deepcopy(dataset_dict))

    def _instances(self, annotations, transforms, source_hw, image_shape, file_name):
        annos = []
        for i, obj in enumerate(copy.deepcopy(annotations)):
            if obj.get("iscrowd", 0):
                continue
            obj["_index"] = i
            name = _ann_name(obj, i)
            if isinstance(obj.get("segmentation"), list):
                obj["segmentation"] = _clean_polygons(obj["segmentation"], file_name, name)
                if not obj["segmentation"]:
                    continue
            _check_segmentation_frame(obj.get("segmentation"), file_name, name, source_hw)
            try:
                annos.append(utils.transform_instance_annotations(obj, transforms, image_shape))
            except ANNOTATION_DATA_ERRORS as e:
                raise BadSampleError(f"{file_name}: {name} cannot be transformed "
                                     f"({type(e).__name__}: {e})") from e
        return per_instance_annotations_to_instances(annos, image_shape, file_name,
                                                     self.num_classes)
