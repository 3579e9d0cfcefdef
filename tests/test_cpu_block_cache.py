"""The CPU memory policy (isda/utils/cpu_allocator.py) and its large-block cache
(ops/cpu_allocator/, extension isda._cpu_cache).

The policy is process-wide, so every case runs in a fresh Python process. The cache is built on
Linux (setup.py); elsewhere the policy falls back to glibc's and these cases do not apply.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the block cache is built on Linux only")


def run_python(code, **env):
    """Runs ``code`` in a fresh interpreter (repository on the path); returns its last stdout
    line parsed as JSON."""
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("ISDA_CPU_ALLOCATOR", "ISDA_CPU_CACHE_MB", "ISDA_CPU_CACHE_MIN_KB",
                "ISDA_CPU_CACHE_HUGEPAGES"):
        full_env.pop(key, None)
    full_env.update({k: str(v) for k, v in env.items()})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@linux_only
def test_size_classes_hand_computed():
    from isda import _cpu_cache  # built by setup.py on Linux: its absence is a failure here

    mb = 1 << 20
    cases = {
        mb: mb,                                   # a power of two is its own class
        mb + 1: mb + mb // 8,                     # next eighth of 1 MB
        3 * mb + 1: 13 * (mb // 4),               # eighths of 2 MB: 256 KB steps, 13 of them
        5000: 8192,                               # below 32 KB the step is one page
        7 * mb: 7 * mb,                           # 7 MB = 14 x 512 KB
        (1 << 30) + 5: (1 << 30) + (1 << 27),
    }
    for n, want in cases.items():
        assert _cpu_cache.class_size(n) == want, n


@linux_only
def test_cache_reuses_blocks_keeps_values_and_respects_its_limit():
    stats = run_python("""
        import json, torch
        from isda.utils.cpu_allocator import apply_allocator_policy, block_cache_stats
        from isda import _cpu_cache
        assert apply_allocator_policy() == "cache"
        s0 = block_cache_stats()
        x = torch.full((3 << 20,), 7, dtype=torch.uint8)        # 3 MB: a class size itself
        ptr = x.data_ptr()
        del x
        y = torch.empty(3 << 20, dtype=torch.uint8)             # same class: the same block
        small = torch.ones(100)                                 # below 1 MB: glibc's
        s1 = block_cache_stats()
        same_block = y.data_ptr() == ptr
        y.fill_(3)
        y_sum = int(y.sum(dtype=torch.int64))
        del y
        blocks = [torch.ones(3 << 20, dtype=torch.uint8) for _ in range(4)]
        sums = [int(b.sum(dtype=torch.int64)) for b in blocks]
        del blocks                                              # 12 MB freed, limit 8 MB
        s2 = block_cache_stats()
        released = _cpu_cache.release()
        s3 = block_cache_stats()
        print(json.dumps(dict(s0=s0, s1=s1, s2=s2, s3=s3, same_block=same_block, y_sum=y_sum,
                              sums=sums, released_bytes=released)))
    """, ISDA_CPU_CACHE_MB=8)
    cls = 3 << 20
    assert stats["same_block"]
    assert stats["y_sum"] == 3 * (3 << 20)
    assert stats["sums"] == [3 << 20] * 4
    d1 = {k: stats["s1"][k] - stats["s0"][k] for k in ("hits", "misses")}
    assert d1 == {"hits": 1, "misses": 1}
    assert stats["s1"]["in_use_bytes"] - stats["s0"]["in_use_bytes"] == cls
    assert stats["s2"]["cached_bytes"] <= 8 << 20
    assert stats["s2"]["released"] - stats["s0"]["released"] >= 2
    assert stats["released_bytes"] == stats["s2"]["cached_bytes"]
    assert stats["s3"]["cached_bytes"] == 0


@linux_only
def test_requests_of_other_classes_take_the_pages_of_idle_blocks():
    """A miss while blocks of other classes sit idle: smaller idle blocks are moved into the new
    block (their pages, not fresh ones: the process does not grow by them) and a larger idle
    block is split (the request takes its head, its tail stays idle and resident for the next
    request); a block made of moved pieces is moved again piece by piece (one kernel mapping
    each: older kernels move no more in one call); values are the writer's."""
    out = run_python("""
        import json, torch
        from isda.utils.cpu_allocator import apply_allocator_policy, block_cache_stats

        def rss_mb():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

        def values(t):
            return [int(v) for v in torch.aminmax(t)]  # scalars: no large temporary

        assert apply_allocator_policy() == "cache"
        mb = 1 << 20
        blocks = [torch.full((4 * mb,), 1, dtype=torch.uint8) for _ in range(4)]
        del blocks                                               # 4 x 4 MB idle, faulted in
        s1, r1 = block_cache_stats(), rss_mb()
        big = torch.full((15 * mb,), 2, dtype=torch.uint8)      # class 15 MB: no idle match
        s2, r2 = block_cache_stats(), rss_mb()
        big_values = values(big)
        del big                                                  # idle: 15 MB (moved) + 4 MB
        head = torch.full((5 * mb,), 3, dtype=torch.uint8)      # class 5 MB: 15 MB split
        s3, r3 = block_cache_stats(), rss_mb()
        tail = torch.full((10 * mb,), 4, dtype=torch.uint8)     # class 10 MB: the idle tail
        s4, r4 = block_cache_stats(), rss_mb()
        head_values, tail_values = values(head), values(tail)
        del head, tail                        # idle: 5 + 10 MB (of the moved block) + 4 MB
        large = torch.full((20 * mb,), 5, dtype=torch.uint8)    # class 20 MB: no larger block
        s5, r5 = block_cache_stats(), rss_mb()
        print(json.dumps(dict(s1=s1, s2=s2, s3=s3, s4=s4, s5=s5, r1=r1, r2=r2, r3=r3, r4=r4, r5=r5,
                              big_values=big_values, head_values=head_values,
                              tail_values=tail_values, large_values=values(large))))
    """, ISDA_CPU_CACHE_MB=64)
    mb = 1 << 20
    s1, s2, s3, s4, s5 = (out[k] for k in ("s1", "s2", "s3", "s4", "s5"))
    assert s1["cached_bytes"] == 16 * mb
    # three idle 4 MB blocks moved in (12 <= 15 MB), the fourth does not fit the 3 MB left
    assert s2["repurposed"] - s1["repurposed"] == 1, out
    assert s2["cached_bytes"] == 4 * mb
    assert out["r2"] - out["r1"] < 3 + 1.5, out      # only the 3 MB not covered are new pages
    assert out["big_values"] == [2, 2]
    # the 15 MB block split: 5 MB in use, its 10 MB tail idle beside the 4 MB block; no page
    # left the process
    assert s3["repurposed"] - s2["repurposed"] == 1, out
    assert s3["cached_bytes"] == 14 * mb, out
    assert abs(out["r3"] - out["r2"]) < 1.5, out
    # the tail serves the next 10 MB request as a hit, with its resident pages
    assert (s4["hits"] - s3["hits"], s4["misses"] - s3["misses"]) == (1, 0), out
    assert s4["cached_bytes"] == 4 * mb
    assert abs(out["r4"] - out["r3"]) < 1.5, out
    assert out["head_values"] == [3, 3] and out["tail_values"] == [4, 4]
    # 20 MB: all 19 idle MB moved in (the split halves of the moved-together block in their
    # pieces, and the 4 MB block); 1 MB of new pages
    assert s5["repurposed"] - s4["repurposed"] == 1, out
    assert s5["cached_bytes"] == 0, out
    assert out["r5"] - out["r4"] < 1 + 1.5, out
    assert out["large_values"] == [5, 5]


