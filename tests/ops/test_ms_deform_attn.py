"""Multi-scale deformable attention: the compiled op against the grid_sample reference, the
reference against hand-computed values, gradients, determinism, dtypes, edge cases, validation,
fallback, the module and the fvcore FLOP handle."""
import warnings

import pytest
import torch

import isda.layers.ms_deform_attn as msda
import isda.layers.ms_deform_attn_backend as msda_backend
from isda.layers.ms_deform_attn import (
    MSDeformAttn,
    flop_count_handles,
    ms_deform_attn,
    ms_deform_attn_reference,
    set_backend,
)

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent


def _levels(hw):
    shapes = torch.tensor(hw, dtype=torch.int64).view(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def _inputs(hw, N=2, Lq=5, M=2, D=4, P=2, dtype=torch.float64, seed=0, borders=True):
    """Random inputs; locations in [-0.3, 1.3] with a share exactly on 0, 1 and pixel edges."""
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = _levels(hw)
    L = shapes.shape[0]
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    loc = torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    if borders:
        # pixel edges of each level (k / W, k / H), and the map borders 0 and 1
        for lvl, (H, W) in enumerate(shapes.tolist()):
            for axis, size in ((0, W), (1, H)):
                sel = torch.rand(N, Lq, M, P, generator=g) < 0.3
                k = torch.randint(0, size + 1, (N, Lq, M, P), generator=g).to(dtype) / size
                plane = loc[:, :, :, lvl, :, axis]
                plane[sel] = k[sel]
        loc.view(-1)[::7] = 0.0
        loc.view(-1)[3::11] = 1.0
    attn = torch.rand(N, Lq, M, L, P, generator=g, dtype=dtype)
    return value, shapes, starts, loc, attn


def _smooth_locations(shapes, N, Lq, M, P, dtype=torch.float64, seed=0):
    """Locations whose pixel coordinates are >= 0.1 away from integers (bilinear is smooth
    there), spanning one pixel beyond every border."""
    g = torch.Generator().manual_seed(seed)
    L = shapes.shape[0]
    loc = torch.empty(N, Lq, M, L, P, 2, dtype=dtype)
    for lvl, (H, W) in enumerate(shapes.tolist()):
        for axis, size in ((0, W), (1, H)):
            k = torch.randint(-1, size + 1, (N, Lq, M, P), generator=g).to(dtype)
            u = torch.rand(N, Lq, M, P, generator=g, dtype=dtype) * 0.8 + 0.1
            loc[:, :, :, lvl, :, axis] = (k + u + 0.5) / size
    return loc


def compiled(*args):
    with set_backend("compiled"):
        return ms_deform_attn(*args)


# ------------------------------------------------------------------------------------------
# the reference is right on its own
# ------------------------------------------------------------------------------------------
def _hand_case():
    # level 0: 2x2 map [[1, 2], [3, 4]]; level 1: 1x1 map [10]; one head, one channel
    value = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64).view(1, 5, 1, 1)
    shapes = torch.tensor([[2, 2], [1, 1]])
    starts = torch.tensor([0, 4])
    # (x, y) per point; pixel coordinate = loc * size - 0.5
    pts0 = [[0.5, 0.5],     # centre of the map: mean of all four = 2.5
            [0.25, 0.25],   # centre of pixel (0, 0) = 1
            [0.375, 0.75],  # x = 0.25, y = 1: 0.75 * 3 + 0.25 * 4 = 3.25
            [0.0, 0.25]]    # x = -0.5 (half a pixel outside), y = 0: 0.5 * 1 = 0.5
    pts1 = [[0.5, 0.5],     # the only pixel: 10
            [1.0, 0.5],     # x = 0.5: half outside: 5
            [-0.6, 0.5],    # x = -1.1: more than one pixel outside: 0
            [1.25, 1.25]]   # x = y = 0.75: 0.25 * 0.25 * 10 = 0.625
    loc = torch.tensor([pts0, pts1], dtype=torch.float64).view(1, 1, 1, 2, 4, 2)
    attn = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]],
                        dtype=torch.float64).view(1, 1, 1, 2, 4)
    expected = (0.1 * 2.5 + 0.2 * 1 + 0.3 * 3.25 + 0.4 * 0.5
                + 0.5 * 10 + 0.6 * 5 + 0.7 * 0 + 0.8 * 0.625)
    return (value, shapes, starts, loc, attn), expected


def test_reference_matches_hand_computed_case():
    args, expected = _hand_case()
    out = ms_deform_attn_reference(*args)
    assert out.shape == (1, 1, 1)
    assert abs(out.item() - expected) < 1e-12


