"""Checkpoint converters: torchvision ResNet and Deformable DETR weights into ISDA's layout."""
import argparse
import os
import pickle
import re

import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone

from isda_helpers import config_from, tool_module
from isda.checkpoint import ISDACheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_tool, _isda_cfg = tool_module, config_from


# --------------------------------------------------------------------------- torchvision ResNet
def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * 0.1
            m.running_mean.data = torch.randn(n, generator=g) * 0.1
            m.running_var.data = torch.rand(n, generator=g) + 0.5


@pytest.fixture(scope="module")
def isda_r50():
    torch.manual_seed(0)
    return build_model(_isda_cfg("Base-ISDA.yaml"))


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_resnet_converter_matches_features(tmp_path, depth, isda_r50):
    import torchvision

    tool = _tool("convert_torchvision_resnet")
    torch.manual_seed(0)
    tv = getattr(torchvision.models, f"resnet{depth}")(weights=None).eval()
    _randomize_bn(tv)
    src = str(tmp_path / "tv.pth")
    torch.save(tv.state_dict(), src)
    out = str(tmp_path / f"R-{depth}.pkl")
    assert tool.main([src, out]) == 0
    with open(out, "rb") as f:
        raw = pickle.load(f)
    assert raw["__author__"] == "torchvision" and raw["matching_heuristics"] is True
    assert "res2.0.conv1.norm.running_var" in raw["model"]
    assert not any(k.startswith("fc") for k in raw["model"])
    assert all(isinstance(v, np.ndarray) for v in raw["model"].values())

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    ISDACheckpointer(d2).load(out)
    loaded = d2.state_dict()
    for name, value in raw["model"].items():
        assert torch.equal(loaded[name], torch.from_numpy(value)), name

    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = d2(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for i in range(1, 5):
            y = getattr(tv, f"layer{i}")(y)
            torch.testing.assert_close(feats[f"res{i + 1}"], y, rtol=1e-4, atol=1e-4)

    if depth == 50:  # as MODEL.WEIGHTS of the full ISDA R50 model (name matching heuristics)
        # a backbone only: a partial load, as training does it (strict loading refuses it)
        ISDACheckpointer(isda_r50, allow_partial=True).load(out)
        state = isda_r50.state_dict()
        for name, value in raw["model"].items():
            assert torch.equal(state["backbone." + name], torch.from_numpy(value)), name


# --------------------------------------------------------------------------- Deformable DETR
def _tv_name(rest):
    """Detectron2 ResNet name (without 'backbone.') -> torchvision name (test-side inverse)."""
    if rest == "stem.conv1.weight":
        return "conv1.weight"
    m = re.fullmatch(r"stem\.conv1\.norm\.(\w+)", rest)
    if m:
        return f"bn1.{m.group(1)}"
    m = re.fullmatch(r"res(\d)\.(\d+)\.(.+)", rest)
    layer, block, tail = int(m.group(1)) - 1, m.group(2), m.group(3)
    tail = re.sub(r"^conv(\d)\.weight$", r"conv\1.weight", tail)
    tail = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", tail)
    tail = tail.replace("shortcut.norm.", "downsample.1.").replace("shortcut.weight",
                                                                   "downsample.0.weight")
    return f"layer{layer}.{block}.{tail}"


def _official_source_name(isda):
    """ISDA name -> official Deformable DETR name (None: no source). Written independently of
    the converter, from the public key list."""
    if isda.startswith("backbone."):
        return "backbone.0.body." + _tv_name(isda[len("backbone."):])
    m = re.fullmatch(r"mapper\.lateral\.(\d)\.(.+)", isda)
    if m:
        return None if m.group(1) == "0" else f"input_proj.{int(m.group(1)) - 1}.{m.group(2)}"
    if isda.startswith("mapper.extra.0."):
        return "input_proj.3." + isda[len("mapper.extra.0."):]
    if isda == "level_embed":
        return "transformer.level_embed"
    if isda.startswith("decoder.reference_points."):
        return "transformer." + isda[len("decoder."):]
    if isda == "decoder.query_embed.weight":
        return "query_embed.weight"
    if isda.startswith("encoder."):
        return "transformer." + isda
    m = re.fullmatch(r"decoder\.layers\.(\d+)\.norm([12])\.(\w+)", isda)
    if m:
        other = {"1": "2", "2": "1"}[m.group(2)]
        return f"transformer.decoder.layers.{m.group(1)}.norm{other}.{m.group(3)}"
    if isda.startswith("decoder.layers."):
        return "transformer." + isda
    return None  # heads (class head handled separately), kernel MLP, mask head


def _mmdet_source_name(isda, neck_bias):
    if isda.startswith("backbone."):
        return "backbone." + _tv_name(isda[len("backbone."):])
    m = re.fullmatch(r"mapper\.(lateral|extra)\.(\d)\.([01])\.(\w+)", isda)
    if m:
        kind, lvl, part, field = m.groups()
        if kind == "lateral" and lvl == "0":
            return None
        base = f"neck.convs.{int(lvl) - 1}" if kind == "lateral" else "neck.extra_convs.0"
        if part == "0" and field == "bias" and not neck_bias:
            return None
        return f"{base}.{'conv' if part == '0' else 'gn'}.{field}"
    t = "bbox_head.transformer."
    if isda == "level_embed":
        return t + "level_embeds"
    if isda.startswith("decoder.reference_points."):
        return t + isda[len("decoder."):]
    if isda == "decoder.query_embed.weight":
        return "bbox_head.query_embedding.weight"
    m = re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", isda)
    if not m:
        return None
    part, i, rest = m.groups()
    p = f"{t}{part}.layers.{i}."
    rest = re.sub(r"^linear1\.", "ffns.0.layers.0.0.", rest)
    rest = re.sub(r"^linear2\.", "ffns.0.layers.1.", rest)
    rest = re.sub(r"^norm(\d)\.", lambda n: f"norms.{int(n.group(1)) - 1}.", rest)
    if part == "encoder":
        rest = rest.replace("self_attn.", "attentions.0.")
    else:
        rest = rest.replace("self_attn.", "attentions.0.attn.").replace("cross_attn.",
                                                                         "attentions.1.")
    return p + rest


def _make_source(target, layout, neck_bias=False):
    """Synthetic Deformable DETR state dict (public key names, realistic shapes) + the ISDA
    name each mapped source key must land at."""
    g = torch.Generator().manual_seed(1)
    src, expected = {}, {}
    for name, value in target.items():
        key = (_official_source_name(name) if layout == "official"
               else _mmdet_source_name(name, neck_bias))
        if key is None:
            continue
        src[key] = torch.randn(value.shape, generator=g)
        expected[key] = name
    n_cls = 91 if layout == "official" else 80
    head = {"weight": torch.randn(n_cls, 256, generator=g), "bias": torch.randn(n_cls, generator=g)}
    for i in range(6):  # six references to one shared head, as saved without box refinement
        for f in ("weight", "bias"):
            key = f"class_embed.{i}.{f}" if layout == "official" else f"bbox_head.cls_branches.{i}.{f}"
            src[key] = head[f]
        for j, (a, b) in enumerate([(256, 256), (256, 256), (256, 4)]):
            prefix = f"bbox_embed.{i}.layers.{j}" if layout == "official" \
                else f"bbox_head.reg_branches.{i}.{2 * j}"
            src[prefix + ".weight"] = torch.randn(b, a, generator=g)
            src[prefix + ".bias"] = torch.randn(b, generator=g)
    if layout == "mmdet":
        for k in [k for k in src if k.startswith("backbone.") and k.endswith("running_var")]:
            src[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(100)
    return src, expected, head


def _expected_at_init(target, neck_bias=True):
    at_init = {k for k in target if k.startswith(("mapper.lateral.0.", "heads.kernel_embed.",
                                                  "mask_head."))}
    return at_init


@pytest.mark.parametrize("layout,neck_bias", [("official", True), ("mmdet", False),
                                              ("mmdet", True)])
def test_deformable_detr_converter_maps_every_key(isda_r50, layout, neck_bias):
    tool = _tool("convert_deformable_detr")
    target = isda_r50.state_dict()
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    src, expected, head = _make_source(target, layout, neck_bias)
    out, report = tool.convert(src, shapes, num_classes=80)

    assert report["layout"] == layout
    for key, name in expected.items():
        assert report["mapped"][key] == name
        assert torch.equal(out[name], src[key]), key
    # nothing but the expected ISDA keys stays at init
    assert set(report["target_at_init"]) == _expected_at_init(target)
    zero = set(report["zero_filled"])
    if layout == "mmdet" and not neck_bias:
        assert zero == {f"mapper.lateral.{i}.0.bias" for i in (1, 2, 3)} | {"mapper.extra.0.0.bias"}
        assert all(torch.count_nonzero(out[k]) == 0 for k in zero)
    else:
        assert not zero
    # every source key is either mapped or reported
    assert set(report["mapped"]) | set(report["unmapped_source"]) == set(src)
    unmapped = set(report["unmapped_source"])
    box = {k for k in src if "bbox_embed" in k or "reg_branches" in k}
    cls_dupes = {k for k in src if re.search(r"(class_embed|cls_branches)\.[0-4]\.", k)}
    counters = {k for k in src if k.endswith("num_batches_tracked")}
    assert unmapped == box | cls_dupes | counters

    # class head: the last layer's copy, reduced to the 80 COCO ids for the official 91 slots
    w = out["heads.class_embed.weight"]
    assert w.shape == (80, 256)
    if layout == "official":
        assert torch.equal(w[0], head["weight"][1])  # person = id 1
        assert torch.equal(w[11], head["weight"][13])  # stop sign = id 13 (id 12 unused)
        assert torch.equal(w[79], head["weight"][90])  # toothbrush = id 90
        assert torch.equal(out["heads.class_embed.bias"][56], head["bias"][62])  # chair = id 62
    else:
        assert torch.equal(w, head["weight"])


def test_deformable_detr_converter_explicit_names(isda_r50):
    """A few hand-checked pairs, independent of the test-side inverse mapping."""
    tool = _tool("convert_deformable_detr")
    official = {
        "backbone.0.body.conv1.weight": "backbone.stem.conv1.weight",
        "backbone.0.body.bn1.running_mean": "backbone.stem.conv1.norm.running_mean",
        "backbone.0.body.layer1.0.downsample.1.running_var": "backbone.res2.0.shortcut.norm.running_var",
        "backbone.0.body.layer4.2.bn3.weight": "backbone.res5.2.conv3.norm.weight",
        "input_proj.0.0.weight": "mapper.lateral.1.0.weight",
        "input_proj.2.1.bias": "mapper.lateral.3.1.bias",
        "input_proj.3.0.weight": "mapper.extra.0.0.weight",
        "transformer.level_embed": "level_embed",
        "transformer.reference_points.weight": "decoder.reference_points.weight",
        "query_embed.weight": "decoder.query_embed.weight",
        "transformer.encoder.layers.5.self_attn.sampling_offsets.bias":
            "encoder.layers.5.self_attn.sampling_offsets.bias",
        "transformer.decoder.layers.3.norm1.weight": "decoder.layers.3.norm2.weight",
        "transformer.decoder.layers.3.norm2.bias": "decoder.layers.3.norm1.bias",
        "transformer.decoder.layers.0.self_attn.in_proj_weight":
            "decoder.layers.0.self_attn.in_proj_weight",
    }
    mmdet = {
        "backbone.layer3.5.conv2.weight": "backbone.res4.5.conv2.weight",
        "neck.convs.1.gn.weight": "mapper.lateral.2.1.weight",
        "neck.extra_convs.0.conv.weight": "mapper.extra.0.0.weight",
        "bbox_head.transformer.level_embeds": "level_embed",
        "bbox_head.query_embedding.weight": "decoder.query_embed.weight",
        "bbox_head.transformer.encoder.layers.1.ffns.0.layers.0.0.weight":
            "encoder.layers.1.linear1.weight",
        "bbox_head.transformer.encoder.layers.1.norms.1.bias": "encoder.layers.1.norm2.bias",
        "bbox_head.transformer.decoder.layers.2.attentions.0.attn.out_proj.weight":
            "decoder.layers.2.self_attn.out_proj.weight",
        "bbox_head.transformer.decoder.layers.2.attentions.1.value_proj.weight":
            "decoder.layers.2.cross_attn.value_proj.weight",
        "bbox_head.transformer.decoder.layers.2.ffns.0.layers.1.bias": "decoder.layers.2.linear2.bias",
        "bbox_head.transformer.decoder.layers.2.norms.2.weight": "decoder.layers.2.norm3.weight",
    }
    target = isda_r50.state_dict()
    for names, fn in [(official, tool.official_name), (mmdet, tool.mmdet_name)]:
        for src, dst in names.items():
            assert fn(src) == dst, src
            assert dst in target, dst
    assert tool.official_name("bbox_embed.0.layers.2.weight") is None
    assert tool.mmdet_name("bbox_head.reg_branches.0.4.weight") is None


def test_deformable_detr_converter_refuses_shape_mismatch(isda_r50):
    tool = _tool("convert_deformable_detr")
    target = isda_r50.state_dict()
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    src, _, _ = _make_source(target, "official")
    src["query_embed.weight"] = torch.zeros(100, 512)
    with pytest.raises(tool.ConversionError, match="query_embed.weight"):
        tool.convert(src, shapes, num_classes=80)


def test_deformable_detr_converter_other_class_count_left_at_init(isda_r50):
    tool = _tool("convert_deformable_detr")
    target = isda_r50.state_dict()
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    shapes["heads.class_embed.weight"], shapes["heads.class_embed.bias"] = (1, 256), (1,)
    src, _, _ = _make_source(target, "official")
    out, report = tool.convert(src, shapes, num_classes=1)
    assert "heads.class_embed.weight" not in out
    assert {"heads.class_embed.weight", "heads.class_embed.bias"} <= set(report["target_at_init"])
    assert "class_embed.5.weight" in report["unmapped_source"]


def test_deformable_detr_converter_cli_output_loads(isda_r50, tmp_path):
    tool = _tool("convert_deformable_detr")
    src, expected, _ = _make_source(isda_r50.state_dict(), "official")
    path = str(tmp_path / "r50_deformable_detr-checkpoint.pth")
    torch.save({"model": src, "args": argparse.Namespace(num_feature_levels=4, two_stage=False),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 49}, path)
    out = str(tmp_path / "isda_init.pth")
    assert tool.main([path, out, "--config-file", os.path.join(ROOT, "configs", "Base-ISDA.yaml"),
                      "--opts", "MODEL.WEIGHTS", ""]) == 0
    import json

    report = json.load(open(str(tmp_path / "isda_init.json")))
    assert report["target_at_init"] == sorted(_expected_at_init(isda_r50.state_dict()))
    ISDACheckpointer(isda_r50, allow_partial=True).load(out)  # P2, mask head, kernels at init
    state = isda_r50.state_dict()
    for key, name in expected.items():
        assert torch.equal(state[name], src[key]), key
