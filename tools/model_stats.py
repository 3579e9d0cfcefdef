#!/usr/bin/env python
"""Parameter and FLOP counts of an ISDA configuration (network only, no post-processing).

    python tools/model_stats.py --config-file configs/Base-ISDA.yaml --size 800 1216

FLOPs are fvcore's (one multiply-add = 1 flop), counted on a traced forward pass from the
normalised image to the last decoder layer's class logits and stride-4 mask logits; the
deformable attention op is counted by the handle ``isda.layers.flop_count_handles()``, the
decoder's dot-product self-attention by a handle defined here.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import isda  # noqa: E402  first: quiets Detectron2's import-time warnings
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from isda.layers import flop_count_handles  # noqa: E402
from isda.modeling.heads import predict_masks  # noqa: E402


class _Network(nn.Module):
    """image [3, H, W] -> (class logits [Q, K], mask logits [Q, H/s, W/s]) of the last layer."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image):
        out = self.model.forward_features([{"image": image}])
        return out["logits"][-1, 0], predict_masks(out["kernels"][-1], out["mask_features"])[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="configs/Base-ISDA.yaml",
                   help="model config (default configs/Base-ISDA.yaml)")
    p.add_argument("--size", nargs=2, type=int, default=[800, 1216], metavar=("H", "W"),
                   help="input size for the FLOP count (default 800 1216)")
    p.add_argument("--setup-file", metavar="FILE",
                   help="a Python file run first (your registrations), as for train_net.py")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    from isda.utils.cli import parse_args_anywhere
    from isda.utils.setup_file import run_setup_file

    args = parse_args_anywhere(p, argv)
    run_setup_file(args.setup_file)

    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"] + args.opts)
    model = build_model(cfg).eval()

    params = {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    for name in ("backbone", "mapper", "encoder", "decoder", "mask_head", "heads"):
        params[name] = sum(p.numel() for p in getattr(model, name).parameters())
    params["level_embed"] = model.level_embed.numel()

    from fvcore.nn import FlopCountAnalysis

    image = torch.zeros(3, *args.size)
    flops = FlopCountAnalysis(_Network(model), (image,)).set_op_handle(
        **flop_count_handles())
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_module = flops.by_module()
    report = {
        "config": args.config_file, "input": args.size, "params": params,
        "gflops": round(flops.total() / 1e9, 2),
        "gflops_by_module": {k: round(by_module["model." + k] / 1e9, 2)
                             for k in ("backbone", "mapper", "encoder", "decoder", "mask_head",
                                       "heads")},
        "gflops_by_operator": {k: round(v / 1e9, 2) for k, v in sorted(
            flops.by_operator().items(), key=lambda kv: -kv[1])},
        "uncounted_ops": sorted(flops.unsupported_ops()),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
