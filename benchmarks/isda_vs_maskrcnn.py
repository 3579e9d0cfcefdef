#!/usr/bin/env python
"""ISDA-R50 (configs/Base-ISDA.yaml) against Mask R-CNN R50-FPN (model zoo) on the CPU, both
random-init with 80 classes, 100 instances per image, on the same input: inference latency (also
ISDA in bf16), training step time, peak memory (fresh processes), parameters, FLOPs.

    python benchmarks/isda_vs_maskrcnn.py --no-flops         # full run, 800x1216
    python benchmarks/isda_vs_maskrcnn.py --quick            # smoke test, 512x768
    python benchmarks/isda_vs_maskrcnn.py --size 480x736 --no-flops   # another input size
    python benchmarks/isda_vs_maskrcnn.py --profile          # ISDA: top operators, stage times

Timings alternate the models; ratios are of medians, spreads min-max over the repeats. The last
stdout line is one JSON object.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's isda, imported before Detectron2 (its warnings)
from isda import add_isda_config  # noqa: E402
from isda.modeling.meta_arch import ISDA  # noqa: E402
from isda.solver import build_isda_optimizer  # noqa: E402
from detectron2 import model_zoo  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

MODELS = ("isda", "maskrcnn")
#: passes per memory process (the peak RSS grows over the first three with heap fragmentation)
MEMORY_PASSES = 4
#: the top-level modules timed by --profile
STAGES = ("backbone", "mapper", "encoder", "decoder", "mask_head", "heads", "criterion")


# helpers shared with export_latency.py, torch_tools.py, ms_deform_attn.py, data_pipeline.py
def set_threads(n):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def parse_size(s):
    h, w = s.lower().split("x")
    return int(h), int(w)


def time_rounds(fns, repeats, warmup=1):
    """{name: callable}, the order reversed every other round -> {name: [seconds per round]}."""
    names, times = list(fns), {n: [] for n in fns}
    for i in range(warmup + repeats):
        for n in (names if i % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            if i >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def medians_ms(fns, repeats, warmup=1):
    return {n: statistics.median(v) * 1e3 for n, v in time_rounds(fns, repeats, warmup).items()}


def rss_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_mb(fn):
    """Peak RSS (MB) that ``fn()`` adds to this process's RSS (VmHWM reset first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss_kb("VmRSS")
    fn()
    return round((rss_kb("VmHWM") - base) / 1024, 1)


def in_processes(variants, rounds):
    """{label: (args, env)}: each ``python args`` run in ``rounds`` fresh processes, the order
    reversed every other round -> {label: [its last stdout line, JSON, per round]}."""
    labels, runs = list(variants), {k: [] for k in variants}
    for i in range(rounds):
        for k in (labels if i % 2 == 0 else labels[::-1]):
            runs[k].append(fresh_process(*variants[k]))
            print(f"  round {i + 1} {k}: {runs[k][-1]}", flush=True)
    return runs


def fresh_process(args, env=None):
    """Run ``python args...`` -> its last stdout line, parsed as JSON."""
    out = subprocess.run([sys.executable, *map(str, args)], check=True, capture_output=True,
                         text=True, env={**os.environ, **(env or {})}).stdout
    return json.loads(out.strip().splitlines()[-1])


def spread(values, ndigits=3):
    return [round(min(values), ndigits), round(max(values), ndigits)]


