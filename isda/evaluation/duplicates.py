"""Where the false positives of an instance segmenter come from: duplicates or background.

:func:`count_duplicates` evaluates COCO-format mask detections with pycocotools (AP, AP50, AP75)
and, on COCOeval's own matching at IoU 0.5 (all areas, up to 100 detections per image and
category), reports

* ``recall50``: the fraction of (non-crowd) ground-truth objects matched by any detection;
* above ``score_threshold`` (the demo's drawing threshold, 0.3, by default):
  ``tp`` matched detections, ``duplicates`` unmatched detections whose mask IoU with an object
  already matched by a higher-scored detection (of the same category) is >= 0.5, ``background``
  the other unmatched ones, and ``duplicates_per_tp``.

Detections COCOeval ignores (matched to crowd regions) count in none of these. Used by
``tools/coco_duplicates.py`` and ``benchmarks/learning_race.py``.
"""
import contextlib
import copy
import io

import numpy as np

__all__ = ["count_duplicates", "DEMO_SCORE_THRESHOLD"]

#: The demo's default ``--confidence-threshold`` (the detections a user sees).
DEMO_SCORE_THRESHOLD = 0.3
_IOU = 0.5


def _load(coco_gt, results):
    from pycocotools.coco import COCO

    if isinstance(coco_gt, str):
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(coco_gt)
    if isinstance(results, str):
        import json

        with open(results) as f:
            results = json.load(f)
    return coco_gt, list(results)


def count_duplicates(coco_gt, results, score_threshold=DEMO_SCORE_THRESHOLD):
    """COCO ground truth (a ``pycocotools.coco.COCO`` or the path of its JSON) and mask
    detections (a list of COCO result dicts with "image_id", "category_id", "segmentation" (RLE
    or polygons), "score", or the path of their JSON) -> dict with ``AP``, ``AP50``, ``AP75``
    (percent; NaN without detections), ``recall50``, ``num_gt``, ``num_det``, ``tp``,
    ``duplicates``, ``background``, ``duplicates_per_tp`` (above ``score_threshold``) and
    ``score_threshold``."""
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    coco_gt, results = _load(coco_gt, results)
    out = {"score_threshold": float(score_threshold), "num_det": len(results)}
    num_gt = sum(1 for a in coco_gt.dataset["annotations"] if not a.get("iscrowd", 0))
    out["num_gt"] = num_gt
    if not results:
        out.update(AP=float("nan"), AP50=float("nan"), AP75=float("nan"), recall50=0.0, tp=0,
                   duplicates=0, background=0, duplicates_per_tp=0.0)
        return out
    results = copy.deepcopy(results)  # loadRes adds fields (area, id, bbox)
    for r in results:
        r.pop("bbox", None)  # segm evaluation: areas and boxes from the masks
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out["AP"], out["AP50"], out["AP75"] = (float(v) * 100 for v in ev.stats[:3])
    t = int(np.argmin(np.abs(ev.params.iouThrs - _IOU)))
    max_det = ev.params.maxDets[-1]
    matched_gt = counted_gt = tp = dup = bg = 0
    for e in ev.evalImgs:
        if e is None or e["aRng"] != ev.params.areaRng[0] or e["maxDet"] != max_det:
            continue
        gt_ignore = np.asarray(e["gtIgnore"], dtype=bool)
        counted_gt += int((~gt_ignore).sum())
        matched_gt += int(((e["gtMatches"][t] > 0) & ~gt_ignore).sum())
        gts = [coco_gt.anns[g] for g, ig in zip(e["gtIds"], gt_ignore) if not ig]
        gt_rles = [coco_gt.annToRLE(g) for g in gts]
        matched = set()  # ids of the objects matched so far, in score order
        for d, m, ig, s in zip(e["dtIds"], e["dtMatches"][t], e["dtIgnore"][t], e["dtScores"]):
            if ig:
                continue
            if m > 0:
                matched.add(int(m))
                tp += s >= score_threshold
                continue
            if s < score_threshold:
                continue
            taken = [i for i, g in enumerate(gts) if g["id"] in matched]
            best = 0.0
            if taken:
                ious = mask_utils.iou([coco_dt.annToRLE(coco_dt.anns[d])],
                                      [gt_rles[i] for i in taken], [0] * len(taken))
                best = float(np.max(ious))
            if best >= _IOU:
                dup += 1
            else:
                bg += 1
    # (recall over every detection COCOeval keeps; its own recall array averages categories)
    out["recall50"] = matched_gt / counted_gt if counted_gt else 0.0
    out.update(tp=int(tp), duplicates=dup, background=bg,
               duplicates_per_tp=dup / tp if tp else 0.0)
    return out
