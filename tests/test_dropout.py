"""The compiled CPU dropout / fused ReLU-dropout (isda/layers/dropout.py, ops/csrc/cpu/dropout_cpu.cpp)
against an independent numpy implementation of its documented random stream, torch's ops and
float64 gradient checks."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import isda.layers.dropout as D
from isda import _dropout as _C  # the optional compiled dropout extension

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent

M64 = (1 << 64) - 1


def splitmix64_words(seed: int, n: int) -> np.ndarray:
    """The documented stream in plain Python integers: element i -> 32-bit word."""
    words = []
    for i in range(n):
        z = (seed + (i >> 1) * 0x9E3779B97F4A7C15) & M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        z ^= z >> 31
        words.append((z >> 32) if i & 1 else (z & 0xFFFFFFFF))
    return np.array(words, dtype=np.uint64)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n", [1, 7, 4097])
def test_mask_and_output_match_the_documented_stream(relu, n):
    p, seed = 0.3, 987654321
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    out, mask = _C.dropout_forward(x, p, seed, relu)
    keep = splitmix64_words(seed, n) >= round(p * 2 ** 32)
    if relu:
        keep &= x.numpy() > 0
    assert mask.dtype == torch.uint8
    assert np.array_equal(mask.numpy().astype(bool), keep)
    expected = np.where(keep, x.numpy() / (1 - p), 0.0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n", [1, 7, 40001])
def test_mask_alone_matches_the_documented_stream(relu, n):
    """``dropout_mask``: what the feed-forward block's backward pass rebuilds from the seed
    without writing the [rows, d_ffn] output (odd task boundaries included at 40001)."""
    p, seed = 0.1, -5
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    mask = _C.dropout_mask(x, p, seed, relu)
    keep = splitmix64_words(seed % (1 << 64), n) >= round(p * 2 ** 32)
    if relu:
        keep &= x.numpy() > 0
    assert mask.dtype == torch.uint8 and mask.shape == x.shape
    assert np.array_equal(mask.numpy().astype(bool), keep)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("n", [7, 40001])
def test_in_place_forward_writes_the_documented_output_into_its_input(relu, n):
    """``dropout_forward_``: the feed-forward block's backward pass rebuilds the forward
    output in the recomputed hidden state itself (no second [rows, d_ffn] tensor)."""
    p, seed = 0.2, 424242
    x = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ref = x.numpy().copy()
    storage = x.data_ptr()
    mask = _C.dropout_forward_(x, p, seed, relu)
    keep = splitmix64_words(seed, n) >= round(p * 2 ** 32)
    if relu:
        keep &= ref > 0
    assert x.data_ptr() == storage and mask.dtype == torch.uint8
    assert np.array_equal(mask.numpy().astype(bool), keep)
    np.testing.assert_allclose(x.numpy(), np.where(keep, ref / (1 - p), 0.0), rtol=1e-15, atol=0)


def test_in_place_backward_scales_its_gradient_by_the_mask():
    n, scale = 40001, 1.25
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(n, dtype=torch.float64, generator=g)
    mask = (torch.rand(n, generator=g) > 0.3).to(torch.uint8)
    want = grad.numpy() * mask.numpy() * scale  # computed before the call changes grad
    _C.dropout_backward_(grad, mask, scale)
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-15, atol=0)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.dropout_backward_(torch.zeros(4, 2).t(), torch.ones(2, 4, dtype=torch.uint8), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        _C.dropout_forward_(torch.zeros(4, 2).t(), 0.1, 1, False)


def test_negative_seed_and_odd_task_boundaries_use_the_same_stream():
    # 2 threads split 40001 elements at an odd index: the result must not depend on the split
    x = torch.randn(40001)
    seed = -(2 ** 61) + 5
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, mask1 = _C.dropout_forward(x, 0.1, seed, True)
        torch.set_num_threads(2)
        out2, mask2 = _C.dropout_forward(x, 0.1, seed, True)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(mask1, mask2) and torch.equal(out1, out2)
    keep = splitmix64_words(seed % (1 << 64), 200) >= round(0.1 * 2 ** 32)
    assert np.array_equal(mask1[:200].numpy().astype(bool), keep & (x[:200].numpy() > 0))
    assert np.array_equal(mask1[-200:].numpy().astype(bool),
                          (splitmix64_words(seed % (1 << 64), 40001)[-200:] >= round(0.1 * 2 ** 32))
                          & (x[-200:].numpy() > 0))


def test_drop_rate_is_p_within_binomial_bounds():
    n, p = 1 << 20, 0.1
    _, mask = _C.dropout_forward(torch.ones(n), p, 42, False)
    dropped = n - int(mask.sum())
    sd = (n * p * (1 - p)) ** 0.5
    assert abs(dropped - n * p) < 5 * sd
    # neighbouring elements (the two halves of one hash) are independent
    m = mask.numpy().astype(np.int64)
    both_dropped = int(((1 - m[0::2]) * (1 - m[1::2])).sum())
    assert abs(both_dropped - n / 2 * p * p) < 5 * (n / 2 * p * p) ** 0.5


@pytest.mark.parametrize("relu", [False, True])
def test_gradients_in_float64(relu):
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    fn = D.relu_dropout if relu else D.dropout
    torch.manual_seed(3)
    out = fn(x, 0.25, True)
    # the derivative is the saved mask times 1 / (1 - p): read the mask off the output
    keep = (out != 0).to(torch.float64)
    g = torch.randn_like(x)
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g * keep / 0.75, rtol=0, atol=1e-15)
    # and the output is the (ReLU'd) input scaled where kept
    ref = (F.relu(x) if relu else x) * keep / 0.75
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)


def test_plain_dropout_keeps_no_mask_and_regenerates_it_for_any_gradient_layout():
    """Without the ReLU the backward pass keeps nothing (the mask comes back from the seed);
    the gradient is right for a non-contiguous incoming gradient as well."""
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    saved = []
    torch.manual_seed(5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = D.dropout(x, 0.3, True)
    assert saved == []
    keep = (out != 0).to(torch.float64)
    g = torch.randn(40, 6, dtype=torch.float64).t()  # transposed: not contiguous
    (gx,) = torch.autograd.grad(out, x, g)
    torch.testing.assert_close(gx, g * keep / 0.7, rtol=0, atol=1e-15)


def test_seed_comes_from_torch_generator_and_eval_is_identity():
    x = torch.randn(1000)
    torch.manual_seed(7)
    a = D.dropout(x, 0.5, True)
    torch.manual_seed(7)
    b = D.dropout(x, 0.5, True)
    c = D.dropout(x, 0.5, True)
    assert torch.equal(a, b) and not torch.equal(b, c)
    assert D.dropout(x, 0.5, False) is x
    torch.testing.assert_close(D.relu_dropout(x, 0.5, False), F.relu(x), rtol=0, atol=0)
    module = D.FastDropout(0.5).eval()
    assert module(x) is x
    assert D.relu_dropout(x, 1.0, True).abs().sum() == 0


def test_fallback_to_torch_without_the_extension(monkeypatch):
    monkeypatch.setattr(D, "_extension", lambda: None)
    x = torch.randn(2000, requires_grad=True)
    assert not D.fast_dropout_available(x)
    out = D.relu_dropout(x, 0.2, True)
    assert "_DropoutFunction" not in type(out.grad_fn).__name__
    kept = out != 0
    torch.testing.assert_close(out[kept], F.relu(x)[kept] / 0.8)


def test_bad_input_is_refused_with_a_clear_error():
    with pytest.raises(RuntimeError, match="p must be in"):
        _C.dropout_forward(torch.ones(3), 1.0, 0, False)
    with pytest.raises(RuntimeError, match="differ in shape"):
        _C.dropout_backward(torch.ones(3), torch.ones(4, dtype=torch.uint8), 1.0)
