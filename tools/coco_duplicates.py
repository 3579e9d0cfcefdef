#!/usr/bin/env python
"""How many of a model's false positives are duplicates: COCO mask results against ground truth.

    python tools/coco_duplicates.py --gt instances_val.json \
        --results output/inference/coco_instances_results.json [--score 0.3]

Prints mask AP / AP50 / AP75 (pycocotools), recall at IoU 0.5, and above the score threshold
(default 0.3, the demo's): true positives, duplicates (false positives whose mask IoU with an
object already matched by a higher-scored detection is >= 0.5), background false positives and
duplicates per true positive. The last line is JSON. ``train_net.py --eval-only`` writes
``coco_instances_results.json`` to ``OUTPUT_DIR/inference/``; the ground truth is the dataset's
COCO JSON (Detectron2's COCOEvaluator writes ``<dataset>_coco_format.json`` there for datasets
registered without one). The counting is :func:`isda.evaluation.count_duplicates`.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from isda.evaluation.duplicates import DEMO_SCORE_THRESHOLD, count_duplicates  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--gt", required=True, help="COCO ground-truth JSON (instances)")
    p.add_argument("--results", required=True, help="COCO results JSON (segmentation + score)")
    p.add_argument("--score", type=float, default=DEMO_SCORE_THRESHOLD,
                   help=f"score threshold for the counts (default {DEMO_SCORE_THRESHOLD}, the "
                        "demo's)")
    args = p.parse_args(argv)
    r = count_duplicates(args.gt, args.results, args.score)
    print(f"mask AP {r['AP']:.1f}  AP50 {r['AP50']:.1f}  AP75 {r['AP75']:.1f}")
    print(f"recall at IoU 0.5: {r['recall50']:.3f} of {r['num_gt']} objects "
          f"({r['num_det']} detections)")
    print(f"score >= {r['score_threshold']:g}: true positives {r['tp']}, duplicates "
          f"{r['duplicates']}, background {r['background']}, duplicates per TP "
          f"{r['duplicates_per_tp']:.2f}")
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
