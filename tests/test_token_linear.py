"""TokenLinear (oneDNN 1x1-convolution path for large CPU inputs) against a float64 F.linear."""
import pytest
import torch
import torch.nn.functional as F

import isda.layers.token_linear as TL

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent


@pytest.mark.parametrize("shape", [(2, 700, 48), (1500, 48)])
def test_matches_float64_linear_forward_and_backward(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    layer = TL.TokenLinear(48, 40)
    assert TL._use_onednn(x), "this size must take the oneDNN path"
    y = layer(x)
    assert y.shape == (*shape[:-1], 40) and y.is_contiguous()
    gy = torch.randn(y.shape, generator=g)
    gx, gw, gb = torch.autograd.grad(y, [x, layer.weight, layer.bias], gy)

    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
    y64 = F.linear(x64, w64, b64)
    rx, rw, rb = torch.autograd.grad(y64, [x64, w64, b64], gy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), rx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gb.double(), rb, rtol=1e-5, atol=1e-3)


def _aten_ops(fn):
    """The aten operators ``fn`` runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    names = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return names


def test_backward_is_two_products_not_the_convolution_backward():
    """The input's gradient through oneDNN (a product with the transposed weight) and the
    weight's as one mm: oneDNN's convolution backward took about twice as long."""
    x = torch.randn(3000, 64, requires_grad=True)
    layer = TL.TokenLinear(64, 32)

    def step():
        layer(x).sum().backward()

    names = _aten_ops(step)
    assert "convolution_backward" not in names
    assert names.count("convolution") + names.count("mkldnn_convolution") >= 2
    assert "mm" in names


@pytest.mark.parametrize("token", [True, False])
def test_linear_input_grad_matches_float64(token):
    g = torch.Generator().manual_seed(5)
    grad_out, weight = torch.randn(4, 700, 40, generator=g), torch.randn(40, 48, generator=g)
    module = TL.TokenLinear(48, 40) if token else torch.nn.Linear(48, 40)
    got = TL.linear_input_grad(grad_out, weight, module)
    torch.testing.assert_close(got.double(), grad_out.double() @ weight.double(),
                               rtol=1e-5, atol=1e-4)


def test_small_inputs_and_disabled_onednn_use_f_linear():
    x = torch.randn(10, 48)
    assert not TL._use_onednn(x)
    layer = TL.TokenLinear(48, 8)
    big = torch.randn(5000, 48)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not TL._use_onednn(big)
        torch.testing.assert_close(layer(big), F.linear(big, layer.weight, layer.bias),
                                   rtol=0, atol=0)


def test_state_dict_is_nn_linear_compatible():
    a = torch.nn.Linear(16, 4)
    b = TL.TokenLinear(16, 4)
    b.load_state_dict(a.state_dict())
    assert set(b.state_dict()) == {"weight", "bias"}
