"""The config: ISDA's defaults and the paper's R50 settings of configs/Base-ISDA.yaml."""
from detectron2.config import get_cfg

import isda
from isda_helpers import ROOT


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
