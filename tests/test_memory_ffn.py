"""The encoder's feed-forward block with its hidden state recomputed in the backward pass
(``isda.modeling.transformer_blocks.feed_forward``): values and gradients against the plain
composition evaluated in float64, what is kept for the backward pass, and the chunked
inference path."""
import pytest
import torch
from torch import nn

from isda.cpu_fast_paths import FastActivationDropout
from isda.layers.dropout import fast_dropout_available
from isda.layers.token_linear import TokenLinear
from isda.modeling.transformer_blocks import (INFERENCE_CHUNK_ROWS, ActivationDropout,
                                              feed_forward)

pytestmark = pytest.mark.usefixtures("one_thread")

D, F_ = 32, 96


def _block(fast, p, seed=0):
    torch.manual_seed(seed)
    lin = TokenLinear if fast else nn.Linear
    l1, l2 = lin(D, F_), lin(F_, D)
    act = (FastActivationDropout if fast else ActivationDropout)("relu", p)
    return l1, act, l2


def _grads(x, l1, act, l2, fn, seed):
    x = x.clone().requires_grad_(True)
    for m in (l1, l2):
        m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = fn(x, l1, act, l2)
    # positive output gradients: the bias gradients (sums over rows) do not cancel
    g = torch.rand(y.shape, generator=torch.Generator().manual_seed(2)).to(y.dtype) + 0.5
    (y * g).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for m in (l1, l2) for p in m.parameters()]


def _plain(x, l1, act, l2):
    return l2(act(l1(x)))


# with dropout only the compiled kernel gives the same random mask in the fp32 and float64 runs
# (torch's dropout draws differently per dtype), so (plain, p > 0) has no float64 reference
@pytest.mark.parametrize("fast,p", [(False, 0.0), (True, 0.0), (True, 0.3)])
def test_recomputed_ffn_matches_float64_composition(fast, p):
    if p > 0 and not fast_dropout_available(torch.zeros(1)):
        pytest.skip("compiled dropout not built")
    l1, act, l2 = _block(fast, p)
    act.train()
    x = torch.randn(2, 1500, D, generator=torch.Generator().manual_seed(1))
    got = _grads(x, l1, act, l2, feed_forward, seed=7)
    for m in (l1, l2):
        m.double()
    want = _grads(x.double(), l1, act, l2, _plain, seed=7)  # the float64 reference
    names = ["output", "grad x", "grad w1", "grad b1", "grad w2", "grad b2"]
    for name, a, b in zip(names, got, want):
        # fp32 sums over 3000 rows: the error is relative to the tensor's scale
        err = float((a.double() - b).abs().max() / b.abs().max())
        assert err < 1e-5, (name, err)


class _ExtensionWithout:
    """The compiled dropout extension as built before some of its functions existed."""

    def __init__(self, ext, missing):
        self._ext, self._missing = ext, set(missing)

    def __getattr__(self, name):
        if name in self._missing:
            raise AttributeError(name)
        return getattr(self._ext, name)


@pytest.mark.parametrize("missing", [("dropout_forward_", "dropout_backward_"),
                                     ("dropout_forward_", "dropout_backward_", "dropout_mask")])
def test_recomputed_ffn_with_an_older_dropout_extension(monkeypatch, missing):
    """An extension built before the in-place kernels (users who pull without rebuilding)
    gives the same values and gradients through its older functions."""
    if not fast_dropout_available(torch.zeros(1)):
        pytest.skip("compiled dropout not built")
    import isda.layers.dropout as dropout_module

    l1, act, l2 = _block(True, 0.3)
    act.train()
    x = torch.randn(2, 1500, D, generator=torch.Generator().manual_seed(1))
    want = _grads(x, l1, act, l2, feed_forward, seed=7)
    old = _ExtensionWithout(dropout_module._extension(), missing)
    monkeypatch.setattr(dropout_module, "_extension", lambda: old)
    got = _grads(x, l1, act, l2, feed_forward, seed=7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_backward_keeps_no_hidden_state():
    """Only the input is kept: no float [rows, d_ffn] hidden state, and with the compiled
    dropout no mask either (regenerated from its seed); torch's dropout keeps a uint8 mask."""
    l1, act, l2 = _block(True, 0.1)
    act.train()
    x = torch.randn(3000, D, requires_grad=True)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = feed_forward(x, l1, act, l2)
    floats = [s for s, dt in saved if dt.is_floating_point and s and s[0] == 3000]
    assert floats == [(3000, D)], saved  # the input only
    masks = [s for s, dt in saved if dt == torch.uint8]
    assert masks == ([] if fast_dropout_available(x) else [(3000, F_)]), saved
    y.sum().backward()
    assert x.grad is not None and l1.weight.grad is not None


@pytest.mark.parametrize("fast", [False, True])
def test_chunked_inference_matches_float64(fast):
    l1, act, l2 = _block(fast, 0.1)
    act.eval()
    x = torch.randn(1, INFERENCE_CHUNK_ROWS * 2 + 123, D)
    with torch.no_grad():
        got = feed_forward(x, l1, act, l2)
        want = torch.relu(x.double() @ l1.weight.double().T + l1.bias.double()) \
            @ l2.weight.double().T + l2.bias.double()
    assert got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