def test_compiled_matches_hand_computed_case():
    args, expected = _hand_case()
    assert abs(compiled(*args).item() - expected) < 1e-12


# ------------------------------------------------------------------------------------------
# forward and backward against the float64 reference
# ------------------------------------------------------------------------------------------
CASES = [
    # levels (H, W)...,                          N, Lq, M, D, P
    ([(1, 1)],                                   2, 5, 2, 1, 1),
    ([(3, 5)],                                   1, 7, 3, 30, 4),
    ([(13, 19)],                                 2, 6, 1, 71, 1),
    ([(13, 19), (3, 5), (1, 1), (4, 4)],         2, 9, 2, 32, 4),
    ([(7, 9), (4, 5), (2, 3), (1, 1)],           1, 4, 2, 64, 4),
    ([(3, 5), (1, 1), (13, 19), (2, 2)],         2, 3, 3, 71, 1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[1:])))
def test_forward_backward_match_reference(case):
    hw, N, Lq, M, D, P = case
    value, shapes, starts, loc, attn = _inputs(hw, N, Lq, M, D, P, seed=len(hw) * 100 + D)
    ref_in = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref = ms_deform_attn_reference(ref_in[0], shapes, starts, ref_in[1], ref_in[2])
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)
    ref_grads = [t.grad for t in ref_in]

    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        ins = [t.to(dtype).requires_grad_() for t in (value, loc, attn)]
        out = compiled(ins[0], shapes, starts, ins[1], ins[2])
        assert out.dtype == dtype and out.shape == (N, Lq, M * D)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        out.backward(grad_out.to(dtype))
        if dtype == torch.float64:
            # loc gradients are non-smooth exactly on pixel edges; ours follows grid_sample there
            for got, want in zip(ins, ref_grads):
                torch.testing.assert_close(got.grad, want, rtol=1e-9, atol=1e-9)


def test_gradcheck_compiled_float64():
    shapes, starts, S = _levels([(3, 4), (2, 2), (1, 1)])
    N, Lq, M, D, P = 2, 3, 2, 3, 2
    g = torch.Generator().manual_seed(1)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64, requires_grad=True)
    loc = _smooth_locations(shapes, N, Lq, M, P).requires_grad_()
    attn = torch.rand(N, Lq, M, 3, P, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(v, lo, a):
        return torch.ops.isda.ms_deform_attn(v, shapes, starts, lo, a)

    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_reference_float64():
    shapes, starts, S = _levels([(3, 4), (1, 1)])
    g = torch.Generator().manual_seed(2)
    value = torch.randn(1, S, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    loc = _smooth_locations(shapes, 1, 3, 2, 2, seed=2).requires_grad_()
    attn = torch.rand(1, 3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda v, lo, a: ms_deform_attn_reference(v, shapes, starts, lo, a)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# determinism
# ------------------------------------------------------------------------------------------
def _run_fwd_bwd(args, grad_out):
    value, shapes, starts, loc, attn = args
    ins = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = compiled(ins[0], shapes, starts, ins[1], ins[2])
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in ins]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bit_identical_across_runs_and_thread_counts(dtype):
    # many queries on small maps: lots of sample points share grad_value corners
    args = _inputs([(5, 7), (3, 3), (1, 2)], N=2, Lq=300, M=3, D=16, P=4, dtype=dtype, seed=3)
    grad_out = torch.randn(2, 300, 48, dtype=dtype, generator=torch.Generator().manual_seed(4))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_fwd_bwd(args, grad_out)
        torch.set_num_threads(2)
        two = _run_fwd_bwd(args, grad_out)
        again = _run_fwd_bwd(args, grad_out)
    finally:
        torch.set_num_threads(previous)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)


# ------------------------------------------------------------------------------------------
# dtypes, layouts, edge cases
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_accepted(dtype):
    value, shapes, starts, loc, attn = _inputs([(6, 5), (3, 2)], N=1, Lq=4, M=2, D=8, P=2, seed=5)
    ref = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    ins = [t.to(dtype).requires_grad_() for t in (value, loc, attn)]
    out = compiled(ins[0], shapes, starts, ins[1], ins[2])
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)
    out.float().sum().backward()
    for t in ins:
        assert t.grad is not None and t.grad.dtype == dtype and torch.isfinite(t.grad).all()
    # AMP-style mixed inputs: half value, float32 locations/weights -> promoted float32 output
    mixed = compiled(value.to(dtype), shapes, starts, loc.float(), attn.float())
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed.double(), ref, rtol=5e-2, atol=5e-2)


