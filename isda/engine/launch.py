"""CPU multi-process launch on top of ``torch.distributed`` (gloo).

Detectron2 v0.6's :func:`detectron2.engine.launch` asserts CUDA and uses NCCL; this is the same
recipe for CPU processes: ``torch.multiprocessing.spawn`` one process per rank,
``init_process_group("gloo")``, and Detectron2's ``comm._LOCAL_PROCESS_GROUP`` set up exactly as
``launch`` does, so ``comm.get_rank()``, ``comm.get_local_rank()``, ``comm.all_gather`` and
Detectron2's samplers and evaluators behave as in a GPU job.

A stalled or dead process never hangs the job: every collective operation times out after
``timeout`` (``--dist-timeout`` of ``train_net.py``, or ``ISDA_DIST_TIMEOUT`` in seconds; default
30 minutes, Detectron2's), the process that times out fails with an error saying so, and the
launcher then stops the others (SIGTERM, then SIGKILL after a few seconds, which also ends a
stopped process). The workers are killed by the kernel when their launcher dies (Linux
``PR_SET_PDEATHSIG`` with SIGKILL), even inside a blocking collective or while stopped.
"""
import ctypes
import logging
import os
import signal
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["launch_cpu", "DEFAULT_TIMEOUT", "dist_timeout"]

DEFAULT_TIMEOUT = timedelta(minutes=30)
#: Seconds the launcher gives the other processes to stop after one failed, before SIGKILL.
STOP_GRACE_SECONDS = 5.0


def dist_timeout(seconds=None) -> timedelta:
    """The collective-operation timeout: ``seconds`` if given, else ``$ISDA_DIST_TIMEOUT``
    (seconds), else :data:`DEFAULT_TIMEOUT`."""
    if seconds is None:
        env = os.environ.get("ISDA_DIST_TIMEOUT", "").strip()
        if not env:
            return DEFAULT_TIMEOUT
        try:
            seconds = float(env)
        except ValueError:
            raise ValueError(f"ISDA_DIST_TIMEOUT={env!r} is not a number of seconds") from None
    if not seconds > 0:
        raise ValueError(f"the distributed timeout must be > 0 seconds, got {seconds}")
    return timedelta(seconds=float(seconds))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the launcher) dies."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # no glibc: torch's own SIGINT-on-parent-death still applies
        pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cpu(main_func, num_procs_per_machine, num_machines=1, machine_rank=0,
               dist_url=None, args=(), timeout=None):
    """Run ``main_func(*args)`` in ``num_procs_per_machine`` CPU processes per machine (gloo).

    Arguments mirror :func:`detectron2.engine.launch`; ``dist_url="auto"`` (or None) picks a free
    local port for single-machine jobs; ``timeout`` (a ``timedelta``; default
    :func:`dist_timeout`) bounds every collective operation. With one process in total,
    ``main_func`` runs in this process, without a process group.
    """
    world_size = num_machines * num_procs_per_machine
    if world_size <= 1:
        return main_func(*args)
    timeout = timeout if timeout is not None else dist_timeout()
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url=auto is only supported for single-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.start_processes(
        _cpu_worker, nprocs=num_procs_per_machine, join=False, daemon=False,
        start_method="spawn",
        args=(main_func, world_size, num_procs_per_machine, machine_rank, dist_url, args, timeout))
    # when one process fails, the others get SIGTERM, then SIGKILL after the grace period
    while not context.join(grace_period=STOP_GRACE_SECONDS):
        pass


def _cpu_worker(local_rank, main_func, world_size, num_procs_per_machine, machine_rank, dist_url,
                args, timeout):
    _die_with_parent()
    global_rank = machine_rank * num_procs_per_machine + local_rank
    # each process gets its share of the cores instead of all of them (oversubscription)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_procs_per_machine))
    try:
        dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                                rank=global_rank, timeout=timeout)
    except Exception:
        logging.getLogger(__name__).error("Process group URL: %s", dist_url)
        raise
    # ranks within the same machine, as detectron2.engine.launch sets them up
    assert comm._LOCAL_PROCESS_GROUP is None
    for i in range(world_size // num_procs_per_machine):
        ranks_on_i = list(range(i * num_procs_per_machine, (i + 1) * num_procs_per_machine))
        pg = dist.new_group(ranks_on_i)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    comm.synchronize()
    try:
        main_func(*args)
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise RuntimeError(
                f"rank {global_rank}: a collective operation timed out after "
                f"{timeout.total_seconds():.0f} s: another process stalled or died (the timeout is "
                "--dist-timeout SECONDS of train_net.py, or ISDA_DIST_TIMEOUT)") from e
        raise
    finally:
        dist.destroy_process_group()
