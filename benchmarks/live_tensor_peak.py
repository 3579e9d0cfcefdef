#!/usr/bin/env python
"""Peak of live tensor bytes in one inference and one training step, ISDA-R50 against Mask
R-CNN R50-FPN: a memory figure that does not move from run to run.

    python benchmarks/live_tensor_peak.py                 # 800x1216, inference and training
    python benchmarks/live_tensor_peak.py --modes infer --top 12

The peak RSS of ``isda_vs_maskrcnn.py`` includes the heap's fragmentation, which depends on the
order of allocations and moves ISDA's inference peak by 400 MB between identical processes.
Here every tensor an operator returns is counted from its allocation until its storage is
freed (a ``TorchDispatchMode``; views share their storage's bytes, parameters, the input and the
optimizer state made before the pass are not counted). Each model runs its pass once untracked
(warm-up, lazily built state), then once tracked. Printed: the peak, the operator at the peak and
the largest tensors alive at that moment (shape, dtype, the project line that made them). The
last stdout line is one JSON object: ``{model}_{mode}_live_peak_mb`` and ``{mode}_live_ratio``
(ISDA / Mask R-CNN).
"""
import argparse
import json
import sys
import traceback
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 2 ** 20


class LiveTensorPeak:
    """Counts the bytes of the storages created while installed (``with tracker.mode():``)."""

    def __init__(self, top=10):
        self.top = top
        self.live = {}  # storage address -> (bytes, description)
        self.current = self.peak = 0
        self.peak_op, self.peak_tensors = None, []

    def _where(self):
        for frame in reversed(traceback.extract_stack()[:-3]):
            if "site-packages/torch" not in frame.filename and frame.filename != __file__:
                return f"{Path(frame.filename).name}:{frame.lineno}"
        return "?"

    def _freed(self, key):
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def record(self, func, out):
        import torch

        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self.live:  # empty, or a view of a counted storage
                continue
            nbytes = storage.nbytes()
            self.live[key] = (nbytes, f"{tuple(t.shape)} {str(t.dtype)[6:]} {self._where()}")
            self.current += nbytes
            weakref.finalize(storage, self._freed, key)
            if self.current > self.peak:
                self.peak, self.peak_op = self.current, str(func)
                self.peak_tensors = sorted(self.live.values(), reverse=True)[:self.top]

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.record(func, out)
                return out

        return _Mode()


def measure(name, mode, h, w, top):
    """-> LiveTensorPeak of one ``mode`` ("infer" or "train") pass of model ``name``."""
    from r50_models import build, infer, make_input, train_step

    model, optimizer = build(name)
    sample = make_input(h, w)
    run = (lambda: infer(model, sample)) if mode == "infer" else \
        (lambda: train_step(model, optimizer, sample))
    run()  # warm-up: lazily created state (optimizer moments, caches) is not a pass's peak
    tracker = LiveTensorPeak(top)
    with tracker.mode():
        run()
    return tracker


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="800x1216", help="HxW (default 800x1216)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--modes", default="infer,train", help="infer and/or train")
    p.add_argument("--top", type=int, default=8, help="largest live tensors listed at the peak")
    args = p.parse_args(argv)

    from r50_models import parse_size, set_threads

    set_threads(args.threads)
    h, w = parse_size(args.size)
    report = {"size": [h, w], "threads": args.threads}
    for mode in args.modes.split(","):
        for name in ("isda", "maskrcnn"):
            t = measure(name, mode, h, w, args.top)
            report[f"{name}_{mode}_live_peak_mb"] = round(t.peak / MB, 1)
            print(f"{name} {mode}: live tensor peak {t.peak / MB:.1f} MB at {t.peak_op}",
                  flush=True)
            for nbytes, what in t.peak_tensors:
                print(f"    {nbytes / MB:8.1f} MB  {what}")
        report[f"{mode}_live_ratio"] = round(report[f"isda_{mode}_live_peak_mb"]
                                             / report[f"maskrcnn_{mode}_live_peak_mb"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
