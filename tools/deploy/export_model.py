#!/usr/bin/env python
"""Export an ISDA model to ONNX (``model.onnx``) or to a ``torch.export`` program (``model.pt2``).

    python tools/deploy/export_model.py --config-file configs/nuclei/isda_R18_nuclei.yaml \
        --format onnx --output exported/ MODEL.WEIGHTS output/main/train/model_final.pth

The exported graph takes one image of any height and width (>= 65): float32 [1, 3, H, W],
0..255, in the config's INPUT.FORMAT channel order; normalisation and padding are inside the
graph, resizing (ResizeShortestEdge) and the final post-processing outside
(``isda.export.postprocess.outputs_to_instances``, or ``isda.export.OnnxPredictor``). Next to the
model file, ``export.json`` records the input format, the post-processing settings and the class
names. Both formats come from one ``torch.export`` capture: ``--format onnx torch_export``
writes both. See docs/deployment.md.
"""
import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import isda  # noqa: E402,F401  first: registers ISDA, quiets Detectron2's import-time warnings
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from isda import add_isda_config  # noqa: E402
from isda.checkpoint import ISDACheckpointer  # noqa: E402
from isda.export.exporter import (DEFAULT_OPSET, FILENAMES, MIN_OPSET, export_isda,  # noqa: E402
                                  export_program, network_input)
from isda.export.model import ExportableISDA  # noqa: E402
from isda.data.image_io import read_image  # noqa: E402  (training's reader)
from isda.utils.cli import parse_args_anywhere  # noqa: E402
from isda.utils.setup_file import run_setup_file  # noqa: E402

logger = logging.getLogger("isda.export")
#: --verify compares what a user sees: the instances scoring at least this (the demo's default
#: --confidence-threshold), their classes, masks (IoU) and scores
VERIFY_SCORE = 0.3
VERIFY_MIN_IOU = 0.9
VERIFY_MAX_SCORE_DIFF = 0.01


class ExportError(Exception):
    """A refused export (printed as 'error: ...', exit status 2); nothing was written."""


def get_parser():
    p = argparse.ArgumentParser(
        description="Export an ISDA model to ONNX or torch.export, with dynamic input height "
                    "and width (see docs/deployment.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config-file", required=True, metavar="FILE",
                   help="ISDA config file (e.g. configs/nuclei/isda_R18_nuclei.yaml)")
    p.add_argument("--format", nargs="+", choices=sorted(FILENAMES), default=["onnx"],
                   help="what to write: 'onnx' (model.onnx, run it with onnxruntime) and/or "
                        "'torch_export' (model.pt2, torch.export.save); both come from one "
                        "capture")
    p.add_argument("--output", required=True, metavar="DIR",
                   help="output directory (created); receives the model file(s) and "
                        "export.json (one sub-directory per format when several are given)")
    p.add_argument("--setup-file", metavar="FILE",
                   help="a Python file run first, e.g. your dataset registrations, so that "
                        "DATASETS.TEST gives the sample image and the class names "
                        "(docs/custom_dataset.md)")
    p.add_argument("--sample-image", default=None, metavar="FILE",
                   help="image used to trace the model (any size; the export is valid for "
                        "every height and width >= 65). Default: the first image of "
                        "DATASETS.TEST[0] (it must be registered: see --setup-file)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset version (>= {MIN_OPSET}: GridSample is standard from 16)")
    p.add_argument("--verify", action="store_true",
                   help="run the exported model(s) on the sample image beside the PyTorch "
                        f"model and compare the instances scoring >= {VERIFY_SCORE} (what the "
                        "demo draws): same count and classes, mask IoU >= "
                        f"{VERIFY_MIN_IOU}, scores within {VERIFY_MAX_SCORE_DIFF}; exit 1 "
                        "saying what differs")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS "
                        "path/to/model_final.pth MODEL.ISDA.TEST.TOPK 50 (options may follow "
                        "them)")
    return p


def setup_cfg(args):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def load_model(cfg):
    """The config's model, eval mode, with MODEL.WEIGHTS (strict) or random init (warned)."""
    model = build_model(cfg).eval()
    if cfg.MODEL.WEIGHTS:
        ISDACheckpointer(model).load(cfg.MODEL.WEIGHTS)
    else:
        logger.warning("MODEL.WEIGHTS is empty: exporting a randomly initialised model")
    return model


