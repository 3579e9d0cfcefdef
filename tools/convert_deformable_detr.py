#!/usr/bin/env python
"""Map a COCO-trained Deformable DETR (R50, single-scale queries, no box refinement, not
two-stage) checkpoint onto ISDA's modules, as the authors initialise ISDA.

    python tools/convert_deformable_detr.py r50_deformable_detr.pth isda_init.pth \\
        [--config-file configs/coco/isda_R50_3x.yaml] [--report isda_init.json] [--opts K V ...]

Both public layouts are recognised:

- the official repository's ``{"model": ..., "args": Namespace, ...}`` (``backbone.0.body.*``,
  ``transformer.*``, ``input_proj.*``, ``query_embed``, ``class_embed.*``, ``bbox_embed.*``);
- mmdetection's ``{"state_dict": ..., "meta": ...}`` (``backbone.*``, ``neck.*``,
  ``bbox_head.transformer.*``, ``bbox_head.query_embedding``, ``bbox_head.cls_branches.*``).

What maps where (ISDA names from ``isda/modeling``):

- ResNet: torchvision names -> Detectron2's (``backbone.stem.*``, ``backbone.res{2-5}.*``);
- input projection / neck for C3, C4, C5 and the extra stride-2 conv on C5 ->
  ``mapper.lateral.{1,2,3}`` (P3..P5) and ``mapper.extra.0`` (P6). ISDA's P2 mapper
  ``mapper.lateral.0`` has no source and stays at its initialisation. mmdetection's neck convs
  have no bias (GroupNorm follows): ISDA's conv biases are then written as zeros (same function);
- level embedding, encoder, decoder, query embedding and reference-point layer -> ``level_embed``,
  ``encoder.*``, ``decoder.*``. The official decoder layer names its post-cross-attention norm
  ``norm1`` and its post-self-attention norm ``norm2``; ISDA's are the other way round;
- class head (shared by all layers in both sources when boxes are not refined; the last
  layer's copy is used) -> ``heads.class_embed`` only if the class count fits: with 80 target
  classes, the official head's 91 slots (indexed by COCO category id) are reduced to the 80 COCO
  ids in Detectron2's contiguous order; mmdetection's 80 map directly. Otherwise it stays at init.

Never mapped (reported): box heads, the mask-feature head, the kernel MLP, ``mapper.lateral.0``.
The output is ``{"model": state_dict}`` with the mapped tensors only, to be used as
``MODEL.WEIGHTS``; a summary is printed and the full report written as JSON. Any shape mismatch
(other than the class head) is refused.
"""
import argparse
import json
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from convert_torchvision_resnet import torchvision_resnet_name  # noqa: E402

# COCO category ids of the 80 thing classes, sorted: Detectron2's contiguous ids 0..79
COCO_CATEGORY_IDS = (
    list(range(1, 12)) + list(range(13, 26)) + [27, 28] + list(range(31, 45))
    + list(range(46, 66)) + [67, 70] + list(range(72, 83)) + list(range(84, 91))
)
assert len(COCO_CATEGORY_IDS) == 80

_ATTN = r"(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)"
_NORM = r"(weight|bias)"
# official decoder norm -> ISDA decoder norm (see the module docstring)
_OFFICIAL_DEC_NORM = {"norm1": "norm2", "norm2": "norm1", "norm3": "norm3"}
_MMDET_ENC_NORM = {"0": "norm1", "1": "norm2"}
_MMDET_DEC_NORM = {"0": "norm1", "1": "norm2", "2": "norm3"}


class ConversionError(ValueError):
    """The source cannot be mapped onto the target (layout unknown or shapes differ)."""


def detect_layout(state_dict):
    """'official' or 'mmdet' from the key names."""
    keys = list(state_dict)
    if any(k.startswith("backbone.0.body.") for k in keys) and any(
            k.startswith("transformer.") for k in keys):
        return "official"
    if any(k.startswith("bbox_head.transformer.") for k in keys):
        return "mmdet"
    raise ConversionError("not a Deformable DETR checkpoint: expected 'backbone.0.body.*' + "
                          "'transformer.*' (official) or 'bbox_head.transformer.*' (mmdetection)")


