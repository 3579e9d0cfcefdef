#!/usr/bin/env python
"""ISDA-R50 (configs/Base-ISDA.yaml) against Detectron2's Mask R-CNN R50-FPN (model zoo
``mask_rcnn_R_50_FPN_3x``) on the CPU: inference latency, training iteration time, peak memory,
parameters and FLOPs, both random-init with 80 classes, on the same input.

    python benchmarks/isda_vs_maskrcnn.py                    # full run, 800x1216
    python benchmarks/isda_vs_maskrcnn.py --quick            # smoke test, 512x768
    python benchmarks/isda_vs_maskrcnn.py --sizes 480x736 640x960 800x1216 --plot docs/latency_vs_size.png
    python benchmarks/isda_vs_maskrcnn.py --profile          # ISDA per-stage breakdown (see profile_isda.py)
    python benchmarks/isda_vs_maskrcnn.py --no-flops --memory-repeats 5

Fair work: both return exactly 100 instances per image (Mask R-CNN with SCORE_THRESH_TEST 0 and
100 detections, so its mask head runs on 100 boxes; ISDA its top-100), post-processing included;
training steps (batch 1, forward + backward + optimizer step, each model's own optimizer) use the
same ground truth (10 objects with masks). Timings alternate the two models (inference also
alternates ISDA with ``MODEL.ISDA.TEST.PRECISION bf16``: ``bf16_infer_ratio`` = bf16 / fp32);
each memory figure comes from a fresh subprocess (peak RSS ``VmHWM`` minus the RSS after the
model is built), ``--memory-repeats`` times per (model, pass), the models alternating: peaks and
ratios are medians, their spreads min-max over the repeats (a ratio's repeat i pairs the i-th
ISDA and Mask R-CNN processes). ``train_ratio`` is the ratio of the median step times, its
spread min-max of the per-round ratios. The last stdout line is one JSON object.
"""
import argparse
import json
import statistics
import subprocess
import time
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from r50_models import (ROOT, build, build_cfg, calibrate_frozen_bn, infer,  # noqa: E402,F401
                        make_input, parse_size, set_threads, train_step)
from side_by_side import alternating_medians  # noqa: E402

MODELS = ("isda", "maskrcnn")
#: passes per memory process: with freed blocks kept in the heap, the peak RSS of both models
#: still grows in the second and third pass (heap fragmentation) and is steady from the fourth
MEMORY_PASSES = 4


def time_alternating(models, fn, repeats, warmup):
    """Median seconds of ``fn(name)`` per model, the models alternating (side_by_side)."""
    ms = alternating_medians({m: (lambda m=m: fn(m)) for m in models}, repeats, warmup)
    return {m: v / 1e3 for m, v in ms.items()}


def time_rounds(models, fn, repeats, warmup):
    """Seconds of ``fn(name)`` per model and round, the order reversed every other round (as
    :func:`side_by_side.alternating_medians`) -> {name: [seconds per timed round]}."""
    times = {m: [] for m in models}
    for i in range(warmup + repeats):
        for m in (models if i % 2 == 0 else models[::-1]):
            t0 = time.perf_counter()
            fn(m)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    return times


def spread(values, ndigits=3):
    """[min, max] of ``values``, rounded."""
    return [round(min(values), ndigits), round(max(values), ndigits)]


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_worker(name, mode, h, w, threads, isda_opts=()):
    """Runs in a fresh process: peak RSS added by :data:`MEMORY_PASSES` passes (MB) over the RSS
    once the model, its optimizer and the input exist. ``name`` "isda_bf16": ISDA with TEST.PRECISION bf16."""
    set_threads(threads)
    model, opt = build("isda" if name == "isda_bf16" else name, isda_opts=isda_opts)
    if name == "isda_bf16":
        model.test_precision = "bf16"
    sample = make_input(h, w)
    try:  # reset VmHWM so that transients of the model build do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_kb("VmRSS")
    for _ in range(MEMORY_PASSES):
        if mode == "infer":
            infer(model, sample)
        else:
            train_step(model, opt, sample)
    return (_rss_kb("VmHWM") - base) / 1024


def measure_memory(name, mode, h, w, threads, isda_opts=()):
    cmd = [sys.executable, __file__, "--_memory-worker", name, mode, "--size", f"{h}x{w}",
           "--threads", str(threads), "--isda-opts", *isda_opts]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def memory_figures(report, runs, h, w, threads, repeats, isda_opts=(), variants=None):
    """``runs``: [(model name, pass)]; each measured ``repeats`` times in fresh processes, the
    runs alternating within a repeat. ``variants``: {name: (model name, ISDA opts)} for names
    that are settings of a model (default: the name is the model, with ``isda_opts``). Stores
    ``{name}_{pass}_peak_mb`` (median) and ``..._spread`` ([min, max]) in ``report``;
    -> {(name, pass): [MB per repeat]}."""
    variants = variants or {}
    peaks = {r: [] for r in runs}
    for i in range(repeats):
        for name, mode in (runs if i % 2 == 0 else runs[::-1]):
            model, opts = variants.get(name, (name, isda_opts))
            peaks[(name, mode)].append(measure_memory(model, mode, h, w, threads, opts))
        print(f"  repeat {i + 1}/{repeats}: " + "  ".join(
            f"{n} {m} {v[-1]:.0f} MB" for (n, m), v in peaks.items()), flush=True)
    for (name, mode), v in peaks.items():
        report[f"{name}_{mode}_peak_mb"] = round(statistics.median(v), 1)
        report[f"{name}_{mode}_peak_mb_spread"] = spread(v, 1)
    return peaks


