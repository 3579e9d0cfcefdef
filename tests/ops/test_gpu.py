"""GPU checks, run by ``make gpu-check`` (``pytest -m gpu tests/ops/test_gpu.py``) and skipped
without CUDA ("needs a CUDA GPU"):

* the compiled CUDA op against the float64 reference computed on the CPU (forward and the three
  gradients; four levels, sample points outside the maps, few and many queries), ``gradcheck``
  in float64, float16/bfloat16 inputs against float32;
* no device-to-host synchronisation in the compiled op's forward and backward (the value checks
  of the level metadata run on the GPU only under the debug switch ``set_validation``);
* the tiny model on CUDA: one training step, one inference, both equal to the CPU run of the
  same weights;
* two-GPU DDP training with NCCL (skipped with fewer than two GPUs).

Two tests of the validation switch need no GPU and run everywhere.
"""
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

import isda.layers.ms_deform_attn as msda
import isda.layers.ms_deform_attn_checks as msda_checks
from isda.layers.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_reference,
    set_backend,
    set_validation,
)
from isda_helpers import build, small_cfg, synthetic_input

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

#: the device under test (a module global, so the checks can be tried on "cpu" by hand)
DEVICE = "cuda"

LEVELS4 = [(13, 19), (7, 10), (4, 5), (2, 3)]
LEVELS4_LARGE = [(64, 96), (32, 48), (16, 24), (8, 12)]  # an encoder-sized pyramid, S = 8160


@pytest.fixture
def cuda_op():
    """The compiled op must have its CUDA kernels (``make gpu-check`` builds them)."""
    if not msda.compiled_available(DEVICE):
        pytest.fail("isda._C has no CUDA kernels (isda._C.has_cuda() is False): rebuild with "
                    "FORCE_CUDA=1, e.g. `make gpu-check` does")


