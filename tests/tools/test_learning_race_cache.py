"""The learning race's bookkeeping (benchmarks/learning_race.py), without training: the config
fingerprint follows the whole ``_BASE_`` chain, cached runs are found by their full
specification, ``--cached-only`` never starts a run, and the table's mean +- sd."""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
import learning_race as race

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent


def _configs(tmp_path, base_lr="0.001"):
    (tmp_path / "Base.yaml").write_text(f"SOLVER:\n  BASE_LR: {base_lr}\n")
    (tmp_path / "sub").mkdir(exist_ok=True)
    child = tmp_path / "sub" / "child.yaml"
    child.write_text('_BASE_: "../Base.yaml"\nMODEL:\n  ISDA:\n    NUM_CLASSES: 1\n')
    return child


def test_fingerprint_changes_with_the_base_file_and_only_then(tmp_path):
    child = _configs(tmp_path)
    first = race.config_fingerprint(child)
    assert race.config_fingerprint(child) == first and len(first) == 12
    _configs(tmp_path, base_lr="0.002")  # only the _BASE_ file changes
    assert race.config_fingerprint(child) != first
    _configs(tmp_path)
    assert race.config_fingerprint(child) == first


def test_cached_runs_are_found_by_their_whole_spec_and_cached_only_never_runs(tmp_path,
                                                                               monkeypatch):
    spec = {"model": "isda", "dataset": "nuclei", "seed": 0, "max_iter": 10, "calibrate": 0}
    other = dict(spec, seed=1)
    assert race.spec_key(spec) != race.spec_key(other)
    assert race.spec_key(dict(reversed(list(spec.items())))) == race.spec_key(spec)
    (tmp_path / f"{race.spec_key(spec)}.json").write_text(
        json.dumps({"spec": spec, "result": {"AP": 12.5}}))

    def no_subprocess(*a, **k):
        raise AssertionError("a run was started")

    monkeypatch.setattr(race.subprocess, "run", no_subprocess)
    assert race.run_cached(spec, tmp_path) == {"AP": 12.5}
    assert race.run_cached(other, tmp_path, cached_only=True) is None
    with pytest.raises(AssertionError, match="a run was started"):
        race.run_cached(other, tmp_path)


def test_summary_is_mean_and_sample_sd():
    rows = [{"AP": 1.0}, {"AP": 2.0}, {"AP": 6.0}]
    mean, sd = race.summarise(rows, "AP")
    assert mean == pytest.approx(3.0)
    # sample sd by hand: deviations -2, -1, 3 -> (4 + 1 + 9) / 2 = 7
    assert sd == pytest.approx(7 ** 0.5)
    assert race.summarise([{"AP": 4.0}], "AP") == (4.0, 0.0)


def test_next_pass_rescales_by_the_measured_cpu_time_and_accepts_within_tolerance():
    # Mask R-CNN on nuclei3d: 14 iterations took 4.22 CPU-minutes of a 3-minute budget
    assert race.next_pass_iters(14, 4.22, 3.0, 0.05) == 10  # 14 * 3 / 4.22 = 9.95
    assert race.next_pass_iters(100, 2.5, 3.0, 0.05) == 120  # under budget: more iterations
    assert race.next_pass_iters(100, 3.1, 3.0, 0.05) is None  # 3.3 % over: accepted
    assert race.next_pass_iters(100, 2.86, 3.0, 0.05) is None  # 4.7 % under: accepted
    assert race.next_pass_iters(12, 30.0, 3.0, 0.05) == 10  # never fewer than 10 iterations


def test_a_cell_that_missed_its_budget_runs_again_and_the_table_reports_that_pass(
        tmp_path, monkeypatch, capsys):
    """The calibration says 1 CPU-s per iteration; the runs really take 1.5 (as Mask R-CNN's did):
    pass 1 runs 180 iterations in 4.5 minutes of a 3-minute budget, pass 2 runs 120."""
    started = []

    def fake_run(spec, results_dir, cached_only=False):
        if spec["calibrate"]:
            return {"cpu_s_per_iter": 1.0}
        started.append((spec["max_iter"], spec["seed"]))
        n = spec["max_iter"]
        return {"cpu_min": n * 1.5 / 60, "iters": n, "AP": n / 10, "AP50": n / 5, "AP75": 0.0}

    monkeypatch.setattr(race, "run_cached", fake_run)
    race.main(["--budgets", "3", "--seeds", "0,1", "--datasets", "nuclei", "--models", "isda",
               "--results", str(tmp_path)])
    assert sorted(started) == [(120, 0), (120, 1), (180, 0), (180, 1)]
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (row,) = last["table"]
    assert (row["pass"], row["iters"], row["cpu_min"], row["AP"]) == (2, 120, 3.0, 12.0)

    started.clear()  # one pass only: the calibration's iteration count is final
    race.main(["--budgets", "3", "--seeds", "0", "--datasets", "nuclei", "--models", "isda",
               "--results", str(tmp_path), "--passes", "1"])
    assert started == [(180, 0)]
