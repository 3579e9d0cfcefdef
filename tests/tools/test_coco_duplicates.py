"""isda.evaluation.count_duplicates and tools/coco_duplicates.py on hand-made ground truth and
detections whose matching, counts and AP50 are computed by hand below."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from isda.evaluation.duplicates import count_duplicates

ROOT = Path(__file__).resolve().parents[2]
H = W = 20


def _rle(r0, r1, c0, c1):
    m = np.zeros((H, W), dtype=np.uint8, order="F")
    m[r0:r1, c0:c1] = 1
    rle = mask_utils.encode(m)
    rle["counts"] = rle["counts"].decode()
    return rle


# image 1: A and B side by side (touching), C below A; image 2: D (never detected) and a crowd
# region across the top rows
GT = {
    1: [("A", (0, 10, 0, 10)), ("B", (0, 10, 10, 20)), ("C", (12, 20, 0, 8))],
    2: [("D", (5, 15, 5, 15))],
}
# (image, box, score, what it is by hand)
DETS = [
    (1, (0, 10, 0, 10), 0.9, "TP A"),
    (1, (0, 10, 1, 11), 0.8, "duplicate: IoU(A) 90/110, IoU(B) 10/190"),
    (1, (0, 10, 10, 20), 0.7, "TP B"),
    (1, (15, 20, 15, 20), 0.6, "background"),
    (1, (0, 10, 0, 4), 0.5, "background: IoU(A) 40/100 < 0.5"),
    (1, (12, 18, 0, 8), 0.2, "TP C (IoU 48/64), below 0.3"),
    (1, (12, 20, 0, 7), 0.15, "duplicate of C, below 0.3"),
    (1, (0, 10, 0, 10), 0.1, "duplicate of A, below 0.3"),
    (2, (0, 4, 0, 10), 0.95, "inside the crowd region: ignored"),
]


def _files(tmp_path):
    anns, k = [], 1
    for img, objs in GT.items():
        for _, box in objs:
            rle = _rle(*box)
            anns.append({"id": k, "image_id": img, "category_id": 1, "segmentation": rle,
                         "area": float(mask_utils.area(rle)), "iscrowd": 0,
                         "bbox": list(mask_utils.toBbox(rle))})
            k += 1
    crowd = _rle(0, 5, 0, 20)
    anns.append({"id": k, "image_id": 2, "category_id": 1, "segmentation": crowd,
                 "area": float(mask_utils.area(crowd)), "iscrowd": 1,
                 "bbox": list(mask_utils.toBbox(crowd))})
    gt = {"images": [{"id": i, "height": H, "width": W, "file_name": f"{i}.png"} for i in GT],
          "categories": [{"id": 1, "name": "thing"}], "annotations": anns}
    dets = [{"image_id": img, "category_id": 1, "segmentation": _rle(*box), "score": s}
            for img, box, s, _ in DETS]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    return str(tmp_path / "gt.json"), str(tmp_path / "dets.json")


# AP50 by hand: the 8 counted detections in score order are TP FP TP FP FP TP FP FP over 4
# objects: precision 1, 1/2, 2/3, 1/2, 2/5, 1/2, 3/7, 3/8 at recall 1/4, 1/4, 1/2, 1/2, 1/2,
# 3/4, 3/4, 3/4; the interpolated precision (max to the right) is 1 up to recall 0.25 (26 of
# COCO's 101 recall points), 2/3 up to 0.5 (25 points), 1/2 up to 0.75 (25 points), then 0.
AP50 = 100 * (26 * 1 + 25 * 2 / 3 + 25 * 0.5) / 101


def test_counts_by_hand(tmp_path):
    gt, dets = _files(tmp_path)
    r = count_duplicates(gt, dets, score_threshold=0.3)
    assert r["num_gt"] == 4 and r["num_det"] == 9
    assert r["recall50"] == pytest.approx(3 / 4)  # A, B, C; D missed
    assert (r["tp"], r["duplicates"], r["background"]) == (2, 1, 2)
    assert r["duplicates_per_tp"] == pytest.approx(0.5)
    assert r["AP50"] == pytest.approx(AP50, abs=1e-6)
    # threshold 0.1: C's TP and the two late duplicates count too
    low = count_duplicates(gt, dets, score_threshold=0.1)
    assert (low["tp"], low["duplicates"], low["background"]) == (3, 3, 2)
    assert low["duplicates_per_tp"] == pytest.approx(1.0)


def test_no_detections(tmp_path):
    gt, _ = _files(tmp_path)
    r = count_duplicates(gt, [], 0.3)
    assert r["recall50"] == 0 and r["tp"] == r["duplicates"] == 0 and np.isnan(r["AP"])


def test_tool_prints_the_counts_and_json_last(tmp_path):
    gt, dets = _files(tmp_path)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "coco_duplicates.py"), "--gt", gt,
                          "--results", dets], capture_output=True, text=True, check=True).stdout
    last = json.loads(out.strip().splitlines()[-1])
    assert (last["tp"], last["duplicates"], last["background"]) == (2, 1, 2)
    assert last["score_threshold"] == 0.3  # the demo's threshold by default
    assert "duplicates 1" in out and "recall at IoU 0.5: 0.750" in out
