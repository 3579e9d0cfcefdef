"""The model is plain PyTorch (issue 29): gradients of layers with a zero norm gain against
float64 references written here with ``torch.nn.functional``; the module tree of a model built
with every option holds no ISDA layer class but the deformable attention; building and running a
model leaves process-wide state alone, and no source in ``isda/`` or ``ops/`` hooks an allocator."""
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from isda.layers.ms_deform_attn import MSDeformAttn, ms_deform_attn_reference
from isda.modeling.channel_mapper import ChannelMapper
from isda.modeling.deformable_encoder import DeformableEncoderLayer
from isda_helpers import build, small_cfg, synthetic_input

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(6, 8), (3, 4)]
C, HEADS, POINTS = 16, 2, 2


def _reference_encoder_layer(p, src, pos, ref, shapes, starts):
    """DeformableEncoderLayer's forward (no dropout) from its parameters ``p`` (name ->
    tensor), with F.linear, F.layer_norm and the grid_sample attention."""
    n, s, _ = src.shape
    levels = len(SHAPES)
    q = src + pos
    value = F.linear(src, p["self_attn.value_proj.weight"], p["self_attn.value_proj.bias"])
    offsets = F.linear(q, p["self_attn.sampling_offsets.weight"],
                       p["self_attn.sampling_offsets.bias"]).view(n, s, HEADS, levels, POINTS, 2)
    logits = F.linear(q, p["self_attn.attention_weights.weight"],
                      p["self_attn.attention_weights.bias"])
    weights = logits.view(n, s, HEADS, levels * POINTS).softmax(-1)
    wh = torch.tensor([[w, h] for h, w in SHAPES], dtype=src.dtype)
    loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    attn = ms_deform_attn_reference(value.view(n, s, HEADS, C // HEADS), shapes, starts, loc,
                                    weights.view(n, s, HEADS, levels, POINTS))
    attn = F.linear(attn, p["self_attn.output_proj.weight"], p["self_attn.output_proj.bias"])
    x = F.layer_norm(src + attn, (C,), p["norm1.weight"], p["norm1.bias"], 1e-5)
    h = F.linear(F.relu(F.linear(x, p["linear1.weight"], p["linear1.bias"])),
                 p["linear2.weight"], p["linear2.bias"])
    return F.layer_norm(x + h, (C,), p["norm2.weight"], p["norm2.bias"], 1e-5)


def test_encoder_layer_gradients_with_a_zero_layer_norm_gain():
    """A LayerNorm gain of 0 (and one below 1e-4): input and weight gradients as float64 autograd
    of the functional composition. The former from-output LayerNorm rebuilt its input by
    dividing by the gain clamped to 1e-4 and got these gradients wrong."""
    torch.manual_seed(0)
    layer = DeformableEncoderLayer(C, 32, dropout=0.0, n_levels=len(SHAPES), n_heads=HEADS,
                                   n_points=POINTS).train()
    with torch.no_grad():
        for prm in layer.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
        layer.norm1.weight[:3] = 0.0
        layer.norm1.weight[3] = 1e-6
        layer.norm2.weight[5] = 0.0
    shapes = torch.tensor(SHAPES)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]])
    s = sum(h * w for h, w in SHAPES)
    g = torch.Generator().manual_seed(1)
    src, pos = torch.randn(2, s, C, generator=g), torch.randn(2, s, C, generator=g)
    ref = torch.rand(2, s, len(SHAPES), 2, generator=g)
    grad_out = torch.randn(2, s, C, generator=g)

    x = src.clone().requires_grad_()
    layer(x, pos, ref, shapes, starts, None).backward(grad_out)
    got = {"src": x.grad, **{k: v.grad for k, v in layer.named_parameters()}}

    params = {k: v.detach().double().requires_grad_() for k, v in layer.named_parameters()}
    x64 = src.double().requires_grad_()
    out = _reference_encoder_layer(params, x64, pos.double(), ref.double(), shapes, starts)
    out.backward(grad_out.double())
    want = {"src": x64.grad, **{k: v.grad for k, v in params.items()}}
    assert want["norm1.weight"][:4].abs().min() > 1e-3  # the zero gains do get gradients
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-4, atol=1e-5, msg=k)


