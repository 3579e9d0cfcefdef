#!/usr/bin/env python
"""A learning race: ISDA (configs/custom/isda_R18_scratch.yaml) against Detectron2's Mask R-CNN
(from-scratch GN recipe at depth 18, its schedule scaled to the run), both trained from scratch
for the same CPU-time budgets, one thread each, same data, mapper and order; mask AP, recall at
IoU 0.5 and duplicates per TP (score >= 0.3) on held-out images.

    python benchmarks/learning_race.py                       # 3, 6, 12 CPU-minutes x 3 seeds
    python benchmarks/learning_race.py --budgets 3 --seeds 0 --datasets nuclei     # one cell
    python benchmarks/learning_race.py --label groups0 --isda-opts MODEL.ISDA.AUX_GROUPS 0
    python benchmarks/learning_race.py --cached-only --plot docs/learning_race.png

A calibration sets MAX_ITER per model and dataset; a cell that missed its budget by more than
--tolerance runs again rescaled (--passes). Runs are cached in --results; each ISDA model is also
evaluated with the --eval-dedup removals. Table: mean +- sd over seeds; last line JSON.
"""
import argparse
import copy
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's isda

# training / held-out data and the input recipe both models share. nuclei: stardist's 512x512
# image, columns 0-351 train (random crops), 384-511 held out as 4 tiles; nuclei3d: z-slices of
# stardist's 3-D stack (0-19 train, 24-30 held out).
DATASETS = {
    "nuclei": {"train": "nuclei_train_region", "test": "nuclei_val", "classes": 1, "input": [
        "INPUT.MIN_SIZE_TRAIN", (256, 288, 320), "INPUT.MAX_SIZE_TRAIN", 640,
        "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MIN_SIZE_TEST", 288,
        "INPUT.MAX_SIZE_TEST", 640, "INPUT.RANDOM_FLIP", "both", "INPUT.CROP.ENABLED", True,
        "INPUT.CROP.PROB", 1.0, "INPUT.CROP.TYPE", "absolute_range", "INPUT.CROP.SIZE",
        [128, 176], "INPUT.CROP.PRE_RESIZE_SIZES", (352,)]},
    "nuclei3d": {"train": "nuclei3d_train", "test": "nuclei3d_val", "classes": 1, "input": [
        "INPUT.MIN_SIZE_TRAIN", (224, 256, 288), "INPUT.MAX_SIZE_TRAIN", 640,
        "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice", "INPUT.MIN_SIZE_TEST", 256,
        "INPUT.MAX_SIZE_TEST", 640, "INPUT.RANDOM_FLIP", "both", "INPUT.CROP.ENABLED", False]},
}
MASKRCNN_CONFIG = "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml"
EVAL_DEDUP = ("none", "mask_nms", "matrix_nms")  # MODEL.ISDA.TEST.DEDUP evaluated besides
ISDA_CONFIG = "configs/custom/isda_R18_scratch.yaml"
BATCH = 2
METRICS = {"AP": 1, "AP50": 1, "AP75": 1, "recall50": 3, "duplicates_per_tp": 2}  # digits