def _backbone(rest):
    try:
        name = torchvision_resnet_name(rest)
    except KeyError:
        return None
    return None if name is None else "backbone." + name


def _mapper(level, part, field):
    """Source projection level 0..3 (C3, C4, C5, extra) -> ISDA mapper name."""
    level = int(level)
    prefix = f"mapper.lateral.{level + 1}" if level < 3 else "mapper.extra.0"
    return f"{prefix}.{part}.{field}"


def official_name(key):
    """ISDA name of an official Deformable DETR key; None = no counterpart (the caller says
    why); 'class_embed' keys are returned unchanged for the class-head step."""
    m = re.fullmatch(r"backbone\.0\.body\.(.+)", key)
    if m:
        return _backbone(m.group(1))
    m = re.fullmatch(r"input_proj\.(\d)\.([01])\.(weight|bias)", key)
    if m:
        return _mapper(*m.groups())
    if key == "transformer.level_embed":
        return "level_embed"
    m = re.fullmatch(r"transformer\.reference_points\.(weight|bias)", key)
    if m:
        return f"decoder.reference_points.{m.group(1)}"
    if key == "query_embed.weight":
        return "decoder.query_embed.weight"
    m = re.fullmatch(rf"transformer\.encoder\.layers\.(\d+)\.self_attn\.{_ATTN}", key)
    if m:
        return f"encoder.layers.{m.group(1)}.self_attn.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(rf"transformer\.encoder\.layers\.(\d+)\.(norm1|norm2|linear1|linear2)\.{_NORM}",
                     key)
    if m:
        return f"encoder.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(rf"transformer\.decoder\.layers\.(\d+)\.cross_attn\.{_ATTN}", key)
    if m:
        return f"decoder.layers.{m.group(1)}.cross_attn.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(r"transformer\.decoder\.layers\.(\d+)\.self_attn\."
                     r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", key)
    if m:
        return f"decoder.layers.{m.group(1)}.self_attn.{m.group(2)}"
    m = re.fullmatch(rf"transformer\.decoder\.layers\.(\d+)\.(norm[123])\.{_NORM}", key)
    if m:
        return f"decoder.layers.{m.group(1)}.{_OFFICIAL_DEC_NORM[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(rf"transformer\.decoder\.layers\.(\d+)\.(linear1|linear2)\.{_NORM}", key)
    if m:
        return f"decoder.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    if re.fullmatch(r"class_embed\.\d+\.(weight|bias)", key):
        return key
    return None


def mmdet_name(key):
    """ISDA name of an mmdetection Deformable DETR key (see :func:`official_name`)."""
    m = re.fullmatch(r"backbone\.(.+)", key)
    if m:
        return _backbone(m.group(1))
    m = re.fullmatch(r"neck\.convs\.(\d)\.(conv|gn)\.(weight|bias)", key)
    if m:
        return _mapper(m.group(1), "0" if m.group(2) == "conv" else "1", m.group(3))
    m = re.fullmatch(r"neck\.extra_convs\.0\.(conv|gn)\.(weight|bias)", key)
    if m:
        return _mapper(3, "0" if m.group(1) == "conv" else "1", m.group(2))
    t = "bbox_head.transformer."
    if key == t + "level_embeds":
        return "level_embed"
    m = re.fullmatch(re.escape(t) + r"reference_points\.(weight|bias)", key)
    if m:
        return f"decoder.reference_points.{m.group(1)}"
    if key == "bbox_head.query_embedding.weight":
        return "decoder.query_embed.weight"
    enc = re.escape(t + "encoder.layers.")
    dec = re.escape(t + "decoder.layers.")
    m = re.fullmatch(enc + rf"(\d+)\.attentions\.0\.{_ATTN}", key)
    if m:
        return f"encoder.layers.{m.group(1)}.self_attn.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(enc + rf"(\d+)\.norms\.([01])\.{_NORM}", key)
    if m:
        return f"encoder.layers.{m.group(1)}.{_MMDET_ENC_NORM[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(re.escape(t) + rf"(encoder|decoder)\.layers\.(\d+)\.ffns\.0\.layers\."
                     rf"(0\.0|1)\.{_NORM}", key)
    if m:
        part = m.group(1)
        linear = "linear1" if m.group(3) == "0.0" else "linear2"
        return f"{part}.layers.{m.group(2)}.{linear}.{m.group(4)}"
    m = re.fullmatch(dec + r"(\d+)\.attentions\.0\.attn\."
                     r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)", key)
    if m:
        return f"decoder.layers.{m.group(1)}.self_attn.{m.group(2)}"
    m = re.fullmatch(dec + rf"(\d+)\.attentions\.1\.{_ATTN}", key)
    if m:
        return f"decoder.layers.{m.group(1)}.cross_attn.{m.group(2)}.{m.group(3)}"
    m = re.fullmatch(dec + rf"(\d+)\.norms\.([012])\.{_NORM}", key)
    if m:
        return f"decoder.layers.{m.group(1)}.{_MMDET_DEC_NORM[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"bbox_head\.cls_branches\.(\d+)\.(weight|bias)", key)
    if m:
        return f"class_embed.{m.group(1)}.{m.group(2)}"
    return None


