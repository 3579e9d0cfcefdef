"""train_net.py end to end, in subprocesses, as users run it: train + checkpoint, --resume,
--eval-only reproducing the in-training evaluation, strict JSON outputs, and a fresh run in a
folder holding an earlier run (refused, or moved aside with OUTPUT_DIR_EXISTING move)."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1",
    "MODEL.ISDA.DEC_LAYERS", "1", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160",
    "INPUT.MIN_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2",
    "DATASETS.TEST", "('nuclei_val',)", "SOLVER.BASE_LR", "0.001",
]
CONFIG = "configs/nuclei/isda_R18_tiny.yaml"


def run_train_net(*args, timeout=600):
    cmd = [sys.executable, "train_net.py", "--config-file", CONFIG, *args]
    return cmd, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def train_net(*args, timeout=600):
    """Run train_net.py; flags (--resume, --eval-only) must come before KEY VALUE pairs."""
    cmd, proc = run_train_net(*args, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


def _refuse(token):
    raise ValueError(f"not JSON: bare {token} token")


def strict_loads(text):
    """json.loads that refuses NaN / Infinity tokens (as most JSON parsers do)."""
    return json.loads(text, parse_constant=_refuse)


def read_metrics(out: Path):
    return [strict_loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def same(a, b):
    """Two metrics equal, an undefined one (null) only to another undefined one."""
    if a is None or b is None:
        return a is None and b is None
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def snapshot(folder: Path):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def first_run(module_tmp_path_factory):
    out = module_tmp_path_factory.mktemp("train")
    log = train_net(*TINY, "SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "4", "OUTPUT_DIR", str(out))
    return out, log


def test_trains_checkpoints_and_evaluates(first_run):
    out, log = first_run
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events written"
    rows = read_metrics(out)
    iters = [r["iteration"] for r in rows if "total_loss" in r]
    assert iters and max(iters) == 3
    assert all(math.isfinite(r["total_loss"]) for r in rows if "total_loss" in r)
    assert any("segm/AP" in r for r in rows), "the final evaluation did not run"
    assert "eta:" in log


def test_resume_continues_from_last_checkpoint(first_run, tmp_path):
    out, _ = first_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    log = train_net("--resume", *TINY, "SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "0",
                    "OUTPUT_DIR", str(resumed))
    assert "Starting training from iteration 4" in log
    iters = [r["iteration"] for r in read_metrics(resumed) if "total_loss" in r]
    assert max(iters) == 5


def test_eval_only_reproduces_the_training_evaluation(first_run, tmp_path):
    out, _ = first_run
    in_training = [r for r in read_metrics(out) if "segm/AP" in r][-1]
    ev = tmp_path / "eval"
    train_net("--eval-only", *TINY, "MODEL.WEIGHTS", str(out / "model_final.pth"),
              "OUTPUT_DIR", str(ev))
    res = strict_loads((ev / "inference" / "results.json").read_text())["results"]["segm"]
    for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
        assert same(res[key], in_training[f"segm/{key}"]), key


def test_fresh_run_in_a_folder_with_an_earlier_run_is_refused_and_changes_nothing(first_run,
                                                                                   tmp_path):
    out, _ = first_run
    work = tmp_path / "again"
    shutil.copytree(out, work)
    before = snapshot(work)
    cmd, proc = run_train_net(*TINY, "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0",
                              "OUTPUT_DIR", str(work))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "EarlierRunError" in last, last
    assert "--resume" in last and "OUTPUT_DIR_EXISTING move" in last and "losses.jsonl" in last
    assert snapshot(work) == before  # not a byte changed: losses.jsonl, metrics.json, log.txt...


def test_fresh_run_with_output_dir_existing_move_keeps_the_earlier_run_aside(first_run, tmp_path):
    out, _ = first_run
    work = tmp_path / "again"
    shutil.copytree(out, work)
    before = snapshot(work)
    log = train_net(*TINY, "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0",
                    "OUTPUT_DIR", str(work), "OUTPUT_DIR_EXISTING", "move")
    moved = [p for p in work.iterdir() if p.name.startswith("previous-")]
    assert len(moved) == 1 and f"into '{moved[0]}'" in log
    # the earlier run, byte for byte, in previous-<timestamp>/
    assert snapshot(moved[0]) == before
    # the new run's records hold the new run only
    rows = [strict_loads(x) for x in (work / "losses.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0]
    assert [r["iteration"] for r in read_metrics(work) if "total_loss" in r] == [0]
    assert (work / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert sorted(p.name for p in work.glob("*.pth")) == ["model_final.pth"]
