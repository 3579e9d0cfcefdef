#!/usr/bin/env python
"""A learning race: ISDA against Detectron2's Mask R-CNN, both trained from scratch for the same
CPU-time budgets on small real data, each evaluated on held-out images with COCOEvaluator.

    python benchmarks/learning_race.py                       # 3, 6, 12 CPU-minutes x 3 seeds
    python benchmarks/learning_race.py --budgets 3 --seeds 0 --datasets nuclei     # one cell
    python benchmarks/learning_race.py --label groups0 --isda-opts MODEL.ISDA.AUX_GROUPS 0
    python benchmarks/learning_race.py --plot docs/learning_race.png

The two sides:

* **Mask R-CNN**: Detectron2's from-scratch GroupNorm recipe
  (``Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml``) at ResNet depth 18, its SGD optimiser and
  multi-step schedule with everything scaled to the run: learning rate by the linear scaling
  rule to the batch (0.02 x batch / 16), the 3x schedule's steps at the same fractions of
  ``SOLVER.MAX_ITER`` (7/9 and 25/27), its 1000-iteration warm-up capped at a tenth of the run.
* **ISDA**: ``configs/custom/isda_R18_scratch.yaml`` (the recommended config for small data
  trained from scratch; ``--isda-config`` / ``--isda-opts`` for variants).

Both get the same data: the same ISDA dataset mapper (``isda/data/dataset_mapper.py``, which also
gives Mask R-CNN its ``gt_boxes``), so the same crops, sizes and flips; the same batch and the
same sampling order (seeded), one intra-op thread each, the same evaluation mapper. A budget is
CPU time of the training process (``time.process_time``: data loading, forward, backward,
optimiser); each model's seconds per iteration is measured first (a short calibration run per
model and dataset) and ``SOLVER.MAX_ITER`` set so that training takes the budget, so each run has
its full schedule (warm-up and decay). The short calibration can miss (Mask R-CNN's iterations
get dearer as it learns): a cell whose runs used more than ``--tolerance`` more or less than the
budget runs again with ``SOLVER.MAX_ITER`` rescaled by their own CPU time (``--passes``), and the
table reports the last pass. Evaluation time is not counted. Runs go in parallel
(``--workers``, each one thread) and are cached in ``--results`` (one JSON per run), so an
interrupted race resumes. The table gives mean +- sd over seeds; the last line is JSON.

Beside AP, each run reports recall at IoU 0.5 and, above the demo's score threshold 0.3, its
duplicates per true positive: false positives whose mask IoU with an object already matched by
a higher-scored detection is >= 0.5 (:func:`isda.evaluation.count_duplicates`, the counts of
``tools/coco_duplicates.py``). Each trained ISDA model is also evaluated with the duplicate
removals of ``--eval-dedup`` (``MODEL.ISDA.TEST.DEDUP``; rows "ISDA +mask_nms", ...): same
training, so the rows differ by the post-processing alone.
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
sys.path.insert(0, str(ROOT))  # this checkout's isda, not an installed one

# Per dataset: training / held-out registrations and the input recipe both models share.
# nuclei: stardist's fluorescence nuclei (512x512, columns 0-351 train as one region with random
# crops, columns 384-511 held out as 4 tiles); nuclei3d: the z-slices of stardist's 3-D nuclei
# stack (slices 0-19 train, 24-30 held out).
DATASETS = {
    "nuclei": {
        "train": "nuclei_train_region", "test": "nuclei_val", "classes": 1,
        "input": ["INPUT.MIN_SIZE_TRAIN", (256, 288, 320), "INPUT.MAX_SIZE_TRAIN", 640,
                  "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice",
                  "INPUT.MIN_SIZE_TEST", 288, "INPUT.MAX_SIZE_TEST", 640,
                  "INPUT.RANDOM_FLIP", "both",
                  "INPUT.CROP.ENABLED", True, "INPUT.CROP.PROB", 1.0,
                  "INPUT.CROP.TYPE", "absolute_range", "INPUT.CROP.SIZE", [128, 176],
                  "INPUT.CROP.PRE_RESIZE_SIZES", (352,)],
    },
    "nuclei3d": {
        "train": "nuclei3d_train", "test": "nuclei3d_val", "classes": 1,
        "input": ["INPUT.MIN_SIZE_TRAIN", (224, 256, 288), "INPUT.MAX_SIZE_TRAIN", 640,
                  "INPUT.MIN_SIZE_TRAIN_SAMPLING", "choice",
                  "INPUT.MIN_SIZE_TEST", 256, "INPUT.MAX_SIZE_TEST", 640,
                  "INPUT.RANDOM_FLIP", "both", "INPUT.CROP.ENABLED", False],
    },
}
MASKRCNN_CONFIG = "Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml"
# each ISDA run is also evaluated with these duplicate removals (MODEL.ISDA.TEST.DEDUP)
EVAL_DEDUP = ("none", "mask_nms", "matrix_nms")  # (the config's own is not repeated)
ISDA_CONFIG = "configs/custom/isda_R18_scratch.yaml"
BATCH = 2


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def build_cfg(model, dataset, max_iter, seed, isda_config, isda_opts, maskrcnn_opts, batch=BATCH,
              input_opts=()):
    """The config of one run (``max_iter`` sets the schedule; ``input_opts``: KEY VALUE
    overrides of the dataset's input recipe, given to both models)."""
    from detectron2 import model_zoo
    from detectron2.config import get_cfg

    import isda

    d = DATASETS[dataset]
    cfg = get_cfg()
    isda.add_isda_config(cfg)  # ISDA's input keys (crop probability, ...) for the shared mapper
    if model == "isda":
        cfg.merge_from_file(str(ROOT / isda_config))
        cfg.merge_from_list(["MODEL.ISDA.NUM_CLASSES", d["classes"], "SOLVER.MAX_ITER", max_iter])
        cfg.merge_from_list(list(isda_opts))
    else:
        cfg.merge_from_file(model_zoo.get_config_file(MASKRCNN_CONFIG))
        # depth 18: basic blocks, whose res2 width is 64
        warmup = max(1, min(1000, max_iter // 10))
        cfg.merge_from_list([
            "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
            "MODEL.ROI_HEADS.NUM_CLASSES", d["classes"],
            "SOLVER.BASE_LR", 0.02 * batch / 16, "SOLVER.MAX_ITER", max_iter,
            "SOLVER.STEPS", (round(max_iter * 210 / 270), round(max_iter * 250 / 270)),
            "SOLVER.WARMUP_ITERS", warmup])
        cfg.merge_from_list(list(maskrcnn_opts))
    cfg.merge_from_list(list(d["input"]) + list(input_opts))
    cfg.merge_from_list(["DATASETS.TRAIN", (d["train"],), "DATASETS.TEST", (d["test"],),
                         "SOLVER.IMS_PER_BATCH", batch, "MODEL.DEVICE", "cpu", "SEED", seed,
                         "DATALOADER.NUM_WORKERS", 0, "MODEL.WEIGHTS", ""])
    cfg.freeze()
    return cfg


# --------------------------------------------------------------------------------------------
# one run (in its own process, one thread)
# --------------------------------------------------------------------------------------------
def _seed_everything(seed):
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batches(cfg, seed):
    """Endless batches of mapped training dicts: seeded shuffles of the dataset, ISDA's mapper."""
    import torch
    from detectron2.data import DatasetCatalog

    from isda.data.dataset_mapper import ISDADatasetMapper

    records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    mapper = ISDADatasetMapper(cfg, is_train=True)
    g = torch.Generator().manual_seed(seed)
    batch = []
    while True:
        for i in torch.randperm(len(records), generator=g).tolist():
            batch.append(mapper(copy.deepcopy(records[i])))
            if len(batch) == cfg.SOLVER.IMS_PER_BATCH:
                yield batch
                batch = []


def build_training(model_name, cfg):
    from detectron2.engine import DefaultTrainer
    from detectron2.modeling import build_model

    from isda.engine import Trainer

    model = build_model(cfg)
    trainer_cls = Trainer if model_name == "isda" else DefaultTrainer
    optimizer = trainer_cls.build_optimizer(cfg, model)
    scheduler = trainer_cls.build_lr_scheduler(cfg, optimizer)
    return model, optimizer, scheduler


def train(model_name, cfg, iters=None, skip=0):
    """Train ``iters`` (default ``SOLVER.MAX_ITER``) iterations as Detectron2's ``SimpleTrainer``
    does -> (model, CPU seconds of the iterations after the first ``skip``)."""
    import torch
    from detectron2.utils.events import EventStorage

    _seed_everything(cfg.SEED)
    model, optimizer, scheduler = build_training(model_name, cfg)
    model.train()
    data = batches(cfg, cfg.SEED)
    iters = cfg.SOLVER.MAX_ITER if iters is None else iters
    start = time.process_time()
    with EventStorage(0) as storage:  # Mask R-CNN logs its training statistics there
        for it in range(iters):
            if it == skip:
                start = time.process_time()
            storage.iter = it
            losses = model(next(data))
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{model_name}: loss {loss.item()} at iteration {it}: "
                                         f"{losses}")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model, time.process_time() - start


def evaluate(cfg, model, score_threshold=None):
    """COCOEvaluator mask AP on ``DATASETS.TEST[0]`` (both models through ISDA's test mapper),
    with the duplicate counts of :func:`isda.evaluation.count_duplicates` on the same
    detections -> dict: AP, AP50, AP75, recall50, tp, duplicates, background, duplicates_per_tp
    (the counts above ``score_threshold``, default the demo's 0.3)."""
    import contextlib
    import io

    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset

    from isda.data.dataset_mapper import ISDADatasetMapper
    from isda.evaluation import DEMO_SCORE_THRESHOLD, count_duplicates

    name = cfg.DATASETS.TEST[0]
    mapper = ISDADatasetMapper(cfg, is_train=False)
    loader = [[mapper(copy.deepcopy(r))] for r in DatasetCatalog.get(name)]
    model.eval()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=out)
        segm = inference_on_dataset(model, loader, evaluator)["segm"]
        results_path = Path(out) / "coco_instances_results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else []
        dups = count_duplicates(evaluator._coco_api, results,
                                DEMO_SCORE_THRESHOLD if score_threshold is None
                                else score_threshold)
    res = {}
    for k in ("AP", "AP50", "AP75"):
        # COCOEvaluator reports NaN when a model makes no detection at all: AP 0
        res[k] = 0.0 if math.isnan(segm[k]) else segm[k]
    for k in ("recall50", "tp", "duplicates", "background", "duplicates_per_tp"):
        res[k] = dups[k]
    return res


def run_worker(spec):
    """The ``--_run`` entry: calibrate (spec["calibrate"]) or train + evaluate one run."""
    import torch

    torch.set_num_threads(1)
    import isda  # noqa: F401  (registers the model and the datasets)

    if spec["calibrate"]:
        cfg = build_cfg(spec["model"], spec["dataset"], 1000, 0, spec["isda_config"],
                        spec["isda_opts"], spec["maskrcnn_opts"], spec.get("batch", BATCH),
                        spec.get("input_opts", ()))
        skip, n = 3, spec["calibrate"]
        _, cpu = train(spec["model"], cfg, iters=skip + n, skip=skip)
        return {"cpu_s_per_iter": cpu / n}
    cfg = build_cfg(spec["model"], spec["dataset"], spec["max_iter"], spec["seed"],
                    spec["isda_config"], spec["isda_opts"], spec["maskrcnn_opts"],
                    spec.get("batch", BATCH), spec.get("input_opts", ()))
    model, cpu = train(spec["model"], cfg)
    out = {"cpu_min": cpu / 60, "iters": cfg.SOLVER.MAX_ITER}
    out.update(evaluate(cfg, model))
    if spec["model"] == "isda":
        # the same trained model evaluated again with each other duplicate removal
        # (MODEL.ISDA.TEST.DEDUP; evaluation is not counted in the budget)
        own = cfg.MODEL.ISDA.TEST.DEDUP
        out["dedup"] = own
        for method in spec.get("eval_dedup", []):
            if method != own:
                model.dedup = method
                out[f"dedup_{method}"] = evaluate(cfg, model)
        model.dedup = own
    return out


# --------------------------------------------------------------------------------------------
# the race (parent process)
# --------------------------------------------------------------------------------------------
def config_fingerprint(path):
    """sha1 (12 hex digits) of a config file and its ``_BASE_`` chain: an edited config file
    gets new cache entries instead of the old file's results."""
    import yaml

    texts, path = [], (ROOT / path).resolve()
    while path is not None:
        text = path.read_text()
        texts.append(text)
        base = (yaml.safe_load(text) or {}).get("_BASE_")
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
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec, "result": result}))
    tmp.replace(path)
    return result


