"""What a new training run does with an ``OUTPUT_DIR`` that holds an earlier run
(``OUTPUT_DIR_EXISTING``: ``refuse``, the default, or ``move`` it to ``previous-<timestamp>/``)."""
import atexit
import datetime
import fcntl
import fnmatch
import os
import shutil
import socket
import sys

__all__ = ["EarlierRunError", "OutputDirBusyError", "earlier_run_records", "earlier_run_message",
           "prepare_output_dir", "lock_output_dir", "RUN_RECORDS", "RUN_OUTPUTS", "LOCK_NAME"]

#: the lock file of a training run in OUTPUT_DIR (its content names the process holding it)
LOCK_NAME = ".isda-train.lock"
_held = {}  # real path of OUTPUT_DIR -> open lock file (held until the process exits)

# files that show an earlier training run in OUTPUT_DIR (non-empty ones)
RUN_RECORDS = ("last_checkpoint", "losses.jsonl", "metrics.json", "model_*.pth")
# what "OUTPUT_DIR_EXISTING move" moves aside (the records and the rest of that run's outputs)
RUN_OUTPUTS = RUN_RECORDS + ("config.yaml", "log.txt", "log.txt.rank*", "events.out.tfevents.*",
                             "inference")


class EarlierRunError(FileExistsError):
    """A training run without --resume was started in an OUTPUT_DIR holding an earlier run."""


class OutputDirBusyError(RuntimeError):
    """Another live process trains in the same OUTPUT_DIR (it holds the folder's lock)."""


def lock_output_dir(output_dir):
    """Take the OS-level lock of a training run on ``output_dir`` (``flock`` on
    ``OUTPUT_DIR/.isda-train.lock``, created with the folder), or raise
    :class:`OutputDirBusyError` naming the folder and the process that holds it. The lock is
    held until this process exits (the kernel releases it even on SIGKILL); taking it again in
    the same process is a no-op. Call before the run writes anything into the folder."""
    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held:
        return _held[key][0]
    path = os.path.join(output_dir, LOCK_NAME)
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "a process that has just started"
            f.close()
            break
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            holder = None
            break
        f.close()  # the previous holder removed the file as we opened it: lock the new one
    if holder is not None:
        raise OutputDirBusyError(
            f"OUTPUT_DIR '{output_dir}' is in use by another training run ({holder}). Two runs "
            "in one folder would mix their logs, losses and checkpoints, so this one was not "
            "started and nothing was written. Wait for the other to end, or choose another "
            "OUTPUT_DIR") from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {started}: "
            f"{' '.join(sys.argv)[:300]}\n")
    f.flush()
    _held[key] = (f, path)
    if len(_held) == 1:
        atexit.register(_release_all)
    return f


def _release_all():
    """At exit: remove the lock files this process holds (then release them), so a finished
    run leaves no file behind. A killed process leaves its file, whose lock the kernel has
    released: the next run takes it."""
    for key, (f, path) in list(_held.items()):
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                os.unlink(path)
        except OSError:
            pass
        f.close()
        del _held[key]


def earlier_run_records(output_dir) -> list:
    """Names of the files in ``output_dir`` that show an earlier training run (RUN_RECORDS)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (any(fnmatch.fnmatch(name, pat) for pat in RUN_RECORDS) and os.path.isfile(path)
                and os.path.getsize(path) > 0):
            found.append(name)
    return found


def earlier_run_message(output_dir, records, how):
    shown = ", ".join(records[:8]) + (f" and {len(records) - 8} more" if len(records) > 8 else "")
    return (f"OUTPUT_DIR '{output_dir}' holds an earlier training run ({shown}). A new run "
            f"without --resume would mix with its records or overwrite them, so {how}. Use "
            "--resume to continue it, choose another OUTPUT_DIR, or set OUTPUT_DIR_EXISTING move "
            "to move the earlier run into OUTPUT_DIR/previous-<timestamp>/ and start afresh")


def prepare_output_dir(cfg, resume: bool):
    """Before a training run writes anything (main process): if ``cfg.OUTPUT_DIR`` holds an
    earlier run and ``resume`` is False, refuse (``EarlierRunError``; nothing is changed) or,
    with ``OUTPUT_DIR_EXISTING move``, move that run's files into
    ``OUTPUT_DIR/previous-<timestamp>/``; returns that message (None when nothing moved)."""
    policy = cfg.get("OUTPUT_DIR_EXISTING", "refuse")
    if policy not in ("refuse", "move"):
        raise ValueError(f"OUTPUT_DIR_EXISTING must be 'refuse' or 'move', got {policy!r}")
    out = cfg.OUTPUT_DIR
    records = earlier_run_records(out)
    if resume or not records:
        return
    if policy == "refuse":
        raise EarlierRunError(earlier_run_message(out, records, "nothing was started or "
                                                   "changed (OUTPUT_DIR_EXISTING refuse)"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(out, f"previous-{stamp}")
    n = 1
    while os.path.exists(dest):
        dest = os.path.join(out, f"previous-{stamp}-{n}")
        n += 1
    os.makedirs(dest)
    moved = []
    for name in sorted(os.listdir(out)):
        if any(fnmatch.fnmatch(name, pat) for pat in RUN_OUTPUTS):
            shutil.move(os.path.join(out, name), os.path.join(dest, name))
            moved.append(name)
    # the logger is not set up yet: say it on stderr and again in the log (see setup)
    msg = (f"OUTPUT_DIR '{out}' held an earlier training run: moved {len(moved)} files "
           f"({', '.join(moved[:8])}{' ...' if len(moved) > 8 else ''}) into '{dest}' "
           "(OUTPUT_DIR_EXISTING move); this run starts afresh")
    print(msg, flush=True)
    return msg
