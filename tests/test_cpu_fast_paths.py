"""The CPU fast paths are one explicit conversion of the plain model: the paper's modules
(nn.Linear, nn.Dropout) are swapped for their fast twins and back, with the same parameters,
state dict and (up to float rounding) outputs."""
import torch
from torch import nn
from torch.nn import functional as F

from isda.cpu_fast_paths import (FastActivationDropout, convert_to_cpu_fast_paths,
                                 convert_to_plain, fast_path_modules)
from isda.layers.dropout import FastDropout
from isda.layers.token_linear import TokenLinear
from isda.modeling.transformer_blocks import ActivationDropout
from test_model_helpers import build, small_cfg, synthetic_input

FAST_TYPES = (TokenLinear, FastDropout, FastActivationDropout)


def _infer(model, inputs):
    model.eval()
    with torch.no_grad():
        return [o["instances"] for o in model(inputs)]


def test_plain_model_has_no_fast_modules(one_thread):
    model = build(small_cfg("MODEL.CPU_FAST_PATHS", False))
    assert fast_path_modules(model) == []
    assert not any(isinstance(m, FAST_TYPES) for m in model.modules())


def test_conversion_swaps_exactly_the_transformer_token_layers(one_thread):
    model = build(small_cfg("MODEL.CPU_FAST_PATHS", False))
    params = {k: v for k, v in model.state_dict().items()}
    convert_to_cpu_fast_paths(model, allocator=False)
    names = set(fast_path_modules(model))
    linears = {n for n in names if isinstance(model.get_submodule(n), TokenLinear)}
    # every projection of every deformable attention and both FFN layers of every layer
    per_attn = {"sampling_offsets", "attention_weights", "value_proj", "output_proj"}
    expected = set()
    for prefix, attn in (("encoder.layers", "self_attn"), ("decoder.layers", "cross_attn")):
        layers = model.get_submodule(prefix)
        for i in range(len(layers)):
            expected |= {f"{prefix}.{i}.{attn}.{p}" for p in per_attn}
            expected |= {f"{prefix}.{i}.linear1", f"{prefix}.{i}.linear2"}
    assert linears == expected
    # heads and reference points stay plain nn.Linear (few rows)
    assert type(model.get_submodule("decoder.reference_points")) is nn.Linear
    assert all(isinstance(model.get_submodule(n), (FastDropout, FastActivationDropout))
               for n in names - linears)
    after = model.state_dict()
    assert after.keys() == params.keys()
    assert all(after[k] is params[k] or torch.equal(after[k], params[k]) for k in params)


def test_fast_and_plain_models_agree_and_convert_back(one_thread):
    plain = build(small_cfg("MODEL.CPU_FAST_PATHS", False))
    inputs = [synthetic_input(96, 128, with_targets=False, seed=3)]
    ref = _infer(plain, inputs)
    convert_to_cpu_fast_paths(plain, allocator=False)
    fast = _infer(plain, inputs)
    for a, b in zip(ref, fast):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-5)
        assert torch.equal(a.pred_classes, b.pred_classes)
    convert_to_plain(plain)
    assert fast_path_modules(plain) == []
    again = _infer(plain, inputs)
    for a, b in zip(ref, again):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_masks, b.pred_masks)


def test_fast_activation_dropout_is_relu_then_dropout():
    torch.manual_seed(0)
    x = torch.randn(4000, dtype=torch.float64)
    layer = ActivationDropout("relu", 0.25)
    layer.__class__ = FastActivationDropout
    layer.dropout.__class__ = FastDropout
    layer.train()
    out = layer(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], F.relu(x)[kept] * (1.0 / 0.75), rtol=0, atol=0)
    assert not kept[x <= 0].any()
    dropped = ((x > 0) & ~kept).double().mean().item()
    assert 0.2 < dropped / (x > 0).double().mean().item() < 0.3
    layer.eval()
    assert torch.equal(layer(x), F.relu(x))
