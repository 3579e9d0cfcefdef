"""Exact resume after SIGKILL, atomic checkpoints, and a truncated last checkpoint.

A training subprocess (dropout on, flip/crop/multi-scale augmentation on, fixed seed) is killed
with SIGKILL mid-run and restarted with ``--resume``; its per-iteration losses after the resume
point must equal those of an uninterrupted run of the same command (relative difference
<= 1e-6), which is the independent reference.
"""
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detectron2.data.samplers import TrainingSampler

from isda.checkpoint import CheckpointNotFoundError, CorruptCheckpointError
from isda.engine.sampler import ResumableBatchSampler

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/nuclei/isda_R18_tiny.yaml"
MAX_ITER, PERIOD = 8, 3  # checkpoints after iterations 2, 5 and 7
SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1",
    "MODEL.ISDA.DEC_LAYERS", "1", "MODEL.ISDA.DROPOUT", "0.1",
    "INPUT.MIN_SIZE_TRAIN", "(32, 40, 48)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.CROP.PRE_RESIZE_SIZES", "(48,)", "INPUT.CROP.SIZE", "[32, 48]",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.001", "DATASETS.TEST", "()",
    "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD), "SEED", "7",
]


# one intra-op thread: a few multi-threaded torch CPU kernels may sum in a different order from
# run to run (measured up to 4e-7 relative on a loaded machine); with one thread the runs are
# bit-identical, so any difference left comes from the resume itself
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def command(out, *flags):
    return [sys.executable, "train_net.py", *flags, "--config-file", CONFIG, *SMALL,
            "OUTPUT_DIR", str(out)]


def losses(out):
    rows = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows}


