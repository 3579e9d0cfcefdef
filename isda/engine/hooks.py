"""Training hooks for exact resumes and observability.

- :class:`RNGStateHook`: the random-number states (python, numpy, torch CPU and CUDA) of every
  rank, stored in checkpoints through the trainer's hooks state;
- :class:`BadSampleCounter`: the number of skipped bad samples, in metrics, checkpoints and the
  final log line;
- :class:`LossLogger`: every iteration's losses as JSON lines (``OUTPUT_DIR/losses.jsonl``).
"""
import json
import logging
import os
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["RNGStateHook", "BadSampleCounter", "LossLogger", "is_checkpoint_iter"]

logger = logging.getLogger(__name__)


def is_checkpoint_iter(iteration: int, period: int, max_iter: int) -> bool:
    """Whether Detectron2's ``PeriodicCheckpointer`` saves after ``iteration``."""
    return (period > 0 and (iteration + 1) % period == 0) or iteration >= max_iter - 1


def get_rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.random.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _plain(states: dict) -> dict:
    """RNG states as tensors, lists and numbers only (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = states["numpy"]
    version, internal, gauss_py = states["python"]
    out = {"python": [version, list(internal), gauss_py],
           "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos),
                     int(has_gauss), float(gauss)],
           "torch": states["torch"]}
    if "cuda" in states:
        out["cuda"] = list(states["cuda"])
    return out


def _unplain(plain: dict) -> dict:
    version, internal, gauss_py = plain["python"]
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    out = {"python": (version, tuple(internal), gauss_py),
           "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss),
           "torch": plain["torch"]}
    if "cuda" in plain:
        out["cuda"] = plain["cuda"]
    return out


class RNGStateHook(HookBase):
    """Makes each iteration start from the random state the previous one ended with, and saves
    that state (of every rank) in checkpoints.

    ``after_step`` snapshots the states right after the model's step, before checkpointing,
    evaluation or logging hooks run (register this hook first); ``before_step`` restores the
    snapshot, so whatever those hooks draw (e.g. an evaluation's data loader seed) does not
    change training. A resumed run restores the snapshot stored with the checkpoint and draws
    the same numbers as an uninterrupted run.
    """

    def __init__(self, checkpoint_period: int):
        self.period = checkpoint_period
        self._snapshot = None  # this rank's states after the last step
        self._all_ranks = None  # every rank's snapshot at the last checkpoint iteration

    def before_step(self):
        if self._snapshot is not None:
            set_rng_states(self._snapshot)

    def after_step(self):
        self._snapshot = get_rng_states()
        if is_checkpoint_iter(self.trainer.iter, self.period, self.trainer.max_iter):
            plain = _plain(self._snapshot)
            self._all_ranks = comm.all_gather(plain) if comm.get_world_size() > 1 else [plain]

    def state_dict(self):
        return {"ranks": self._all_ranks} if self._all_ranks else {}

    def load_state_dict(self, state_dict):
        ranks = state_dict["ranks"]
        rank = comm.get_rank()
        if len(ranks) != comm.get_world_size():
            logger.warning("Checkpoint holds random states of %d ranks, this run has %d: "
                           "the resumed run will not replay the random numbers exactly",
                           len(ranks), comm.get_world_size())
        self._snapshot = _unplain(ranks[rank % len(ranks)])
        set_rng_states(self._snapshot)


class BadSampleCounter(HookBase):
    """Counts the samples the loader skipped (``INPUT.BAD_SAMPLE_POLICY=skip``): scalar
    ``data/bad_samples`` (this rank) in the metrics, the total over ranks in checkpoints and in
    the final log line."""

    def __init__(self, loader, checkpoint_period: int):
        self.loader = loader
        self.period = checkpoint_period
        self._offset = 0  # skipped before a resume (this rank)
        self._saved = None

    def count(self) -> int:
        return self._offset + self.loader.num_bad_samples

    def after_step(self):
        self.trainer.storage.put_scalar("data/bad_samples", self.count(), smoothing_hint=False)
        if is_checkpoint_iter(self.trainer.iter, self.period, self.trainer.max_iter):
            counts = comm.all_gather(self.count()) if comm.get_world_size() > 1 else [self.count()]
            self._saved = counts

    def state_dict(self):
        return {"ranks": self._saved} if self._saved is not None else {}

    def load_state_dict(self, state_dict):
        ranks = state_dict["ranks"]
        self._offset = int(ranks[comm.get_rank()]) if comm.get_rank() < len(ranks) else 0

    def after_train(self):
        finished = self.trainer.iter >= self.trainer.max_iter
        counts = (comm.all_gather(self.count()) if finished and comm.get_world_size() > 1
                  else [self.count()])
        total = sum(counts)
        if total:
            logger.warning("Bad samples skipped during training: %d (%s)", total,
                           "per rank " + str(counts) if len(counts) > 1 else "INPUT.BAD_SAMPLE_POLICY=skip")
        else:
            logger.info("Bad samples skipped during training: 0")


class LossLogger(HookBase):
    """Appends ``{"iteration": i, <loss name>: value, ...}`` to ``OUTPUT_DIR/losses.jsonl`` after
    every iteration (main process; values averaged over ranks as in ``metrics.json``). On a
    resume, lines from iterations that are replayed are dropped first."""

    def __init__(self, output_dir: str, filename: str = "losses.jsonl"):
        self.path = os.path.join(output_dir, filename)

    def before_train(self):
        if not comm.is_main_process():
            return
        start = self.trainer.start_iter
        kept = []
        if os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["iteration"] < start:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError):
                        break  # a line cut by a kill: drop it and everything after
        with open(self.path, "w") as f:
            f.writelines(kept)

    def after_step(self):
        if not comm.is_main_process():
            return
        it = self.trainer.iter
        row = {"iteration": it}
        for name, (value, at) in self.trainer.storage.latest().items():
            if at == it and "loss" in name:
                row[name] = float(value)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
