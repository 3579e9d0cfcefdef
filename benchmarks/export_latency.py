#!/usr/bin/env python
"""CPU latency of an exported ISDA-R50 in onnxruntime against the PyTorch model, side by side.

    python benchmarks/export_latency.py                 # 800x1216, 2 threads, 5 repeats
    python benchmarks/export_latency.py --size 256x384 --repeats 1     # smoke test

configs/coco/isda_R50_3x.yaml, random init, exported to ONNX; a voc_sample photo as input.
``pytorch``: the model with its post-processing; ``onnxruntime``: session.run +
outputs_to_instances; ``onnxruntime_graph``: session.run alone. Last stdout line: JSON.
"""
import argparse
import json
import os
import tempfile
import time

from isda_vs_maskrcnn import ROOT, calibrate_frozen_bn, medians_ms, parse_size, set_threads


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", default="800x1216", help="network input HxW")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of each runtime")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--config-file", default=str(ROOT / "configs" / "coco" / "isda_R50_3x.yaml"),
                   help="model config (random init)")
    p.add_argument("--export-dir", default=None,
                   help="where model.onnx goes (reused if there); default: a temporary folder")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    args = p.parse_args(argv)
    set_threads(args.threads)
    import cv2
    import numpy as np
    import onnxruntime
    import torch
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.modeling import build_model

    from isda import add_isda_config
    from isda.export import OnnxPredictor, outputs_to_instances
    from isda.export.exporter import export_isda, export_program
    from isda.export.model import ExportableISDA

    h, w = parse_size(args.size)
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
    report = {"size": [h, w], "threads": args.threads, "repeats": args.repeats,
              "config": os.path.relpath(args.config_file, ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = args.export_dir or tmp
        if not os.path.isfile(os.path.join(export_dir, "model.onnx")):
            t0 = time.perf_counter()  # traced at half size: the graph holds for every size
            example = torch.nn.functional.interpolate(image[None], size=(h // 2, w // 2))
            program = export_program(ExportableISDA(model), example)
            export_isda(cfg, model, "onnx", export_dir, example, opset=args.opset,
                        program=program)
            report["export_s"] = round(time.perf_counter() - t0, 1)
            print(f"exported in {report['export_s']} s", flush=True)
        pred = OnnxPredictor(export_dir, num_threads=args.threads)

        def run_pytorch():
            with torch.no_grad():
                return model([{"image": image, "height": h, "width": w}])[0]["instances"]

        def run_graph():
            return pred.session.run(None, {"image": x})

        def run_onnxruntime():
            return outputs_to_instances(*run_graph(), (h, w), (h, w), pred.mask_stride,
                                        pred.mask_threshold)

        a, b = run_pytorch(), run_onnxruntime()  # the same results (random weights, real photo)
        report.update(instances=[len(a), len(b)],
                      max_score_diff=float((a.scores - b.scores).abs().max()))
        times = medians_ms({"pytorch": run_pytorch, "onnxruntime": run_onnxruntime,
                            "onnxruntime_graph": run_graph}, args.repeats)
    for name, ms in times.items():
        report[f"{name}_ms"] = round(ms, 1)
        print(f"{name:<18} {ms:9.1f} ms", flush=True)
    report["onnxruntime_speedup"] = round(times["pytorch"] / times["onnxruntime"], 2)
    report["postprocess_ms"] = round(times["onnxruntime"] - times["onnxruntime_graph"], 1)
    report["versions"] = {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
