#!/usr/bin/env python
"""ISDA-R50's optimizer step on the CPU: torch's default AdamW loop vs the fused AdamW.

    python benchmarks/optimizer_step.py [--quick] [--threads 2] [--repeats N]

Both optimizers update ISDA-R50's trainable parameters (the lr-multiplier groups of
``isda.solver.param_groups``) from the same random gradients, alternating, after warm-up
steps; the full-model gradient clipping is timed once on its own (it is the same for both).
Also prints the largest relative difference between the two updated parameter sets after the
timed steps (float rounding only). Last line: JSON with the medians and ``fused_speedup``.
"""
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import alternating_medians, layer_benchmark_args, report_pair  # noqa: E402


def main(argv=None):
    args = layer_benchmark_args(__doc__, argv)
    repeats = args.repeats or (5 if args.quick else 15)
    from r50_models import build_cfg
    from detectron2.modeling import build_model
    from isda.solver import fused_adamw_supported, param_groups

    cfg = build_cfg("isda")
    torch.manual_seed(0)
    model = build_model(cfg)
    twin = copy.deepcopy(model)
    opts = {}
    for name, m in (("loop", model), ("fused", twin)):
        groups = param_groups(cfg, m)
        g = torch.Generator().manual_seed(1)
        for group in groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g) * 1e-3
        kwargs = {"fused": True} if name == "fused" else {}
        opts[name] = torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, betas=(0.9, 0.999), **kwargs)
    if not fused_adamw_supported(model.parameters()):
        print("this torch has no fused AdamW for the CPU (torch >= 2.4 has)")
        print(json.dumps({"fused_supported": False}))
        return
    params = [p for p in model.parameters() if p.requires_grad]
    times = alternating_medians({n: o.step for n, o in opts.items()}, repeats, warmup=2)
    clip = alternating_medians({"clip": lambda: torch.nn.utils.clip_grad_norm_(params, 0.1)},
                               repeats)
    report = {"threads": args.threads, "repeats": repeats, "tensors": len(params),
              "params_m": round(sum(p.numel() for p in params) / 1e6, 2)}
    report_pair(report, "adamw_step", times, "loop", "fused",
                f"AdamW step, {len(params)} tensors")
    report["fused_speedup"] = report.pop("adamw_step_speedup")
    report["clip_grad_norm_ms"] = round(clip["clip"], 2)
    with torch.no_grad():
        diff = max(float((a - b).abs().max() / a.abs().max().clamp(min=1e-12))
                   for a, b in zip(model.parameters(), twin.parameters()))
    report["max_rel_param_diff"] = diff
    print(f"full-model gradient clipping {clip['clip']:.2f} ms; largest relative parameter "
          f"difference after {repeats + 2} steps of each: {diff:.2e}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
