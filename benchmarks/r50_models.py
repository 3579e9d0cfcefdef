"""ISDA-R50 and Detectron2's Mask R-CNN R50-FPN built the same way for the CPU benchmarks:
random init with 80 classes (FrozenBN statistics calibrated alike), one synthetic input with
masks, inference and one training step."""
import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def set_threads(n):
    """Same intra-op thread count for every model (set before torch starts its pools)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def build_cfg(name, isda_opts=()):
    """``isda_opts``: KEY VALUE overrides of ISDA's config (e.g. MODEL.ISDA.ENCODER_CHECKPOINT)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    import isda

    cfg = get_cfg()
    if name == "isda":
        isda.add_isda_config(cfg)
        cfg.merge_from_file(str(ROOT / "configs" / "Base-ISDA.yaml"))
        cfg.merge_from_list(["MODEL.ISDA.NUM_CLASSES", 80, "MODEL.ISDA.TEST.TOPK", 100])
        cfg.merge_from_list(list(isda_opts))
    else:
        cfg.merge_from_file(model_zoo.get_config_file(
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
        cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 80,
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                             "TEST.DETECTIONS_PER_IMAGE", 100])
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    return cfg


def calibrate_frozen_bn(model, seed=1):
    """Give every FrozenBN layer of the backbone the statistics of its input on a random image,
    as a pretrained backbone has: a random-init ResNet with identity FrozenBN multiplies the
    activation scale by ~2 per block, which makes Mask R-CNN's softmax scores underflow to 0
    (so fewer than 100 survive SCORE_THRESH_TEST 0). Same treatment for both models."""
    from detectron2.layers import FrozenBatchNorm2d

    def pre_hook(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))
        module.weight.fill_(1.0)
        module.bias.fill_(0.0)

    layers = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(pre_hook) for m in layers]
    sample = make_input(320, 480, seed=seed, num_objects=1)
    with torch.no_grad():
        images = model.preprocess_image([sample])
        images = images[0] if isinstance(images, tuple) else images  # ISDA also returns a mask
        model.backbone(images.tensor)
    for h in handles:
        h.remove()


def build(name, seed=0, isda_opts=()):
    """-> (model in eval mode, optimizer the model's own trainer would use)."""
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    from isda.solver import build_isda_optimizer

    torch.manual_seed(seed)
    cfg = build_cfg(name, isda_opts)
    model = build_model(cfg).eval()
    calibrate_frozen_bn(model)
    opt = build_isda_optimizer(cfg, model) if name == "isda" else build_optimizer(cfg, model)
    return model, opt


def make_input(h, w, seed=0, num_objects=10):
    """One random image [3, h, w] uint8 with ``num_objects`` elliptical instances (masks, tight
    boxes, classes in 0..79), identical for both models."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    masks = []
    for _ in range(num_objects):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        ry, rx = (torch.rand(2, generator=g) * torch.tensor([h, w]) * 0.2 + 8).tolist()
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    masks = BitMasks(torch.stack(masks))
    inst = Instances((h, w))
    inst.gt_masks = masks
    inst.gt_boxes = Boxes(masks.get_bounding_boxes().tensor)
    inst.gt_classes = torch.randint(0, 80, (num_objects,), generator=g)
    return {"image": image, "height": h, "width": w, "instances": inst}


def infer(model, sample):

    with torch.no_grad():
        out = model([{k: sample[k] for k in ("image", "height", "width")}])
    n = len(out[0]["instances"])
    if n != 100:
        raise RuntimeError(f"expected 100 instances, got {n}")
    return out


def train_step(model, opt, sample, free_grads=None):
    """One step as the model's own trainer runs it: Detectron2's SimpleTrainer (forward,
    zero_grad, backward, step); ISDA's Trainer then frees the gradients (``free_grads``,
    default: whether ``model`` is ISDA)."""
    from detectron2.utils.events import EventStorage

    from isda.modeling.meta_arch import ISDA

    model.train()
    with EventStorage(0):
        losses = model([sample])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if free_grads is None:
        free_grads = isinstance(model, ISDA)
    if free_grads:
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def parse_size(s):
    h, w = s.lower().split("x")
    return int(h), int(w)
