#!/usr/bin/env python
"""ISDA's post-processing on the CPU: the per-mask windows (the CPU path) against the chunked,
batched form (the GPU path), side by side on the same predictions.

    python benchmarks/postprocess.py [--quick] [--threads 2] [--repeats N]

Predictions of ISDA-R50 at 800x1216 (300 queries, 80 classes, 200x304 mask grid, top 100):
"spread" masks (smooth noise over the whole map, as a random-init model gives) and "discs"
(small objects scattered over the image, as a trained model's detections of small objects),
post-processed to the input size (the resize skipped) and to a smaller original size
(600x912: the resize evaluated). Both paths give the same masks (pixels at the threshold
aside, counted). Last line: JSON with the medians and ``speedup`` (chunked / per-mask) per case.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side import alternating_medians, layer_benchmark_args, report_pair  # noqa: E402


def predictions(kind, seed=0, q=300, k=80, h=200, w=304):
    """(class logits [Q, K], mask logits [Q, h, w])."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randn(q, k, generator=g)
    if kind == "spread":
        noise = torch.randn(q, 1, h // 4, w // 4, generator=g)
        return cls, torch.nn.functional.interpolate(noise, size=(h, w), mode="bilinear")[:, 0] * 3
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    centre = torch.rand(q, 2, generator=g) * torch.tensor([h - 1.0, w - 1.0])
    radius = 3 + torch.rand(q, generator=g) * 20
    dist = ((yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2).sqrt()
    return cls, (radius[:, None, None] - dist) * 0.5


def main(argv=None):
    args = layer_benchmark_args(__doc__, argv)
    repeats = args.repeats or (3 if args.quick else 9)
    from isda.modeling.postprocess import isda_postprocess

    report = {"threads": args.threads, "repeats": repeats}
    for kind in ("spread", "discs"):
        cls, masks = predictions(kind)
        for out in ((800, 1216), (600, 912)):
            def run(cpu_paths):
                return lambda: isda_postprocess(cls, masks, (800, 1216), out, cpu_paths=cpu_paths)

            a, b = run(False)(), run(True)()
            differ = int((a.pred_masks != b.pred_masks).sum())
            times = alternating_medians({"chunked": run(False), "per_mask": run(True)}, repeats)
            name = f"{kind}_{out[0]}x{out[1]}"
            report_pair(report, name, times, "chunked", "per_mask",
                        f"{name:>16}: {int(b.pred_masks.sum()):>9} mask pixels, {differ} differ")
            report[f"{name}_pixels_differ"] = differ
    print(json.dumps(report))


if __name__ == "__main__":
    main()
