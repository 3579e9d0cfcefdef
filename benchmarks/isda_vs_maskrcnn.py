#!/usr/bin/env python
"""ISDA-R50 (configs/Base-ISDA.yaml) against Detectron2's Mask R-CNN R50-FPN (model zoo
``mask_rcnn_R_50_FPN_3x``) on the CPU: inference latency, training iteration time, peak memory,
parameters and FLOPs, both random-init with 80 classes, on the same input.

    python benchmarks/isda_vs_maskrcnn.py                    # full run, 800x1216
    python benchmarks/isda_vs_maskrcnn.py --quick            # smoke test, 512x768
    python benchmarks/isda_vs_maskrcnn.py --sizes 480x736 640x960 800x1216 --plot docs/latency_vs_size.png
    python benchmarks/isda_vs_maskrcnn.py --profile          # ISDA per-stage breakdown (see profile_isda.py)

Fair work: both return exactly 100 instances per image (Mask R-CNN with SCORE_THRESH_TEST 0 and
100 detections, so its mask head runs on 100 boxes; ISDA its top-100), post-processing included;
training steps (batch 1, forward + backward + optimizer step, each model's own optimizer) use the
same ground truth (10 objects with masks). Timings alternate the two models; each memory figure
comes from a fresh subprocess (peak RSS ``VmHWM`` minus the RSS after the model is built). The
last stdout line is one JSON object.
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
MODELS = ("isda", "maskrcnn")


def set_threads(n):
    """Same intra-op thread count for every model (set before torch starts its pools)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def build_cfg(name):
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    import isda

    cfg = get_cfg()
    if name == "isda":
        isda.add_isda_config(cfg)
        cfg.merge_from_file(str(ROOT / "configs" / "Base-ISDA.yaml"))
        cfg.merge_from_list(["MODEL.ISDA.NUM_CLASSES", 80, "MODEL.ISDA.TEST.TOPK", 100])
    else:
        cfg.merge_from_file(model_zoo.get_config_file(
            "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
        cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", 80,
                             "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
                             "TEST.DETECTIONS_PER_IMAGE", 100])
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    return cfg


def calibrate_frozen_bn(model, seed=1):
    """Give every FrozenBN layer of the backbone the statistics of its input on a random image,
    as a pretrained backbone has: a random-init ResNet with identity FrozenBN multiplies the
    activation scale by ~2 per block, which makes Mask R-CNN's softmax scores underflow to 0
    (so fewer than 100 survive SCORE_THRESH_TEST 0). Same treatment for both models."""
    from detectron2.layers import FrozenBatchNorm2d

    def pre_hook(module, inputs):
        x = inputs[0]
        module.running_mean.copy_(x.mean((0, 2, 3)))
        module.running_var.copy_(x.var((0, 2, 3)))
        module.weight.fill_(1.0)
        module.bias.fill_(0.0)

    layers = [m for m in model.backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(pre_hook) for m in layers]
    sample = make_input(320, 480, seed=seed, num_objects=1)
    with torch.no_grad():
        images = model.preprocess_image([sample])
        images = images[0] if isinstance(images, tuple) else images  # ISDA also returns a mask
        model.backbone(images.tensor)
    for h in handles:
        h.remove()


def build(name, seed=0):
    """-> (model in eval mode, optimizer the model's own trainer would use)."""
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer

    from isda.solver import build_isda_optimizer

    torch.manual_seed(seed)
    cfg = build_cfg(name)
    model = build_model(cfg).eval()
    calibrate_frozen_bn(model)
    opt = build_isda_optimizer(cfg, model) if name == "isda" else build_optimizer(cfg, model)
    return model, opt


def make_input(h, w, seed=0, num_objects=10):
    """One random image [3, h, w] uint8 with ``num_objects`` elliptical instances (masks, tight
    boxes, classes in 0..79), identical for both models."""
    from detectron2.structures import BitMasks, Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    masks = []
    for _ in range(num_objects):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        ry, rx = (torch.rand(2, generator=g) * torch.tensor([h, w]) * 0.2 + 8).tolist()
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1)
    masks = BitMasks(torch.stack(masks))
    inst = Instances((h, w))
    inst.gt_masks = masks
    inst.gt_boxes = Boxes(masks.get_bounding_boxes().tensor)
    inst.gt_classes = torch.randint(0, 80, (num_objects,), generator=g)
    return {"image": image, "height": h, "width": w, "instances": inst}


def infer(model, sample):

    with torch.no_grad():
        out = model([{k: sample[k] for k in ("image", "height", "width")}])
    n = len(out[0]["instances"])
    if n != 100:
        raise RuntimeError(f"expected 100 instances, got {n}")
    return out


def train_step(model, opt, sample):
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0):
        losses = model([sample])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_worker(name, mode, h, w, threads):
    """Runs in a fresh process: peak RSS added by two passes (MB) over the RSS once the model,
    its optimizer and the input exist."""
    set_threads(threads)
    model, opt = build(name)
    sample = make_input(h, w)
    try:  # reset VmHWM so that transients of the model build do not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _rss_kb("VmRSS")
    for _ in range(2):
        if mode == "infer":
            infer(model, sample)
        else:
            train_step(model, opt, sample)
    return (_rss_kb("VmHWM") - base) / 1024