def _unmapped_reason(key):
    if "bbox_embed" in key or "reg_branches" in key:
        return "box regression head: ISDA has no box head"
    if key.endswith("num_batches_tracked"):
        return "BatchNorm step counter: not used by FrozenBN"
    if ".fc." in key or key.startswith("fc."):
        return "ImageNet classifier"
    return "no ISDA counterpart"


def convert(source, target_shapes, num_classes):
    """Map ``source`` (a Deformable DETR state dict, either layout) onto ISDA.

    target_shapes: {ISDA name: shape} of the model to load into; num_classes: its class count.
    Returns (state_dict for ISDA, report dict). Raises :class:`ConversionError` on a shape
    mismatch or a target name that does not exist.
    """
    layout = detect_layout(source)
    rename = official_name if layout == "official" else mmdet_name
    out, mapped, unmapped, errors = {}, {}, {}, []
    class_keys = {}
    for key, value in source.items():
        name = rename(key)
        if name is None:
            unmapped[key] = _unmapped_reason(key)
            continue
        if name.startswith("class_embed."):
            class_keys[key] = name
            continue
        if name not in target_shapes:
            errors.append(f"{key} -> {name}: no such parameter in the ISDA model")
            continue
        if tuple(value.shape) != tuple(target_shapes[name]):
            errors.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target_shapes[name])}")
            continue
        out[name] = value.detach().clone()
        mapped[key] = name
    if errors:
        raise ConversionError("shapes or names do not match the ISDA model (wrong config?):\n  "
                              + "\n  ".join(errors))

    class_note = _map_class_head(source, class_keys, target_shapes, num_classes, out, mapped,
                                 unmapped)

    zero_filled = []
    for name in list(out):
        # a conv mapped without its bias (mmdetection's ConvModule + GN): bias = 0 is exact
        if name.endswith(".weight") and name.startswith("mapper."):
            bias = name[: -len("weight")] + "bias"
            if bias in target_shapes and bias not in out and out[name].dim() == 4:
                out[bias] = torch.zeros(target_shapes[bias])
                zero_filled.append(bias)

    report = {
        "layout": layout,
        "mapped": mapped,
        "unmapped_source": dict(sorted(unmapped.items())),
        "zero_filled": sorted(zero_filled),
        "target_at_init": sorted(k for k in target_shapes if k not in out),
        "class_head": class_note,
    }
    return out, report