def check_datasets(cfg):
    """Every DATASETS.TEST name must be registered: an unregistered one is an error (it gave
    a silent fallback to another dataset's image and ``class_names: null``)."""
    registered = set(DatasetCatalog.list())
    missing = [n for n in cfg.DATASETS.TEST if n not in registered]
    if missing:
        raise ExportError(
            f"dataset {', '.join(repr(n) for n in missing)} (DATASETS.TEST) is not registered: "
            "give the file that registers it with --setup-file (docs/custom_dataset.md), or "
            "set DATASETS.TEST to registered datasets")


def sample_image(cfg, path=None):
    """uint8 [H, W, 3] in the config's INPUT.FORMAT, read as training reads images: ``path``,
    else the first image of DATASETS.TEST[0]."""
    if path is None:
        if not len(cfg.DATASETS.TEST):
            raise ExportError("no sample image: DATASETS.TEST is empty; give --sample-image")
        name = cfg.DATASETS.TEST[0]
        dicts = DatasetCatalog.get(name)
        if not dicts:
            raise ExportError(f"no sample image: dataset '{name}' has no image; give "
                              "--sample-image")
        path = dicts[0]["file_name"]
    if not os.path.isfile(path):
        raise ExportError(f"sample image '{path}' does not exist")
    logger.info("sample image: %s", path)
    try:
        return read_image(path, format=cfg.INPUT.FORMAT)
    except Exception as e:  # noqa: BLE001  (PIL raises several types for unreadable files)
        raise ExportError(f"cannot read sample image '{path}': {type(e).__name__}: {e}") \
            from None


def class_names(cfg, num_classes):
    """The class names of DATASETS.TEST[0]; None, with a warning, when there are none or
    their count differs from the model's (the export would draw wrong names)."""
    for name in cfg.DATASETS.TEST:
        meta = MetadataCatalog.get(name)
        names = meta.get("thing_classes", None)
        if names is None and name in DatasetCatalog.list():
            DatasetCatalog.get(name)  # COCO files set their classes when loaded
            names = meta.get("thing_classes", None)
        if names is None:
            continue
        if len(names) != num_classes:
            logger.warning(
                "dataset '%s' has %d classes but the model predicts MODEL.ISDA.NUM_CLASSES = "
                "%d: export.json records \"class_names\": null", name, len(names), num_classes)
            return None
        return list(names)
    logger.warning("no class names (DATASETS.TEST is empty or has none): export.json records "
                   "\"class_names\": null and the demo draws class numbers")
    return None


def check_output(output, formats):
    """Before the (long) capture: the output folders can be created and written."""
    dirs = [output] if len(formats) == 1 else [os.path.join(output, f) for f in formats]
    for d in dirs:
        if os.path.exists(d) and not os.path.isdir(d):
            raise ExportError(f"--output: '{d}' is a file, not a folder")
        parent = d
        while not os.path.exists(parent):
            parent = os.path.dirname(os.path.abspath(parent))
        if not os.path.isdir(parent):
            raise ExportError(f"--output: '{parent}' is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ExportError(f"--output: cannot write into '{parent}' (permission denied); "
                              "choose another folder (nothing was written)")


