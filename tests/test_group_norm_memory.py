"""GroupNorm (+ ReLU) keeping its output for the backward pass
(``isda.layers.group_norm``), as the channel mapper and the mask-feature head run it in training:
values and gradients against ``nn.GroupNorm`` evaluated in float64, and the bytes kept for the
backward pass counted by hand."""
import copy

import pytest
import torch
from torch import nn

from isda.layers.group_norm import group_norm_keeping_output, run_keeping_norm_outputs
from isda.modeling.channel_mapper import ChannelMapper
from isda.modeling.mask_feature_head import MaskFeatureHead

pytestmark = pytest.mark.usefixtures("one_thread")


def _norm(c=12, groups=3, gain="random", seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = nn.GroupNorm(groups, c)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(c, generator=g))  # negative gains included
        norm.bias.copy_(torch.randn(c, generator=g) * 0.5)
        if gain == "one_small":
            norm.weight[1] = 3e-3
    return norm


def _grads(x, norm, fn):
    x = x.clone().requires_grad_(True)
    norm.zero_grad(set_to_none=True)
    y = fn(x, norm)
    g = torch.rand(y.shape, generator=torch.Generator().manual_seed(4)).to(y.dtype) - 0.5
    (y * g).sum().backward()
    return [y.detach(), x.grad, norm.weight.grad, norm.bias.grad]


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("gain", ["random", "one_small"])
def test_group_norm_keeping_output_matches_float64_group_norm(relu, layout, gain):
    norm = _norm(gain=gain)
    x = torch.randn(2, 12, 7, 9, generator=torch.Generator().manual_seed(1)) * 3 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    got = _grads(x, norm, lambda t, m: group_norm_keeping_output(t, m, relu))

    def reference(t, m):
        y = m(t)
        return torch.relu(y) if relu else y

    ref = _grads(x.double(), copy.deepcopy(norm).double(), reference)
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=2e-5)


def test_group_norm_keeping_output_keeps_output_not_input():
    norm = _norm()
    x = torch.randn(2, 12, 5, 6, requires_grad=True)
    z = x * 2  # the norm's input, made inside the graph
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        r = group_norm_keeping_output(z, norm, relu=True)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert z.untyped_storage().data_ptr() not in ptrs
    assert r.untyped_storage().data_ptr() not in ptrs  # the ReLU output is not kept either
    big = [t for t in saved if t.numel() == z.numel()]
    assert len(big) == 1  # one full-size tensor: the norm's output before the ReLU


def test_without_gradient_the_modules_run_unchanged():
    layers = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(inplace=True))
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(run_keeping_norm_outputs(layers, x), layers(x), rtol=0, atol=0)


def _kept_bytes(fn):
    """Bytes of the distinct storages saved for the backward pass while ``fn`` runs (parameters
    and leaf inputs excluded)."""
    saved = {}

    def pack(t):
        if not (t.requires_grad and t.is_leaf):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_mapper_and_mask_head_keep_the_hand_counted_bytes_less():
    """Channel mapper -> mask-feature head at stride 4 (as ISDA-R50 is built, small widths):
    the norms keeping their outputs drop, from what the plain modules keep, the mapper's
    pre-norm maps of the levels the mask head convolves (P2, P3, P4; P5 is concatenated with
    coordinates first) and the ReLU outputs that an upsampling or the branch sum consumes."""
    torch.manual_seed(0)
    cin, c, f = [8, 16, 32, 64], 32, 16
    mapper = ChannelMapper(cin, c, num_extra=1, gn_groups=8)
    head = MaskFeatureHead(c, f, c, out_stride=4, coords=True, gn_groups=8)
    sizes = [(32, 48), (16, 24), (8, 12), (4, 6)]  # strides 4, 8, 16, 32
    feats = [torch.randn(1, ch, h, w, requires_grad=True) for ch, (h, w) in zip(cin, sizes)]

    def run(plain):
        if plain:
            maps = [layer(x) for layer, x in zip(mapper.lateral, feats)]
            maps.append(mapper.extra[0](feats[-1]))
            out = None
            for s, branch, p in zip(head.in_strides, head.branches, maps):
                x = torch.cat([p, _coords(p)], 1) if s == 32 else p
                y = branch(x)
                out = y if out is None else out + y
            out = head.output(out)
        else:
            maps = mapper(feats)
            out = head({s: p for s, p in zip((4, 8, 16, 32), maps)})
        (out * out).sum().backward()  # a consumer that keeps the output, as the mask product

    from isda.modeling.mask_feature_head import coord_channels as _coords

    plain, new = _kept_bytes(lambda: run(True)), _kept_bytes(lambda: run(False))
    a4, a8, a16, a32 = (h * w for h, w in sizes)
    expected = 4 * (c * (a4 + a8 + a16) + f * (a4 + 3 * a8 + 2 * a16 + a32))
    assert plain - new == expected
