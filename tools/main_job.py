#!/usr/bin/env python
"""The README's main job (``make main``): train ISDA on the embedded nuclei data on this
machine, evaluate the final checkpoint on the held-out ``nuclei_val`` image with Detectron2's
``COCOEvaluator``, and visualise predictions next to the ground truth.

Writes, under ``--output`` (default ``output/main``):

* ``train/``          the training run (Detectron2 logs, TensorBoard events, ``model_final.pth``);
                      a re-run moves the earlier run into ``train/previous-<timestamp>/``
                      (``OUTPUT_DIR_EXISTING move``): nothing of it is deleted
* ``metrics.json``    the evaluator's results plus the git commit, seed and wall times (strict
                      JSON: an undefined metric, NaN, is ``null``)
* ``predictions.png`` ground truth | prediction panels for the validation image and a train tile

The held-out split is never used to choose a checkpoint: the final one is evaluated.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/nuclei/isda_R18_nuclei.yaml"


def run(cmd, log_file: Path) -> float:
    """Run a command, tee its output to a log file, return its wall time in seconds."""
    t0 = time.time()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if any(k in line for k in ("eta:", "copypaste:", "Traceback", "Error:")):
                print("   " + line.rstrip()[:160], flush=True)
        if proc.wait() != 0:
            raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"see {log_file}")
    return time.time() - t0


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def visualise(config: str, weights: Path, out_png: Path, opts, threshold: float = 0.3) -> None:
    """Ground truth next to predictions for nuclei_val and the first training tile."""
    import cv2
    import numpy as np
    import torch

    # isda first: it imports Detectron2's modules with their import-time torch.jit.script
    # FutureWarning silenced (isda/__init__.py); imported before it, detectron2.data printed it
    import isda  # noqa: F401
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import ColorMode, Visualizer

    from isda import add_isda_config
    from isda.predictor import ISDAPredictor

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / config))
    cfg.merge_from_list(list(opts) + ["MODEL.WEIGHTS", str(weights), "MODEL.DEVICE", "cpu"])
    cfg.freeze()
    predictor = ISDAPredictor(cfg)
    rows = []
    for name, index in (("nuclei_val", 0), ("nuclei_train", 0)):
        record = DatasetCatalog.get(name)[index]
        meta = MetadataCatalog.get(name)
        image = read_image(record["file_name"], format="RGB")
        gt = Visualizer(image, meta, scale=2.0, instance_mode=ColorMode.IMAGE)
        gt_img = gt.draw_dataset_dict(record).get_image()
        with torch.no_grad():
            inst = predictor(image, image_format="RGB")["instances"]
        inst = inst.to("cpu")
        inst = inst[inst.scores >= threshold]
        pred = Visualizer(image, meta, scale=2.0, instance_mode=ColorMode.IMAGE)
        pred_img = pred.draw_instance_predictions(inst).get_image()
        sep = np.full((gt_img.shape[0], 8, 3), 255, np.uint8)
        panel = np.concatenate([gt_img, sep, pred_img], axis=1)
        label = np.full((28, panel.shape[1], 3), 255, np.uint8)
        cv2.putText(label, f"{name}: ground truth | ISDA predictions (score >= {threshold:g}, "
                           f"{len(inst)} instances)", (4, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([label, panel], axis=0))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 8), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    cv2.imwrite(str(out_png), cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR))


def write_metrics(path: Path, metrics: dict) -> None:
    """Write ``metrics`` as strict JSON (NaN / inf -> ``null``), atomically."""
    from isda.checkpoint import atomic_write_text
    from isda.engine.hooks import dumps_strict

    atomic_write_text(dumps_strict(metrics, indent=2) + "\n", str(path))


def fmt(value, spec=".1f") -> str:
    """A metric for the console: ``n/a`` when undefined (None, NaN, inf) or missing."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "n/a"
    return format(value, spec) if value == value and abs(value) != float("inf") else "n/a"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="The README's main job (make main): train ISDA on the embedded nuclei data, "
                    "evaluate the final checkpoint on the held-out nuclei_val tiles with "
                    "Detectron2's COCOEvaluator and draw predictions next to the ground truth.")
    ap.add_argument("--config-file", default=DEFAULT_CONFIG,
                    help=f"training config (default {DEFAULT_CONFIG})")
    ap.add_argument("--output", default="output/main",
                    help="folder of the run: train/, metrics.json, predictions.png "
                         "(default output/main)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the run (default 0)")
    ap.add_argument("--vis-threshold", type=float, default=0.3,
                    help="score threshold of the drawn predictions (scores are class x mask "
                         "probability; the small nuclei model's true detections score 0.3-0.5)")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config overrides")
    args = ap.parse_args(argv)
    out = (ROOT / args.output).resolve()
    train_dir = out / "train"
    out.mkdir(parents=True, exist_ok=True)
    # a re-run moves the earlier run in train/ aside (train/previous-<timestamp>/), never deletes it
    opts = ["MODEL.DEVICE", "cpu", "SEED", str(args.seed), "OUTPUT_DIR", str(train_dir),
            "OUTPUT_DIR_EXISTING", "move"] + args.opts
    py = sys.executable
    t_start = time.time()

    print(f"[main] training {args.config_file} (CPU, seed {args.seed})", flush=True)
    t_train = run([py, "train_net.py", "--config-file", args.config_file, *opts],
                  out / "train.log")
    weights = train_dir / "model_final.pth"
    print(f"[main] evaluating the final checkpoint on nuclei_val", flush=True)
    t_eval = run([py, "train_net.py", "--config-file", args.config_file, "--eval-only",
                  *opts, "MODEL.WEIGHTS", str(weights), "DATASETS.TEST", "('nuclei_val',)"],
                 out / "eval.log")
    results = json.loads((train_dir / "inference" / "results.json").read_text())["results"]

    print("[main] drawing predictions", flush=True)
    t0 = time.time()
    visualise(args.config_file, weights, out / "predictions.png", args.opts, args.vis_threshold)
    t_vis = time.time() - t0

    metrics = {
        "dataset": "nuclei_val", "config": args.config_file, "seed": args.seed,
        "results": results, "git_commit": git_commit(), "weights": str(weights.relative_to(ROOT) if weights.is_relative_to(ROOT) else weights),
        "wall_seconds": {"train": round(t_train, 1), "eval": round(t_eval, 1),
                         "visualise": round(t_vis, 1), "total": round(time.time() - t_start, 1)},
        "threads": os.cpu_count(),
    }
    write_metrics(out / "metrics.json", metrics)
    segm = results.get("segm", {})
    print(f"[main] nuclei_val mask AP {fmt(segm.get('AP'))}, "
          f"AP50 {fmt(segm.get('AP50'))}, AP75 {fmt(segm.get('AP75'))}")
    print(f"[main] train {t_train:.0f} s, eval {t_eval:.0f} s")
    print(f"[main] metrics:     {out / 'metrics.json'}")
    print(f"[main] predictions: {out / 'predictions.png'}")
    print(f"[main] checkpoint:  {weights}")
    print(f"[main] logs:        {out / 'train.log'}, {out / 'eval.log'}; "
          f"TensorBoard: tensorboard --logdir {train_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
