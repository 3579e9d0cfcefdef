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
from detectron2.data.detection_utils import read_image  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from isda import add_isda_config  # noqa: E402
from isda.checkpoint import ISDACheckpointer  # noqa: E402
from isda.export.exporter import (DEFAULT_OPSET, FILENAMES, MIN_OPSET, export_isda,  # noqa: E402
                                  export_program, network_input)
from isda.export.model import ExportableISDA  # noqa: E402

logger = logging.getLogger("isda.export")
FALLBACK_DATASET = "nuclei_val"


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
    p.add_argument("--sample-image", default=None, metavar="FILE",
                   help="image used to trace the model (any size; the export is valid for "
                        "every height and width >= 65). Default: the first image of "
                        f"DATASETS.TEST[0], else of {FALLBACK_DATASET}")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset version (>= {MIN_OPSET}: GridSample is standard from 16)")
    p.add_argument("--verify", action="store_true",
                   help="run the exported model(s) on the sample image and report the largest "
                        "score difference to the PyTorch model")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER,
                   help="config overrides as KEY VALUE pairs at the end, e.g. MODEL.WEIGHTS "
                        "path/to/model_final.pth MODEL.ISDA.TEST.TOPK 50")
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


def sample_image(cfg, path=None):
    """uint8 [H, W, 3] in the config's INPUT.FORMAT: ``path``, else a dataset image."""
    if path is None:
        names = list(cfg.DATASETS.TEST) + [FALLBACK_DATASET]
        for name in names:
            try:
                dicts = DatasetCatalog.get(name)
            except Exception as e:  # noqa: BLE001  (unregistered / data not present)
                logger.info("no sample image from %s (%s)", name, e)
                continue
            if dicts:
                path = dicts[0]["file_name"]
                break
        if path is None:
            raise SystemExit("no sample image: give --sample-image")
    logger.info("sample image: %s", path)
    return read_image(path, format=cfg.INPUT.FORMAT)


def class_names(cfg, num_classes):
    for name in cfg.DATASETS.TEST:
        try:
            names = MetadataCatalog.get(name).get("thing_classes")
        except KeyError:
            names = None
        if names is not None and len(names) == num_classes:
            return list(names)
    return None


def verify(model, out_dir, fmt, image, cfg):
    """Run the export (its predictor) and the PyTorch model on ``image`` (same resize) ->
    instance counts and the largest score difference."""
    from isda.export.onnx_predictor import load_predictor

    height, width = image.shape[:2]
    x = network_input(image, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    with torch.no_grad():
        a = model([{"image": torch.from_numpy(x[0]), "height": height,
                    "width": width}])[0]["instances"]
    b = load_predictor(out_dir)(image, cfg.INPUT.FORMAT)["instances"]
    if len(a) != len(b):
        return {"instances": [len(a), len(b)], "ok": False}
    diff = float((a.scores - b.scores).abs().max()) if len(a) else 0.0
    return {"instances": len(a), "max_score_diff": diff, "ok": diff <= 1e-3}


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="isda")
    if args.opset < MIN_OPSET:
        raise SystemExit(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
    cfg = setup_cfg(args)
    model = load_model(cfg)
    image = sample_image(cfg, args.sample_image)
    example = torch.from_numpy(network_input(image, cfg.INPUT.MIN_SIZE_TEST,
                                             cfg.INPUT.MAX_SIZE_TEST))
    names = class_names(cfg, cfg.MODEL.ISDA.NUM_CLASSES)
    formats = list(dict.fromkeys(args.format))
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
    if args.verify and not all(e["verify"]["ok"] for e in summary["exports"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