def build_cfg(spec, max_iter, seed):
    """The config of one run of ``spec`` (model, dataset, configs, overrides, batch)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    import isda

    d = DATASETS[spec["dataset"]]
    cfg = get_cfg()
    isda.add_isda_config(cfg)  # ISDA's input keys, for the shared mapper
    if spec["model"] == "isda":
        cfg.merge_from_file(str(ROOT / spec["isda_config"]))
        cfg.merge_from_list(["MODEL.ISDA.NUM_CLASSES", d["classes"], *spec["isda_opts"]])
    else:
        cfg.merge_from_file(model_zoo.get_config_file(MASKRCNN_CONFIG))
        cfg.merge_from_list([  # depth 18: basic blocks, res2 width 64
            "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.ROI_HEADS.NUM_CLASSES", d["classes"], "SOLVER.BASE_LR", 0.02 * BATCH / 16,
            "SOLVER.STEPS", (round(max_iter * 210 / 270), round(max_iter * 250 / 270)),
            "SOLVER.WARMUP_ITERS", max(1, min(1000, max_iter // 10))])
    cfg.merge_from_list([*d["input"], "SOLVER.MAX_ITER", max_iter,
                         "DATASETS.TRAIN", (d["train"],), "DATASETS.TEST", (d["test"],),
                         "SOLVER.IMS_PER_BATCH", BATCH, "MODEL.DEVICE", "cpu", "SEED", seed,
                         "DATALOADER.NUM_WORKERS", 0, "MODEL.WEIGHTS", ""])
    cfg.freeze()
    return cfg


def train(model_name, cfg, iters, skip=0):
    """``iters`` SimpleTrainer iterations on seeded shuffles through ISDA's mapper
    -> (model, CPU seconds after the first ``skip``)."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.events import EventStorage

    from isda.data.dataset_mapper import ISDADatasetMapper
    from isda.engine import Trainer

    seed_all_rng(cfg.SEED)  # python, numpy, torch
    model = build_model(cfg)
    trainer = Trainer if model_name == "isda" else DefaultTrainer
    optimizer = trainer.build_optimizer(cfg, model)
    scheduler = trainer.build_lr_scheduler(cfg, optimizer)
    records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    mapper, g = ISDADatasetMapper(cfg, is_train=True), torch.Generator().manual_seed(cfg.SEED)
    order = []
    model.train()
    with EventStorage(0) as storage:
        for it in range(iters):
            if it == skip:
                start = time.process_time()
            storage.iter = it
            batch = []
            while len(batch) < cfg.SOLVER.IMS_PER_BATCH:
                order = order or torch.randperm(len(records), generator=g).tolist()
                batch.append(mapper(copy.deepcopy(records[order.pop(0)])))
            loss = sum(model(batch).values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{model_name}: loss {loss.item()} at iteration {it}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model, time.process_time() - start


def evaluate(cfg, model):
    """COCOEvaluator mask AP on DATASETS.TEST[0] and the duplicate counts of the detections
    above the demo's score threshold (isda.evaluation.count_duplicates)."""
    import contextlib
    import io

    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from isda.data.dataset_mapper import ISDADatasetMapper
    from isda.evaluation import DEMO_SCORE_THRESHOLD, count_duplicates

    name, mapper = cfg.DATASETS.TEST[0], ISDADatasetMapper(cfg, is_train=False)
    loader = [[mapper(copy.deepcopy(r))] for r in DatasetCatalog.get(name)]
    model.eval()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=out)
        segm = inference_on_dataset(model, loader, evaluator)["segm"]
        path = Path(out) / "coco_instances_results.json"
        dups = count_duplicates(evaluator._coco_api,
                                json.loads(path.read_text()) if path.is_file() else [],
                                DEMO_SCORE_THRESHOLD)
    # COCOEvaluator gives NaN when a model detects nothing: AP 0
    return {**{k: 0.0 if math.isnan(segm[k]) else segm[k] for k in ("AP", "AP50", "AP75")},
            **{k: dups[k] for k in ("recall50", "tp", "duplicates", "background",
                                    "duplicates_per_tp")}}


def run_worker(spec):
    """The ``--_run`` entry: calibrate (spec["calibrate"] iterations) or train + evaluate."""
    import torch

    torch.set_num_threads(1)
    import isda  # noqa: F401  (registers the model and the datasets)

    if spec["calibrate"]:
        _, cpu = train(spec["model"], build_cfg(spec, 1000, 0), 3 + spec["calibrate"], skip=3)
        return {"cpu_s_per_iter": cpu / spec["calibrate"]}
    cfg = build_cfg(spec, spec["max_iter"], spec["seed"])
    model, cpu = train(spec["model"], cfg, cfg.SOLVER.MAX_ITER)
    out = {"cpu_min": cpu / 60, "iters": cfg.SOLVER.MAX_ITER, **evaluate(cfg, model)}
    if spec["model"] == "isda":  # the same model with the other duplicate removals
        out["dedup"] = own = cfg.MODEL.ISDA.TEST.DEDUP
        for method in spec.get("eval_dedup", []):
            if method != own:
                model.dedup = method
                out[f"dedup_{method}"] = evaluate(cfg, model)
        model.dedup = own
    return out


def config_fingerprint(path):
    """sha1 (12 hex digits) of a config file and its ``_BASE_`` chain (part of the cache key)."""
    import yaml

    texts, path = [], (ROOT / path).resolve()
    while path is not None:
        texts.append(path.read_text())
        base = (yaml.safe_load(texts[-1]) or {}).get("_BASE_")
        path = (path.parent / base).resolve() if base else None
    return hashlib.sha1("\n".join(texts).encode()).hexdigest()[:12]


def spec_key(spec):
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def run_cached(spec, results_dir, cached_only=False):
    """Run ``spec`` in a fresh one-thread process, or read its cached result (``cached_only``:
    None when it is not cached)."""
    path = Path(results_dir) / f"{spec_key(spec)}.json"
    if path.is_file():
        return json.loads(path.read_text())["result"]
    if cached_only:
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, __file__, "--_run", json.dumps(spec)], env=env,
                          cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"run {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps({"spec": spec, "result": result}))
    path.with_suffix(".tmp").replace(path)
    return result


