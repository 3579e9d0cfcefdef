#!/usr/bin/env python
"""Duplicate removal at inference (``MODEL.ISDA.TEST.DEDUP``) measured on one briefly trained
model: mask AP / AP50 / AP75, recall at IoU 0.5 and duplicates per true positive (score >= 0.3)
for each method and threshold, on the learning race's held-out data; plus the CPU cost of each
method in the post-processing.

    python benchmarks/dedup.py --dataset nuclei --iters 200          # ~6 CPU-minutes + eval
    python benchmarks/dedup.py --dataset nuclei3d --iters 294

Training is the learning race's (``benchmarks/learning_race.py``: same config
``configs/custom/isda_R18_scratch.yaml``, data, batch, seeded order, one thread); the trained
weights are kept in ``--out`` and reused by a rerun with the same arguments. Every variant
evaluates the same weights, so the rows differ by the post-processing alone. Last line: JSON.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's isda, not an installed one
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = ["none", "mask_nms:0.5", "mask_nms:0.3", "mask_nms:0.7", "matrix_nms:2.0",
            "matrix_nms:0.5"]


def parse_variant(v):
    """"none" | "mask_nms:IOU" | "matrix_nms:SIGMA" -> (method, iou, sigma)."""
    method, _, arg = v.partition(":")
    if method == "mask_nms":
        return method, float(arg or 0.5), 2.0
    if method == "matrix_nms":
        return method, 0.5, float(arg or 2.0)
    return method, 0.5, 2.0


def postprocess_cost(methods, t=200, grid=(96, 128), repeats=20, seed=0):
    """CPU milliseconds (``time.process_time``, one thread) per image of ``instances_from_topk``
    for ``t`` random-disc masks on a mask grid ``grid`` (input 4x the grid, output the input
    size), and of its duplicate-removal step alone (``dedup_sorted``), per method."""
    import torch

    from isda.modeling.dedup import dedup_sorted
    from isda.modeling.postprocess import instances_from_topk

    g = torch.Generator().manual_seed(seed)
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cy, cx = torch.rand(t, generator=g) * h, torch.rand(t, generator=g) * w
    r = 3 + torch.rand(t, generator=g) * 6
    logits = (r[:, None, None] - ((yy - cy[:, None, None]) ** 2
                                  + (xx - cx[:, None, None]) ** 2).sqrt()) * 2  # [t, h, w]
    scores = torch.rand(t, generator=g).sort(descending=True).values
    classes = torch.zeros(t, dtype=torch.long)
    binary = logits > 0
    size = (h * 4, w * 4)

    def clock(fn):
        fn()  # warm-up
        t0 = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - t0) / repeats * 1000

    out = {}
    for m in methods:
        method, iou, sigma = parse_variant(m)
        out[m] = {
            "postprocess_ms": round(clock(lambda: instances_from_topk(
                scores, classes, logits, size, size, dedup=method, dedup_iou=iou,
                dedup_sigma=sigma)), 2),
            "dedup_step_ms": round(clock(lambda: dedup_sorted(scores, classes, binary, method,
                                                              iou, sigma)), 2)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", default="nuclei", help="a learning-race dataset")
    p.add_argument("--iters", type=int, default=200, help="training iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--isda-config", default="configs/custom/isda_R18_scratch.yaml")
    p.add_argument("--isda-opts", nargs="*", default=[], help="KEY VALUE overrides")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="none, mask_nms:IOU, matrix_nms:SIGMA (default %(default)s)")
    p.add_argument("--score", type=float, default=0.3, help="threshold of the counts")
    p.add_argument("--out", default=str(ROOT / "output" / "dedup_bench"))
    p.add_argument("--cost-only", action="store_true", help="only the post-processing cost")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import isda  # noqa: F401  (registers the model and the datasets)
    import learning_race as race

    variants = args.variants.split(",")
    report = {"variants": variants, "cost_200_masks_96x128": postprocess_cost(variants)}
    for m, c in report["cost_200_masks_96x128"].items():
        print(f"200 masks on a 96x128 grid (output 384x512), {m}: post-processing "
              f"{c['postprocess_ms']:.1f} CPU-ms, of which duplicate removal "
              f"{c['dedup_step_ms']:.1f}", flush=True)
    if args.cost_only:
        print(json.dumps(report))
        return 0
    cfg = race.build_cfg("isda", args.dataset, args.iters, args.seed, args.isda_config,
                         args.isda_opts, [], race.BATCH)
    name = f"{args.dataset}_it{args.iters}_seed{args.seed}_{race.config_fingerprint(args.isda_config)}"
    if args.isda_opts:
        name += "_" + race.spec_key({"opts": args.isda_opts})
    weights = Path(args.out) / f"{name}.pth"
    if weights.is_file():
        from detectron2.modeling import build_model

        model = build_model(cfg)
        model.load_state_dict(torch.load(weights, map_location="cpu"))
        cpu = json.loads(weights.with_suffix(".json").read_text())["cpu_min"] * 60
    else:
        model, cpu = race.train("isda", cfg)
        weights.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), weights)
        weights.with_suffix(".json").write_text(json.dumps({"cpu_min": cpu / 60}))
    report.update(dataset=args.dataset, iters=args.iters, seed=args.seed,
                  train_cpu_min=round(cpu / 60, 2), rows={})
    print(f"{args.dataset}: {args.iters} iterations, {cpu / 60:.2f} CPU-min of training")
    print("\n| post-processing | mask AP | AP50 | AP75 | recall@0.5 | TP | duplicates | "
          f"background FP | duplicates / TP (score >= {args.score:g}) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        model.dedup, model.dedup_iou, model.dedup_sigma = parse_variant(v)
        r = race.evaluate(cfg, model, args.score)
        report["rows"][v] = r
        print(f"| {v} | {r['AP']:.1f} | {r['AP50']:.1f} | {r['AP75']:.1f} | {r['recall50']:.3f} "
              f"| {r['tp']} | {r['duplicates']} | {r['background']} | "
              f"{r['duplicates_per_tp']:.2f} |", flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
