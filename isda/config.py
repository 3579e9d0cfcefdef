"""ISDA's configuration keys (``add_isda_config``)."""
import logging

import torch
from detectron2.config import CfgNode as CN


_said = set()


class ISDACfgNode(CN):
    """Detectron2's ``CfgNode`` whose merges (``merge_from_file``, ``merge_from_list``,
    ``merge_from_other_cfg``) resolve ``MODEL.DEVICE auto`` at once, so that no "auto" is left
    for Detectron2 (``DefaultPredictor``, ``build_model``, ``DefaultTrainer``) to choke on.
    :func:`add_isda_config` gives the root of a config this class; its sub-nodes stay plain
    ``CfgNode`` (yacs type-checks sub-nodes when merging). Clones and pickles keep it."""

    @classmethod
    def _create_config_tree_from_dict(cls, dic, key_list):
        return CN._create_config_tree_from_dict.__func__(CN, dic, key_list)

    @classmethod
    def _decode_cfg_value(cls, value):
        return CN._decode_cfg_value.__func__(CN, value)

    def merge_from_file(self, *args, **kwargs):
        out = super().merge_from_file(*args, **kwargs)
        _resolve_merged(self)
        return out

    def merge_from_list(self, *args, **kwargs):
        out = super().merge_from_list(*args, **kwargs)
        _resolve_merged(self)
        return out

    def merge_from_other_cfg(self, *args, **kwargs):
        out = super().merge_from_other_cfg(*args, **kwargs)
        _resolve_merged(self)
        return out


def _resolve_merged(cfg):
    model = cfg.get("MODEL") if hasattr(cfg, "get") else None
    if model is not None and model.get("DEVICE") == "auto" and not cfg.is_frozen():
        resolve_device(cfg)


