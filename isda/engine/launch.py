"""CPU multi-process launch on top of ``torch.distributed`` (gloo).

Detectron2 v0.6's :func:`detectron2.engine.launch` asserts CUDA and uses NCCL; this is the same
recipe for CPU processes: ``torch.multiprocessing.spawn`` one process per rank,
``init_process_group("gloo")``, and Detectron2's ``comm._LOCAL_PROCESS_GROUP`` set up exactly as
``launch`` does, so ``comm.get_rank()``, ``comm.get_local_rank()``, ``comm.all_gather`` and
Detectron2's samplers and evaluators behave as in a GPU job.
"""
import logging
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.utils import comm

__all__ = ["launch_cpu", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cpu(main_func, num_procs_per_machine, num_machines=1, machine_rank=0,
               dist_url=None, args=(), timeout=DEFAULT_TIMEOUT):
    """Run ``main_func(*args)`` in ``num_procs_per_machine`` CPU processes per machine (gloo).

    Arguments mirror :func:`detectron2.engine.launch`; ``dist_url="auto"`` (or None) picks a free
    local port for single-machine jobs. With one process in total, ``main_func`` runs in this
    process, without a process group.
    """
    world_size = num_machines * num_procs_per_machine
    if world_size <= 1:
        return main_func(*args)
    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url=auto is only supported for single-machine jobs")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_cpu_worker, nprocs=num_procs_per_machine,
             args=(main_func, world_size, num_procs_per_machine, machine_rank, dist_url, args,
                   timeout),
             daemon=False)


def _cpu_worker(local_rank, main_func, world_size, num_procs_per_machine, machine_rank, dist_url,
                args, timeout):
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
    finally:
        dist.destroy_process_group()
