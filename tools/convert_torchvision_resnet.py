#!/usr/bin/env python
"""Convert an ImageNet torchvision ResNet state dict to Detectron2's ResNet names.

    python tools/convert_torchvision_resnet.py resnet50-0676ba61.pth R-50.pkl

The output is a Detectron2 model-zoo style pickle,
``{"model": {name: numpy array}, "__author__": "torchvision", "matching_heuristics": True}``,
usable as ``MODEL.WEIGHTS`` (loaded by :class:`isda.checkpoint.ISDACheckpointer` or Detectron2's
own checkpointer). Depths 18/34 (basic blocks) and 50/101/152 (bottlenecks) are supported.

The converted weights expect torchvision's input convention, which ISDA's configs already use:
``INPUT.FORMAT: RGB``, ``MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]``,
``MODEL.PIXEL_STD: [58.395, 57.12, 57.375]`` and ``MODEL.RESNETS.STRIDE_IN_1X1: False``
(plus ``RES2_OUT_CHANNELS: 64`` for depths 18/34).
"""
import argparse
import os
import pickle
import re
import sys

import numpy as np
import torch

# torchvision BatchNorm parameter -> Detectron2 FrozenBN parameter (same names)
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def torchvision_resnet_name(key):
    """Detectron2 name of one torchvision ResNet key, or None when it has no counterpart
    (``fc.*``, ``num_batches_tracked``)."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    if key == "conv1.weight":
        return "stem.conv1.weight"
    m = re.fullmatch(r"bn1\.(\w+)", key)
    if m:
        return f"stem.conv1.norm.{m.group(1)}"
    m = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", key)
    if not m:
        raise KeyError(f"unexpected torchvision ResNet key '{key}'")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    prefix = f"res{stage}.{block}."
    m = re.fullmatch(r"conv(\d)\.weight", rest)
    if m:
        return prefix + f"conv{m.group(1)}.weight"
    m = re.fullmatch(r"bn(\d)\.(\w+)", rest)
    if m:
        return prefix + f"conv{m.group(1)}.norm.{m.group(2)}"
    if rest == "downsample.0.weight":
        return prefix + "shortcut.weight"
    m = re.fullmatch(r"downsample\.1\.(\w+)", rest)
    if m:
        return prefix + f"shortcut.norm.{m.group(1)}"
    raise KeyError(f"unexpected torchvision ResNet key '{key}'")


def convert_torchvision_resnet(state_dict):
    """torchvision ResNet state dict -> {Detectron2 name: tensor} (fc and counters dropped)."""
    out = {}
    for key, value in state_dict.items():
        name = torchvision_resnet_name(key)
        if name is not None:
            out[name] = value
    return out


def _read_state_dict(path):
    from isda.checkpoint import load_checkpoint_file

    data = load_checkpoint_file(path)["model"]  # safe loading, plain or nested layouts
    return data


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision ResNet state dict (.pth/.safetensors)")
    parser.add_argument("output", help="output .pkl for MODEL.WEIGHTS")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error("the output must end with .pkl (Detectron2's model-zoo format)")
    converted = convert_torchvision_resnet(_read_state_dict(args.input))
    arrays = {k: v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
              for k, v in converted.items()}
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "torchvision", "matching_heuristics": True},
                    f, protocol=4)
    os.replace(tmp, args.output)
    print(f"wrote {len(arrays)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
