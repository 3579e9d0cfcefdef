#!/usr/bin/env python
"""CPU memory policies (isda/utils/cpu_allocator.py) side by side on ISDA-R50 training steps:
step time and peak RSS for glibc's heap with mmap off ("keep"), the large-block cache with a
limit of 0 MB (every large block mapped afresh, as glibc's default does above its threshold) and
the cache at other limits (default 512 and 2048 MB: the former and the current default), each
with 4 KB pages and with transparent huge pages advised for its blocks ("+thp",
ISDA_CPU_CACHE_HUGEPAGES).

    python benchmarks/cpu_allocator.py                          # 800x1216, 2 threads
    python benchmarks/cpu_allocator.py --quick                  # 512x768, fewer rounds
    python benchmarks/cpu_allocator.py --model maskrcnn --limits 0 512

Time: one process, the policies switched between training steps (the cache's limits changed in
place; "keep" routes every block to glibc, mmap off, after the idle cached blocks are released),
the order reversed every other round, so machine noise hits all policies alike; per policy the
median step time and its ratio to "keep" (median and min-max of the per-round ratios). Blocks
allocated under one policy and freed under another go back through the allocator that made them.
Memory: per policy a fresh process (peak RSS over four training steps minus the RSS once model,
optimizer and input exist: benchmarks/isda_vs_maskrcnn.py's memory worker), ``--memory-repeats``
times, the policies alternating; median and min-max. The last stdout line is one JSON object.
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: "keep", "cache@<MB>" (4 KB pages) or "cache@<MB>+thp" (transparent huge pages advised)
KEEP = "keep"


def parse_policy(name):
    """-> (limit MB, huge pages) of a cache policy name."""
    limit, _, thp = name.partition("@")[2].partition("+")
    return int(limit), thp == "thp"


def switch_policy(module, name, min_bytes):
    """Make ``name`` the policy of the following allocations (the cache stays installed); the
    idle cached blocks are released, so that each policy maps its own."""
    if name == KEEP:
        module.install(1 << 62, 0, False)  # no block is large enough: glibc (mmap off) serves all
    else:
        limit, huge = parse_policy(name)
        module.install(min_bytes, limit << 20, huge)
    module.release()


def time_policies(model_name, policies, h, w, rounds, warmup):
    """-> {policy: [seconds per timed round]}; one process, policies alternating per step."""
    from isda import _cpu_cache
    from isda.utils.cpu_allocator import apply_allocator_policy
    from r50_models import build, make_input, train_step

    os.environ["ISDA_CPU_ALLOCATOR"] = "cache"
    if apply_allocator_policy() != "cache":
        raise SystemExit("the block cache (isda._cpu_cache) is not available: build ISDA first")
    min_bytes = _cpu_cache.stats()["min_bytes"]  # as installed from ISDA_CPU_CACHE_MIN_KB
    # glibc's side runs with mmap off, as under "keep" (blocks >= min_bytes never reach it
    # under the cache policies)
    from isda.utils import cpu_allocator
    cpu_allocator._keep_in_heap()
    model, opt = build(model_name)
    sample = make_input(h, w)
    times = {p: [] for p in policies}
    for i in range(warmup + rounds):
        for p in (policies if i % 2 == 0 else policies[::-1]):
            switch_policy(_cpu_cache, p, min_bytes)
            train_step(model, opt, sample)  # one untimed step: the cache fills for this policy
            t0 = time.perf_counter()
            train_step(model, opt, sample)
            if i >= warmup:
                times[p].append(time.perf_counter() - t0)
        if i >= warmup:
            print(f"  round {i + 1 - warmup}/{rounds}: "
                  + "  ".join(f"{p} {v[-1]:.2f} s" for p, v in times.items()), flush=True)
    return times


def memory_policies(model_name, policies, h, w, threads, repeats):
    """-> {policy: [peak MB per repeat]}, each from a fresh process."""
    from isda_vs_maskrcnn import measure_memory

    peaks = {p: [] for p in policies}
    for i in range(repeats):
        for p in (policies if i % 2 == 0 else policies[::-1]):
            if p == KEEP:
                os.environ["ISDA_CPU_ALLOCATOR"] = "keep"
            else:
                limit, huge = parse_policy(p)
                os.environ["ISDA_CPU_ALLOCATOR"] = "cache"
                os.environ["ISDA_CPU_CACHE_MB"] = str(limit)
                os.environ["ISDA_CPU_CACHE_HUGEPAGES"] = str(int(huge))
            peaks[p].append(measure_memory(model_name, "train", h, w, threads))
        print(f"  memory repeat {i + 1}/{repeats}: "
              + "  ".join(f"{p} {v[-1]:.0f} MB" for p, v in peaks.items()), flush=True)
    return peaks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("isda", "maskrcnn"), default="isda",
                   help="which model trains (default: isda, ISDA-R50)")
    p.add_argument("--size", default=None, help="HxW (default 800x1216, --quick 512x768)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--limits", type=int, nargs="+", default=[0, 512, 2048],
                   help="cache limits in MB to compare with keep (default: 0 512 2048)")
    p.add_argument("--huge-pages", choices=("on", "off", "both"), default="both",
                   help="cache policies with transparent huge pages advised, without, or both "
                        "(default)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4, --quick 2)")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh processes per policy (default 2, --quick 1; 0: no memory)")
    p.add_argument("--quick", action="store_true",
                   help="a short run: 512x768, 2 rounds, 1 memory process per policy")
    args = p.parse_args(argv)
    if any(limit < 0 for limit in args.limits):
        p.error("--limits must be >= 0 MB")

    from r50_models import parse_size, set_threads

    h, w = parse_size(args.size or ("512x768" if args.quick else "800x1216"))
    rounds = args.rounds or (2 if args.quick else 4)
    mem_repeats = args.memory_repeats if args.memory_repeats is not None else (1 if args.quick else 2)
    set_threads(args.threads)
    thp = {"on": ["+thp"], "off": [""], "both": ["", "+thp"]}[args.huge_pages]
    policies = [KEEP] + [f"cache@{limit}{t}" for limit in args.limits for t in thp]
    print(f"{args.model} training steps at {h}x{w}, {args.threads} threads: {', '.join(policies)}",
          flush=True)
    t_start = time.perf_counter()
    times = time_policies(args.model, policies, h, w, rounds, 1)
    peaks = memory_policies(args.model, policies, h, w, args.threads, mem_repeats) if mem_repeats else {}

    report = {"model": args.model, "size": [h, w], "threads": args.threads, "rounds": rounds,
              "memory_repeats": mem_repeats, "spreads": "min-max over the rounds / repeats",
              "policies": {}}
    print(f"\n| policy | step (median of {rounds}) | / keep (spread) | peak training RSS, MB |")
    print("|---|---|---|---|")
    for pol in policies:
        ratios = [a / b for a, b in zip(times[pol], times[KEEP])]
        entry = {"step_ms": round(statistics.median(times[pol]) * 1e3, 1),
                 "time_ratio_vs_keep": round(statistics.median(ratios), 3),
                 "time_ratio_vs_keep_spread": [round(min(ratios), 3), round(max(ratios), 3)]}
        if peaks:
            entry["peak_mb"] = round(statistics.median(peaks[pol]), 1)
            entry["peak_mb_spread"] = [round(min(peaks[pol]), 1), round(max(peaks[pol]), 1)]
        report["policies"][pol] = entry
        mem = (f"{entry['peak_mb']:.0f} ({entry['peak_mb_spread'][0]:.0f}-"
               f"{entry['peak_mb_spread'][1]:.0f})") if peaks else "-"
        print(f"| {pol} | {entry['step_ms']:.0f} ms | {entry['time_ratio_vs_keep']:.3f} "
              f"({entry['time_ratio_vs_keep_spread'][0]:.3f}-"
              f"{entry['time_ratio_vs_keep_spread'][1]:.3f}) | {mem} |")
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