def test_non_contiguous_inputs():
    value, shapes, starts, loc, attn = _inputs([(4, 6), (2, 3)], N=2, Lq=5, M=2, D=6, P=3, seed=6)
    expected = compiled(value, shapes, starts, loc, attn)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.flip(-1).contiguous().flip(-1)
    attn_nc = attn.transpose(0, 1).contiguous().transpose(0, 1)
    assert not value_nc.is_contiguous() and not attn_nc.is_contiguous()
    torch.testing.assert_close(compiled(value_nc, shapes, starts, loc_nc, attn_nc), expected,
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["compiled", "reference"])
@pytest.mark.parametrize("N,Lq", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_and_zero_queries(backend, N, Lq):
    shapes, starts, S = _levels([(3, 4), (1, 2)])
    value = torch.randn(N, S, 2, 4, requires_grad=True)
    loc = torch.rand(N, Lq, 2, 2, 3, 2, requires_grad=True)
    attn = torch.rand(N, Lq, 2, 2, 3, requires_grad=True)
    with set_backend(backend):
        out = ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.shape == (N, Lq, 8)
    out.sum().backward()
    assert value.grad is not None and value.grad.shape == value.shape
    assert (value.grad == 0).all()


def test_validation_errors_name_the_argument():
    value, shapes, starts, loc, attn = _inputs([(3, 4), (2, 2)], N=1, Lq=2, M=2, D=3, P=2)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, shapes.float(), starts, loc, attn)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, starts.double(), loc, attn)
    with pytest.raises(ValueError, match="level_start_index"):
        ms_deform_attn(value, shapes, torch.tensor([0, 11]), loc, attn)
    with pytest.raises(ValueError, match="value"):
        ms_deform_attn(value[:, :-1], shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="spatial_shapes"):
        ms_deform_attn(value, shapes[:1], starts[:1], loc, attn)
    with pytest.raises(ValueError, match="attention_weights"):
        ms_deform_attn(value, shapes, starts, loc, attn[..., :1])
    with pytest.raises(ValueError, match="sampling_locations"):
        ms_deform_attn(value, shapes, starts, loc[:, :, :1], attn)
    with pytest.raises(ValueError, match="value"):
        ms_deform_attn(value.long(), shapes, starts, loc, attn)
    with pytest.raises(ValueError, match="sampling_locations.*device"):
        ms_deform_attn(value, shapes, starts, loc.to("meta"), attn)