def next_pass_iters(iters, used_min, budget_min, tolerance):
    """MAX_ITER for another pass of a cell whose runs took ``used_min`` CPU-minutes at
    ``iters`` iterations (its own CPU time; None: within ``tolerance`` of the budget)."""
    if abs(used_min / budget_min - 1) <= tolerance:
        return None
    return max(10, round(iters * budget_min / used_min))


def summarise(rows, key):
    """-> (mean, sample sd) of ``key`` over ``rows``."""
    v = [r[key] for r in rows]
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def plot(table, path):
    """Mask AP and AP50 against CPU-minutes, one row of panels per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({t["dataset"] for t in table})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(9, 3.4 * len(datasets)), squeeze=False)
    for (ax, metric), d in [(a, d) for row, d in zip(axes, datasets) for a in zip(row, METRICS)]:
        for label in sorted({t["label"] for t in table if t["dataset"] == d}):
            pts = [t for t in table if (t["dataset"], t["label"]) == (d, label)]  # by budget
            ax.errorbar([t["cpu_min"] for t in pts], [t[metric] for t in pts], marker="o",
                        yerr=[t[metric + "_sd"] for t in pts], capsize=3, label=label)
        ax.set(xlabel="training CPU-minutes (one thread)", ylabel=f"mask {metric}",
               title=f"{d}: mask {metric} (mean +- sd over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table_row(sel, label):
    """One table row: the runs ``sel`` of a cell, mean +- sd over their seeds."""
    r0 = sel[0]
    t = {"dataset": r0["dataset"], "budget_min": r0["budget_min"], "model": r0["model"],
         "label": label, "iters": round(statistics.fmean(r["iters"] for r in sel)),
         "cpu_min": round(statistics.fmean(r["cpu_min"] for r in sel), 2), "seeds": len(sel),
         "pass": r0["run_pass"]}
    for k, digits in METRICS.items():
        if all(k in r for r in sel):  # (runs cached before the duplicate columns: "-")
            t[k], t[k + "_sd"] = (round(v, digits) for v in summarise(sel, k))
    return t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budgets", default="3,6,12", help="CPU-minutes per run (default 3,6,12)")
    p.add_argument("--seeds", default="0,1,2", help="seeds per budget (default 0,1,2)")
    p.add_argument("--datasets", default="nuclei,nuclei3d", help=f"of {sorted(DATASETS)}")
    p.add_argument("--models", default="isda,maskrcnn", help="isda and/or maskrcnn")
    p.add_argument("--label", default=None, help="name of the ISDA variant in the table")
    p.add_argument("--isda-config", default=ISDA_CONFIG, help=f"default {ISDA_CONFIG}")
    p.add_argument("--isda-opts", nargs="*", default=[], help="KEY VALUE overrides for ISDA")
    p.add_argument("--eval-dedup", default=",".join(EVAL_DEDUP),
                   help="TEST.DEDUP methods each ISDA run is also evaluated with ('' none)")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one thread each")
    p.add_argument("--calibrate-iters", type=int, default=10, help="timed calibration iterations")
    p.add_argument("--passes", type=int, default=2, help="passes per cell at most (1: no rerun)")
    p.add_argument("--tolerance", type=float, default=0.05, help="accepted miss of the budget")
    p.add_argument("--results", default=str(ROOT / "output" / "learning_race"),
                   help="folder of cached per-run results")
    p.add_argument("--cached-only", action="store_true", help="report cached runs, run nothing")
    p.add_argument("--plot", default=None, help="PNG of mask AP and AP50 against CPU-minutes")
    p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._run:
        print("RESULT " + json.dumps(run_worker(json.loads(args._run))), flush=True)
        return 0
    budgets = sorted((float(b) for b in args.budgets.split(",")), reverse=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets, models = args.datasets.split(","), args.models.split(",")
    if set(datasets) - set(DATASETS):
        p.error(f"--datasets: {sorted(set(datasets) - set(DATASETS))} not in {sorted(DATASETS)}")
    eval_dedup = [m for m in args.eval_dedup.split(",") if m]
    label = {"isda": args.label or "ISDA", "maskrcnn": "Mask R-CNN"}
    label.update({f"isda+{m}": f"{label['isda']} +{m}" for m in eval_dedup})
    isda_sha = config_fingerprint(args.isda_config)

    def spec(model, dataset, **kw):
        """A run's specification: its cache key."""
        isda = model == "isda"
        s = {"isda_config": args.isda_config if isda else "", "maskrcnn_opts": [],
             "isda_opts": list(args.isda_opts) if isda else [], "model": model,
             "dataset": dataset, "calibrate": 0}
        if isda:
            s["isda_config_sha"] = isda_sha
            if eval_dedup and not kw.get("calibrate"):
                s["eval_dedup"] = eval_dedup
        return {**s, **kw}

    t0, pool = time.time(), ThreadPoolExecutor(args.workers)

    def submit(s):
        return pool.submit(run_cached, s, args.results, args.cached_only)

    cal = {(m, d): submit(spec(m, d, calibrate=args.calibrate_iters))
           for m in models for d in datasets}
    cal = {k: f.result()["cpu_s_per_iter"] for k, f in cal.items() if f.result() is not None}
    for (m, d), s in sorted(cal.items()):
        print(f"calibration {d} {label[m]}: {s:.3f} CPU-s / iteration", flush=True)
    # longest budgets first: the pool ends with the short runs
    cells = [(m, d, b) for b in budgets for d in datasets for m in models if (m, d) in cal]
    iters = {(m, d, b): max(10, round(b * 60 / cal[(m, d)])) for m, d, b in cells}
    final, pending = {}, list(cells)
    for pass_no in range(1, args.passes + 1):
        futures = [((m, d, b, seed), submit(spec(m, d, max_iter=iters[(m, d, b)], seed=seed)))
                   for b in budgets for seed in seeds for m, d, bb in pending if bb == b]
        got = {}
        for (m, d, b, seed), f in futures:
            r = f.result()
            if r is None:  # --cached-only: not run yet
                continue
            got.setdefault((m, d, b), []).append(dict(
                r, model=m, dataset=d, budget_min=b, seed=seed, run_pass=pass_no))
            print(f"pass {pass_no} {d} {label[m]} {b:g} min seed {seed}: {r['iters']} it, "
                  f"{r['cpu_min']:.2f} CPU-min, " + ", ".join(
                      f"{k} {r[k]:.3g}" for k in METRICS if k in r), flush=True)
        final.update(got)
        pending = []
        for cell, runs in got.items():
            used = statistics.fmean(r["cpu_min"] for r in runs)
            nxt = next_pass_iters(iters[cell], used, cell[2], args.tolerance)
            if nxt is not None and len(runs) == len(seeds) and pass_no < args.passes:
                print(f"pass {pass_no} {cell[1]} {label[cell[0]]} {cell[2]:g} min: used "
                      f"{used:.2f} CPU-min at {iters[cell]} it -> {nxt} it", flush=True)
                iters[cell] = nxt
                pending.append(cell)
        if not pending:
            break
    rows = [r for cell in cells for r in final.get(cell, [])]
    # each ISDA run's evaluations with the other duplicate removals: rows of their own
    rows += [dict(r, **r[f"dedup_{m}"], model=f"isda+{m}") for m in eval_dedup for r in rows
             if r["model"] == "isda" and f"dedup_{m}" in r]
    row_models = models + [f"isda+{m}" for m in eval_dedup if "isda" in models]
    table = [table_row(sel, label[m]) for d in datasets for b in sorted(budgets)
             for m in row_models if (sel := [r for r in rows if (r["dataset"], r["budget_min"],
                                                                  r["model"]) == (d, b, m)])]
    print("\n| dataset | budget (CPU-min) | model | seeds | pass | iterations | CPU-min | mask AP "
          "| AP50 | AP75 | recall@0.5 | duplicates / TP (score >= 0.3) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['dataset']} | {t['budget_min']:g} | {t['label']} | {t['seeds']} | "
              f"{t['pass']} | {t['iters']} | {t['cpu_min']} | " + " | ".join(
                  f"{t[k]} +- {t[k + '_sd']}" if k in t else "-" for k in METRICS) + " |")
    goal = {}
    for d, b in [(d, b) for d in datasets for b in budgets]:
        c = {t["model"]: t for t in table if (t["dataset"], t["budget_min"]) == (d, b)}
        if "isda" in c and "maskrcnn" in c:
            goal[f"{d}@{b:g}"] = {k: c["isda"][k] >= c["maskrcnn"][k] for k in ("AP", "AP50")}
    if args.plot:
        plot(table, args.plot)
        print(f"plot: {args.plot}")
    print(json.dumps({"batch": BATCH, "threads_per_run": 1,
                      "isda_config": args.isda_config, "isda_opts": args.isda_opts,
                      "maskrcnn_config": MASKRCNN_CONFIG, "eval_dedup": eval_dedup,
                      "calibration_cpu_s_per_iter": {f"{d}/{m}": round(s, 3)
                                                     for (m, d), s in cal.items()},
                      "table": table, "isda_at_least_maskrcnn": goal,
                      "wall_min": round((time.time() - t0) / 60, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
