"""Multi-process CPU training never hangs: a stalled worker (SIGSTOP) ends the job within the
configured collective timeout, and the workers die with their launcher, even while one of them
is stopped and the other blocked in a collective operation."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 15
ARGS = [
    "train_net.py", "--num-cpu-procs", "2", "--config-file", "configs/nuclei/isda_R18_tiny.yaml",
    "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1", "MODEL.ISDA.DEC_LAYERS", "1",
    "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.CROP.ENABLED", "False",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "100000",
    "TEST.EVAL_PERIOD", "0",
]


def _ranks(launcher):
    return [c for c in launcher.children(recursive=True)
            if "resource_tracker" not in " ".join(c.cmdline())]


@pytest.fixture
def training(tmp_path):
    """A 2-process training job, started and training (its loss log has rows)."""
    env = dict(os.environ, ISDA_DIST_TIMEOUT=str(TIMEOUT_S))
    log = open(tmp_path / "console.txt", "w")  # a file: a full pipe would block the job
    proc = subprocess.Popen([sys.executable, *ARGS, "OUTPUT_DIR", str(tmp_path / "out")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.console = tmp_path / "console.txt"
    launcher = psutil.Process(proc.pid)
    losses = tmp_path / "out" / "losses.jsonl"
    deadline = time.time() + 300
    while not (losses.exists() and losses.stat().st_size > 0):
        assert proc.poll() is None, proc.console.read_text()[-3000:]
        assert time.time() < deadline, "training did not start"
        time.sleep(1)
    ranks = _ranks(launcher)
    assert len(ranks) == 2, ranks
    yield proc, ranks
    for p in ranks + [launcher]:  # never leave a process behind, whatever happened
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()
    log.close()


def _gone(processes, within):
    deadline = time.time() + within
    while time.time() < deadline:
        alive = [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.5)
    return alive


def test_a_stalled_worker_ends_the_job_within_the_timeout(training):
    proc, ranks = training
    t0 = time.time()
    ranks[1].send_signal(signal.SIGSTOP)
    try:
        proc.wait(timeout=TIMEOUT_S + 90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job still runs {time.time() - t0:.0f} s after a worker stalled "
                    f"(collective timeout {TIMEOUT_S} s)")
    output = proc.console.read_text()
    assert proc.returncode != 0
    assert f"a collective operation timed out after {TIMEOUT_S} s" in output, output[-3000:]
    assert _gone(ranks, within=10) == []


def test_workers_die_with_their_launcher(training):
    proc, ranks = training
    ranks[1].send_signal(signal.SIGSTOP)  # one stopped, the other soon blocked in a collective
    time.sleep(2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _gone(ranks, within=10) == []