# ------------------------------------------------------------------------------------------
# backend switch and fallback
# ------------------------------------------------------------------------------------------
def test_fallback_warns_once_when_extension_missing(monkeypatch):
    args = _inputs([(3, 4)], N=1, Lq=2, M=1, D=2, P=1)
    monkeypatch.setattr(msda_backend, "load_extension", lambda: None)
    monkeypatch.setattr(msda_backend, "_warned_fallback", False)
    with set_backend("auto"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out1 = ms_deform_attn(*args)
            out2 = ms_deform_attn(*args)
        assert sum("falling back" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(out1, ms_deform_attn_reference(*args))
    torch.testing.assert_close(out2, out1)
    with set_backend("compiled"), pytest.raises(RuntimeError, match="not available"):
        ms_deform_attn(*args)


def test_set_backend_restores_and_validates():
    before = msda.get_backend()
    with set_backend("reference"):
        assert msda.get_backend() == "reference"
    assert msda.get_backend() == before
    with pytest.raises(ValueError):
        set_backend("fast")


# ------------------------------------------------------------------------------------------
# the module
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_compiled_equals_reference_end_to_end(ref_dim):
    torch.manual_seed(7)
    shapes, starts, S = _levels([(6, 8), (3, 4), (2, 2)])
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2).double()
    with torch.no_grad():  # move away from the init so every parameter matters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    N, Lq = 2, 7
    query = torch.randn(N, Lq, 32, dtype=torch.float64)
    src = torch.randn(N, S, 32, dtype=torch.float64)
    ref_pts = torch.rand(N, Lq, 3, ref_dim, dtype=torch.float64)
    if ref_dim == 4:
        ref_pts[..., 2:] = ref_pts[..., 2:] * 0.5 + 0.1
    mask = torch.zeros(N, S, dtype=torch.bool)
    mask[1, -5:] = True
    grad_out = torch.randn(N, Lq, 32, dtype=torch.float64)

    results = {}
    for backend in ("compiled", "reference"):
        module.zero_grad()
        ins = [t.clone().requires_grad_() for t in (query, ref_pts, src)]
        with set_backend(backend):
            out = module(ins[0], ins[1], ins[2], shapes, starts, mask)
        out.backward(grad_out)
        grads = [t.grad for t in ins] + [p.grad.clone() for p in module.parameters()]
        results[backend] = (out.detach(), grads)
    out_c, grads_c = results["compiled"]
    out_r, grads_r = results["reference"]
    assert out_c.shape == (N, Lq, 32)
    torch.testing.assert_close(out_c, out_r, rtol=1e-10, atol=1e-10)
    for gc, gr in zip(grads_c, grads_r):
        torch.testing.assert_close(gc, gr, rtol=1e-9, atol=1e-9)


def test_module_init_matches_deformable_detr():
    m = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=3)
    bias = m.sampling_offsets.bias.view(4, 2, 3, 2)
    # head 0 points along +x, head 1 along +y, point p at distance p + 1
    torch.testing.assert_close(bias[0, 1, 2], torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(bias[1, 0, 1], torch.tensor([0.0, 2.0]), atol=1e-6, rtol=0)
    assert (m.sampling_offsets.weight == 0).all()
    assert (m.attention_weights.weight == 0).all() and (m.attention_weights.bias == 0).all()
    assert (m.value_proj.bias == 0).all() and (m.output_proj.bias == 0).all()


# ------------------------------------------------------------------------------------------
# FLOP counting
# ------------------------------------------------------------------------------------------
def test_fvcore_flop_handle():
    fvcore_nn = pytest.importorskip("fvcore.nn")
    value, shapes, starts, loc, attn = _inputs([(4, 5), (2, 2)], N=1, Lq=3, M=2, D=8, P=2,
                                               dtype=torch.float32)

    class Op(torch.nn.Module):
        def forward(self, v, lo, a):
            return torch.ops.isda.ms_deform_attn(v, shapes, starts, lo, a)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counter = fvcore_nn.FlopCountAnalysis(Op(), (value, loc, attn))
        counter.set_op_handle(**flop_count_handles())
        counter.unsupported_ops_warnings(False)
        total = counter.total()
    assert total == 5 * 1 * 3 * 2 * 2 * 2 * 8


def test_operator_direct_calls_upcast_and_check():
    op, op_backward = torch.ops.isda.ms_deform_attn, torch.ops.isda.ms_deform_attn_backward
    value, shapes, starts, loc, attn = _inputs([(4, 3), (2, 2)], N=1, Lq=3, M=2, D=5, P=2, seed=8)
    ref = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    half = [t.to(torch.bfloat16) for t in (value, loc, attn)]
    out = op(half[0], shapes, starts, half[1], half[2])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)
    grads = op_backward(half[0], shapes, starts, half[1], half[2], torch.ones_like(out))
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    with pytest.raises(RuntimeError, match="dtype"):
        op(value, shapes, starts, loc.float(), attn)
    with pytest.raises(RuntimeError, match="attention_weights"):
        op(value, shapes, starts, loc, attn[..., :1])


