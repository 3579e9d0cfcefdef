#!/usr/bin/env python
"""Per-stage wall-time breakdown of ISDA-R50 inference and training on the CPU.

    python benchmarks/profile_isda.py [--size 800x1216] [--threads 2] [--repeats 5]
    (= python benchmarks/isda_vs_maskrcnn.py --profile)
    python benchmarks/profile_isda.py --inference-only --isda-opts MODEL.ISDA.TEST.PRECISION bf16

Stages are timed with ``time.perf_counter`` by forward hooks on the submodules and by wrapping
the stage functions, installed only for the measurement (the model carries no permanent
instrumentation). Nested stages are reported exclusively: "losses" excludes "matching" and the mask
prediction done inside the criterion.
Training adds the backward pass and the optimizer step; "other" is the rest of the iteration.
"""
import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r50_models import build, infer, make_input, parse_size, set_threads  # noqa: E402

MODULE_STAGES = (("backbone", "backbone"), ("channel mapper", "mapper"), ("encoder", "encoder"),
                 ("decoder", "decoder"), ("mask-feature head", "mask_head"), ("heads", "heads"),
                 ("matching", "criterion.matcher"), ("losses", "criterion"))
FUNCTION_STAGES = (("mask prediction", "predict_masks"), ("post-processing", "select_topk"),
                   ("post-processing", "instances_from_topk"))
METHOD_STAGES = (("pre-processing", "preprocess_image"), ("flatten + position", "flatten_levels"),
                 ("training targets", "prepare_targets"))


class StageTimer:
    """Accumulates seconds per stage while installed (``with timer.installed(model):``)."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def _wrap(self, stage, fn):
        def wrapped(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - t0
        return wrapped

    @contextlib.contextmanager
    def installed(self, model):
        from isda.modeling import criterion, meta_arch

        handles, saved = [], {}
        for stage, path in MODULE_STAGES:
            module = model.get_submodule(path)
            start = {}
            handles.append(module.register_forward_pre_hook(
                lambda *_, s=start: s.__setitem__("t", time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda *_, s=start, st=stage: self.seconds.__setitem__(
                    st, self.seconds[st] + time.perf_counter() - s["t"])))
        for stage, name in FUNCTION_STAGES:
            saved[name] = getattr(meta_arch, name)
            setattr(meta_arch, name, self._wrap(stage, saved[name]))
        # the criterion computes mask logits itself: all queries, chunked and without gradient,
        # inside the matcher ("matching", a module stage), and the matched queries of all
        # layers with gradient ("mask prediction", taken out of "losses")
        saved_criterion = criterion.matched_kernel_masks
        criterion.matched_kernel_masks = self._wrap("mask prediction (criterion)", saved_criterion)
        for stage, name in METHOD_STAGES:
            setattr(model, name, self._wrap(stage, getattr(model, name)))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            for name, fn in saved.items():
                setattr(meta_arch, name, fn)
            criterion.matched_kernel_masks = saved_criterion
            for _, name in METHOD_STAGES:
                delattr(model, name)

    def exclusive(self):
        s = dict(self.seconds)
        inner = s.pop("mask prediction (criterion)", 0.0)
        if "losses" in s:
            s["losses"] -= s.get("matching", 0.0) + inner
            s["mask prediction"] = s.get("mask prediction", 0.0) + inner
        return s


def _profile_once(model, opt, sample, train):
    """-> dict stage -> seconds of one inference or one training iteration."""
    from detectron2.utils.events import EventStorage

    timer = StageTimer()
    t0 = time.perf_counter()
    with timer.installed(model):
        if not train:
            infer(model, sample)
        else:
            model.train()
            with EventStorage(0):
                losses = model([sample])
                loss = sum(losses.values())
            opt.zero_grad(set_to_none=True)
            tb = time.perf_counter()
            loss.backward()
            timer.seconds["backward"] += time.perf_counter() - tb
            ts = time.perf_counter()
            opt.step()
            timer.seconds["optimizer step"] += time.perf_counter() - ts
            model.eval()
    total = time.perf_counter() - t0
    stages = timer.exclusive()
    stages["other"] = total - sum(stages.values())
    stages["total"] = total
    return stages


def breakdown(model, opt, sample, train, repeats):
    """Median per stage over ``repeats`` runs after one warm-up."""
    _profile_once(model, opt, sample, train)
    runs = [_profile_once(model, opt, sample, train) for _ in range(repeats)]
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}


def format_table(title, stages):
    total = stages["total"]
    lines = [f"{title}", f"| stage | ms | share |", "|---|---|---|"]
    for k, v in stages.items():
        if k != "total" and v > 0:
            lines.append(f"| {k} | {v * 1e3:.1f} | {100 * v / total:.1f}% |")
    lines.append(f"| **total** | **{total * 1e3:.1f}** | 100% |")
    return "\n".join(lines)


def run_profile(h, w, threads, repeats=5, isda_opts=(), inference_only=False):
    set_threads(threads)
    model, opt = build("isda", isda_opts=isda_opts)
    sample = make_input(h, w)
    for train in (False,) if inference_only else (False, True):
        name = "training iteration" if train else "inference"
        stages = breakdown(model, opt, sample, train, repeats)
        opts = f", {' '.join(map(str, isda_opts))}" if isda_opts else ""
        print(format_table(f"ISDA-R50 {name}, {h}x{w}, {threads} threads{opts}, median of {repeats}",
                           stages), flush=True)
        print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="800x1216", help="input HxW (default 800x1216)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, median reported (default 5)")
    p.add_argument("--isda-opts", nargs="*", default=[],
                   help="KEY VALUE overrides of ISDA's config, e.g. MODEL.ISDA.TEST.PRECISION bf16")
    p.add_argument("--inference-only", action="store_true", help="skip the training breakdown")
    args = p.parse_args(argv)
    run_profile(*parse_size(args.size), args.threads, args.repeats, args.isda_opts,
                args.inference_only)


if __name__ == "__main__":
    main()
