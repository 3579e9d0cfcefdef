#!/usr/bin/env python
"""The training data pipeline: ISDA's dataset mapper against the previous per-instance route
(Detectron2's ``transform_instance_annotations`` on each instance,
``tests/per_instance_mapper.py``),
side by side on the same records and seeds, and the ``data_time`` share of a short training run.

    python benchmarks/data_pipeline.py [--calls 24] [--repeats 5] [--train-iters 30]

Cases (per-sample milliseconds, median over ``--repeats`` passes over ``--calls`` seeds, a
quarter / half of them for the two slower cases; both routes give identical outputs, checked on
the first pass, which also fills the mask cache as the first epoch does):

* ``crop``: the main job (configs/nuclei/isda_R18_nuclei.yaml) on ``nuclei_train_region``, one
  512x352 image with 95 RLE nuclei, 128-176 px crops (``crop_cold``: the cache disabled);
* ``coco_polygons``: 3 VOC photos upscaled to 800x1333 with their polygons, flipped and resized
  to 800x1333 (the COCO recipe's multi-scale branch at full size);
* ``many_instances``: a synthetic 600x800 image with 300 instances (2/3 RLE, 1/3 polygons),
  the DETR crop branch with both flips and the transpose, output 160-400 px.

``--train-iters N`` (0: skip) trains the main job's config for N iterations and reports
``data_time / time`` from Detectron2's metrics.json (the median of the last 20 iterations).
Timings use one torch thread (the mapper's own setting in a loader worker). Last line: JSON.
"""
import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def cpu_description() -> dict:
    model, flags = "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "cpu_count": os.cpu_count(),
            "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]}


def make_cfg(path, opts=()):
    from detectron2.config import get_cfg

    from isda import add_isda_config

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / path))
    cfg.merge_from_list(list(opts))
    return cfg


def upscaled_voc(folder: Path, hw=(800, 1333)):
    """voc_sample's photos resized to ``hw`` with their polygons scaled alike."""
    from detectron2.data import DatasetCatalog
    from PIL import Image

    records = []
    for rec in DatasetCatalog.get("voc_sample"):
        sy, sx = hw[0] / rec["height"], hw[1] / rec["width"]
        path = folder / Path(rec["file_name"]).name
        Image.open(rec["file_name"]).convert("RGB").resize(hw[::-1], Image.BILINEAR).save(path)
        anns = []
        for a in rec["annotations"]:
            seg = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(p)]
                   for p in a["segmentation"]]
            x, y, w, h = a["bbox"]
            anns.append(dict(a, segmentation=seg, bbox=[x * sx, y * sy, w * sx, h * sy]))
        records.append(dict(rec, file_name=str(path), height=hw[0], width=hw[1],
                            annotations=anns))
    return records


def same_outputs(a: dict, b: dict) -> bool:
    import torch

    ia, ib = a["instances"], b["instances"]
    return (torch.equal(a["image"], b["image"]) and torch.equal(ia.gt_classes, ib.gt_classes)
            and torch.equal(ia.gt_masks.tensor, ib.gt_masks.tensor)
            and torch.equal(ia.gt_boxes.tensor, ib.gt_boxes.tensor))


def time_case(cfg, records, calls: int, repeats: int, **new_kw) -> dict:
    """Per-sample ms of both mappers (alternating passes over the same seeds and records)."""
    import numpy as np

    from isda.data.dataset_mapper import ISDADatasetMapper
    from per_instance_mapper import PerInstanceMapper

    mappers = {"per_instance": PerInstanceMapper(cfg, is_train=True),
               "isda": ISDADatasetMapper(cfg, is_train=True, **new_kw)}
    jobs = [(seed, records[seed % len(records)]) for seed in range(calls)]
    outs = {}
    for name, m in mappers.items():  # the first pass: check, and warm the cache
        outs[name] = []
        for seed, rec in jobs:
            np.random.seed(seed)
            outs[name].append(m(copy.deepcopy(rec)))
    if not all(same_outputs(a, b) for a, b in zip(outs["per_instance"], outs["isda"])):
        raise SystemExit("the two mappers' outputs differ")
    instances = statistics.mean(len(o["instances"]) for o in outs["isda"])
    del outs
    times = {n: [] for n in mappers}
    for r in range(repeats):
        for name in (list(mappers) if r % 2 == 0 else list(mappers)[::-1]):
            # Detectron2's loader hands the mapper a fresh copy of the record each time
            batch = [copy.deepcopy(rec) for _, rec in jobs]
            t0 = time.perf_counter()
            for (seed, _), rec in zip(jobs, batch):
                np.random.seed(seed)
                mappers[name](rec)
            times[name].append((time.perf_counter() - t0) / len(jobs))
    ms = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    return {"per_instance_ms": round(ms["per_instance"], 2), "isda_ms": round(ms["isda"], 2),
            "speedup": round(ms["per_instance"] / ms["isda"], 2),
            "output_instances": round(instances, 1)}


