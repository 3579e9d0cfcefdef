#!/usr/bin/env python
"""ISDA demo: predict instance masks on images or a video and save the drawings.

    python demo/demo.py --config-file configs/nuclei/isda_R18_nuclei.yaml \\
        --input datasets/nuclei/images/val_c384.png --output out/ \\
        --opts MODEL.WEIGHTS release/isda_R18_nuclei-xxxxxxxx.safetensors

``--input`` takes image files, folders (their images, sorted) and glob patterns (quote them);
``--video-input`` one video file, written with the mp4v codec. ``--output`` is a file for a
single image or video, otherwise a folder (created as needed). Class names come from the
metadata of ``DATASETS.TEST[0]``; ``MODEL.DEVICE`` selects the device (``--opts MODEL.DEVICE
cpu``).
"""
import argparse
import glob
import logging
import os
import sys
import time

import cv2
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import VisualizationDemo  # noqa: E402

from isda import add_isda_config  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def setup_cfg(args):
    """Config from ``--config-file`` + ``--opts`` (ISDA keys added)."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="ISDA demo (Detectron2)")
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", nargs="+", help="images, folders or glob patterns")
    parser.add_argument("--video-input", metavar="FILE", help="a video file")
    parser.add_argument("--output", help="output file (one image or a video) or folder")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the instances drawn")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs")
    return parser


def expand_inputs(items):
    """Files, folders and glob patterns -> sorted list of image paths; raises
    FileNotFoundError naming what matched nothing."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"input folder '{item}' holds no image "
                                        f"({', '.join(IMAGE_EXTENSIONS)})")
        elif os.path.isfile(item):
            found = [item]
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(os.path.expanduser(item)) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(f"input pattern '{item}' matches no file")
        else:
            raise FileNotFoundError(f"input '{item}' does not exist")
        paths.extend(found)
    return paths


def _read(path, image_format):
    try:
        return read_image(path, format=image_format)
    except Exception as e:  # PIL raises several types for unreadable files
        raise OSError(f"cannot read image '{path}': {type(e).__name__}: {e}") from None


def _output_path(output, src, many):
    """Where to write the drawing of ``src``: inside the folder ``output`` when there are many
    inputs or ``output`` is a folder, else ``output`` itself."""
    if many or os.path.isdir(output) or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.basename(src))
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    return output


def run_images(demo, paths, output, image_format, logger):
    many = len(paths) > 1
    for path in paths:
        image = _read(path, image_format)
        start = time.time()
        instances, vis = demo.run_on_image(image)
        logger.info(f"{path}: {len(instances)} instances in {time.time() - start:.2f}s")
        if output:
            out = _output_path(output, path, many)
            vis.save(out)
            if not os.path.isfile(out):
                raise OSError(f"could not write '{out}'")


def run_video(demo, path, output, logger):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video input '{path}' does not exist")
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise OSError(f"cannot open video '{path}'")
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer = None
    if output:
        out = _output_path(output, path, False)
        if os.path.isdir(output) or output.endswith(os.sep):
            out = os.path.splitext(out)[0] + ".mp4"
        writer = cv2.VideoWriter(out, cv2.VideoWriter_fourcc(*"mp4v"), float(fps),
                                 (width, height), True)
        if not writer.isOpened():
            raise OSError(f"cannot write video '{out}' (mp4v codec)")
    frames = 0
    try:
        for frame in demo.run_on_video(video):
            frames += 1
            if writer is not None:
                writer.write(frame)
    finally:
        video.release()
        if writer is not None:
            writer.release()
    if frames == 0:
        raise OSError(f"no frame could be decoded from '{path}'")
    logger.info(f"{path}: {frames} frames" + (f" -> {out}" if output else ""))


def main(argv=None):
    args = get_parser().parse_args(argv)
    logger = setup_logger(name="isda.demo")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    if bool(args.input) == bool(args.video_input):
        get_parser().error("give either --input or --video-input")
    try:
        paths = expand_inputs(args.input) if args.input else None
        cfg = setup_cfg(args)
        demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold)
        if paths is not None:
            run_images(demo, paths, args.output, cfg.INPUT.FORMAT, logger)
        else:
            run_video(demo, args.video_input, args.output, logger)
    except (FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
