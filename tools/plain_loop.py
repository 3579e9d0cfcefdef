"""A plain training loop for small ISDA experiments and tests, without Detectron2's trainer or
ISDA's augmenting mapper: the model, the un-augmented ``DATASETS.TRAIN`` images held in memory
(:class:`MinimalInstanceMapper`: resize, ``INPUT.FORMAT`` colour order, bit-mask instances),
AdamW with linear warm-up (and x GAMMA at each of ``SOLVER.STEPS``) and global gradient-norm
clipping. Used by ``tools/learning_curve.py`` and the tests (overfit, demo); not part of the
``isda`` package."""
import copy

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model


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




def build_plain_training(cfg):
    """-> (model seeded with ``cfg.SEED``, list of mapped training dicts, AdamW optimizer)."""
    torch.manual_seed(cfg.SEED)
    from isda.config import with_resolved_device

    cfg = with_resolved_device(cfg)
    model = build_model(cfg)
    mapper = MinimalInstanceMapper(cfg, is_train=True)
    data = [mapper(d) for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR,
                            weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return model, data, opt


def plain_step(model, opt, cfg, batch, it: int):
    """One iteration (1-based ``it``) on ``batch`` -> (total loss, dict of losses)."""
    lr = cfg.SOLVER.BASE_LR * min(1.0, it / max(1, cfg.SOLVER.WARMUP_ITERS))
    lr *= cfg.SOLVER.GAMMA ** sum(it > s for s in cfg.SOLVER.STEPS)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    losses = model(batch)
    loss = sum(losses.values())
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
    opt.step()
    return loss, losses


def evaluate_segm(model, cfg, output_dir):
    """Mask AP of ``model`` on ``cfg.DATASETS.TEST[0]`` (COCOEvaluator, Python COCO eval)."""
    name = cfg.DATASETS.TEST[0]
    mapper = MinimalInstanceMapper(cfg, is_train=False)
    loader = [[mapper(d)] for d in DatasetCatalog.get(name)]
    evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=str(output_dir),
                              use_fast_impl=False)
    model.eval()
    return inference_on_dataset(model, loader, evaluator)["segm"]