def isda_cfg(path, opts=()):
    """ISDA's config file ``path`` (relative to the repository) with KEY VALUE ``opts``."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / path))
    cfg.merge_from_list(list(opts))
    return cfg


def build(name, seed=0, isda_opts=()):
    """-> (model in eval mode, the optimizer its own trainer would use). ``name``: "isda"
    (ISDA-R50), "maskrcnn" or "main" (the main job's ISDA, FrozenBN left as built)."""
    if name == "isda":
        cfg = isda_cfg("configs/Base-ISDA.yaml",
                       ["MODEL.ISDA.NUM_CLASSES", 80, "MODEL.ISDA.TEST.TOPK", 100, *isda_opts])
    elif name == "main":
        cfg = isda_cfg("configs/nuclei/isda_R18_nuclei.yaml", isda_opts)
    else:
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
        cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 80, "TEST.DETECTIONS_PER_IMAGE", 100,
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    if name != "main":
        calibrate_frozen_bn(model)
    return model, (build_optimizer if name == "maskrcnn" else build_isda_optimizer)(cfg, model)


def calibrate_frozen_bn(model, seed=1):
    """Set every backbone FrozenBN to its input's statistics on a random image, as a pretrained
    backbone has (with identity FrozenBN the random ResNet's activations blow up and Mask
    R-CNN's scores underflow to 0). Same treatment for both models."""
    def pre_hook(module, inputs):
        module.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        module.running_var.copy_(inputs[0].var((0, 2, 3)))
        module.weight.fill_(1.0)
        module.bias.fill_(0.0)

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.backbone.modules()
               if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        images = model.preprocess_image([make_input(320, 480, seed=seed, num_objects=1)])
        model.backbone((images[0] if isinstance(images, tuple) else images).tensor)
    for h in handles:
        h.remove()


def make_input(h, w, seed=0, num_objects=10):
    """A random uint8 image [3, h, w] with ``num_objects`` elliptical instances."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    masks = []
    for _ in range(num_objects):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        ry, rx = (torch.rand(2, generator=g) * torch.tensor([h, w]) * 0.2 + 8).tolist()
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    inst = Instances((h, w), gt_masks=BitMasks(torch.stack(masks)))
    inst.gt_boxes = Boxes(inst.gt_masks.get_bounding_boxes().tensor)
    inst.gt_classes = torch.randint(0, 80, (num_objects,), generator=g)
    return {"image": image, "height": h, "width": w, "instances": inst}


def infer(model, sample):
    with torch.no_grad():
        out = model([{k: sample[k] for k in ("image", "height", "width")}])
    if len(out[0]["instances"]) != 100:
        raise RuntimeError(f"expected 100 instances, got {len(out[0]['instances'])}")
    return out


def train_step(model, opt, batch):
    """One step as the model's trainer runs it (forward, zero_grad, backward, step); ISDA's
    Trainer then frees the gradients. ``batch``: a sample or a list of samples."""
    model.train()
    with EventStorage(0):
        loss = sum(model(batch if isinstance(batch, list) else [batch]).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if isinstance(model, ISDA):
        opt.zero_grad(set_to_none=True)
    model.eval()
    return float(loss.detach())


def memory_worker(name, mode, h, w, isda_opts):
    """Peak RSS (MB) added by MEMORY_PASSES passes ("isda_bf16": TEST.PRECISION bf16)."""
    model, opt = build("isda" if name == "isda_bf16" else name, isda_opts=isda_opts)
    if name == "isda_bf16":
        model.test_precision = "bf16"
    sample = make_input(h, w)
    return peak_mb(lambda: [infer(model, sample) if mode == "infer"
                            else train_step(model, opt, sample) for _ in range(MEMORY_PASSES)])


def memory_figures(report, runs, h, w, threads, repeats, isda_opts):
    """Each (name, pass) of ``runs`` in ``repeats`` fresh processes; stores the median
    ``{name}_{pass}_peak_mb`` and its ``_spread`` -> {(name, pass): [MB]}."""
    res = in_processes({(n, m): ([__file__, "--_memory-worker", n, m, "--size", f"{h}x{w}",
                                  "--threads", threads, "--isda-opts", *isda_opts], None)
                        for n, m in runs}, repeats)
    peaks = {k: [r["peak_mb"] for r in v] for k, v in res.items()}
    for (name, mode), v in peaks.items():
        report[f"{name}_{mode}_peak_mb"] = round(statistics.median(v), 1)
        report[f"{name}_{mode}_peak_mb_spread"] = spread(v, 1)
    return peaks


def ratio(report, key, num, den, of_medians):
    """``key``: the ratio of the medians (timings) or the median of the paired ratios (memory,
    process i against process i); ``key_spread``: min-max of the paired ratios."""
    r = [a / b for a, b in zip(num, den)]
    med = statistics.median
    report[key] = round(med(num) / med(den) if of_medians else med(r), 3)
    report[key + "_spread"] = spread(r)


class _Traceable(nn.Module):
    def __init__(self, model, h, w):
        super().__init__()
        self.model, self.h, self.w = model, h, w

    def forward(self, image):
        inst = self.model([{"image": image, "height": self.h, "width": self.w}])[0]["instances"]
        return inst.pred_masks, inst.scores, inst.pred_classes


def count_flops(model, sample):
    """fvcore FLOPs (multiply-adds) of one inference, ISDA's handles for its attention ops."""
    import warnings

    from fvcore.nn import FlopCountAnalysis
    from isda.layers import flop_count_handles

    flops = FlopCountAnalysis(_Traceable(model, *sample["image"].shape[1:]), (sample["image"],))
    flops.set_op_handle(**flop_count_handles())
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flops.total()


def run_profile(h, w, repeats, isda_opts):
    """torch.profiler over ISDA-R50 inferences and training steps: the top operators by self
    CPU time, and the forward wall time of the top-level modules (hooks)."""
    from torch.profiler import ProfilerActivity, profile

    (model, opt), sample = build("isda", isda_opts=isda_opts), make_input(h, w)
    report = {"size": [h, w], "threads": torch.get_num_threads(), "repeats": repeats}
    stages, t = {}, {}
    for s in STAGES:
        mod = model.get_submodule(s)
        mod.register_forward_pre_hook(lambda *_, s=s: t.__setitem__(s, time.perf_counter()))
        mod.register_forward_hook(lambda *_, s=s: stages.__setitem__(
            s, stages.get(s, 0.0) + time.perf_counter() - t[s]))
    for mode, fn in (("infer", lambda: infer(model, sample)),
                     ("train", lambda: train_step(model, opt, sample))):
        fn()  # warm-up
        stages.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            total = (time.perf_counter() - t0) / repeats * 1e3
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        report[f"{mode}_ms"] = round(total, 1)
        report[f"{mode}_stages_ms"] = {s: round(v / repeats * 1e3, 1) for s, v in stages.items()}
        report[f"{mode}_top_ops_ms"] = {e.key: round(e.self_cpu_time_total / repeats / 1e3, 1)
                                        for e in ops[:10]}
        print(f"\nISDA-R50 {mode} {h}x{w}: {total:.0f} ms per pass (profiled); forward stages "
              f"(ms): {report[f'{mode}_stages_ms']}")
        print("| operator | self CPU ms per pass | calls per pass |\n|---|---|---|")
        for e in ops[:15]:
            print(f"| {e.key} | {e.self_cpu_time_total / repeats / 1e3:.1f} | "
                  f"{e.count // repeats} |")
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 512x768, few repeats")
    p.add_argument("--size", default=None, help="HxW (default 800x1216, 512x768 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed inference repeats per model (default: 3 quick, 10 full)")
    p.add_argument("--train-repeats", type=int, default=None,
                   help="timed training steps per model (default: 2 quick, 6 full)")
    p.add_argument("--no-flops", action="store_true", help="skip the (slow) fvcore tracing")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help="fresh processes per memory figure (default: 1 quick, 3 full)")
    p.add_argument("--no-bf16", action="store_true", help="skip ISDA's bf16 inference")
    p.add_argument("--profile", action="store_true",
                   help="ISDA only: torch.profiler top operators and stage times\n"
                        "(--repeats passes each, default 2 quick, 5 full)")
    p.add_argument("--isda-opts", nargs="*", default=[],
                   help="KEY VALUE overrides of ISDA's config, e.g.\n"
                        "MODEL.ISDA.ENCODER_CHECKPOINT True")
    p.add_argument("--_memory-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    h, w = parse_size(args.size or ("512x768" if args.quick else "800x1216"))
    set_threads(args.threads)
    if args._memory_worker:
        return print(json.dumps({"peak_mb": memory_worker(*args._memory_worker, h, w,
                                                          args.isda_opts)}))
    if args.profile:
        return print(json.dumps(run_profile(h, w, args.repeats or (2 if args.quick else 5),
                                            args.isda_opts)))
    from isda.layers.mixed_precision import cpu_bf16_is_fast

    repeats, train_repeats, memory_repeats = (args.repeats or (3 if args.quick else 10),
                                              args.train_repeats or (2 if args.quick else 6),
                                              args.memory_repeats or (1 if args.quick else 3))
    models = {m: build(m, isda_opts=args.isda_opts) for m in MODELS}
    report = {"size": [h, w], "threads": args.threads, "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_bf16_fast": cpu_bf16_is_fast(), "isda_opts": args.isda_opts,
              "infer_repeats": repeats, "train_repeats": train_repeats,
              "memory_repeats": memory_repeats, "spreads": "min-max over the repeats"}
    sample = make_input(h, w)
    isda_model = models["isda"][0]  # bf16: the same model, TEST.PRECISION switched per call

    def run_infer(m):
        isda_model.test_precision = "bf16" if m == "isda_bf16" else "fp32"
        return infer(models[m.replace("_bf16", "")][0], sample)

    names = list(MODELS) + ([] if args.no_bf16 else ["isda_bf16"])
    print(f"inference and training {h}x{w}, {repeats} + {train_repeats} repeats", flush=True)
    inf = time_rounds({m: lambda m=m: run_infer(m) for m in names}, repeats)
    isda_model.test_precision = "fp32"
    tr = time_rounds({m: lambda m=m: train_step(*models[m], sample) for m in MODELS},
                     train_repeats)
    report.update({f"{m}_infer_ms": round(statistics.median(inf[m]) * 1e3, 1) for m in names})
    for m in MODELS:
        report[f"{m}_train_ms"] = round(statistics.median(tr[m]) * 1e3, 1)
        report[f"{m}_params_m"] = round(sum(p.numel() for p in models[m][0].parameters()) / 1e6, 2)
    del models, isda_model
    print(f"memory (fresh subprocesses, {memory_repeats} repeats)", flush=True)
    runs = [(m, "infer") for m in names] + [(m, "train") for m in MODELS]
    peaks = memory_figures(report, runs, h, w, args.threads, memory_repeats, args.isda_opts)
    if not args.no_flops:
        print("FLOPs (fvcore)", flush=True)
        for m in MODELS:
            report[f"{m}_gflops"] = round(count_flops(build(m, isda_opts=args.isda_opts)[0],
                                                      sample) / 1e9, 1)
    for key, num, den in (("infer_ratio", inf["isda"], inf["maskrcnn"]),
                          ("train_ratio", tr["isda"], tr["maskrcnn"]),
                          ("bf16_infer_ratio", inf.get("isda_bf16"), inf["isda"]),
                          ("mem_ratio", peaks[("isda", "infer")], peaks[("maskrcnn", "infer")]),
                          ("train_mem_ratio", peaks[("isda", "train")],
                           peaks[("maskrcnn", "train")]),
                          ("bf16_mem_ratio", peaks.get(("isda_bf16", "infer")),
                           peaks[("maskrcnn", "infer")])):
        if num:
            ratio(report, key, num, den, of_medians="mem" not in key)
    targets = {"infer_ratio": 1.0, "train_ratio": 1.2, "mem_ratio": 1.0, "train_mem_ratio": 1.2,
               "bf16_infer_ratio": 0.6}
    report["targets_met"] = {k: report[k] <= v for k, v in targets.items() if k in report}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
