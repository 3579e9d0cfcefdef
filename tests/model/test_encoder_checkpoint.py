"""``MODEL.ISDA.ENCODER_CHECKPOINT``: the encoder layers recompute their forward in the backward
pass. Outputs and gradients (with dropout on and off) against the same
encoder run without checkpointing, what is kept for the backward pass, and the config switch."""
import copy
from pathlib import Path

import pytest
import torch

from isda.modeling.deformable_encoder import DeformableEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(8, 10), (4, 5), (2, 3), (1, 2)]
C, FFN, HEADS, POINTS = 32, 64, 4, 2


def _inputs(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    s = sum(h * w for h, w in SHAPES)
    src = torch.randn(n, s, C, generator=g)
    pos = torch.randn(n, s, C, generator=g)
    ratios = torch.ones(n, len(SHAPES), 2)
    return src, pos, ratios


def _encoder(dropout):
    torch.manual_seed(0)
    enc = DeformableEncoder(2, d_model=C, d_ffn=FFN, dropout=dropout, n_levels=len(SHAPES),
                            n_heads=HEADS, n_points=POINTS)
    with torch.no_grad():  # non-trivial offsets and weights (the init zeroes some of them)
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return enc.train()


def _run(enc, src, pos, ratios, seed=5, pack=None):
    src = src.clone().requires_grad_(True)
    pos = pos.clone().requires_grad_(True)
    shapes = torch.tensor(SHAPES, dtype=torch.int64)
    areas = shapes.prod(1)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    enc.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks of the forward pass
    if pack is None:
        out = enc(src, pos, shapes, starts, ratios, None)
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = enc(src, pos, shapes, starts, ratios, None)
    torch.manual_seed(123)  # another RNG state before the backward pass (recomputation)
    g = torch.rand(out.shape, generator=torch.Generator().manual_seed(3)) - 0.5
    (out * g).sum().backward()
    return [out.detach(), src.grad, pos.grad] + [p.grad.clone() for p in enc.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_checkpointed_encoder_gives_the_same_outputs_and_gradients(dropout):
    plain = _encoder(dropout)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    src, pos, ratios = _inputs()
    want = _run(plain, src, pos, ratios)
    got = _run(ckpt, src, pos, ratios)
    # a different dropout draw would change the output itself: the test can tell
    other = _run(plain, src, pos, ratios, seed=6)
    if dropout > 0:
        assert not torch.allclose(other[0], want[0])
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert b is not None and torch.allclose(a, b, rtol=1e-5, atol=1e-6), i


def test_checkpointed_encoder_keeps_only_layer_inputs():
    def kept(enc):
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if not isinstance(t, torch.nn.Parameter):
                seen[s.data_ptr()] = s.nbytes()
            return t

        _run(enc, *_inputs(), pack=pack)
        return sum(seen.values())

    plain = _encoder(0.1)
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    tokens = sum(h * w for h, w in SHAPES) * 2
    plain_bytes, ckpt_bytes = kept(plain), kept(ckpt)
    # with checkpointing, what the two layers get as inputs: src, pos and the first layer's
    # output ([tokens, C] each), the reference points [tokens, levels, 2] and the level shapes
    inputs = (3 * tokens * C + tokens * len(SHAPES) * 2) * 4
    assert inputs <= ckpt_bytes <= inputs + 1024, (ckpt_bytes, inputs)
    # without, each layer also keeps its projections, sampling locations, attention weights...
    assert plain_bytes > 4 * ckpt_bytes, (plain_bytes, ckpt_bytes)


def test_config_switch_reaches_the_encoder_and_is_off_by_default():
    from detectron2.config import get_cfg

    import isda
    from isda.modeling.meta_arch import ISDA

    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(Path(__file__).resolve().parents[2] / "configs" / "Base-ISDA.yaml"))
    assert cfg.MODEL.ISDA.ENCODER_CHECKPOINT is False
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEPTH", 18,
                         "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.ISDA.HIDDEN_DIM", 32,
                         "MODEL.ISDA.DIM_FEEDFORWARD", 64, "MODEL.ISDA.ENC_LAYERS", 1,
                         "MODEL.ISDA.DEC_LAYERS", 1, "MODEL.ISDA.ENCODER_CHECKPOINT", True])
    model = ISDA(**ISDA.from_config(cfg))
    assert model.encoder.checkpoint is True
