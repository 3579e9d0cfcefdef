#!/usr/bin/env python
"""The training data pipeline: ISDA's dataset mapper against the per-instance route
(tests/per_instance_mapper.py) on the same records and seeds, and the main job's data_time share.

    python benchmarks/data_pipeline.py                       # 24 calls, 5 repeats, 30 iterations
    python benchmarks/data_pipeline.py --calls 4 --repeats 1 --train-iters 0   # smoke test

Cases (per-sample ms, outputs checked equal): ``crop`` the main job's crops (``crop_cold``:
no mask cache), ``coco_polygons`` VOC photos at 800x1333, ``many_instances`` 300 instances with
DETR-style crops. One torch thread. The last stdout line is one JSON object.
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

from isda_vs_maskrcnn import ROOT, isda_cfg as make_cfg

sys.path.insert(0, str(ROOT / "tests"))


def cpu_description() -> dict:
    info = dict(map(str.strip, line.split(":", 1)) for line in open("/proc/cpuinfo") if ":" in line)
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name", "unknown"), "cpu_count": os.cpu_count(),
            "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]}


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


def time_case(cfg, records, calls: int, repeats: int, **new_kw) -> dict:
    """Per-sample ms of both mappers (alternating passes over the same seeds and records)."""
    import numpy as np
    import torch

    from isda.data.dataset_mapper import ISDADatasetMapper
    from per_instance_mapper import PerInstanceMapper

    mappers = {"per_instance": PerInstanceMapper(cfg, is_train=True),
               "isda": ISDADatasetMapper(cfg, is_train=True, **new_kw)}
    jobs = [(seed, records[seed % len(records)]) for seed in range(calls)]
    outs = {name: [] for name in mappers}
    for name, m in mappers.items():  # the first pass: check, and warm the cache
        for seed, rec in jobs:
            np.random.seed(seed)
            o = m(copy.deepcopy(rec))
            i = o["instances"]
            outs[name].append([o["image"], i.gt_classes, i.gt_masks.tensor, i.gt_boxes.tensor])
    if not all(torch.equal(x, y) for a, b in zip(*outs.values()) for x, y in zip(a, b)):
        raise SystemExit("the two mappers' outputs differ")
    instances = statistics.mean(len(o[1]) for o in outs["isda"])
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
    """data_time / time of the main job's last metrics.json record after ``iters`` iterations."""
    with tempfile.TemporaryDirectory(prefix="isda_data_pipeline_") as out:
        cmd = [sys.executable, "train_net.py", "--config-file",
               "configs/nuclei/isda_R18_nuclei.yaml", "SOLVER.MAX_ITER", str(iters),
               "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "OUTPUT_DIR", out]
        t0, proc = time.time(), subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        records = [json.loads(line) for line in open(Path(out) / "metrics.json")
                   if line.strip().startswith("{")]
        last = [r for r in records if "data_time" in r and "time" in r][-1]
    print(f"training {iters} iterations: {last['time']:.3f} s per iteration, data_time "
          f"{last['data_time']:.4f} s", flush=True)
    return {"train_iters": iters, "train_wall_s": round(time.time() - t0, 1),
            "iteration_s": round(last["time"], 3), "data_time_s": round(last["data_time"], 4),
            "data_time_share": round(last["data_time"] / last["time"], 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--calls", type=int, default=24, help="samples (seeds) per pass")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per mapper")
    p.add_argument("--train-iters", type=int, default=30,
                   help="iterations of the main job's training for data_time (0: skip)")
    args = p.parse_args(argv)

    import torch
    from detectron2.data import DatasetCatalog

    torch.set_num_threads(1)
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
    report.update(data_time_share(args.train_iters) if args.train_iters > 0
                  else {"data_time_share": None})
    print(json.dumps(report))


if __name__ == "__main__":
    main()
