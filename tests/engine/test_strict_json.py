"""Every JSON file ISDA writes is strict JSON: an undefined metric (NaN / inf) is ``null``, never a
bare ``NaN`` / ``Infinity`` token, which most JSON parsers reject. Checked with a parser that
refuses those tokens (``json.loads(..., parse_constant=...)``): Detectron2's ``metrics.json``
through the trainer's writers, ``inference/results.json`` (``train_net.save_results``), the main
job's ``metrics.json`` and ``losses.jsonl``."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from detectron2.utils.events import EventStorage, JSONWriter

ROOT = Path(__file__).resolve().parents[2]
import train_net  # noqa: E402

SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1",
    "MODEL.ISDA.DEC_LAYERS", "1", "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "48",
    "INPUT.CROP.ENABLED", "False", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()",
]


def _refuse(token):
    raise ValueError(f"not JSON: bare {token} token")


def strict_loads(text):
    return json.loads(text, parse_constant=_refuse)


def test_the_strict_parser_refuses_what_json_dumps_writes_by_default():
    with pytest.raises(ValueError, match="bare NaN"):
        strict_loads(json.dumps({"AP": float("nan")}))


def _cfg(out, *opts):
    args = train_net.argument_parser().parse_args(
        ["--config-file", str(ROOT / "configs/nuclei/isda_R18_tiny.yaml"), *SMALL, *opts,
         "OUTPUT_DIR", str(out)])
    return train_net.setup(args)


def test_trainer_metrics_json_is_strict(tmp_path):
    trainer = train_net.Trainer(_cfg(tmp_path, "SOLVER.MAX_ITER", "2"))
    writers = [w for h in trainer._hooks for w in getattr(h, "_writers", [])
               if isinstance(w, JSONWriter)]
    assert len(writers) == 1
    with EventStorage(7) as storage:
        # what an evaluation of a category without ground truth reports, and a normal value
        storage.put_scalars(**{"segm/APl": float("nan"), "segm/AP": 12.5,
                               "segm/APm": float("inf")}, smoothing_hint=False)
        storage.put_scalar("total_loss", 1.25)
        writers[0].write()
    writers[0].close()
    lines = (tmp_path / "metrics.json").read_text().splitlines()
    rows = [strict_loads(line) for line in lines]
    assert len(rows) == 1
    row = rows[0]
    assert row["iteration"] == 7 and row["segm/AP"] == 12.5 and row["total_loss"] == 1.25
    assert row["segm/APl"] is None and row["segm/APm"] is None


def test_metrics_json_drops_replayed_iterations_on_resume(tmp_path):
    """A resume from iteration 2's checkpoint replays iterations 3+: their old lines go (the
    rest, also lines an older version wrote with NaN, stays and becomes strict)."""
    from isda.engine.hooks import StrictJSONWriter

    path = tmp_path / "metrics.json"
    old = [{"iteration": i, "total_loss": 1.0 / (i + 1)} for i in range(6)]
    old[1]["segm/AP"] = float("nan")
    path.write_text("".join(json.dumps(r) + "\n" for r in old))  # as plain json.dumps wrote it
    writer = StrictJSONWriter(str(path))
    assert writer.drop_from(3) == 3
    with EventStorage(3) as storage:
        storage.put_scalar("total_loss", 0.5)
        writer.write()
    writer.close()
    rows = [strict_loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["segm/AP"] is None and rows[3]["total_loss"] == 0.5
    assert rows[2]["total_loss"] == pytest.approx(1 / 3)


def test_results_json_is_strict(tmp_path):
    cfg = _cfg(tmp_path)
    results = {"segm": {"AP": 3.5, "APs": float("nan"), "AP-nucleus": float("nan"),
                        "APl": float("-inf")}}
    path = train_net.save_results(cfg, results)
    data = strict_loads(Path(path).read_text())
    assert data["results"]["segm"] == {"AP": 3.5, "APs": None, "AP-nucleus": None, "APl": None}
    assert data["datasets"] == [] and data["weights"] == cfg.MODEL.WEIGHTS


def _main_job():
    spec = importlib.util.spec_from_file_location("main_job", str(ROOT / "tools" / "main_job.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_main_job_metrics_json_is_strict(tmp_path):
    main_job = _main_job()
    metrics = {"dataset": "nuclei_val", "results": {"segm": {"AP": float("nan"), "AP50": 41.25}},
               "wall_seconds": {"train": 1.5}}
    main_job.write_metrics(tmp_path / "metrics.json", metrics)
    data = strict_loads((tmp_path / "metrics.json").read_text())
    assert data["results"]["segm"] == {"AP": None, "AP50": 41.25}
    # the console line does not print a number for an undefined metric either
    assert [main_job.fmt(v) for v in (None, float("nan"), math.inf, 41.25, "x")] == \
        ["n/a", "n/a", "n/a", "41.2", "n/a"]


def test_losses_jsonl_is_strict(tmp_path):
    from isda.engine.hooks import dumps_strict

    assert strict_loads(dumps_strict({"iteration": 1, "loss": float("nan")})) == \
        {"iteration": 1, "loss": None}
    with pytest.raises(ValueError):
        json.dumps({"x": float("nan")}, allow_nan=False)  # what dumps_strict relies on