# the classic fragmenting pattern: 40 blocks of 4 MB, every other one freed (holes between live
# blocks), then 20 blocks of 6 MB that fit no hole. glibc's heap (the former "keep" default)
# keeps the 80 MB of holes resident; the cache unmaps what it holds beyond its limit
FRAGMENTING = """
    import json, torch
    from isda.utils.cpu_allocator import apply_allocator_policy

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024

    policy = apply_allocator_policy()
    mb = 1 << 20
    torch.ones(mb)  # warm-up
    start = rss_mb()
    first = [torch.ones(4 * mb // 4) for _ in range(40)]
    kept = first[0::2]
    del first
    second = [torch.ones(6 * mb // 4) for _ in range(20)]
    live = sum(t.numel() * 4 for t in kept + second) / mb
    print(json.dumps({"policy": policy, "growth_mb": rss_mb() - start, "live_mb": live}))
"""


@linux_only
def test_default_policy_does_not_keep_holes_between_live_blocks():
    out = run_python(FRAGMENTING, ISDA_CPU_CACHE_MB=16)
    assert out["policy"] == "cache"
    assert out["live_mb"] == 200
    # the live blocks, at most the cache's limit of idle ones, and a little runtime noise
    assert out["growth_mb"] < out["live_mb"] + 16 + 10, out