def measure_memory(name, mode, h, w, threads):
    cmd = [sys.executable, __file__, "--_memory-worker", name, mode, "--size", f"{h}x{w}",
           "--threads", str(threads), "--allocator", os.environ.get("ISDA_CPU_ALLOCATOR", "keep")]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def time_alternating(models, fn, repeats, warmup):
    """Median seconds of ``fn(name)`` per model, alternating the models every repeat."""
    times = {m: [] for m in models}
    for i in range(warmup + repeats):
        for m in (models if i % 2 == 0 else models[::-1]):
            t0 = time.perf_counter()
            fn(m)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


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

    def sdpa(inputs, outputs):
        q, k, v = (inputs[i].type().sizes() for i in range(3))
        batch = 1
        for d in q[:-2]:
            batch *= d
        return batch * q[-2] * k[-2] * (q[-1] + v[-1])

    net = _Traceable(model, sample["height"], sample["width"])
    flops = FlopCountAnalysis(net, (sample["image"],))
    flops.set_op_handle(**flop_count_handles(), **{"aten::scaled_dot_product_attention": sdpa})
    flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flops.total()


def parse_size(s):
    h, w = s.lower().split("x")
    return int(h), int(w)


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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None, help="timed inference repeats per model")
    p.add_argument("--train-repeats", type=int, default=None)
    p.add_argument("--sizes", nargs="+", default=None, help="latency vs input size, e.g. 480x736")
    p.add_argument("--size-repeats", type=int, default=3, help="repeats per --sizes entry")
    p.add_argument("--plot", default=None, help="PNG path for the latency-vs-size plot")
    p.add_argument("--no-flops", action="store_true", help="skip the (slow) fvcore tracing")
    p.add_argument("--profile", action="store_true", help="ISDA per-stage breakdown only")
    p.add_argument("--allocator", choices=("keep", "system"), default="keep",
                   help="glibc policy for both models: 'keep' freed memory in the heap, as "
                        "train_net.py does on the CPU (isda/utils/cpu_allocator.py), or the "
                        "'system' default (mmap/munmap per large block)")
    p.add_argument("--_memory-worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    h, w = parse_size(args.size or ("512x768" if args.quick else "800x1216"))
    set_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    os.environ["ISDA_CPU_ALLOCATOR"] = args.allocator  # inherited by the memory subprocesses
    from isda.utils.cpu_allocator import keep_freed_memory

    keep_freed_memory()

    if args._memory_worker:
        name, mode = args._memory_worker
        print(json.dumps({"peak_mb": round(memory_worker(name, mode, h, w, args.threads), 1)}))
        return
    if args.profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from profile_isda import run_profile

        run_profile(h, w, args.threads, repeats=args.repeats or (2 if args.quick else 5))
        return


    repeats = args.repeats or (3 if args.quick else 10)
    train_repeats = args.train_repeats or (2 if args.quick else 6)
    models = {m: build(m) for m in MODELS}
    report = {"size": [h, w], "threads": args.threads, "torch": torch.__version__,
              "allocator": args.allocator,
              "infer_repeats": repeats, "train_repeats": train_repeats}

    rows = []
    if args.sizes:
        print("latency vs input size", flush=True)
        sizes = [parse_size(s) for s in args.sizes if parse_size(s) != (h, w)]
        rows = latency_vs_size(models, sizes, args.size_repeats, 1)

    sample = make_input(h, w)
    print(f"inference {h}x{w}, {repeats} repeats", flush=True)
    inf = time_alternating(list(MODELS), lambda m: infer(models[m][0], sample), repeats, 1)
    print(f"training {h}x{w}, {train_repeats} repeats", flush=True)
    tr = time_alternating(list(MODELS), lambda m: train_step(*models[m], sample), train_repeats, 1)
    for m in MODELS:
        report[f"{m}_infer_ms"] = round(inf[m] * 1e3, 1)
        report[f"{m}_train_ms"] = round(tr[m] * 1e3, 1)
        report[f"{m}_params_m"] = round(sum(p.numel() for p in models[m][0].parameters()) / 1e6, 2)
    del models
    if args.sizes:  # the main size joins the curve with its (more repeated) medians
        rows = sorted(rows + [{"size": [h, w], **{f"{m}_ms": report[f"{m}_infer_ms"]
                                                  for m in MODELS}}], key=lambda r: r["size"])
        report["latency_vs_size"] = rows
        if args.plot:
            plot(rows, args.plot)
    print("memory (fresh subprocesses)", flush=True)
    for mode, key in (("infer", "infer_peak_mb"), ("train", "train_peak_mb")):
        for m in MODELS:
            report[f"{m}_{key}"] = measure_memory(m, mode, h, w, args.threads)
    if not args.no_flops:
        print("FLOPs (fvcore)", flush=True)
        for m in MODELS:
            model, _ = build(m)
            report[f"{m}_gflops"] = round(count_flops(model, sample) / 1e9, 1)
            del model
    report["infer_ratio"] = round(inf["isda"] / inf["maskrcnn"], 3)
    report["train_ratio"] = round(tr["isda"] / tr["maskrcnn"], 3)
    report["mem_ratio"] = round(report["isda_infer_peak_mb"] / report["maskrcnn_infer_peak_mb"], 3)
    report["train_mem_ratio"] = round(
        report["isda_train_peak_mb"] / report["maskrcnn_train_peak_mb"], 3)
    targets = {"infer_ratio": 1.0, "train_ratio": 1.5, "mem_ratio": 1.2}
    report["targets_met"] = {k: report[k] <= v for k, v in targets.items()}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
