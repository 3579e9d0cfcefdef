"""ISDA's optimiser: AdamW (or SGD) with per-module lr multipliers and full-model gradient clipping.

lr multipliers (reference: x0.1 for the backbone, the sampling-offset layers and the
reference-point layer) come from ``SOLVER.BACKBONE_MULTIPLIER``,
``SOLVER.SAMPLING_OFFSET_MULTIPLIER`` and ``SOLVER.REFERENCE_POINT_MULTIPLIER``.
``SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"`` clips the global L2 norm of all gradients
(Detectron2 v0.6 only clips per parameter).

``SOLVER.ADAMW_FUSED True`` runs torch's fused AdamW (one kernel per parameter for the whole
update) where torch has it for the parameters' device (CPU since torch 2.4, CUDA): the same
update up to float rounding, and on the CPU 3x faster than the per-parameter loop torch uses by
default there (ISDA-R50's 326 tensors: 99 -> 33 ms per step, measured with
``benchmarks/optimizer_step.py``, in git history at commit 9f954e2).
Off by default (see the key's comment in ``isda/config.py``); torch builds without it keep the
loop.
"""
from typing import Any, Dict, List

import torch
from detectron2.solver.build import maybe_add_gradient_clipping


def param_groups(cfg, model: torch.nn.Module) -> List[Dict[str, Any]]:
    base_lr = cfg.SOLVER.BASE_LR
    wd = cfg.SOLVER.WEIGHT_DECAY
    groups: Dict[float, List[torch.nn.Parameter]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        mult = 1.0
        if name.startswith("backbone.") or ".backbone." in name:
            mult = cfg.SOLVER.BACKBONE_MULTIPLIER
        elif "sampling_offsets" in name:
            mult = cfg.SOLVER.SAMPLING_OFFSET_MULTIPLIER
        elif "reference_points" in name:
            mult = cfg.SOLVER.REFERENCE_POINT_MULTIPLIER
        groups.setdefault(mult, []).append(p)
    return [{"params": ps, "lr": base_lr * m, "weight_decay": wd, "lr_multiplier": m}
            for m, ps in sorted(groups.items(), reverse=True)]


def _full_model_clipping(optim_cls, clip_norm: float):
    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = [p for g in self.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optim_cls.__name__ + "WithFullModelGradientClip"
    return FullModelGradientClipping


def fused_adamw_supported(params) -> bool:
    """Whether this torch has a fused AdamW for ``params`` (all floating point, on one device
    type torch's fused kernels cover): probed by building one on an empty copy of a parameter."""
    params = list(params)
    if not params or not all(p.is_floating_point() for p in params):
        return False
    devices = {p.device.type for p in params}
    if len(devices) != 1:
        return False
    probe = torch.zeros(1, dtype=params[0].dtype, device=params[0].device, requires_grad=True)
    try:
        torch.optim.AdamW([probe], fused=True)
    except (RuntimeError, ValueError, TypeError):  # older torch, or a device without the kernel
        return False
    return True


def build_isda_optimizer(cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(cfg, model)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        optim_cls, kwargs = torch.optim.AdamW, {"betas": (0.9, 0.999)}
        if cfg.SOLVER.get("ADAMW_FUSED", False) and fused_adamw_supported(
                p for g in groups for p in g["params"]):
            kwargs["fused"] = True
    elif name == "SGD":
        optim_cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER: unknown optimiser '{cfg.SOLVER.OPTIMIZER}' "
                         "(ADAMW or SGD)")
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _full_model_clipping(optim_cls, clip.CLIP_VALUE)
        return optim_cls(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)
    return maybe_add_gradient_clipping(cfg, optim_cls)(groups, lr=cfg.SOLVER.BASE_LR, **kwargs)


def resolve_schedule(cfg):
    """A copy of ``cfg`` whose ``SOLVER.WARMUP_ITERS`` and ``SOLVER.STEPS`` follow
    ``SOLVER.MAX_ITER`` (``SOLVER.WARMUP_FRACTION`` > 0, ``SOLVER.STEP_FRACTIONS`` not empty); the
    same ``cfg`` when neither is set."""
    s = cfg.SOLVER
    frac_warmup = float(s.get("WARMUP_FRACTION", 0.0))
    frac_steps = tuple(s.get("STEP_FRACTIONS", ()))
    if frac_warmup <= 0 and not frac_steps:
        return cfg
    for name, v in [("WARMUP_FRACTION", frac_warmup)] + [("STEP_FRACTIONS", f) for f in frac_steps]:
        if not 0 <= float(v) < 1:
            raise ValueError(f"SOLVER.{name}: fractions of SOLVER.MAX_ITER must be in [0, 1), "
                             f"got {v}")
    out = cfg.clone()
    out.defrost()
    if frac_warmup > 0:
        out.SOLVER.WARMUP_ITERS = max(1, round(frac_warmup * s.MAX_ITER))
    if frac_steps:
        # Detectron2's schedulers need every step inside the run (1 <= step < MAX_ITER): a very
        # short run (e.g. a 2-iteration smoke test) keeps the steps that fit
        steps = {min(max(1, round(f * s.MAX_ITER)), s.MAX_ITER - 1) for f in frac_steps}
        out.SOLVER.STEPS = tuple(sorted(x for x in steps if x >= 1))
    if cfg.is_frozen():
        out.freeze()
    return out


def build_isda_lr_scheduler(cfg, optimizer):
    """Detectron2's scheduler (``SOLVER.LR_SCHEDULER_NAME``) on :func:`resolve_schedule`'s
    warm-up and steps."""
    from detectron2.solver import build_lr_scheduler

    return build_lr_scheduler(resolve_schedule(cfg), optimizer)