def wait_for_iteration(proc, out, iteration, timeout=300):
    path = out / "losses.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before the kill")
        if path.is_file() and any(json.loads(x)["iteration"] >= iteration
                                  for x in path.read_text().splitlines() if x.endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training")


@pytest.fixture(scope="module")
def runs(module_tmp_path_factory):
    ref_out = module_tmp_path_factory.mktemp("uninterrupted")
    out = module_tmp_path_factory.mktemp("killed")
    log = open(ref_out / "stdout.txt", "w")
    reference = subprocess.Popen(command(ref_out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                 env=ENV)
    victim = subprocess.Popen(command(out), cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=ENV)
    try:
        # iterations 0-2 done and checkpointed (model_0000002.pth), 3-4 done: kill during 5
        wait_for_iteration(victim, out, 4)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
    finally:
        if victim.poll() is None:
            victim.kill()
    killed_state = {
        "files": sorted(p.name for p in out.iterdir()),
        "losses": losses(out),
        "last": (out / "last_checkpoint").read_text().strip(),
    }
    resumed = subprocess.run(command(out, "--resume"), cwd=ROOT, capture_output=True, text=True,
                             timeout=600, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert reference.wait(timeout=600) == 0, (ref_out / "stdout.txt").read_text()[-4000:]
    log.close()
    return ref_out, out, killed_state, resumed.stdout + resumed.stderr


def test_kill_leaves_only_complete_checkpoints(runs):
    _, out, killed, _ = runs
    assert killed["last"] in ("model_0000002.pth", "model_0000005.pth"), killed
    ckpts = [f for f in killed["files"] if f.endswith(".pth")]
    assert killed["last"] in ckpts
    for name in ckpts:  # every .pth visible after the kill loads completely
        data = torch.load(out / name, map_location="cpu", weights_only=True)
        assert "model" in data and "optimizer" in data["trainer"]["_trainer"]
        assert "RNGStateHook" in data["trainer"]["hooks"]
        assert name == "model_final.pth" or int(name[6:13]) == data["iteration"]
    assert max(killed["losses"]) >= 4 and "model_final.pth" not in killed["files"]


def test_resumed_losses_equal_uninterrupted_run(runs):
    ref_out, out, killed, log = runs
    resume_at = int(killed["last"][6:13]) + 1
    assert f"Starting training from iteration {resume_at}" in log
    ref, got = losses(ref_out), losses(out)
    assert sorted(ref) == sorted(got) == list(range(MAX_ITER))
    compared = 0
    for it in range(resume_at, MAX_ITER):
        names = [k for k in ref[it] if k != "iteration"]
        assert names and sorted(names) == sorted(k for k in got[it] if k != "iteration")
        for k in names:
            a, b = got[it][k], ref[it][k]
            assert abs(a - b) <= 1e-6 * max(abs(b), 1e-12), (it, k, a, b)
            compared += 1
    assert compared >= 3 * (MAX_ITER - resume_at)
    # iterations before the resume point were trained once, by the killed process
    for it in range(resume_at):
        assert got[it] == killed["losses"][it]
    # and the final weights agree as well
    a = torch.load(ref_out / "model_final.pth", weights_only=True)["model"]
    b = torch.load(out / "model_final.pth", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)


def _trainer(out):
    import train_net

    args = train_net.argument_parser().parse_args(
        ["--resume", "--config-file", str(ROOT / CONFIG), *SMALL, "OUTPUT_DIR", str(out)])
    return train_net.Trainer(train_net.setup(args))


def test_truncated_last_checkpoint_falls_back_to_previous_good_one(runs, tmp_path):
    _, out, _, _ = runs
    work = tmp_path / "run"
    shutil.copytree(out, work)
    final = work / "model_final.pth"
    assert (work / "last_checkpoint").read_text().strip() == "model_final.pth"
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])
    os.utime(work / "model_0000005.pth", (time.time() + 5,) * 2)  # the newest good one
    trainer = _trainer(work)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 6  # model_0000005.pth holds iteration 5
    log = (work / "log.txt").read_text()
    assert "model_final.pth" in log and "truncated or corrupt" in log
    assert "previous good checkpoint" in log and "model_0000005.pth" in log


def test_no_loadable_checkpoint_names_the_corrupt_file(runs, tmp_path):
    _, out, _, _ = runs
    work = tmp_path / "run"
    shutil.copytree(out, work)
    for p in work.glob("*.pth"):
        p.write_bytes(p.read_bytes()[:1000])
    trainer = _trainer(work)
    with pytest.raises(CorruptCheckpointError, match="model_final.pth.*truncated or corrupt"):
        trainer.resume_or_load(resume=True)


def test_last_checkpoint_naming_a_deleted_file_falls_back_to_the_newest_earlier_one(runs, tmp_path):
    _, out, _, _ = runs
    work = tmp_path / "run"
    shutil.copytree(out, work)
    assert (work / "last_checkpoint").read_text().strip() == "model_final.pth"
    (work / "model_final.pth").unlink()
    os.utime(work / "model_0000005.pth", (time.time() + 5,) * 2)  # the newest one left
    trainer = _trainer(work)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 6  # model_0000005.pth holds iteration 5
    log = (work / "log.txt").read_text()
    assert "names 'model_final.pth', which does not exist" in log
    assert "previous good checkpoint" in log and "model_0000005.pth" in log


def test_last_checkpoint_naming_a_deleted_file_and_nothing_else_names_it(runs, tmp_path):
    _, out, _, _ = runs
    work = tmp_path / "run"
    shutil.copytree(out, work)
    for p in work.glob("*.pth"):
        p.unlink()
    trainer = _trainer(work)
    with pytest.raises(CheckpointNotFoundError, match="model_final.pth.*does not exist"):
        trainer.resume_or_load(resume=True)


@pytest.mark.parametrize("group", [False, True])
def test_sampler_skips_to_the_uninterrupted_batches(group):
    """Batch k of a sampler started at k == batch k of one started at 0; ungrouped batches are
    consecutive chunks of Detectron2's TrainingSampler stream (the reference)."""
    size, bs, seed = 7, 3, 11
    groups = [i % 2 for i in range(size)] if group else None
    full = list(itertools.islice(ResumableBatchSampler(size, bs, seed=seed, group_ids=groups), 12))
    for k in (0, 1, 5):
        later = ResumableBatchSampler(size, bs, seed=seed, group_ids=groups, start=k)
        assert list(itertools.islice(later, 12 - k)) == full[k:]
    if not group:
        ref = list(itertools.islice(iter(TrainingSampler(size, seed=seed)), 12 * bs))
        assert [i for b in full for _, i in b] == ref
        assert [p for b in full for p, _ in b] == list(range(12 * bs))
    else:
        assert all(len({groups[i] for _, i in b}) == 1 and len(b) == bs for b in full)
