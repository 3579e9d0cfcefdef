#!/usr/bin/env python
"""Does ``MODEL.ISDA.TEST.PRECISION bf16`` keep the results of a trained model? The nuclei
checkpoint on ``nuclei_val`` in fp32 and in bf16 (the same model object, same inputs):

    python benchmarks/bf16_agreement.py [--weights model_final.pth] [--threads 2]

Weights: ``--weights``, else the first of ``output/isda_R18_nuclei/model_final.pth`` and
``output/main/train/model_final.pth`` (the main job's) that exists, else a brief training run of
``configs/nuclei/isda_R18_nuclei.yaml`` (``--train-iters``, default 200) into a temporary folder.

For every image the detections of the two runs are matched one to one by the Hungarian
algorithm on mask IoU (pairs of different classes forbidden; both runs return the same number of
detections: the top-k (query, class) pairs). Reported: the matched pairs' mask IoU (min, mean;
required >= 0.95 each for the detections that count, see ``--min-score``), their score
differences (max / mean absolute), COCO mask AP of both runs (Detectron2's ``COCOEvaluator``) and
the AP difference, and the latency of both on these images. Every counted pair below IoU 0.95
is listed with its masks' areas and with how much the fp32 mask itself changes when the mask
threshold moves by ``--threshold-shift`` either way (a flat mask whose probabilities sit at the
threshold flips pixels under any rounding). The last stdout line is one JSON object.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/nuclei/isda_R18_nuclei.yaml"
CANDIDATES = ("output/isda_R18_nuclei/model_final.pth", "output/main/train/model_final.pth")


def find_or_train_weights(weights, train_iters, threads):
    if weights:
        return weights, "given"
    for c in CANDIDATES:
        if (ROOT / c).is_file():
            return str(ROOT / c), "found"
    out = Path(tempfile.mkdtemp(prefix="isda_bf16_")) / "train"
    print(f"no checkpoint found: training {CONFIG} for {train_iters} iterations into {out}",
          flush=True)
    steps = f"({int(train_iters * 0.85)},)"
    subprocess.run([sys.executable, str(ROOT / "train_net.py"), "--config-file", str(ROOT / CONFIG),
                    "SOLVER.MAX_ITER", str(train_iters), "SOLVER.STEPS", steps,
                    "SOLVER.CHECKPOINT_PERIOD", str(10 * train_iters), "TEST.EVAL_PERIOD", "0",
                    "OUTPUT_DIR", str(out)], check=True, cwd=ROOT,
                   env={**__import__("os").environ, "OMP_NUM_THREADS": str(threads)})
    return str(out / "model_final.pth"), f"trained {train_iters} iterations"


def rle_iou(masks_a, masks_b):
    """Mask IoU matrix [len(a), len(b)] of two boolean mask stacks, by pycocotools on RLE (two
    empty masks count as IoU 1, as identical)."""
    import numpy as np
    from pycocotools import mask as mask_util

    def rles(m):
        return mask_util.encode(np.asfortranarray(m.permute(1, 2, 0).numpy().astype(np.uint8)))

    if len(masks_a) == 0 or len(masks_b) == 0:
        return np.zeros((len(masks_a), len(masks_b)))
    iou = np.asarray(mask_util.iou(rles(masks_a), rles(masks_b), [0] * len(masks_b)))
    empty = (masks_a.flatten(1).sum(1) == 0).numpy()[:, None] & \
        (masks_b.flatten(1).sum(1) == 0).numpy()[None]
    return np.where(empty, 1.0, iou).reshape(len(masks_a), len(masks_b))


def match(a, b):
    """Instances ``a``, ``b`` -> (index in a, index in b, mask IoU) of the one-to-one matching
    among same-class pairs minimising ``|score difference| - IoU`` (the score term tells apart
    the near-duplicate masks that several queries may predict)."""
    from scipy.optimize import linear_sum_assignment

    iou = torch.as_tensor(rle_iou(a.pred_masks, b.pred_masks), dtype=torch.float64)
    same = a.pred_classes[:, None] == b.pred_classes[None]
    dscore = (a.scores.double()[:, None] - b.scores.double()[None]).abs()
    cost = torch.where(same, dscore - iou, torch.full_like(iou, 10.0)).numpy()
    ia, ib = linear_sum_assignment(cost)
    if not bool(same[ia, ib].all()):
        raise RuntimeError("the two runs differ in the number of detections of a class")
    return ia, ib, iou[ia, ib].numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--weights", default=None, help="checkpoint (default: see above)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--train-iters", type=int, default=200,
                   help="iterations of the brief training run when no checkpoint exists")
    p.add_argument("--min-score", type=float, default=0.05,
                   help="the IoU requirement applies to pairs whose fp32 score is at least "
                        "this (default 0.05; all pairs are reported too)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per precision")
    p.add_argument("--threshold-shift", type=float, default=0.001,
                   help="for the pairs below IoU 0.95: how much the fp32 mask itself changes when "
                        "the mask threshold moves by this much either way (default 0.001)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))

    import isda  # noqa: F401  registers ISDA and the datasets
    from detectron2.config import get_cfg
    from detectron2.evaluation import inference_on_dataset

    from isda.checkpoint import ISDACheckpointer
    from isda.engine import Trainer

    weights, origin = find_or_train_weights(args.weights, args.train_iters, args.threads)
    cfg = get_cfg()
    isda.add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / CONFIG))
    cfg.merge_from_list(["MODEL.WEIGHTS", weights, "MODEL.DEVICE", "cpu",
                         "DATALOADER.NUM_WORKERS", 0])
    model = Trainer.build_model(cfg).eval()
    ISDACheckpointer(model).load(weights)
    dataset = cfg.DATASETS.TEST[0]
    batches = list(Trainer.build_test_loader(cfg, dataset))

    def run(precision):
        model.test_precision = precision
        with torch.no_grad():
            return [model(b)[0]["instances"] for b in batches]

    outs = {pr: run(pr) for pr in ("fp32", "bf16")}  # also the warm-up
    times = {"fp32": [], "bf16": []}
    for i in range(args.repeats):
        for pr in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            t0 = time.perf_counter()
            run(pr)
            times[pr].append(time.perf_counter() - t0)

    shifted = []

    def shifted_runs():
        """The fp32 masks at the mask threshold moved by -/+ shift, run once and only when a
        counted pair needs them (same detections in the same order: top-k is chosen on the
        class scores, before the masks are thresholded)."""
        if not shifted:
            threshold = model.mask_threshold
            for t in (threshold - args.threshold_shift, threshold + args.threshold_shift):
                model.mask_threshold = t
                shifted.append(run("fp32"))
            model.mask_threshold = threshold
            for s in shifted:
                if any(not torch.equal(x.pred_classes, y.pred_classes)
                       for x, y in zip(s, outs["fp32"])):
                    raise RuntimeError("the detections changed with the mask threshold")
        return shifted

    ious, ious_counted, dscore, n_det, below = [], [], [], 0, []
    for img, (a, b) in enumerate(zip(outs["bf16"], outs["fp32"])):
        assert a.scores.dtype == torch.float32 and a.pred_masks.dtype == torch.bool
        ia, ib, iou = match(a, b)
        n_det += len(ia)
        ious.extend(iou.tolist())
        counted = (b.scores[ib] >= args.min_score).numpy()
        ious_counted.extend(iou[counted].tolist())
        dscore.extend((a.scores[ia] - b.scores[ib]).abs().tolist())
        for x, y, v, c in zip(ia, ib, iou, counted):
            if not c or v >= 0.95:
                continue
            moved = [round(float(rle_iou(b.pred_masks[y:y + 1],
                                         s[img].pred_masks[y:y + 1])[0, 0]), 4)
                     for s in shifted_runs()]
            below.append({"image": img, "iou": round(float(v), 4),
                          "fp32_score": round(float(b.scores[y]), 4),
                          "fp32_area": int(b.pred_masks[y].sum()),
                          "bf16_area": int(a.pred_masks[x].sum()),
                          "fp32_iou_threshold_shifted": moved})

    aps = {}
    for pr in ("fp32", "bf16"):
        model.test_precision = pr
        evaluator = Trainer.build_evaluator(cfg, dataset,
                                            output_folder=tempfile.mkdtemp(prefix="isda_eval_"))
        res = inference_on_dataset(model, batches, evaluator)
        aps[pr] = {k: round(float(v), 3) for k, v in res["segm"].items()
                   if k in ("AP", "AP50", "AP75") and v == v}
    model.test_precision = "fp32"

    report = {
        "weights": origin, "dataset": dataset, "images": len(batches), "threads": args.threads,
        "detections": n_det, "min_score": args.min_score, "counted_pairs": len(ious_counted),
        "min_iou_counted": round(min(ious_counted), 4) if ious_counted else None,
        "min_iou_all": round(min(ious), 4), "mean_iou_all": round(float(np.mean(ious)), 4),
        "pairs_below_0.95_all": int(sum(i < 0.95 for i in ious)),
        "score_abs_diff_max": round(max(dscore), 5),
        "score_abs_diff_mean": round(float(np.mean(dscore)), 6),
        "ap_fp32": aps["fp32"], "ap_bf16": aps["bf16"],
        "ap_diff": {k: round(aps["bf16"][k] - aps["fp32"][k], 3) for k in aps["fp32"]},
        "fp32_ms": round(statistics.median(times["fp32"]) * 1e3, 1),
        "bf16_ms": round(statistics.median(times["bf16"]) * 1e3, 1),
    }
    report["iou_requirement_met"] = bool(ious_counted) and min(ious_counted) >= 0.95
    # the counted pairs below 0.95, each with its fp32 mask's IoU against the fp32 masks at the
    # shifted thresholds: when that is not above the bf16 pair's IoU, fp32 itself is as unsure
    # of the mask as the two precisions differ (pixels with probabilities at the threshold)
    report["threshold_shift"] = args.threshold_shift
    report["counted_below_0.95"] = below
    report["counted_below_0.95_within_threshold_shift"] = sum(
        1 for b in below if b["iou"] >= min(b["fp32_iou_threshold_shifted"]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
