"""Shared helpers of the tests (small configs, synthetic inputs, tool modules)."""
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


def script_env():
    """Environment of a test file run as a script in a subprocess (``python tests/x.py``):
    the repository and ``tests/`` on ``PYTHONPATH``, so ``import train_net`` and these helpers
    work there and in its spawned ranks, as pytest.ini's ``pythonpath`` does inside pytest."""
    import os

    paths = [str(ROOT), str(ROOT / "tests")] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
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