def add_isda_config(cfg):
    """Add ISDA's own keys (``MODEL.ISDA.*``, the solver and input
    extras) to ``cfg``, with the authors' R50 setting as defaults (``docs/model.md``). Detectron2's
    existing keys keep Detectron2's defaults here: ISDA's values for them (backbone, pixel
    normalisation, input recipe, clipping, schedule) are in ``configs/Base-ISDA.yaml``, the base
    of every ISDA config.
    """
    cfg.MODEL.ISDA = CN()
    isda = cfg.MODEL.ISDA
    isda.NUM_CLASSES = 80
    isda.NUM_QUERIES = 300
    # transformer
    isda.HIDDEN_DIM = 256
    isda.ENC_LAYERS = 6
    isda.DEC_LAYERS = 6
    isda.NHEADS = 8
    isda.NUM_POINTS = 4
    isda.NUM_FEATURE_LEVELS = 4  # P3..P6
    isda.DIM_FEEDFORWARD = 1024
    isda.DROPOUT = 0.1
    # training only: each encoder layer recomputes its forward in the backward pass instead of
    # keeping its activations (less memory for more time; docs/benchmarks.md). Off: the default
    isda.ENCODER_CHECKPOINT = False
    # channel mapper: GroupNorm groups
    isda.GN_GROUPS = 32
    # matcher cost weights
    isda.COST_CLASS = 2.0
    isda.COST_MASK = 3.0
    # losses
    isda.FOCAL_WEIGHT = 2.0
    isda.DICE_WEIGHT = 3.0
    isda.FOCAL_ALPHA = 0.25
    isda.FOCAL_GAMMA = 2.0
    isda.DEEP_SUPERVISION = True
    # training-only query groups for faster convergence (docs/model.md, "Convergence options"):
    # AUX_GROUPS extra groups of NUM_QUERIES queries, decoded with self-attention inside each
    # group and matched on their own; every GT instance matched AUX_GROUP_REPEATS times in each
    # extra group (1: Group DETR, > 1: H-DETR's one-to-many branch); their losses x
    # AUX_LOSS_WEIGHT. Inference uses the model's own NUM_QUERIES only. 0 = the paper's model
    isda.AUX_GROUPS = 0
    isda.AUX_GROUP_REPEATS = 1
    isda.AUX_LOSS_WEIGHT = 1.0
    # queries placed at the encoder's best-scoring tokens, whose own predictions get the set loss
    # (two-stage Deformable DETR / DINO's mixed query selection; isda/modeling/query_selection.py).
    # False = the paper's learned query points
    isda.TWO_STAGE = False
    # dense supervision of the encoder tokens (isda/modeling/dense_supervision.py): tokens near
    # each instance's mass centre predict its class and mask (SOLO's centre sampling, Co-DETR's
    # auxiliary dense head); the losses x DENSE_LOSS_WEIGHT. Training only; with TWO_STAGE it
    # trains the heads that place the queries. 0 = off (the paper's model)
    isda.DENSE_LOSS_WEIGHT = 0.0
    isda.DENSE_CENTRE_RADIUS = 0.2  # centre region: this fraction of the instance's box
    # mask branch
    isda.MASK_STRIDE = 4  # 8, 4 or 2
    isda.MASK_COORDS = True  # "MP": coordinates concatenated to the stride-32 input
    isda.KERNEL_REF_POINTS = True  # "KP": inverse_sigmoid(reference point) ends each kernel
    isda.MASK_FEATURE_SOURCE = "mapper"  # "mapper" (channel mapper P2..P5) or "encoder"
    isda.MASK_FEATURE_DIM = 128  # channels inside the mask-feature head
    isda.MASK_OUT_DIM = 256  # channels of F = length of each dynamic kernel
    # inference
    isda.TEST = CN()
    isda.TEST.TOPK = 100
    isda.TEST.MASK_THRESHOLD = 0.5
    # pixels per chunk when upsampling masks to the original size (bounds peak memory)
    isda.TEST.CHUNK_PIXELS = 1 << 25
    # full-size masks only for instances scoring at least this (0: all TOPK; the demo sets it
    # to --confidence-threshold), and at most this many bytes of them per image: above it,
    # inference stops with MaskMemoryError instead of failing to allocate [TOPK, H, W] booleans
    # (a 12000x12000 image with TOPK 100 would need 13.4 GiB)
    isda.TEST.SCORE_THRESHOLD = 0.0
    isda.TEST.MAX_MASK_BYTES = 1 << 32
    # duplicate removal on the top-k masks (isda/modeling/dedup.py; docs/model.md "Duplicate
    # removal"): "none" (the paper: NMS-free), "mask_nms" (greedy mask NMS at IoU > DEDUP_IOU,
    # per class) or "matrix_nms" (SOLOv2's Gaussian Matrix NMS, DEDUP_SIGMA: scores decayed)
    isda.TEST.DEDUP = "none"
    isda.TEST.DEDUP_IOU = 0.5
    isda.TEST.DEDUP_SIGMA = 2.0
    # "fp32", or "bf16": inference runs the network under bf16 autocast (about 2x the
    # arithmetic rate on CPUs with AVX512-BF16 / AMX; docs/benchmarks.md), the mask product and
    # post-processing in fp32; evaluation, the predictor and the demo all follow it
    isda.TEST.PRECISION = "fp32"
    # weights loading for evaluation and the demo (train_net.py --eval-only, ISDAPredictor) is
    # strict: missing, unexpected or mis-shaped parameters, or MODEL.WEIGHTS "", stop with the
    # list of what did not load. True accepts a partial load (training always does: fine-tuning
    # from an ImageNet backbone or a converted Deformable DETR is partial). docs/checkpoints.md
    isda.ALLOW_PARTIAL_WEIGHTS = False

    # solver extras (read by the trainer; the values of Detectron2's own keys, e.g. the
    # full-model gradient clipping, are in configs/Base-ISDA.yaml)
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.SAMPLING_OFFSET_MULTIPLIER = 0.1
    cfg.SOLVER.REFERENCE_POINT_MULTIPLIER = 0.1
    # torch's fused AdamW (one kernel per parameter; CPU optimizer step 3x faster, 99 -> 33 ms for
    # ISDA-R50) where torch has it. Off by default: the same update up to float rounding, but on
    # the main job (seed 0) that rounding alone moved nuclei_val AP / AP50 from 36.0 / 77.1 to
    # 34.9 / 63.9, and the documented results were all trained without it (docs/benchmarks.md)
    cfg.SOLVER.ADAMW_FUSED = False
    # a schedule that follows SOLVER.MAX_ITER: when WARMUP_FRACTION > 0, WARMUP_ITERS =
    # round(WARMUP_FRACTION x MAX_ITER); when STEP_FRACTIONS is not empty, STEPS = those fractions
    # of MAX_ITER (isda/solver.py, build_isda_lr_scheduler). For SOLVER.LR_SCHEDULER_NAME
    # "WarmupCosineLR" the decay follows MAX_ITER by itself
    cfg.SOLVER.WARMUP_FRACTION = 0.0
    cfg.SOLVER.STEP_FRACTIONS = ()
    # a training run started without --resume in an OUTPUT_DIR that holds an earlier run
    # (last_checkpoint, model_*.pth, losses.jsonl, metrics.json): "refuse" (stop, nothing
    # changed) or "move" (the earlier run's files go to OUTPUT_DIR/previous-<timestamp>/ first).
    # docs/reliability.md, "Checkpoints, counters and outputs"
    cfg.OUTPUT_DIR_EXISTING = "refuse"
    # input pipeline (isda/data/transforms.py): the DETR recipe's values of Detectron2's keys
    # (sizes, flip, crop type and size) are in configs/Base-ISDA.yaml; ISDA's own keys:
    # probability of the crop branch, and the short sides it first resizes to
    cfg.INPUT.CROP.PROB = 0.5
    cfg.INPUT.CROP.PRE_RESIZE_SIZES = (400, 500, 600)
    # a sample that cannot be read or converted during training: "raise" stops with an error
    # naming the file; "skip" logs it, counts it and moves on
    cfg.INPUT.BAD_SAMPLE_POLICY = "raise"
    # megabytes of decoded RLE masks the training mapper keeps per process (each DataLoader
    # worker has its own); 0 decodes on every visit (isda/data/mask_cache.py)
    cfg.INPUT.MASK_CACHE_MB = 256.0
    cfg.INPUT.ISDA = CN()
    # probability of swapping the image axes (0 for natural images, whose "up" matters)
    cfg.INPUT.ISDA.RANDOM_TRANSPOSE = 0.0
    if not hasattr(cfg.SOLVER, "AMP"):
        cfg.SOLVER.AMP = CN({"ENABLED": False})
    # MODEL.DEVICE "auto" (ISDA's configs) becomes "cuda" or "cpu" as soon as it is merged
    if type(cfg) is CN:  # (another config class is left as it is: resolve_device() then)
        object.__setattr__(cfg, "__class__", ISDACfgNode)
    _resolve_merged(cfg)
    return cfg


def resolve_device(cfg) -> str:
    """``MODEL.DEVICE "auto"`` (ISDA's configs) -> ``"cuda"`` when CUDA is available, else
    ``"cpu"`` (one log line per process). A config given to :func:`add_isda_config` does this
    by itself after every merge; any other value is kept (a literal ``cuda`` without CUDA
    stays an error where the model is built). Call before ``cfg.freeze()``; returns the device."""
    if cfg.MODEL.DEVICE == "auto":
        if torch.cuda.is_available():
            cfg.MODEL.DEVICE = "cuda"
        else:
            cfg.MODEL.DEVICE = "cpu"
            if "cpu" not in _said:  # once per process
                _said.add("cpu")
                logging.getLogger("isda").info(
                    "MODEL.DEVICE auto: no CUDA device available, running on the CPU")
    return cfg.MODEL.DEVICE


def with_resolved_device(cfg):
    """``cfg`` itself, or for ``MODEL.DEVICE auto`` a copy (frozen like ``cfg``) with the device
    resolved by :func:`resolve_device`."""
    if cfg.MODEL.DEVICE != "auto":
        return cfg
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    resolve_device(out)
    if frozen:
        out.freeze()
    return out