def paired_ratio(report, key, num, den):
    """Median and [min, max] of the per-repeat ratios ``num[i] / den[i]``."""
    ratios = [a / b for a, b in zip(num, den)]
    report[key] = round(statistics.median(ratios), 3)
    report[key + "_spread"] = spread(ratios)


class _Traceable(nn.Module):
    """image [3, H, W] -> (masks, scores, classes) of one full inference (for fvcore's tracer)."""

    def __init__(self, model, height, width):
        super().__init__()
        self.model, self.height, self.width = model, height, width

    def forward(self, image):
        inst = self.model([{"image": image, "height": self.height, "width": self.width}])[0]
        inst = inst["instances"]
        return inst.pred_masks, inst.scores, inst.pred_classes


def count_flops(model, sample):
    """fvcore FLOPs (1 multiply-add = 1 flop) of one inference, post-processing included, the
    deformable attention op and scaled-dot-product attention counted by handles."""
    import warnings

    from fvcore.nn import FlopCountAnalysis

    from isda.layers import flop_count_handles

    net = _Traceable(model, sample["height"], sample["width"])
    flops = FlopCountAnalysis(net, (sample["image"],))
    flops.set_op_handle(**flop_count_handles())
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flops.total()


def latency_vs_size(models, sizes, repeats, warmup):
    rows = []
    for h, w in sizes:
        sample = make_input(h, w)
        med = time_alternating(list(models), lambda m: infer(models[m][0], sample), repeats, warmup)
        rows.append({"size": [h, w], **{f"{m}_ms": round(med[m] * 1e3, 1) for m in models}})
        print(f"  {h}x{w}: " + "  ".join(f"{m} {med[m] * 1e3:.0f} ms" for m in models), flush=True)
    return rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    px = [r["size"][0] * r["size"][1] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, label in (("isda", "ISDA R50"), ("maskrcnn", "Mask R-CNN R50-FPN")):
        ax.plot(px, [r[f"{m}_ms"] for r in rows], "o-", label=label)
        for x, r in zip(px, rows):
            if m == "isda":
                ax.annotate(f"{r['size'][0]}x{r['size'][1]}", (x, r[f"{m}_ms"]),
                            textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
    ax.set_xlabel("input size (megapixels)")
    ax.set_ylabel("inference latency per image (ms, median)")
    ax.set_title("CPU inference, 100 instances per image")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 512x768, few repeats")
    p.add_argument("--size", default=None, help="HxW (default 800x1216, 512x768 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed inference repeats per model")
    p.add_argument("--train-repeats", type=int, default=None,
                   help="timed training steps per model (default: 2 quick, 6 full)")
    p.add_argument("--sizes", nargs="+", default=None, help="latency vs input size, e.g. 480x736")
    p.add_argument("--size-repeats", type=int, default=3, help="repeats per --sizes entry")
    p.add_argument("--plot", default=None, help="PNG path for the latency-vs-size plot")
    p.add_argument("--no-flops", action="store_true", help="skip the (slow) fvcore tracing")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh processes per memory figure (median and min-max reported; "
                        "default: 1 quick, 3 full)")
    p.add_argument("--no-bf16", action="store_true",
                   help="skip ISDA's bf16 inference (TEST.PRECISION bf16) latency and memory")
    p.add_argument("--profile", action="store_true", help="ISDA per-stage breakdown only")
    p.add_argument("--isda-opts", nargs="*", default=[],
                   help="KEY VALUE overrides of ISDA's config, e.g.\n"
                        "MODEL.ISDA.ENCODER_CHECKPOINT True (memory for time)")
    p.add_argument("--_memory-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    h, w = parse_size(args.size or ("512x768" if args.quick else "800x1216"))
    set_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    if args._memory_worker:
        name, mode = args._memory_worker
        peak = memory_worker(name, mode, h, w, args.threads, args.isda_opts)
        print(json.dumps({"peak_mb": round(peak, 1)}))
        return
    if args.profile:
        from profile_isda import run_profile

        run_profile(h, w, args.threads, repeats=args.repeats or (2 if args.quick else 5))
        return


    repeats = args.repeats or (3 if args.quick else 10)
    train_repeats = args.train_repeats or (2 if args.quick else 6)
    memory_repeats = args.memory_repeats or (1 if args.quick else 3)
    models = {m: build(m, isda_opts=args.isda_opts) for m in MODELS}
    from isda.layers.mixed_precision import cpu_bf16_is_fast

    # bf16 is only fast where oneDNN has bf16 kernels (x86: AVX-512 / AMX): say which CPU ran
    report = {"size": [h, w], "threads": args.threads, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_bf16_fast": cpu_bf16_is_fast(),
              "isda_opts": args.isda_opts, "infer_repeats": repeats,
              "train_repeats": train_repeats, "memory_repeats": memory_repeats,
              "spreads": "min-max over the repeats"}

    rows = []
    if args.sizes:
        print("latency vs input size", flush=True)
        sizes = [parse_size(s) for s in args.sizes if parse_size(s) != (h, w)]
        rows = latency_vs_size(models, sizes, args.size_repeats, 1)

    sample = make_input(h, w)
    # ISDA in bf16 is the same model object with TEST.PRECISION switched for its calls
    isda_model = models["isda"][0]

    def run_infer(m):
        isda_model.test_precision = "bf16" if m == "isda_bf16" else "fp32"
        return infer(models["isda" if m == "isda_bf16" else m][0], sample)

    infer_names = list(MODELS) + ([] if args.no_bf16 else ["isda_bf16"])
    print(f"inference {h}x{w}, {repeats} repeats ({', '.join(infer_names)})", flush=True)
    inf_t = time_rounds(infer_names, run_infer, repeats, 1)
    isda_model.test_precision = "fp32"
    inf = {m: statistics.median(v) for m, v in inf_t.items()}
    print(f"training {h}x{w}, {train_repeats} repeats", flush=True)
    tr_t = time_rounds(list(MODELS), lambda m: train_step(*models[m], sample), train_repeats, 1)
    tr = {m: statistics.median(v) for m, v in tr_t.items()}
    for m in MODELS:
        report[f"{m}_infer_ms"] = round(inf[m] * 1e3, 1)
        report[f"{m}_train_ms"] = round(tr[m] * 1e3, 1)
        report[f"{m}_params_m"] = round(sum(p.numel() for p in models[m][0].parameters()) / 1e6, 2)
    if not args.no_bf16:
        report["isda_bf16_infer_ms"] = round(inf["isda_bf16"] * 1e3, 1)
    del models, isda_model
    if args.sizes:  # the main size joins the curve with its (more repeated) medians
        rows = sorted(rows + [{"size": [h, w], **{f"{m}_ms": report[f"{m}_infer_ms"]
                                                  for m in MODELS}}], key=lambda r: r["size"])
        report["latency_vs_size"] = rows
        if args.plot:
            plot(rows, args.plot)
    print(f"memory (fresh subprocesses, {memory_repeats} repeats)", flush=True)
    runs = [(m, mode) for mode in ("infer", "train") for m in MODELS]
    if not args.no_bf16:
        runs.append(("isda_bf16", "infer"))
    peaks = memory_figures(report, runs, h, w, args.threads, memory_repeats, args.isda_opts)
    if not args.no_flops:
        print("FLOPs (fvcore)", flush=True)
        for m in MODELS:
            model, _ = build(m, isda_opts=args.isda_opts)
            report[f"{m}_gflops"] = round(count_flops(model, sample) / 1e9, 1)
            del model
    report["infer_ratio"] = round(inf["isda"] / inf["maskrcnn"], 3)
    report["infer_ratio_spread"] = spread([a / b for a, b in zip(inf_t["isda"], inf_t["maskrcnn"])])
    report["train_ratio"] = round(tr["isda"] / tr["maskrcnn"], 3)
    report["train_ratio_spread"] = spread([a / b for a, b in zip(tr_t["isda"], tr_t["maskrcnn"])])
    paired_ratio(report, "mem_ratio", peaks[("isda", "infer")], peaks[("maskrcnn", "infer")])
    paired_ratio(report, "train_mem_ratio", peaks[("isda", "train")], peaks[("maskrcnn", "train")])
    if not args.no_bf16:
        report["bf16_infer_ratio"] = round(inf["isda_bf16"] / inf["isda"], 3)
        report["bf16_infer_ratio_spread"] = spread(
            [a / b for a, b in zip(inf_t["isda_bf16"], inf_t["isda"])])
        paired_ratio(report, "bf16_mem_ratio", peaks[("isda_bf16", "infer")],
                     peaks[("maskrcnn", "infer")])
    targets = {"infer_ratio": 1.0, "train_ratio": 1.2, "mem_ratio": 1.0, "train_mem_ratio": 1.2,
               "bf16_infer_ratio": 0.6}
    report["targets_met"] = {k: report[k] <= v for k, v in targets.items() if k in report}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
