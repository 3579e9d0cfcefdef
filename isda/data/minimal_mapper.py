"""A minimal dataset mapper (resize, ``INPUT.FORMAT`` colour order, bit-mask instances).

Used by the model tests and small experiments; the full augmenting mapper lives elsewhere.
"""
import copy

import numpy as np
import torch

from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T


class MinimalInstanceMapper:
    """Dataset dict -> model input dict with "image" [3, H, W] uint8 and, when ``is_train``,
    "instances" (gt_classes, gt_masks as BitMasks, gt_boxes).

    Resizes the shortest edge to ``INPUT.MIN_SIZE_{TRAIN,TEST}`` (capped by MAX_SIZE); a min
    size of 0 keeps the original size.
    """

    def __init__(self, cfg, is_train=True):
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        if is_train:
            min_size, max_size = cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN
        else:
            min_size, max_size = cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        sizes = list(min_size) if isinstance(min_size, (list, tuple)) else [min_size]
        self.augs = [] if sizes == [0] else [T.ResizeShortestEdge(sizes, max_size, "choice")]

    def __call__(self, dataset_dict):
        d = copy.deepcopy(dataset_dict)
        image = utils.read_image(d["file_name"], format=self.image_format)
        utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        transforms = T.AugmentationList(self.augs)(aug_input)
        image = aug_input.image
        d["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annos = d.pop("annotations", None)
        if self.is_train and annos is not None:
            annos = [utils.transform_instance_annotations(a, transforms, image.shape[:2])
                     for a in annos if a.get("iscrowd", 0) == 0]
            inst = utils.annotations_to_instances(annos, image.shape[:2], mask_format="bitmask")
            d["instances"] = utils.filter_empty_instances(inst)
        return d
