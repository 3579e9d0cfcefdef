"""What the encoder keeps for the backward pass: the deformable attention's query projections
with the positional embedding passed apart (``MSDeformAttn(..., query_pos=pos)``) and the
post-norms that keep their output (``layer_norm_keeping_output``). Values and gradients against
the plain modules evaluated in float64, and which tensors are kept."""
import copy

import pytest
import torch

from isda.cpu_fast_paths import convert_to_cpu_fast_paths
from isda.layers.ms_deform_attn import MSDeformAttn

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(6, 8), (3, 4)]
C, HEADS, POINTS = 32, 4, 2


def _inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    src = torch.randn(n, s, C, generator=g)
    pos = torch.randn(n, s, C, generator=g)
    ref = torch.rand(n, s, len(SHAPES), 2, generator=g)
    return src, pos, ref


def _module(fast):
    torch.manual_seed(0)
    attn = MSDeformAttn(C, len(SHAPES), HEADS, POINTS)
    with torch.no_grad():  # non-trivial offsets and weights (the init zeroes their weights)
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    if fast:
        convert_to_cpu_fast_paths(attn, allocator=False)
    return attn


def _run(attn, src, pos, ref, apart):
    src = src.clone().requires_grad_(True)
    pos = pos.clone().requires_grad_(True)
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.int64)
    attn.zero_grad(set_to_none=True)
    if apart:
        out = attn(src, ref, src, shapes, starts, None, query_pos=pos)
    else:
        out = attn(src + pos, ref, src, shapes, starts, None)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype) - 0.5
    (out * g).sum().backward()
    return [out.detach(), src.grad, pos.grad] + [p.grad.clone() for p in attn.parameters()]


@pytest.mark.parametrize("fast", [False, True])
def test_query_pos_apart_matches_float64_sum(fast):
    attn = _module(fast)
    src, pos, ref = _inputs()
    got = _run(attn, src, pos, ref, apart=True)
    ref64 = copy.deepcopy(_module(False)).double()
    want = _run(ref64, src.double(), pos.double(), ref.double(), apart=False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_sum_of_query_and_pos_is_not_kept():
    attn = _module(False)
    src, pos, ref = _inputs()
    src.requires_grad_(True)
    pos.requires_grad_(True)
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.int64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attn(src, ref, src, shapes, starts, None, query_pos=pos)
    allowed = {src.untyped_storage().data_ptr(), pos.untyped_storage().data_ptr()}
    full = [t for t in saved if t.shape == src.shape]
    assert full and all(t.untyped_storage().data_ptr() in allowed for t in full)
    # the plain call on the sum keeps the sum (what the encoder did before)
    saved.clear()
    q = src + pos
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attn(q, ref, src, shapes, starts, None)
    assert any(t.untyped_storage().data_ptr() == q.untyped_storage().data_ptr() for t in saved)


# --------------------------------------------------------------------------------------------
# the encoder's post-norms: the backward pass keeps the LayerNorm's output, not its input
# --------------------------------------------------------------------------------------------
def _norm_grads(x, norm, fn):
    x = x.clone().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    y = fn(x, norm)
    g = torch.rand(y.shape, generator=torch.Generator().manual_seed(4)).to(y.dtype) - 0.5
    (y * g).sum().backward()
    return [y.detach(), x.grad, norm.weight.grad, norm.bias.grad]


@pytest.mark.parametrize("gain", ["random", "one_near_zero"])
def test_layer_norm_keeping_output_matches_float64_layer_norm(gain):
    from isda.modeling.transformer_blocks import layer_norm_keeping_output

    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(C)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(C) + 0.5)
        norm.bias.copy_(torch.randn(C))
        if gain == "one_near_zero":
            norm.weight[3] = 0.05
    x = torch.randn(2, 7, C) * 3 + 1
    got = _norm_grads(x, norm, layer_norm_keeping_output)
    ref = copy.deepcopy(norm).double()
    want = _norm_grads(x.double(), ref, lambda t, m: m(t))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5)


def test_layer_norm_keeping_output_keeps_no_input():
    from isda.modeling.transformer_blocks import layer_norm_keeping_output

    norm = torch.nn.LayerNorm(C)
    x = torch.randn(5, C, requires_grad=True)
    z = x * 2  # the norm's input, a fresh tensor
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer_norm_keeping_output(z, norm)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert z.untyped_storage().data_ptr() not in ptrs
    assert y.untyped_storage().data_ptr() in ptrs


