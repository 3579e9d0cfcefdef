#!/usr/bin/env python
"""CPU latency of an exported ISDA-R50 in onnxruntime vs the PyTorch model, side by side.

    python benchmarks/export_latency.py                 # 800x1216, 2 threads, 5 repeats
    python benchmarks/export_latency.py --repeats 3 --export-dir /tmp/isda_r50_onnx

Model: ``configs/coco/isda_R50_3x.yaml`` with ``MODEL.WEIGHTS ""`` (random init, seed 0; the
FrozenBN statistics calibrated on an image as ``benchmarks/isda_vs_maskrcnn.py`` does, so
activations keep a trained network's scale), exported once with
``isda.export`` (ONNX, opset 18, dynamic height / width). Input: a VOC photo of
``voc_sample`` resized to the benchmark size (the network input: no further resize).

Timed, alternating in one process (``side_by_side.alternating_medians``: the order is
reversed every other round), median of ``--repeats`` after one warm-up round:

* ``pytorch``: ``model([{"image", "height", "width"}])`` as users run it (compiled deformable
  attention, CPU speed-up layers, post-processing to ``Instances``);
* ``onnxruntime``: ``OnnxPredictor``'s path without the resize: ``session.run`` on the
  float image + ``outputs_to_instances`` (the same post-processing);
* ``onnxruntime_graph``: ``session.run`` alone (the graph: everything but the
  post-processing).

Both runtimes get ``--threads`` intra-op threads (torch.set_num_threads; onnxruntime
intra_op_num_threads, idle-thread spinning off so that neither steals the cores from the
other). The last stdout line is one JSON object with the medians (ms) and the ratios.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="800x1216", help="network input HxW")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each runtime")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--config-file", default=str(ROOT / "configs" / "coco" / "isda_R50_3x.yaml"),
                   help="model config (random init)")
    p.add_argument("--export-dir", default=None,
                   help="where model.onnx goes (reused if it already holds one); default: a "
                        "temporary directory")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    import cv2
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    import isda  # noqa: F401
    from isda import add_isda_config
    from isda.export import OnnxPredictor, outputs_to_instances
    from isda.export.exporter import export_isda, export_program
    from isda.export.model import ExportableISDA
    from isda_vs_maskrcnn import calibrate_frozen_bn
    from side_by_side import alternating_medians

    h, w = (int(v) for v in args.size.lower().split("x"))
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "0"])
    cfg.freeze()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    calibrate_frozen_bn(model)

    photo = DatasetCatalog.get("voc_sample")[1]["file_name"]
    rgb = cv2.resize(cv2.imread(photo), (w, h), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    x = np.ascontiguousarray(rgb.astype(np.float32).transpose(2, 0, 1)[None])
    image = torch.from_numpy(x[0])

    tmp = None
    export_dir = args.export_dir
    if export_dir is None:
        tmp = tempfile.TemporaryDirectory()
        export_dir = tmp.name
    report = {"size": [h, w], "threads": args.threads, "repeats": args.repeats,
              "config": os.path.relpath(args.config_file, ROOT)}
    if not os.path.isfile(os.path.join(export_dir, "model.onnx")):
        t0 = time.perf_counter()
        # trace at a smaller size: the graph is valid for every size
        example = torch.nn.functional.interpolate(image[None], size=(h // 2, w // 2))
        program = export_program(ExportableISDA(model), example)
        export_isda(cfg, model, "onnx", export_dir, example, opset=args.opset, program=program)
        report["export_s"] = round(time.perf_counter() - t0, 1)
        print(f"exported to {export_dir} in {report['export_s']} s", flush=True)
    predictor = OnnxPredictor(export_dir, num_threads=args.threads)
    session = predictor.session
    stride, threshold = predictor.mask_stride, predictor.mask_threshold

    def run_pytorch():
        with torch.no_grad():
            return model([{"image": image, "height": h, "width": w}])[0]["instances"]

    def run_graph():
        return session.run(None, {"image": x})

    def run_onnxruntime():
        return outputs_to_instances(*run_graph(), (h, w), (h, w), stride, threshold)

    a, b = run_pytorch(), run_onnxruntime()  # same results (random weights, real photo)
    report["instances"] = [len(a), len(b)]
    report["max_score_diff"] = float((a.scores - b.scores).abs().max())
    times = alternating_medians({"pytorch": run_pytorch, "onnxruntime": run_onnxruntime,
                                 "onnxruntime_graph": run_graph}, args.repeats, warmup=1)
    for name, ms in times.items():
        report[f"{name}_ms"] = round(ms, 1)
        print(f"{name:<18} {ms:9.1f} ms", flush=True)
    report["onnxruntime_speedup"] = round(times["pytorch"] / times["onnxruntime"], 2)
    report["postprocess_ms"] = round(times["onnxruntime"] - times["onnxruntime_graph"], 1)
    import onnxruntime

    report["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