@pytest.fixture
def no_tf32():
    """float32 convolutions and matmuls in full precision, for comparisons with the CPU."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def _levels(hw):
    shapes = torch.tensor(hw, dtype=torch.int64).view(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, torch.cumsum(sizes, 0) - sizes, int(sizes.sum())


def _locations(shapes, N, Lq, M, P, g, edges):
    """Normalised (x, y) per level: pixel coordinates >= 0.1 px away from integers (the bilinear
    weights are smooth there), from two pixels before to two after each border, a share far
    outside; with ``edges`` also a share exactly on pixel edges and on the borders 0 and 1."""
    L = shapes.shape[0]
    loc = torch.empty(N, Lq, M, L, P, 2, dtype=torch.float64)
    for lvl, (H, W) in enumerate(shapes.tolist()):
        for axis, size in ((0, W), (1, H)):
            k = torch.randint(-2, size + 2, (N, Lq, M, P), generator=g).to(torch.float64)
            u = torch.rand(N, Lq, M, P, generator=g, dtype=torch.float64) * 0.8 + 0.1
            plane = (k + u + 0.5) / size
            far = torch.rand(N, Lq, M, P, generator=g) < 0.05
            plane[far] = torch.where(torch.rand(int(far.sum()), generator=g) < 0.5, -3.0, 4.0).double()
            if edges:
                on_edge = torch.rand(N, Lq, M, P, generator=g) < 0.2
                e = torch.randint(0, size + 1, (N, Lq, M, P), generator=g).to(torch.float64) / size
                plane[on_edge] = e[on_edge]
            loc[:, :, :, lvl, :, axis] = plane
    return loc


def _inputs(hw, N, Lq, M, D, P, seed=0, edges=False):
    """float64 CPU inputs (value, spatial_shapes, level_start_index, locations, weights)."""
    g = torch.Generator().manual_seed(seed)
    shapes, starts, S = _levels(hw)
    value = torch.randn(N, S, M, D, generator=g, dtype=torch.float64)
    loc = _locations(shapes, N, Lq, M, P, g, edges)
    attn = torch.rand(N, Lq, M, len(hw), P, generator=g, dtype=torch.float64)
    attn = attn / attn.sum((-2, -1), keepdim=True)
    return value, shapes, starts, loc, attn


def _reference64(value, shapes, starts, loc, attn, grad_out):
    """The float64 reference on the CPU: output and grads of (value, locations, weights)."""
    ins = [t.detach().cpu().double().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn_reference(ins[0], shapes.cpu(), starts.cpu(), ins[1], ins[2])
    out.backward(grad_out.detach().cpu().double())
    return out.detach(), [t.grad for t in ins]


def _compiled(value, shapes, starts, loc, attn, grad_out):
    """The compiled op on DEVICE: output and grads of (value, locations, weights), on the CPU."""
    ins = [t.detach().to(DEVICE).requires_grad_() for t in (value, loc, attn)]
    with set_backend("compiled"):
        out = ms_deform_attn(ins[0], shapes.to(DEVICE), starts.to(DEVICE), ins[1], ins[2])
    out.backward(grad_out.to(DEVICE, out.dtype))
    assert out.device.type == torch.device(DEVICE).type
    return out.detach().cpu(), [t.grad.cpu() for t in ins]


# ------------------------------------------------------------------------------------------
# the compiled op against the float64 reference
# ------------------------------------------------------------------------------------------
CASES = [
    # levels,                       N, Lq,   M, D,  P
    ([(1, 1)],                      1, 1,    1, 1,  1),
    (LEVELS4,                       2, 7,    8, 32, 4),     # L = 4, few queries
    ([(3, 5), (1, 1), (13, 19), (2, 2)], 1, 9, 3, 71, 3),  # odd D, unsorted level sizes
    ([(5, 7), (3, 3), (1, 2), (2, 1)], 3, 300, 2, 16, 4),  # many points share grad_value corners
    (LEVELS4_LARGE,                 2, 4096, 8, 32, 4),     # encoder-sized, many queries
]


def _close(got, want, rtol, atol_rel):
    """assert_close with an absolute tolerance relative to the largest reference value."""
    torch.testing.assert_close(got.double(), want, rtol=rtol,
                               atol=atol_rel * max(want.abs().max().item(), 1.0))


@needs_cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{len(c[0])}-" + "x".join(map(str, c[1:])))
def test_cuda_op_matches_float64_reference(cuda_op, case):
    hw, N, Lq, M, D, P = case
    # float64 on the GPU: equal to the reference up to rounding, also exactly on pixel edges
    value, shapes, starts, loc, attn = _inputs(hw, N, Lq, M, D, P, seed=Lq + D, edges=True)
    grad_out = torch.randn(N, Lq, M * D, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(1))
    ref, ref_grads = _reference64(value, shapes, starts, loc, attn, grad_out)
    out, grads = _compiled(value, shapes, starts, loc, attn, grad_out)
    assert out.dtype == torch.float64 and out.shape == (N, Lq, M * D)
    _close(out, ref, 1e-10, 1e-12)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert got.dtype == torch.float64, name
        _close(got, want, 1e-9, 1e-11)

    # float32 on the GPU against the reference of the same (float32-rounded) inputs; locations
    # away from pixel edges, where a float32 rounding could flip the bilinear cell
    value, shapes, starts, loc, attn = (t.float() if t.is_floating_point() else t
                                        for t in _inputs(hw, N, Lq, M, D, P, seed=Lq + D + 1))
    ref, ref_grads = _reference64(value, shapes, starts, loc, attn, grad_out)
    out, grads = _compiled(value, shapes, starts, loc, attn, grad_out.float())
    assert out.dtype == torch.float32
    _close(out, ref, 1e-5, 2e-5)
    for name, got, want in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert got.dtype == torch.float32, name
        _close(got, want, 1e-4, 3e-5)


@needs_cuda
def test_cuda_op_gradcheck_float64(cuda_op):
    # the CUDA kernels are dispatched for float32 and float64 (AT_DISPATCH_FLOATING_TYPES)
    value, shapes, starts, loc, attn = _inputs([(3, 4), (2, 2), (1, 1), (2, 3)], 2, 3, 2, 3, 2,
                                               seed=5)
    shapes, starts = shapes.to(DEVICE), starts.to(DEVICE)
    ins = [t.to(DEVICE).requires_grad_() for t in (value, loc, attn)]

    def fn(v, lo, a):
        return torch.ops.isda.ms_deform_attn(v, shapes, starts, lo, a)

    # grad_value is accumulated with atomicAdd: not bit-reproducible, hence nondet_tol
    assert torch.autograd.gradcheck(fn, tuple(ins), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    nondet_tol=1e-12)


@needs_cuda
def test_cuda_opcheck(cuda_op):
    """torch.library.opcheck of the CUDA kernels: schema, fake kernels, autograd registration."""
    for dtype in (torch.float64, torch.float32):
        value, shapes, starts, loc, attn = (t.to(DEVICE) for t in _inputs(
            [(3, 4), (2, 2)], 2, 3, 2, 3, 2, seed=6))
        value, loc, attn = (t.to(dtype) for t in (value, loc, attn))
        grad = torch.randn(2, 3, 6, dtype=dtype, device=DEVICE)
        torch.library.opcheck(torch.ops.isda.ms_deform_attn_backward.default,
                              (value, shapes, starts, loc, attn, grad))
        torch.library.opcheck(torch.ops.isda.ms_deform_attn.default,
                              (value.requires_grad_(), shapes, starts, loc.requires_grad_(),
                               attn.requires_grad_()))


@needs_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_cuda_op_reduced_precision_against_float32(cuda_op, dtype, tol):
    hw = [(16, 12), (8, 6), (4, 3), (2, 2)]
    value, shapes, starts, loc, attn = (t.float() if t.is_floating_point() else t
                                        for t in _inputs(hw, 2, 50, 4, 16, 4, seed=9))
    grad_out = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(2))
    out32, grads32 = _compiled(value, shapes, starts, loc, attn, grad_out)
    low = [t.to(dtype) for t in (value, loc, attn)]
    out, grads = _compiled(low[0], shapes, starts, low[1], low[2], grad_out.to(dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    # same computation (the op upcasts to float32) on the rounded inputs: output rounding only
    rounded32, rounded_grads32 = _compiled(*[x.float() if x.is_floating_point() else x for x in
                                             (low[0], shapes, starts, low[1], low[2])],
                                           grad_out.to(dtype).float())
    _close(out.float(), rounded32.double(), tol, tol)
    for got, want in zip(grads, rounded_grads32):
        _close(got.float(), want.double(), tol, tol)
    # against the float32 inputs: the input rounding (of the locations above all) adds error
    _close(out.float(), out32.double(), 10 * tol, 10 * tol)
    # AMP-style mixed inputs: low-precision value, float32 locations and weights -> float32
    mixed, _ = _compiled(low[0], shapes, starts, loc, attn, grad_out)
    assert mixed.dtype == torch.float32
    _close(mixed, out32.double(), 10 * tol, 10 * tol)


# ------------------------------------------------------------------------------------------
# no host synchronisation
# ------------------------------------------------------------------------------------------
class _sync_debug_error:
    """``torch.cuda.set_sync_debug_mode("error")`` for the block: any synchronising CUDA call
    (device-to-host copy, ``.item()``, ``nonzero`` ...) raises a RuntimeError."""

    def __enter__(self):
        torch.cuda.synchronize()
        self.previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.previous)
        return False


@needs_cuda
def test_cuda_op_makes_no_host_sync(cuda_op):
    value, shapes, starts, loc, attn = (t.to(DEVICE) for t in _inputs(LEVELS4, 2, 30, 4, 16, 4))
    value, loc, attn = (t.float().requires_grad_() for t in (value, loc, attn))
    grad_out = torch.randn(2, 30, 64, device=DEVICE)
    module = MSDeformAttn(d_model=64, n_levels=4, n_heads=4, n_points=4).to(DEVICE)
    S = value.shape[1]
    query, src = torch.randn(2, 30, 64, device=DEVICE), torch.randn(2, S, 64, device=DEVICE)
    ref_pts = torch.rand(2, 30, 4, 2, device=DEVICE)
    pad = torch.zeros(2, S, dtype=torch.bool, device=DEVICE)
    pad[1, -20:] = True

    def run():
        out = ms_deform_attn(value, shapes, starts, loc, attn)
        out.backward(grad_out)
        module(query, ref_pts, src, shapes, starts, pad).sum().backward()

    with set_backend("compiled"), set_validation(False):
        run()  # warm-up: lazy CUDA and cuBLAS initialisation may synchronise once
        with _sync_debug_error():
            run()
        # the debug switch does copy to the host (and so catches bad metadata on the GPU)
        with set_validation(True):
            with _sync_debug_error(), pytest.raises(RuntimeError, match="synchroniz"):
                ms_deform_attn(value, shapes, starts, loc, attn)
            with pytest.raises(ValueError, match="level_start_index"):
                ms_deform_attn(value, shapes, starts.flip(0), loc, attn)
            with pytest.raises(ValueError, match="spatial_shapes"):
                ms_deform_attn(value, shapes * 2, starts, loc, attn)


def test_value_checks_run_on_cpu_tensors_only_unless_switched_on():
    """No GPU needed: tensors on the meta device (no data, like a GPU's for the host) pass the
    value checks unless the switch is on; CPU tensors are always checked."""
    value, shapes, starts, loc, attn = _inputs([(3, 4), (2, 2)], 1, 2, 2, 3, 2)
    bad_starts = torch.tensor([0, 11])
    meta = [t.to("meta") for t in (value, shapes, bad_starts, loc, attn)]
    with set_validation(False):
        assert not msda.get_validation()
        msda_checks.validate_inputs(*meta)  # nothing read from the device
        with pytest.raises(ValueError, match="level_start_index"):
            msda_checks.validate_inputs(value, shapes, bad_starts, loc, attn)
        with pytest.raises(ValueError, match="attention_weights"):  # metadata: always checked
            msda_checks.validate_inputs(*meta[:4], meta[4][..., :1])
        with set_validation(True):
            assert msda.get_validation()
        assert not msda.get_validation()


def test_validation_switch_from_the_environment():
    code = ("import importlib, os\n"
            "import isda.layers.ms_deform_attn_checks as m\n"
            "on = m.get_validation()\n"
            "os.environ['ISDA_MSDA_VALIDATE'] = '0'\n"
            "print(on, importlib.reload(m).get_validation())\n")
    env = dict(os.environ, ISDA_MSDA_VALIDATE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "True False"


# ------------------------------------------------------------------------------------------
# the tiny model on CUDA
# ------------------------------------------------------------------------------------------
def _train_batch():
    return [synthetic_input(96, 128, seed=0), synthetic_input(80, 112, num_inst=2, seed=1)]


def _test_batch():
    """Two images of different odd sizes (padding); the second with a larger original size."""
    a = synthetic_input(70, 101, seed=11, with_targets=False)
    b = synthetic_input(53, 88, seed=12, with_targets=False)
    b["height"], b["width"] = 80, 130
    return [a, b]


def _cpu_and_device_models(*opts):
    cfg = small_cfg("MODEL.ISDA.TEST.TOPK", 20, *opts)
    cpu = build(cfg, seed=0)
    dev = build(small_cfg("MODEL.ISDA.TEST.TOPK", 20, "MODEL.DEVICE", DEVICE, *opts), seed=0)
    dev.load_state_dict(cpu.state_dict())
    assert dev.device.type == torch.device(DEVICE).type
    return cpu, dev


@needs_cuda
def test_tiny_model_training_step_on_cuda(cuda_op, no_tf32):
    cpu, model = _cpu_and_device_models()
    cpu.train()
    model.train()
    cpu_losses = cpu(_train_batch())
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = model(_train_batch())
    assert set(losses) == set(cpu_losses)
    for k, v in losses.items():
        assert v.device.type == torch.device(DEVICE).type and torch.isfinite(v), k
        assert v.item() == pytest.approx(cpu_losses[k].item(), rel=1e-3, abs=1e-4), k
    opt.zero_grad()
    sum(losses.values()).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
    opt.step()
    changed = {n for n, p in model.named_parameters()
               if p.requires_grad and not torch.equal(p.detach(), before[n])}
    for module in ("backbone.", "mapper.", "encoder.", "decoder.", "mask_head.", "heads."):
        assert any(n.startswith(module) for n in changed), module
    assert len(changed) > len(before) // 2


def _match_instances(a, b, score_tol, pixel_tol):
    """Each instance of ``a`` has one in ``b`` of the same class, score within ``score_tol``
    and at most a ``pixel_tol`` share of its pixels different (near-equal scores may swap)."""
    assert len(a) == len(b) and a.image_size == b.image_size
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=score_tol)
    npix = a.pred_masks[0].numel() if len(a) else 1
    for i in range(len(a)):
        candidates = [j for j in range(len(b)) if b.pred_classes[j] == a.pred_classes[i]
                      and abs(b.scores[j] - a.scores[i]) <= score_tol]
        diffs = [(a.pred_masks[i] != b.pred_masks[j]).sum().item() / npix for j in candidates]
        assert diffs and min(diffs) <= pixel_tol, (i, diffs)


@needs_cuda
def test_tiny_model_inference_on_cuda_equals_cpu(cuda_op, no_tf32):
    cpu, model = _cpu_and_device_models()
    cpu.eval()
    model.eval()
    batch = _test_batch()
    with torch.no_grad():
        feats_cpu, feats = cpu.forward_features(batch), model.forward_features(batch)
        results_cpu, results = cpu(batch), model(batch)
    for key in ("logits", "kernels"):
        torch.testing.assert_close(feats[key].cpu(), feats_cpu[key], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(feats["mask_features"].cpu(), feats_cpu["mask_features"],
                               rtol=1e-3, atol=1e-3)
    for r, r_cpu, x in zip(results, results_cpu, batch):
        inst = r["instances"]
        size = (x.get("height", x["image"].shape[1]), x.get("width", x["image"].shape[2]))
        assert inst.image_size == size
        assert inst.pred_masks.shape == (len(inst), *size) and inst.pred_masks.dtype == torch.bool
        assert inst.pred_masks.device.type == torch.device(DEVICE).type
        assert inst.pred_boxes.tensor.shape == (len(inst), 4)
        _match_instances(inst.to("cpu"), r_cpu["instances"], score_tol=1e-3, pixel_tol=1e-3)


@needs_cuda
def test_postprocess_on_cuda_equals_cpu():
    """The post-processing's GPU branch on CUDA against its CPU branch, same inputs."""
    from isda.modeling.postprocess import isda_postprocess

    g = torch.Generator().manual_seed(0)
    cls, masks = torch.randn(40, 3, generator=g) * 2, torch.randn(40, 24, 30, generator=g) * 4 - 2
    for image_size, output_size in (((93, 117), (93, 117)), ((93, 117), (400, 311)),
                                    ((93, 117), (60, 70))):
        cpu = isda_postprocess(cls, masks, image_size, output_size, topk=50)
        dev = isda_postprocess(cls.to(DEVICE), masks.to(DEVICE), image_size, output_size, topk=50)
        assert dev.pred_masks.device.type == torch.device(DEVICE).type
        _match_instances(dev.to("cpu"), cpu, score_tol=1e-6, pixel_tol=1e-3)


# ------------------------------------------------------------------------------------------
# DDP with NCCL
# ------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, url, out_dir, backend, iters):
    """One rank: the tiny model under DistributedDataParallel, ``iters`` AdamW steps on
    rank-specific images; saves the final parameters and losses to ``out_dir``."""
    import torch.distributed as dist
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=url, world_size=world_size, rank=rank,
                            timeout=timedelta(minutes=3))
    # Detectron2's local process group, set up as isda/engine/launch.py (and detectron2's
    # launch) do it, so comm.get_local_rank() & co. work as in a training job
    comm._LOCAL_PROCESS_GROUP = dist.new_group(list(range(world_size)))
    comm.synchronize()
    try:
        assert comm.get_rank() == rank and comm.get_world_size() == world_size
        model = build(small_cfg("MODEL.DEVICE", str(device)), seed=0)
        model.train()
        ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None,
                                      broadcast_buffers=False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for it in range(iters):
            seed = 100 * it + 10 * rank  # every rank its own images
            batch = [synthetic_input(96, 128, seed=seed), synthetic_input(80, 112, num_inst=2, seed=seed + 1)]
            loss = sum(ddp(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        torch.save({"params": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "losses": losses, "gathered": comm.all_gather(rank)},
                   Path(out_dir) / f"rank{rank}.pt")
        comm.synchronize()
    finally:
        dist.destroy_process_group()


def run_ddp(out_dir, backend="nccl", world_size=2, iters=3):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, nprocs=world_size, join=True,
             args=(world_size, f"tcp://127.0.0.1:{_free_port()}", str(out_dir), backend, iters))
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


@needs_two_gpus
def test_ddp_two_gpus_nccl_identical_parameters(tmp_path):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    r0, r1 = run_ddp(tmp_path, "nccl")
    assert r0["gathered"] == r1["gathered"] == [0, 1]
    assert r0["losses"] != r1["losses"]  # different images per rank ...
    init = build(small_cfg(), seed=0).state_dict()
    assert r0["params"].keys() == r1["params"].keys() == init.keys()
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # ... identical parameters
    assert any(not torch.equal(r0["params"][k], init[k]) for k in init)  # that did train