def next_pass_iters(iters, used_min, budget_min, tolerance):
    """MAX_ITER for another pass of a cell whose runs took ``used_min`` CPU-minutes (mean over
    seeds) at ``iters`` iterations, or None when that is within ``tolerance`` of the budget.
    The short calibration misses a model whose iterations get dearer as it learns (Mask R-CNN's
    mask head runs on more RoIs once its proposals match objects): the runs' own CPU time does
    not."""
    if abs(used_min / budget_min - 1) <= tolerance:
        return None
    return max(10, round(iters * budget_min / used_min))


def summarise(rows, key):
    vals = [r[key] for r in rows]
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return mean, sd


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({t["dataset"] for t in table})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(9, 3.4 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets):
        for ax, metric in zip(row, ("AP", "AP50")):
            for label in sorted({t["label"] for t in table if t["dataset"] == dataset}):
                pts = sorted((t for t in table if t["dataset"] == dataset and t["label"] == label),
                             key=lambda t: t["budget_min"])
                ax.errorbar([t["cpu_min"] for t in pts], [t[metric] for t in pts],
                            yerr=[t[metric + "_sd"] for t in pts], marker="o", capsize=3,
                            label=label)
            ax.set_xlabel("training CPU-minutes (one thread)")
            ax.set_ylabel(f"mask {metric}")
            ax.set_title(f"{dataset}: mask {metric} (mean +- sd over seeds)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--budgets", default="3,6,12", help="CPU-minutes per run (default 3,6,12)")
    p.add_argument("--seeds", default="0,1,2", help="seeds per budget (default 0,1,2)")
    p.add_argument("--datasets", default="nuclei,nuclei3d", help=f"of {sorted(DATASETS)}")
    p.add_argument("--models", default="isda,maskrcnn", help="isda and/or maskrcnn")
    p.add_argument("--label", default=None, help="name of the ISDA variant in the table")
    p.add_argument("--isda-config", default=ISDA_CONFIG, help=f"default {ISDA_CONFIG}")
    p.add_argument("--isda-opts", nargs="*", default=[], help="KEY VALUE overrides for ISDA")
    p.add_argument("--maskrcnn-opts", nargs="*", default=[], help="KEY VALUE for Mask R-CNN")
    p.add_argument("--eval-dedup", default=",".join(EVAL_DEDUP),
                   help="each ISDA run is also evaluated with these MODEL.ISDA.TEST.DEDUP\n"
                        "methods (rows 'ISDA +method'; default %(default)s; '' for none)")
    p.add_argument("--input-opts", nargs="*", default=[],
                   help="KEY VALUE overrides of the datasets' input recipe, for both models")
    p.add_argument("--batch", type=int, default=BATCH, help=f"images per batch (default {BATCH})")
    p.add_argument("--workers", type=int, default=2, help="parallel runs, one thread each")
    p.add_argument("--calibrate-iters", type=int, default=10, help="timed calibration iterations")
    p.add_argument("--passes", type=int, default=2,
                   help="a cell whose runs missed their budget by more than --tolerance runs\n"
                        "again with MAX_ITER rescaled by their own measured CPU time, up to this\n"
                        "many passes in all (default 2; 1 = the calibration alone sets MAX_ITER)")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="accepted relative miss of a cell's mean CPU time (default 0.05)")
    p.add_argument("--results", default=str(ROOT / "output" / "learning_race"),
                   help="folder of cached per-run results")
    p.add_argument("--cached-only", action="store_true",
                   help="report the runs already in --results, run nothing (a race in progress)")
    p.add_argument("--plot", default=None, help="PNG of mask AP and AP50 against CPU-minutes")
    p.add_argument("--_run", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._run:
        print("RESULT " + json.dumps(run_worker(json.loads(args._run))), flush=True)
        return 0

    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    datasets = args.datasets.split(",")
    models = args.models.split(",")
    for d in datasets:
        if d not in DATASETS:
            p.error(f"--datasets: unknown dataset {d!r} (of {sorted(DATASETS)})")
    base = {"isda_config": args.isda_config, "isda_opts": list(args.isda_opts),
            "maskrcnn_opts": list(args.maskrcnn_opts)}
    eval_dedup = [m for m in args.eval_dedup.split(",") if m]
    label = {"isda": args.label or "ISDA", "maskrcnn": "Mask R-CNN"}

    isda_config_sha = config_fingerprint(args.isda_config)  # (read once, in every ISDA key)

    def spec(model, dataset, **kw):
        s = dict(base, model=model, dataset=dataset, calibrate=0)
        if args.batch != BATCH:  # (the default batch stays out of the cache key)
            s["batch"] = args.batch
        if args.input_opts:  # (so does the datasets' own input recipe)
            s["input_opts"] = list(args.input_opts)
        if model != "isda":
            s["isda_opts"], s["isda_config"] = [], ""
        else:
            s["maskrcnn_opts"] = []
            s["isda_config_sha"] = isda_config_sha
            if eval_dedup and not kw.get("calibrate"):
                s["eval_dedup"] = eval_dedup
        s.update(kw)
        return s

    t0 = time.time()
    pool = ThreadPoolExecutor(args.workers)
    # seconds per iteration of each model on each dataset (both calibrated side by side)
    cal_specs = {(m, d): spec(m, d, calibrate=args.calibrate_iters) for m in models for d in datasets}
    cal = {k: f.result() for k, f in
           ((k, pool.submit(run_cached, s, args.results, args.cached_only))
            for k, s in cal_specs.items())}
    cal = {k: r["cpu_s_per_iter"] for k, r in cal.items() if r is not None}
    for (m, d), s in sorted(cal.items()):
        print(f"calibration {d} {label[m]}: {s:.3f} CPU-s / iteration", flush=True)
    cells = [(m, d, b) for b in sorted(budgets, reverse=True)  # longest first: the pool
             for d in datasets for m in models if (m, d) in cal]  # ends with the short runs
    iters = {(m, d, b): max(10, round(b * 60 / cal[(m, d)])) for m, d, b in cells}
    final, pending = {}, list(cells)
    for pass_no in range(1, args.passes + 1):
        futures = [((m, d, b, seed), pool.submit(run_cached,
                                                 spec(m, d, max_iter=iters[(m, d, b)], seed=seed),
                                                 args.results, args.cached_only))
                   for b in sorted(budgets, reverse=True) for seed in seeds
                   for m, d, bb in pending if bb == b]
        got = {}
        for (m, d, b, seed), f in futures:
            r = f.result()
            if r is None:  # --cached-only: not run yet
                continue
            got.setdefault((m, d, b), []).append(
                dict(r, model=m, label=label[m], dataset=d, budget_min=b, seed=seed,
                     run_pass=pass_no))
            print(f"pass {pass_no} {d} {label[m]:>12} budget {b:g} min seed {seed}: "
                  f"{r['iters']} it, {r['cpu_min']:.2f} CPU-min, AP {r['AP']:.1f} "
                  f"AP50 {r['AP50']:.1f} AP75 {r['AP75']:.1f} recall50 "
                  f"{r.get('recall50', float('nan')):.3f} duplicates/TP "
                  f"{r.get('duplicates_per_tp', float('nan')):.2f}", flush=True)
        still = []
        for cell in pending:
            if cell not in got:  # --cached-only: this pass has not started for the cell
                continue
            final[cell] = got[cell]
            used = statistics.fmean(r["cpu_min"] for r in got[cell])
            nxt = next_pass_iters(iters[cell], used, cell[2], args.tolerance)
            if nxt is not None and len(got[cell]) == len(seeds) and pass_no < args.passes:
                print(f"pass {pass_no} {cell[1]} {label[cell[0]]} {cell[2]:g} min: used "
                      f"{used:.2f} CPU-min at {iters[cell]} it -> {nxt} it", flush=True)
                iters[cell] = nxt
                still.append(cell)
        pending = still
        if not pending:
            break
    rows = [r for cell in cells for r in final.get(cell, [])]
    # the ISDA runs' evaluations with the other duplicate removals, as rows of their own
    variants = []
    for method in eval_dedup:
        for r in [r for r in rows if r["model"] == "isda" and f"dedup_{method}" in r]:
            variants.append(dict(r, **r[f"dedup_{method}"], model=f"isda+{method}",
                                 label=f"{label['isda']} +{method}"))
            label[f"isda+{method}"] = f"{label['isda']} +{method}"
    rows += variants
    row_models = [m for m in models] + [f"isda+{x}" for x in eval_dedup if "isda" in models]

    table = []
    for d in datasets:
        for b in sorted(budgets):
            for m in row_models:
                sel = [r for r in rows if r["dataset"] == d and r["budget_min"] == b
                       and r["model"] == m]
                if not sel:  # --cached-only: no run of this cell yet
                    continue
                t = {"dataset": d, "budget_min": b, "model": m, "label": label[m],
                     "iters": round(statistics.fmean(r["iters"] for r in sel)),
                     "cpu_min": round(statistics.fmean(r["cpu_min"] for r in sel), 2),
                     "seeds": len(sel), "pass": sel[0]["run_pass"]}
                for k in ("AP", "AP50", "AP75"):
                    mean, sd = summarise(sel, k)
                    t[k], t[k + "_sd"] = round(mean, 1), round(sd, 1)
                # (runs cached before these columns existed have none: "-")
                for k, digits in (("recall50", 3), ("duplicates_per_tp", 2)):
                    if all(k in r for r in sel):
                        mean, sd = summarise(sel, k)
                        t[k], t[k + "_sd"] = round(mean, digits), round(sd, digits)
                table.append(t)

    def cell(t, k):
        return f"{t[k]} +- {t[k + '_sd']}" if k in t else "-"

    print("\n| dataset | budget (CPU-min) | model | seeds | pass | iterations | CPU-min | mask AP "
          "| AP50 | AP75 | recall@0.5 | duplicates / TP (score >= 0.3) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['dataset']} | {t['budget_min']:g} | {t['label']} | {t['seeds']} | "
              f"{t['pass']} | {t['iters']} | {t['cpu_min']} | {cell(t, 'AP')} | "
              f"{cell(t, 'AP50')} | {cell(t, 'AP75')} | {cell(t, 'recall50')} | "
              f"{cell(t, 'duplicates_per_tp')} |")
    goal = {}
    if set(models) == {"isda", "maskrcnn"}:
        for d in datasets:
            for b in budgets:
                cell = {t["model"]: t for t in table if t["dataset"] == d and t["budget_min"] == b}
                if len(cell) < 2:
                    continue
                goal[f"{d}@{b:g}"] = {k: cell["isda"][k] >= cell["maskrcnn"][k]
                                      for k in ("AP", "AP50")}
    if args.plot:
        plot(table, args.plot)
        print(f"plot: {args.plot}")
    print(json.dumps({"batch": args.batch, "threads_per_run": 1, "input_opts": args.input_opts,
                      "isda_config": args.isda_config,
                      "isda_opts": args.isda_opts, "maskrcnn_config": MASKRCNN_CONFIG,
                      "eval_dedup": eval_dedup,
                      "calibration_cpu_s_per_iter": {f"{d}/{m}": round(s, 3)
                                                     for (m, d), s in cal.items()},
                      "table": table, "isda_at_least_maskrcnn": goal,
                      "wall_min": round((time.time() - t0) / 60, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