@linux_only
def test_heap_policy_keeps_the_holes():
    """The reference for the case above: glibc's heap with mmap off keeps every hole."""
    out = run_python(FRAGMENTING, ISDA_CPU_ALLOCATOR="keep")
    assert out["policy"] == "keep"
    assert out["growth_mb"] > out["live_mb"] + 60, out


@linux_only
def test_forked_child_allocates_through_the_cache():
    out = run_python("""
        import json, os, torch
        from isda.utils.cpu_allocator import apply_allocator_policy
        assert apply_allocator_policy() == "cache"
        a = torch.ones(2 << 20)
        pid = os.fork()
        if pid == 0:  # one thread, as in DataLoader workers (libgomp does not survive a fork)
            torch.set_num_threads(1)
            b = torch.ones(3 << 20) * 2
            ok = float(b.sum()) == 2.0 * (3 << 20) and float(a.sum()) == float(2 << 20)
            del b
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}))
    """)
    assert out["status"] == 0


def _thp_mode():
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


# a 64 MB tensor through the cache; the kernel's own account of its mapping (/proc/self/smaps:
# AnonHugePages) says whether it got transparent huge pages
HUGE_PAGES = """
    import json, torch
    from isda.utils.cpu_allocator import apply_allocator_policy, block_cache_stats
    assert apply_allocator_policy() == "cache"
    x = torch.ones(16 << 20)
    addr, anon_huge_kb, inside = x.data_ptr(), None, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("AnonHugePages:"):
                anon_huge_kb = int(line.split()[1])
    print(json.dumps({"huge_pages": block_cache_stats()["huge_pages"],
                      "anon_huge_kb": anon_huge_kb, "sum": float(x.sum())}))
"""


@linux_only
def test_huge_pages_advised_for_large_blocks_when_switched_on():
    mode = _thp_mode()
    on = run_python(HUGE_PAGES, ISDA_CPU_CACHE_HUGEPAGES=1)
    off = run_python(HUGE_PAGES)  # the default
    assert on["huge_pages"] is True and off["huge_pages"] is False
    assert on["sum"] == off["sum"] == float(16 << 20)
    if mode in ("always", "madvise"):
        # huge pages are best effort (memory may be too fragmented for some): most, not all
        assert on["anon_huge_kb"] >= 32 << 10, on
    if mode == "madvise":  # only advised mappings get them
        assert off["anon_huge_kb"] == 0, off


def test_bad_settings_name_the_variable():
    for env, name in [({"ISDA_CPU_ALLOCATOR": "jemalloc"}, "ISDA_CPU_ALLOCATOR"),
                      ({"ISDA_CPU_CACHE_MB": "lots"}, "ISDA_CPU_CACHE_MB"),
                      ({"ISDA_CPU_CACHE_HUGEPAGES": "2"}, "ISDA_CPU_CACHE_HUGEPAGES")]:
        code = """
            import json
            from isda.utils.cpu_allocator import apply_allocator_policy
            try:
                apply_allocator_policy()
                print(json.dumps({"error": None}))
            except ValueError as e:
                print(json.dumps({"error": str(e)}))
        """
        out = run_python(code, **env)
        if name.startswith("ISDA_CPU_CACHE_") and not sys.platform.startswith("linux"):
            continue  # the cache's settings are read only where it is built
        assert out["error"] and name in out["error"], out


def test_system_policy_leaves_torch_allocator_alone():
    out = run_python("""
        import json
        from isda.utils.cpu_allocator import apply_allocator_policy, block_cache_stats
        print(json.dumps({"policy": apply_allocator_policy(), "stats": block_cache_stats()}))
    """, ISDA_CPU_ALLOCATOR="system")
    assert out == {"policy": "system", "stats": None}