# --------------------------------------------------------------------------------------------
# the value projection: recomputed in the backward pass, the attention's input kept instead
# --------------------------------------------------------------------------------------------
def _run_masked(attn, src, pos, ref, mask):
    src = src.clone().requires_grad_(True)
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.int64)
    attn.zero_grad(set_to_none=True)
    out = attn(src, ref, src, shapes, starts, mask, query_pos=pos)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype) - 0.5
    (out * g).sum().backward()
    return [out.detach(), src.grad] + [p.grad.clone() for p in attn.parameters()]


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_recomputed_value_projection_matches_float64_reference(fast, masked):
    """The compiled op with the value projection recomputed in the backward pass against the
    grid_sample reference on the plain projection, in float64 (the reference backend does not
    take the recomputing path)."""
    from isda.layers import ms_deform_attn as msda

    attn = _module(fast)
    src, pos, ref = _inputs()
    mask = None
    if masked:
        mask = torch.zeros(src.shape[:2], dtype=torch.bool)
        mask[1, -10:] = True  # the second image's last positions are padding
    assert attn._recomputes_value(src)
    got = _run_masked(attn, src, pos, ref, mask)
    ref64 = copy.deepcopy(_module(False)).double()
    backend = msda.get_backend()
    msda.set_backend("reference")
    try:
        assert not ref64._recomputes_value(src.double())
        want = _run_masked(ref64, src.double(), pos.double(), ref.double(), mask)
    finally:
        msda.set_backend(backend)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_value_projection_is_not_kept():
    attn = _module(False)
    src, pos, ref = _inputs()
    src.requires_grad_(True)
    z = src * 1.0  # the attention's input, made inside the graph as the encoder's layer input
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.int64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attn(z, ref, z, shapes, starts, None, query_pos=pos)
    value_sized = [t for t in saved if t.numel() == z.numel()
                   and t.untyped_storage().data_ptr() != z.untyped_storage().data_ptr()]
    # others of the value's size (C = 32, M = 4, L = 2, P = 2): the sampling locations
    # [N, Lq, M, L, P, 2], the attention output kept by the output projection; the op keeps the
    # value as [N, S, M, D]
    assert not [t for t in value_sized if t.shape[-2:] == (HEADS, C // HEADS)]


def test_sampling_locations_are_not_kept_by_the_encoder_form():
    attn = _module(False)
    src, pos, ref = _inputs()
    src.requires_grad_(True)
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.int64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        attn(src * 1.0, ref, src * 1.0, shapes, starts, None, query_pos=pos)
    assert saved and not [t for t in saved if t.dim() == 6]  # [N, Lq, M, L, P, 2] locations


def test_decoder_form_with_reference_gradient_matches_float64_reference():
    """Reference points with gradient (the decoder's) take the value-only recomputation; the
    gradients of queries, positions, reference points and parameters against float64."""
    from isda.layers import ms_deform_attn as msda

    def run(attn, src, pos, ref):
        src, pos, ref = (t.clone().requires_grad_(True) for t in (src, pos, ref))
        q = src[:, :7]  # 7 queries over all positions, as the decoder's queries
        shapes = torch.tensor(SHAPES, dtype=torch.int64)
        starts = torch.tensor([0, SHAPES[0][0] * SHAPES[0][1]], dtype=torch.int64)
        attn.zero_grad(set_to_none=True)
        out = attn(q, ref[:, :7], src, shapes, starts, None, query_pos=pos[:, :7])
        g = torch.rand(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype) - 0.5
        (out * g).sum().backward()
        return [out.detach(), src.grad, pos.grad, ref.grad] + [p.grad for p in attn.parameters()]

    attn = _module(False)
    src, pos, ref = _inputs()
    assert attn._recomputes_value(src)
    got = run(attn, src, pos, ref)
    backend = msda.get_backend()
    msda.set_backend("reference")
    try:
        want = run(copy.deepcopy(_module(False)).double(), src.double(), pos.double(),
                   ref.double())
    finally:
        msda.set_backend(backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)
