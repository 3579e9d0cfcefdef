"""Training steps: every trainable parameter gets a gradient, frozen ones never change."""
import pytest
import torch

from detectron2.layers import FrozenBatchNorm2d

from isda_helpers import build, small_cfg, synthetic_input

pytestmark = pytest.mark.usefixtures("one_thread")


def test_all_trainable_parameters_get_gradients_and_frozen_stay():
    cfg = small_cfg("MODEL.BACKBONE.FREEZE_AT", 2, "MODEL.RESNETS.NORM", "FrozenBN")
    model = build(cfg)
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen_buffers = {n: b.clone() for n, b in model.named_buffers()
                      if n.startswith("backbone.")}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # FREEZE_AT 2: the stem and res2 are frozen, res3.. are trained; FrozenBN everywhere
    assert frozen and all(n.startswith(("backbone.stem.", "backbone.res2.")) for n in frozen)
    assert any(n.startswith("backbone.res3.") for n in trainable)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batch = [synthetic_input(96, 128, seed=0), synthetic_input(80, 112, num_inst=2, seed=1)]
    # two steps: at initialisation the deformable attention's offset/weight Linears are zero, so
    # the encoder's queries (and hence the level embedding) get exactly zero gradient at step 1
    got_grad = set()
    for _ in range(2):
        opt.zero_grad()
        sum(model(batch).values()).backward()
        for n, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), n
                if p.grad.abs().sum() > 0:
                    got_grad.add(n)
            else:
                assert p.grad is None, n
        opt.step()
    assert set(trainable) - got_grad == set()

    params = dict(model.named_parameters())
    for n, v in frozen.items():
        assert torch.equal(params[n], v), n
    buffers = dict(model.named_buffers())
    for n, v in frozen_buffers.items():
        assert torch.equal(buffers[n], v), n
    changed = [n for n, v in trainable.items() if not torch.equal(params[n], v)]
    assert len(changed) == len(trainable)