def test_channel_mapper_gradients_with_a_zero_group_norm_gain():
    """The GroupNorm twin: a gain of 0 in the channel mapper's GroupNorm, gradients against
    float64 F.conv2d + F.group_norm."""
    torch.manual_seed(0)
    mapper = ChannelMapper([8, 16], out_channels=16, num_extra=1, gn_groups=4)
    with torch.no_grad():
        mapper.lateral[0][1].weight[:2] = 0.0
        mapper.extra[0][1].weight[7] = 0.0
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(2, 8, 12, 10, generator=g), torch.randn(2, 16, 6, 5, generator=g)]
    grads_out = [torch.randn(2, 16, 12, 10, generator=g), torch.randn(2, 16, 6, 5, generator=g),
                 torch.randn(2, 16, 3, 3, generator=g)]
    ins = [f.clone().requires_grad_() for f in feats]
    torch.autograd.backward(mapper(ins), grads_out)
    got = [t.grad for t in ins] + [p.grad for p in mapper.parameters()]

    params = [p.detach().double().requires_grad_() for p in mapper.parameters()]
    named = dict(zip([n for n, _ in mapper.named_parameters()], params))
    ins64 = [f.double().requires_grad_() for f in feats]

    def conv_gn(x, prefix, stride=1, padding=0):
        y = F.conv2d(x, named[prefix + "0.weight"], named[prefix + "0.bias"], stride, padding)
        return F.group_norm(y, 4, named[prefix + "1.weight"], named[prefix + "1.bias"], 1e-5)

    outs = [conv_gn(ins64[0], "lateral.0."), conv_gn(ins64[1], "lateral.1."),
            conv_gn(ins64[1], "extra.0.", 2, 1)]
    torch.autograd.backward(outs, [t.double() for t in grads_out])
    want = [t.grad for t in ins64] + [p.grad for p in params]
    assert want[2 + list(named).index("lateral.0.1.weight")][:2].abs().min() > 1e-3
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=str(i))


# every option the shipped configs and the documented switches use
OPTIONS = [
    (),
    ("MODEL.ISDA.TWO_STAGE", True, "MODEL.ISDA.DENSE_LOSS_WEIGHT", 1.0,
     "MODEL.ISDA.AUX_GROUPS", 1, "MODEL.ISDA.AUX_GROUP_REPEATS", 2,
     "MODEL.ISDA.ENCODER_CHECKPOINT", True, "MODEL.ISDA.TEST.PRECISION", "bf16"),
    ("MODEL.ISDA.MASK_FEATURE_SOURCE", "encoder", "MODEL.ISDA.MASK_STRIDE", 8,
     "MODEL.ISDA.DENSE_LOSS_WEIGHT", 1.0, "MODEL.ISDA.KERNEL_REF_POINTS", False,
     "MODEL.ISDA.MASK_COORDS", False, "MODEL.RESNETS.NORM", "GN"),
    ("MODEL.ISDA.MASK_STRIDE", 2, "MODEL.ISDA.DROPOUT", 0.1),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=["default", "two_stage_aux_dense_ckpt_bf16",
                                               "encoder_features_stride8", "stride2_dropout"])
def test_module_tree_holds_no_isda_layer_but_the_attention(opts):
    model = build(small_cfg(*opts))
    kinds = {type(m) for m in model.modules()}
    from_layers = {k for k in kinds if k.__module__.startswith("isda.layers")}
    assert from_layers == {MSDeformAttn}, from_layers
    assert not any(k.__module__.startswith("isda.cpu_fast_paths") for k in kinds)


def _process_state():
    return {
        "environ": dict(os.environ),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "default_dtype": torch.get_default_dtype(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "grad": torch.is_grad_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "isda_extensions": sorted(m for m in sys.modules if m.startswith("isda._")),
    }


def test_building_and_running_a_model_changes_no_process_wide_state():
    import isda.layers.ms_deform_attn  # noqa: F401  (loads isda._C first: not the model's doing)

    before = _process_state()
    for opts in OPTIONS[:2]:
        model = build(small_cfg(*opts)).train()
        losses = model([synthetic_input(64, 96, seed=1)])
        sum(losses.values()).backward()
        model.eval()
        with torch.no_grad():
            model([synthetic_input(64, 96, with_targets=False)])
    assert _process_state() == before
    assert before["isda_extensions"] in ([], ["isda._C"])


def test_no_source_hooks_an_allocator_or_glibc():
    """Nothing in isda/ or ops/ replaces torch's allocator or tunes glibc's malloc (the former
    block cache installed itself with c10::SetCPUAllocator, the "keep" policy with mallopt)."""
    pattern = re.compile(r"SetCPUAllocator|SetAllocator|mallopt|malloc_trim|"
                         r"CUDAPluggableAllocator|change_current_allocator|LD_PRELOAD")
    hits = []
    for folder in ("isda", "ops"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".cpp", ".h", ".cu", ".cuh", ".c"):
                for i, line in enumerate(path.read_text().splitlines(), 1):
                    if pattern.search(line):
                        hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits
