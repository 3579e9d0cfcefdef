"""Training hooks for exact resumes and observability.

- :class:`RNGStateHook`: the random-number states (python, numpy, torch CPU and CUDA) of every
  rank, stored in checkpoints through the trainer's hooks state;
- :class:`BadSampleCounter`: the number of skipped bad samples, in metrics, checkpoints and the
  final log line (register it before Detectron2's checkpointer: the count saved at a checkpoint
  then includes that iteration; its ``report_hook()`` at the end logs the total last);
- :class:`LossLogger`: every iteration's losses as JSON lines (``OUTPUT_DIR/losses.jsonl``);
- :class:`StrictJSONWriter`: Detectron2's ``JSONWriter`` (``OUTPUT_DIR/metrics.json``) writing
  strict JSON (``null`` for NaN / inf, which plain ``json.dumps`` writes as bare ``NaN`` tokens
  that most JSON parsers reject), and dropping the lines of replayed iterations on a resume;
- :func:`json_safe` / :func:`dumps_strict`: the same rule for any JSON ISDA writes.
"""
import json
import logging
import math
import os
import random

import numpy as np
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import JSONWriter

__all__ = ["RNGStateHook", "BadSampleCounter", "LossLogger", "StrictJSONWriter",
           "is_checkpoint_iter", "json_safe", "dumps_strict"]

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


def json_safe(obj):
    """``obj`` with NaN / inf floats replaced by ``None`` (JSON ``null``: an undefined metric),
    numpy scalars and arrays as Python numbers and lists, tuples as lists."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if torch.is_tensor(obj) and obj.numel() == 1:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """``json.dumps`` of :func:`json_safe` (``obj``) with ``allow_nan=False``: always strict JSON."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


class BadSampleCounter(HookBase):
    """Counts the samples the loader skipped (``INPUT.BAD_SAMPLE_POLICY=skip``): scalar
    ``data/bad_samples`` (this rank) in the metrics, the total over ranks in checkpoints and in
    the final log line.

    Register it before the checkpointer (the trainer does): the count stored in the checkpoint
    of iteration I then includes the samples skipped for iteration I. With
    ``report_at_end=False`` the final log line is left to :meth:`report_hook`, a hook to register
    last, so that the total stays the last line of the training log."""

    def __init__(self, loader, checkpoint_period: int, report_at_end: bool = True):
        self.loader = loader
        self.period = checkpoint_period
        self.report_at_end = report_at_end
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
        if self.report_at_end:
            self.report()

    def report_hook(self) -> HookBase:
        """A hook whose ``after_train`` logs the final count (register it last)."""
        counter = self

        class BadSampleReport(HookBase):
            def after_train(self):
                counter.report()

        return BadSampleReport()

    def report(self):
        """Log the total over ranks (a collective when training finished on several ranks)."""
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
        if not os.path.isfile(self.path):
            open(self.path, "a").close()
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = _lines_before(lines, start)
        if len(kept) != len(lines) or any(a != b for a, b in zip(kept, lines)):
            # written to a temporary file and renamed: a kill here loses no line
            from isda.checkpoint import atomic_write_text

            atomic_write_text("".join(kept), self.path)

    def after_step(self):
        if not comm.is_main_process():
            return
        it = self.trainer.iter
        row = {"iteration": it}
        for name, (value, at) in self.trainer.storage.latest().items():
            if at == it and "loss" in name:
                row[name] = float(value)
        with open(self.path, "a") as f:
            f.write(dumps_strict(row) + "\n")


def _lines_before(lines, start):
    """The JSON lines whose "iteration" is < ``start``, made strict (NaN -> null); stops at a
    line cut by a kill (it and everything after are dropped)."""
    kept = []
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            it = row["iteration"]
        except (ValueError, KeyError, TypeError):
            break
        if it < start:
            kept.append(dumps_strict(row, sort_keys=isinstance(row, dict)) + "\n"
                        if "NaN" in line or "Infinity" in line
                        else (line if line.endswith("\n") else line + "\n"))
    return kept


class _StrictLines:
    """File wrapper for :class:`StrictJSONWriter`: each written JSON line is re-encoded with
    NaN / inf as ``null``; everything else is delegated to the file."""

    def __init__(self, f):
        self._f = f

    def write(self, text):
        out = []
        for line in text.splitlines(keepends=True):
            body = line.rstrip("\n")
            if body.strip():
                try:
                    body = dumps_strict(json.loads(body), sort_keys=True)
                except ValueError:
                    pass
            out.append(body + ("\n" if line.endswith("\n") else ""))
        return self._f.write("".join(out))

    def __getattr__(self, name):
        return getattr(self._f, name)


class StrictJSONWriter(JSONWriter):
    """Detectron2's ``JSONWriter`` (one JSON object per line in ``metrics.json``, same keys and
    smoothing, on Detectron2 v0.6 and later) whose lines are strict JSON: an undefined metric
    (NaN / inf, e.g. the AP of a category without ground truth) is written as ``null``."""

    def __init__(self, json_file, window_size=20):
        super().__init__(json_file, window_size)
        self.path = json_file
        self._file_handle = _StrictLines(self._file_handle)

    def drop_from(self, iteration: int) -> int:
        """Drop the lines of iterations >= ``iteration`` (replayed after a resume), in place so
        that the open append handle stays valid; earlier lines are made strict. Returns the
        number of lines dropped."""
        self._file_handle.flush()
        if not os.path.isfile(self.path):
            return 0
        with open(self.path, "r+") as f:
            lines = f.readlines()
            kept = _lines_before(lines, iteration)
            if kept == lines:
                return 0
            f.seek(0)
            f.writelines(kept)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
        return len([x for x in lines if x.strip()]) - len(kept)