def _map_class_head(source, class_keys, target_shapes, num_classes, out, mapped, unmapped):
    """Map the last layer's copy of the (shared) class head; returns a note for the report."""
    if not class_keys:
        return "no class head in the source"
    layers = sorted({int(n.split(".")[1]) for n in class_keys.values()})
    last = layers[-1]
    for key, name in class_keys.items():
        if int(name.split(".")[1]) != last:
            unmapped[key] = (f"class head copy of an earlier decoder layer: ISDA shares one "
                             f"head, taken from the last layer ({last})")
    src = {name.split(".")[-1]: (key, source[key]) for key, name in class_keys.items()
           if int(name.split(".")[1]) == last}
    src_classes = src["weight"][1].shape[0]
    target_w = tuple(target_shapes["heads.class_embed.weight"])
    if src_classes == num_classes:
        rows = None
        note = f"{src_classes} classes mapped directly"
    elif src_classes == 91 and num_classes == 80:
        rows = torch.tensor(COCO_CATEGORY_IDS)
        note = "80 COCO classes selected from the 91 category-id slots"
    else:
        for key, _ in src.values():
            unmapped[key] = f"class head has {src_classes} classes, the ISDA model {num_classes}"
        return f"left at init: source has {src_classes} classes, target {num_classes}"
    for field, (key, value) in src.items():
        value = value.detach().clone() if rows is None else value.detach()[rows].clone()
        name = f"heads.class_embed.{field}"
        if field == "weight" and tuple(value.shape) != target_w:
            raise ConversionError(f"{key} {tuple(value.shape)} -> {name} {target_w}")
        out[name] = value
        mapped[key] = name
    return note


def build_target_shapes(config_file, opts):
    """Build the ISDA model of ``config_file`` on the CPU -> ({name: shape}, num_classes)."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from isda import add_isda_config

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts) + ["MODEL.DEVICE", "cpu"])
    model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, cfg.MODEL.ISDA.NUM_CLASSES


def summarize(report):
    """Human-readable summary lines of a conversion report."""
    lines = [
        f"layout: {report['layout']}",
        f"mapped {len(report['mapped'])} source tensors; class head: {report['class_head']}",
        f"unmapped source keys ({len(report['unmapped_source'])}):",
    ]
    by_reason = {}
    for k, reason in report["unmapped_source"].items():
        by_reason.setdefault(reason, []).append(k)
    for reason, keys in by_reason.items():
        lines.append(f"  [{len(keys)}] {reason}: {', '.join(keys[:4])}"
                     + (" ..." if len(keys) > 4 else ""))
    if report["zero_filled"]:
        lines.append(f"conv biases set to zero (source conv has none): {report['zero_filled']}")
    groups = {}
    for k in report["target_at_init"]:
        depth = 3 if k.startswith("mapper.") else 2
        groups.setdefault(".".join(k.split(".")[:depth]), []).append(k)
    lines.append(f"ISDA keys left at init ({len(report['target_at_init'])}):")
    for g, keys in groups.items():
        lines.append(f"  {g}.* ({len(keys)})")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="Deformable DETR checkpoint (official or mmdetection)")
    parser.add_argument("output", help="output .pth for MODEL.WEIGHTS")
    parser.add_argument("--config-file", default=os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "configs", "Base-ISDA.yaml"),
        help="ISDA config of the target model (default: configs/Base-ISDA.yaml, R50, 80 classes)")
    parser.add_argument("--report", help="JSON report path (default: OUTPUT with .json)")
    parser.add_argument("--setup-file", metavar="FILE",
                        help="a Python file run first (your registrations), as for train_net.py")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, KEY VALUE pairs")
    from isda.utils.cli import parse_args_anywhere
    from isda.utils.setup_file import run_setup_file

    args = parse_args_anywhere(parser, argv)
    run_setup_file(args.setup_file)

    from isda.checkpoint import atomic_torch_save, load_checkpoint_file

    source = load_checkpoint_file(args.input)["model"]  # safe load: refuses pickled code
    shapes, num_classes = build_target_shapes(args.config_file, args.opts)
    try:
        state, report = convert(source, shapes, num_classes)
    except ConversionError as e:
        print(f"error: cannot convert {args.input}: {e}", file=sys.stderr)
        return 1
    report["source"] = os.path.basename(args.input)
    report["config"] = os.path.relpath(args.config_file)
    atomic_torch_save({"model": state}, args.output)
    report_path = args.report or os.path.splitext(args.output)[0] + ".json"
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    for line in summarize(report):
        print(line)
    print(f"wrote {args.output} ({len(state)} tensors) and {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