def compare_instances(a, b, score=VERIFY_SCORE, min_iou=VERIFY_MIN_IOU,
                      max_diff=VERIFY_MAX_SCORE_DIFF):
    """What a user sees of the PyTorch instances ``a`` and the export's ``b`` (both sorted by
    score): the instances scoring >= ``score`` must agree in number and class, their masks
    overlap by IoU >= ``min_iou`` and their scores within ``max_diff``. Instances near the
    threshold may cross it by a rounding: an unmatched one within ``max_diff`` of it is
    tolerated. -> report dict with "ok" and, when not ok, "problems" (what differs)."""
    a = a[a.scores >= score - max_diff]
    b = b[b.scores >= score - max_diff]
    sure_a = int((a.scores >= score + max_diff).sum())
    sure_b = int((b.scores >= score + max_diff).sum())
    problems, ious, diffs = [], [], []
    used = set()
    for i in range(len(a)):
        best, best_iou = None, -1.0
        for j in range(len(b)):
            if j in used or int(b.pred_classes[j]) != int(a.pred_classes[i]):
                continue
            inter = float((a.pred_masks[i] & b.pred_masks[j]).sum())
            union = float((a.pred_masks[i] | b.pred_masks[j]).sum())
            iou = inter / union if union else 1.0
            if iou > best_iou:
                best, best_iou = j, iou
        if best is None or best_iou < min_iou:
            if i < sure_a:
                problems.append(f"PyTorch instance #{i} (class {int(a.pred_classes[i])}, score "
                                f"{float(a.scores[i]):.4f}) has no export instance of that "
                                f"class with mask IoU >= {min_iou} (best {max(best_iou, 0):.3f})")
            continue
        used.add(best)
        ious.append(best_iou)
        d = abs(float(a.scores[i]) - float(b.scores[best]))
        diffs.append(d)
        if d > max_diff:
            problems.append(f"instance #{i} (class {int(a.pred_classes[i])}): score "
                            f"{float(a.scores[i]):.4f} in PyTorch vs {float(b.scores[best]):.4f} "
                            f"exported (difference {d:.4f} > {max_diff})")
    for j in range(min(sure_b, len(b))):
        if j not in used:
            problems.append(f"exported instance #{j} (class {int(b.pred_classes[j])}, score "
                            f"{float(b.scores[j]):.4f}) has no PyTorch counterpart")
    report = {"instances_at_threshold": [int((a.scores >= score).sum()),
                                         int((b.scores >= score).sum())],
              "score_threshold": score, "min_mask_iou": round(min(ious), 4) if ious else None,
              "max_score_diff": round(max(diffs), 6) if diffs else 0.0, "ok": not problems}
    if problems:
        report["problems"] = problems
    return report


def verify(model, out_dir, fmt, image, cfg):
    """Run the export (its predictor) and the PyTorch model on ``image`` (same resize) and
    compare what the demo would draw (:func:`compare_instances`)."""
    from isda.export.onnx_predictor import load_predictor

    height, width = image.shape[:2]
    x = network_input(image, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    with torch.no_grad():
        a = model([{"image": torch.from_numpy(x[0]), "height": height,
                    "width": width}])[0]["instances"]
    b = load_predictor(out_dir)(image, cfg.INPUT.FORMAT)["instances"]
    return compare_instances(a, b)


def main(argv=None):
    args = parse_args_anywhere(get_parser(), argv)
    setup_logger(name="isda")
    if args.opset < MIN_OPSET:
        raise SystemExit(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
    formats = list(dict.fromkeys(args.format))
    try:
        # everything that can be refused is checked before the model is captured (minutes)
        run_setup_file(args.setup_file)
        cfg = setup_cfg(args)
        check_output(args.output, formats)
        check_datasets(cfg)
        names = class_names(cfg, cfg.MODEL.ISDA.NUM_CLASSES)
        image = sample_image(cfg, args.sample_image)
        model = load_model(cfg)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    example = torch.from_numpy(network_input(image, cfg.INPUT.MIN_SIZE_TEST,
                                             cfg.INPUT.MAX_SIZE_TEST))
    t0 = time.perf_counter()
    program = export_program(ExportableISDA(model), example)
    summary = {"capture_s": round(time.perf_counter() - t0, 1), "exports": []}
    for fmt in formats:
        out_dir = args.output if len(formats) == 1 else os.path.join(args.output, fmt)
        t0 = time.perf_counter()
        meta = export_isda(cfg, model, fmt, out_dir, example, opset=args.opset,
                           class_names=names, program=program)
        entry = {"format": fmt, "path": os.path.join(out_dir, meta["file"]),
                 "seconds": round(time.perf_counter() - t0, 1)}
        if args.verify:
            entry["verify"] = verify(model, out_dir, fmt, image, cfg)
        summary["exports"].append(entry)
        logger.info("wrote %s and %s", entry["path"], os.path.join(out_dir, "export.json"))
    print(json.dumps(summary))
    if args.verify:
        bad = [e for e in summary["exports"] if not e["verify"]["ok"]]
        for e in bad:
            print(f"verify failed for {e['path']} (the files are written; do not deploy them "
                  "before finding why):\n  " + "\n  ".join(e["verify"]["problems"]),
                  file=sys.stderr)
        if bad:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
