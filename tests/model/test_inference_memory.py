"""Inference frees what it no longer needs before the memory-heavy stages: the stride-4 map once
the mask-feature head has read it, the encoder's inputs once it has run, and the backbone maps,
the encoder memory and the mask features before the post-processing (whose full-size boolean
masks make ISDA's inference peak). Checked with weak references to the tensors themselves: a
reference still held anywhere keeps them alive."""
import weakref

import pytest
import torch

import isda.modeling.meta_arch as meta_arch
from isda_helpers import build, small_cfg, synthetic_input

pytestmark = pytest.mark.usefixtures("one_thread")


def test_tensors_are_freed_before_the_transformer_and_the_post_processing(monkeypatch):
    model = build(small_cfg())
    model.eval()
    refs, checks = {}, {}

    def keep(name, tensor):
        refs[name] = weakref.ref(tensor)

    def alive(names):
        return [n for n in names if refs[n]() is not None]

    def before_decoder(module, args):
        checks.setdefault("decoder", alive(["stride-4 map", "encoder input"]))

    hooks = [
        model.mapper.register_forward_hook(lambda m, i, out: keep("stride-4 map", out[0])),
        model.mask_head.register_forward_hook(lambda m, i, out: keep("mask features", out)),
        model.encoder.register_forward_pre_hook(lambda m, args: keep("encoder input", args[0])),
        model.encoder.register_forward_hook(lambda m, i, out: keep("encoder memory", out)),
        model.decoder.register_forward_pre_hook(before_decoder),
    ]
    real = meta_arch.instances_from_topk

    def post_processing(*args, **kwargs):
        checks.setdefault("post-processing",
                          alive(["stride-4 map", "encoder memory", "mask features"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(meta_arch, "instances_from_topk", post_processing)
    try:
        with torch.no_grad():
            results = model([synthetic_input(160, 224, with_targets=False)])
    finally:
        for h in hooks:
            h.remove()
    assert len(results) == 1 and len(results[0]["instances"]) > 0
    assert checks == {"decoder": [], "post-processing": []}, f"still alive: {checks}"


def test_training_keeps_every_map_for_inspection():
    model = build(small_cfg())
    model.train()
    out = model.forward_features([synthetic_input(160, 224)])
    assert sorted(out["maps"]) == [4, 8, 16, 32, 64]
