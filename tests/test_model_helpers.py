"""Shared helpers of the model tests (small configs, synthetic inputs) and config-key tests."""
from pathlib import Path

import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances

import isda

ROOT = Path(__file__).resolve().parents[1]


def small_cfg(*opts):
    """A fast configuration: random-init R18, 64-d transformer with 1+2 layers, 10 queries."""
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "Base-ISDA.yaml"))
    cfg.merge_from_list([
        "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
        "MODEL.ISDA.NUM_CLASSES", 3, "MODEL.ISDA.NUM_QUERIES", 10,
        "MODEL.ISDA.HIDDEN_DIM", 64, "MODEL.ISDA.DIM_FEEDFORWARD", 128,
        "MODEL.ISDA.ENC_LAYERS", 1, "MODEL.ISDA.DEC_LAYERS", 2,
        "MODEL.ISDA.MASK_FEATURE_DIM", 32, "MODEL.ISDA.MASK_OUT_DIM", 64,
        "MODEL.ISDA.DROPOUT", 0.0,
    ])
    cfg.merge_from_list(list(opts))
    return cfg


def build(cfg, seed=0):
    torch.manual_seed(seed)
    return build_model(cfg)


def assert_every_parameter_trained_then_infer(model, losses, expected_detections):
    """Backward through the summed ``losses``: every trainable parameter gets a gradient; then
    one inference on a 64x96 image gives ``expected_detections`` instances."""
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    model.eval()
    with torch.no_grad():
        out = model([synthetic_input(64, 96, with_targets=False)])
    assert len(out[0]["instances"]) == expected_detections


def synthetic_input(h, w, num_inst=3, num_classes=3, seed=0, with_targets=True):
    """A random image [3, h, w] uint8 with ``num_inst`` rectangular instances."""
    g = torch.Generator().manual_seed(seed)
    d = {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)}
    if with_targets:
        inst = Instances((h, w))
        inst.gt_classes = torch.randint(0, num_classes, (num_inst,), generator=g)
        masks = torch.zeros(num_inst, h, w, dtype=torch.bool)
        for i in range(num_inst):
            y0 = int(torch.randint(0, h // 2, (1,), generator=g))
            x0 = int(torch.randint(0, w // 2, (1,), generator=g))
            masks[i, y0:y0 + h // 3, x0:x0 + w // 3] = True
        inst.gt_masks = BitMasks(masks)
        d["instances"] = inst
    return d


def test_config_defaults():
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    c = cfg.MODEL.ISDA
    assert (c.NUM_QUERIES, c.ENC_LAYERS, c.DEC_LAYERS, c.NHEADS, c.NUM_POINTS) == (300, 6, 6, 8, 4)
    assert (c.NUM_FEATURE_LEVELS, c.HIDDEN_DIM, c.DIM_FEEDFORWARD, c.DROPOUT) == (4, 256, 1024, 0.1)
    assert (c.COST_CLASS, c.COST_MASK, c.FOCAL_WEIGHT, c.DICE_WEIGHT) == (2.0, 3.0, 2.0, 3.0)
    assert (c.FOCAL_ALPHA, c.FOCAL_GAMMA, c.DEEP_SUPERVISION) == (0.25, 2.0, True)
    assert (c.MASK_STRIDE, c.MASK_COORDS, c.KERNEL_REF_POINTS) == (4, True, True)
    assert c.MASK_FEATURE_SOURCE in ("mapper", "encoder")
    assert (c.MASK_FEATURE_DIM, c.MASK_OUT_DIM, c.TEST.TOPK, c.TEST.MASK_THRESHOLD) == (128, 256, 100, 0.5)
    s = cfg.SOLVER
    assert s.OPTIMIZER == "ADAMW"
    assert (s.BACKBONE_MULTIPLIER, s.SAMPLING_OFFSET_MULTIPLIER, s.REFERENCE_POINT_MULTIPLIER) == (0.1,) * 3
    assert s.AMP.ENABLED is False
    assert not hasattr(cfg.MODEL, "CPU_FAST_PATHS")  # removed: the model is plain PyTorch
    assert (cfg.INPUT.CROP.PROB, cfg.INPUT.CROP.PRE_RESIZE_SIZES) == (0.5, (400, 500, 600))
    assert cfg.INPUT.BAD_SAMPLE_POLICY == "raise" and cfg.INPUT.ISDA.RANDOM_TRANSPOSE == 0.0
    # Detectron2's own keys keep Detectron2's defaults: ISDA's values are in Base-ISDA.yaml
    plain = get_cfg()
    assert s.CLIP_GRADIENTS.CLIP_TYPE == plain.SOLVER.CLIP_GRADIENTS.CLIP_TYPE
    assert cfg.INPUT.FORMAT == plain.INPUT.FORMAT and cfg.INPUT.CROP.TYPE == plain.INPUT.CROP.TYPE


def test_base_config_matches_reference():
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "Base-ISDA.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "ISDA"
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.RESNETS.NORM == "FrozenBN"
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    assert cfg.SOLVER.BASE_LR == 1.25e-4 and cfg.SOLVER.WEIGHT_DECAY == 1e-4
    clip = cfg.SOLVER.CLIP_GRADIENTS
    assert clip.ENABLED and clip.CLIP_TYPE == "full_model" and clip.CLIP_VALUE == 0.1
    i = cfg.INPUT
    assert i.MIN_SIZE_TRAIN == tuple(range(480, 801, 32)) and i.MAX_SIZE_TRAIN == 1333
    assert (i.MIN_SIZE_TEST, i.MAX_SIZE_TEST, i.RANDOM_FLIP) == (800, 1333, "horizontal")
    assert i.CROP.ENABLED and i.CROP.TYPE == "absolute_range" and list(i.CROP.SIZE) == [384, 600]
    assert (i.CROP.PROB, i.CROP.PRE_RESIZE_SIZES) == (0.5, (400, 500, 600))


def script_env():
    """Environment of a test file run as a script in a subprocess (``python tests/x.py``):
    the repository on ``PYTHONPATH``, so ``import train_net`` works there and in its spawned
    ranks, as pytest.ini's ``pythonpath`` does inside pytest."""
    import os

    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def tool_module(name):
    """``tools/<name>.py`` loaded as a module (the command-line tools are scripts)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def config_from(config, *opts):
    """``configs/<config>`` with ISDA's keys, no weights, on the CPU, then ``opts``."""
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", *opts])
    return cfg


def as_kernels(mask_logits):
    """Dense mask logits [..., Q, H, W] as (kernels [..., Q, H*W], identity mask features
    [N, H*W, H, W]): ``kernels @ features`` gives the logits back exactly, so the kernel-based
    matcher and criterion can be checked on hand-made dense masks."""
    *lead, q, h, w = mask_logits.shape
    n = lead[-1] if lead else 1
    eye = torch.eye(h * w, dtype=mask_logits.dtype).reshape(1, h * w, h, w).expand(n, -1, -1, -1)
    return mask_logits.reshape(*lead, q, h * w), eye.contiguous()