@pytest.mark.parametrize("D", [32, 6])  # the register-accumulated and the generic channel loop
@pytest.mark.parametrize("attn_dtype", [torch.float32, torch.bfloat16])
def test_bf16_value_read_as_is_by_the_cpu_forward(monkeypatch, D, attn_dtype):
    """bf16 inference: the encoder's bf16 value projection goes to the CPU kernel without a
    float32 copy, with the results of that copy (bf16 -> float32 is exact) bit for bit, and
    close to the float64 reference on the bf16-rounded values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    op = torch.ops.isda.ms_deform_attn
    value, shapes, starts, loc, attn = _inputs([(9, 7), (4, 3)], N=1, Lq=40, M=2, D=D, P=3,
                                               seed=11)
    value_bf16 = value.to(torch.bfloat16)
    loc32, attn_in = loc.float(), attn.to(attn_dtype)
    want = op(value_bf16.float(), shapes, starts, loc32, attn_in.float())
    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is op.default:
                seen.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    with set_backend("compiled"), torch.no_grad(), Spy():
        got = ms_deform_attn(value_bf16, shapes, starts, loc32, attn_in)
    assert seen == [torch.bfloat16]  # no float32 copy of the value was made
    assert got.dtype == torch.float32 and torch.equal(got, want)
    ref = ms_deform_attn_reference(value_bf16.double(), shapes, starts, loc,
                                   attn_in.double())
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # direct call: float32 output; other mixed combinations are still refused by name
    direct = op(value_bf16, shapes, starts, loc32, attn_in.float())
    assert direct.dtype == torch.float32 and torch.equal(direct, want)
    with pytest.raises(RuntimeError, match="dtype"):
        op(value.half(), shapes, starts, loc32, attn_in.float())
    with pytest.raises(RuntimeError, match="dtype"):
        op(value_bf16, shapes, starts, loc, attn)  # float64 locations


# ------------------------------------------------------------------------------------------
# the torch operator: opcheck, torch.compile, torch.export
# ------------------------------------------------------------------------------------------
def test_opcheck_forward_and_backward_operators():
    """torch.library.opcheck: schema, fake kernels against the CPU kernels, autograd
    registration and AOT dispatch (with and without dynamic shapes)."""
    op, op_backward = torch.ops.isda.ms_deform_attn.default, torch.ops.isda.ms_deform_attn_backward.default
    for dtype in (torch.float64, torch.float32):
        value, shapes, starts, loc, attn = _inputs([(4, 5), (2, 3)], N=2, Lq=3, M=2, D=4, P=2,
                                                   dtype=dtype, seed=3)
        grad = torch.randn(2, 3, 8, dtype=dtype)
        torch.library.opcheck(op_backward, (value, shapes, starts, loc, attn, grad))
        args = (value.requires_grad_(), shapes, starts, loc.requires_grad_(), attn.requires_grad_())
        torch.library.opcheck(op, args)
    # the CPU's bf16-value form (bf16 inference): float32 output
    value, shapes, starts, loc, attn = _inputs([(4, 5)], N=1, Lq=3, M=2, D=4, P=2, seed=4)
    torch.library.opcheck(op, (value.bfloat16(), shapes, starts, loc.float(), attn.float()))


def _tiny_encoder_inputs(seed=0):
    from isda.modeling.deformable_encoder import DeformableEncoder, encoder_reference_points

    torch.manual_seed(seed)
    enc = DeformableEncoder(2, d_model=32, d_ffn=64, dropout=0.0, n_levels=2, n_heads=4,
                            n_points=2)
    with torch.no_grad():  # non-trivial offsets and attention weights
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    shapes, starts, S = _levels([(6, 8), (3, 4)])
    src = torch.randn(2, S, 32)
    pos = torch.randn(2, S, 32)
    ref = encoder_reference_points(shapes, torch.ones(2, 2, 2))
    return enc, (src, pos, ref, shapes, starts)


def _run_layers(enc, src, pos, ref, shapes, starts):
    """The encoder's layer stack (its reference points computed outside: they read the level
    sizes on the host)."""
    for layer in enc.layers:
        src = layer(src, pos, ref, shapes, starts, None)
    return src


def test_torch_compile_of_the_encoder_has_no_graph_break():
    """fullgraph=True fails on any graph break; the op is one node of the captured graph, and
    the compiled forward and backward (AOT autograd through the registered formula) equal the
    eager ones."""
    import torch._dynamo

    enc, (src, pos, ref, shapes, starts) = _tiny_encoder_inputs()
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run = torch.compile(_run_layers, fullgraph=True, backend=recording_backend)
    with set_backend("compiled"), torch.no_grad():
        got = run(enc, src, pos, ref, shapes, starts)
        want = _run_layers(enc, src, pos, ref, shapes, starts)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(graphs) == 1
    calls = [n for n in graphs[0].graph.nodes if "isda.ms_deform_attn" in str(n.target)]
    assert len(calls) == 2, [str(n.target) for n in graphs[0].graph.nodes]

    torch._dynamo.reset()
    run = torch.compile(_run_layers, fullgraph=True, backend="aot_eager")
    grads = {}
    for name, fn in (("compiled", run), ("eager", _run_layers)):
        enc.zero_grad()
        x = src.clone().requires_grad_()
        with set_backend("compiled"):
            fn(enc, x, pos, ref, shapes, starts).square().sum().backward()
        grads[name] = [x.grad] + [p.grad.clone() for p in enc.parameters()]
    for a, b in zip(grads["compiled"], grads["eager"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_torch_export_shows_the_op_as_one_node():
    torch.manual_seed(0)
    shapes, starts, S = _levels([(6, 8), (3, 4)])
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).eval()
    args = (torch.randn(1, 7, 32), torch.rand(1, 7, 2, 2), torch.randn(1, S, 32), shapes, starts)
    with set_backend("compiled"):
        program = torch.export.export(module, args)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.isda.ms_deform_attn.default) == 1, targets
    assert not any("grid_sampler" in str(t) for t in targets)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(*args), module(*args), rtol=1e-6, atol=1e-6)
