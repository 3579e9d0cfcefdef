"""benchmarks/learning_race.py's duplicate columns, without training: runs that report recall at
IoU 0.5 and duplicates per TP get them in the table and the JSON (mean +- sd over seeds), each
ISDA run's --eval-dedup evaluations become rows of their own, and runs cached before the columns
existed show "-"."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
import learning_race as race

pytestmark = pytest.mark.flavour_independent


def _eval(ap50, recall, dup):
    return {"AP": ap50 / 2, "AP50": ap50, "AP75": 1.0, "recall50": recall, "tp": 10,
            "duplicates": int(dup * 10), "background": 1, "duplicates_per_tp": dup}


def test_columns_and_dedup_rows(tmp_path, monkeypatch, capsys):
    specs = []

    def fake_run(spec, results_dir, cached_only=False):
        if spec["calibrate"]:
            return {"cpu_s_per_iter": 1.0}
        specs.append(spec)
        seed = spec["seed"]
        if spec["model"] == "maskrcnn":  # an old cached run: no duplicate columns
            return {"cpu_min": 3.0, "iters": 180, "AP": 1.0, "AP50": 2.0, "AP75": 0.0}
        return dict(_eval(40.0 + seed, 0.9, 0.5 + seed), cpu_min=3.0, iters=180, dedup="none",
                    dedup_mask_nms=_eval(50.0 + seed, 0.8, 0.1))

    monkeypatch.setattr(race, "run_cached", fake_run)
    race.main(["--budgets", "3", "--seeds", "0,1", "--datasets", "nuclei", "--results",
               str(tmp_path), "--eval-dedup", "mask_nms"])
    out = capsys.readouterr().out
    assert all(s.get("eval_dedup") == ["mask_nms"] for s in specs if s["model"] == "isda")
    assert all("eval_dedup" not in s for s in specs if s["model"] == "maskrcnn")
    table = {t["label"]: t for t in json.loads(out.strip().splitlines()[-1])["table"]}
    assert set(table) == {"ISDA", "ISDA +mask_nms", "Mask R-CNN"}
    # seeds 0, 1: duplicates per TP 0.5 and 1.5 -> mean 1.0, sample sd sqrt(0.5)
    assert table["ISDA"]["duplicates_per_tp"] == 1.0
    assert table["ISDA"]["duplicates_per_tp_sd"] == pytest.approx(0.5 ** 0.5, abs=0.005)
    assert table["ISDA"]["recall50"] == 0.9 and table["ISDA"]["AP50"] == 40.5
    assert table["ISDA +mask_nms"]["AP50"] == 50.5
    assert table["ISDA +mask_nms"]["duplicates_per_tp"] == 0.1
    assert "recall50" not in table["Mask R-CNN"]
    assert "| recall@0.5 | duplicates / TP (score >= 0.3) |" in out
    mrcnn_line = next(line for line in out.splitlines() if line.startswith("| nuclei | 3 | Mask"))
    assert mrcnn_line.endswith("| - | - |")
