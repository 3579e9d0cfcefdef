"""Shared timing helper of the layer benchmarks: medians of callables run alternately."""
import statistics
import time
from typing import Callable, Dict


def alternating_medians(fns: Dict[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> Dict[str, float]:
    """Run every callable ``warmup + repeats`` times, reversing the order on every other round
    (machine noise hits all alike); -> median milliseconds per name over the timed rounds."""
    names = list(fns)
    times = {n: [] for n in names}
    for i in range(warmup + repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {n: statistics.median(v) * 1e3 for n, v in times.items()}


def report_pair(report: dict, prefix: str, times: Dict[str, float], ref: str, new: str,
                title: str) -> None:
    """Store ``{prefix}_{ref}_ms``, ``{prefix}_{new}_ms`` and ``{prefix}_speedup`` (ref / new)
    in ``report`` and print one line."""
    t_ref, t_new = times[ref], times[new]
    report[f"{prefix}_{ref}_ms"] = round(t_ref, 2)
    report[f"{prefix}_{new}_ms"] = round(t_new, 2)
    report[f"{prefix}_speedup"] = round(t_ref / t_new, 2)
    print(f"{title}  {ref} {t_ref:8.2f} ms   {new} {t_new:8.2f} ms   speedup {t_ref / t_new:5.2f}x",
          flush=True)


def layer_benchmark_args(doc: str, argv=None):
    """Common command line of the layer benchmarks (``--quick``, ``--threads``, ``--repeats``);
    sets the thread count (for both implementations alike)."""
    import argparse
    import os

    import torch

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a short run (fewer tokens and repeats)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats per implementation (default: 5 quick, 15 full)")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    return args