def data_time_share(iters: int) -> dict:
    """Train the main job's config for ``iters`` iterations; data_time / time of its last
    metrics.json record (Detectron2's medians over the last 20 iterations)."""
    with tempfile.TemporaryDirectory(prefix="isda_data_pipeline_") as out:
        cmd = [sys.executable, "train_net.py", "--config-file",
               "configs/nuclei/isda_R18_nuclei.yaml", "SOLVER.MAX_ITER", str(iters),
               "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "OUTPUT_DIR", out]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in open(Path(out) / "metrics.json")
                   if line.strip().startswith("{")]
        last = [r for r in records if "data_time" in r and "time" in r][-1]
    return {"train_iters": iters, "train_wall_s": round(time.time() - t0, 1),
            "iteration_s": round(last["time"], 3), "data_time_s": round(last["data_time"], 4),
            "data_time_share": round(last["data_time"] / last["time"], 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=24, help="samples (seeds) per pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per mapper")
    p.add_argument("--train-iters", type=int, default=30,
                   help="iterations of the main job's training for data_time (0: skip)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import isda  # noqa: F401 - registers the datasets
    from detectron2.data import DatasetCatalog
    from many_instances import many_instance_record

    report = dict(cpu_description(), torch_threads=1, calls=args.calls, repeats=args.repeats)
    main_cfg = make_cfg("configs/nuclei/isda_R18_nuclei.yaml")
    region = DatasetCatalog.get("nuclei_train_region")
    paper_crop = ["INPUT.RANDOM_FLIP", "both", "INPUT.ISDA.RANDOM_TRANSPOSE", 0.5,
                  "INPUT.CROP.PROB", 1.0, "INPUT.CROP.SIZE", [100, 300],
                  "INPUT.CROP.PRE_RESIZE_SIZES", (250, 300), "INPUT.MIN_SIZE_TRAIN",
                  (160, 192, 224), "INPUT.MAX_SIZE_TRAIN", 400, "MODEL.ISDA.NUM_CLASSES", 20]
    coco_full = ["INPUT.CROP.ENABLED", False, "INPUT.MIN_SIZE_TRAIN", (800,),
                 "INPUT.MAX_SIZE_TRAIN", 1333, "MODEL.ISDA.NUM_CLASSES", 20]
    with tempfile.TemporaryDirectory(prefix="isda_data_pipeline_") as tmp:
        cases = [
            ("crop", main_cfg, region, {}),
            ("crop_cold", main_cfg, region, {"mask_cache_mb": 0.0}),
            ("coco_polygons", make_cfg("configs/Base-ISDA.yaml", coco_full),
             upscaled_voc(Path(tmp)), {}),
            ("many_instances", make_cfg("configs/Base-ISDA.yaml", paper_crop),
             [many_instance_record(Path(tmp), n=300, hw=(600, 800))], {}),
        ]
        for name, cfg, records, kw in cases:
            calls = {"coco_polygons": max(3, args.calls // 4),
                     "many_instances": max(4, args.calls // 2)}.get(name, args.calls)
            r = time_case(cfg, records, calls, args.repeats, **kw)
            print(f"{name:>15}: per-instance {r['per_instance_ms']:8.2f} ms   isda "
                  f"{r['isda_ms']:7.2f} ms   speedup {r['speedup']:6.2f}x   "
                  f"({r['output_instances']} instances per sample)", flush=True)
            report.update({f"{name}_{k}": v for k, v in r.items()})
    if args.train_iters > 0:
        share = data_time_share(args.train_iters)
        print(f"training {share['train_iters']} iterations: {share['iteration_s']} s per "
              f"iteration, data_time {share['data_time_s']} s "
              f"({100 * share['data_time_share']:.1f} %)", flush=True)
        report.update(share)
    else:
        report["data_time_share"] = None
    print(json.dumps(report))


if __name__ == "__main__":
    main()
