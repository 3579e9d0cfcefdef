#!/usr/bin/env python
"""ISDA demo: predict instance masks on images or a video and save the drawings.

    python demo/demo.py --config-file configs/nuclei/isda_R18_nuclei.yaml \\
        --input datasets/nuclei/images/val_c384.png --output out/ \\
        --opts MODEL.WEIGHTS release/isda_R18_nuclei-xxxxxxxx.safetensors

``--input`` takes image files, folders (their images, sorted) and glob patterns (quote them);
``--video-input`` one video file, written with the mp4v codec. Where the drawings go is
described in ``--help`` (``OUTPUT_RULES`` below): nothing is ever written over an input and two
inputs never share an output; every conflict is refused before anything is written. Class names
come from the metadata of ``DATASETS.TEST[0]``; ``MODEL.DEVICE`` selects the device (``--opts
MODEL.DEVICE cpu``). An empty ``MODEL.WEIGHTS`` is refused unless ``--allow-random-weights``.
"""
import argparse
import glob
import logging
import os
import sys
import time

import cv2
import isda  # noqa: F401  first: registers ISDA and quiets Detectron2's import-time warnings
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from predictor import VisualizationDemo  # noqa: E402

from isda import add_isda_config
from isda.data.image_io import read_image  # noqa: E402  (training's reader: 16-bit scaled)
from isda.modeling.postprocess import MaskMemoryError  # noqa: E402
from isda.utils.cli import parse_args_anywhere  # noqa: E402
from isda.utils.setup_file import run_setup_file  # noqa: E402
from isda.checkpoint import CheckpointError  # noqa: E402

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_EXTENSION = ".mp4"

OUTPUT_RULES = f"""\
where the drawings go:
  no --output        nothing is saved (one warning says so); the counts are still logged.
  --output FOLDER    FOLDER is an existing folder, ends with '/' or has no extension
                     ('--output vis' is the folder vis/, created as needed). Each image keeps
                     its path relative to the common parent folder of all the inputs:
                     x/img.png and y/img.png -> FOLDER/x/img.png and FOLDER/y/img.png; one
                     image, or the images of one folder -> FOLDER/<file name>. A video
                     clip.avi -> FOLDER/clip.avi{VIDEO_EXTENSION} (its whole file name plus
                     {VIDEO_EXTENSION}, so clip.mp4 and clip.avi give different names).
  --output FILE.png  for a single image input; the extension (one of
                     {' '.join(IMAGE_EXTENSIONS)}) sets the format. With several
                     inputs it is an error (give a folder).
  --output FILE{VIDEO_EXTENSION}  for --video-input (MP4 container, mp4v codec).
  Any other extension (e.g. 'out.txt') is an error; end a folder name with '/' to use it.
Images whose short side is below --min-drawing-side (512 px) are drawn enlarged to it (at most
4x) so that the labels stay readable; videos keep their size. Images are written in the format of their file
extension; an input whose extension is not
one of the above gets '.png' appended. An image given twice (e.g. by a folder and a pattern) is
processed once. An output path that is an input file, two inputs with the same output, or an
output path that is an existing folder is refused before anything is written (exit status 2,
the file named). Existing files that are not inputs are replaced.
An image that cannot be read (corrupt, truncated) is skipped with an 'error: ...' line and the
others are processed; the exit status is then 1 (2 when no image could be processed). Images are read as training reads them (16-bit and
float images scaled to 8 bits, isda/data/image_io.py).
Log: one line per input, '<input> -> <output> (<seconds>s): N instances' ('<input> (not saved,
<seconds>s): N instances' without --output); N = instances with a score >=
--confidence-threshold, i.e. the ones drawn; a video ends with 'F frames, N instances' (N summed
over the frames).
MODEL.WEIGHTS must name the weights; if it is empty the demo refuses to run (the drawings of a
random model mean nothing) unless --allow-random-weights is given.
"""


class DemoError(Exception):
    """A refused command line (printed as 'error: ...', exit status 2)."""


def setup_cfg(args):
    """Config from ``--config-file`` + ``--opts`` (ISDA keys added). ``--allow-random-weights``
    with an empty ``MODEL.WEIGHTS`` lets the (strict) checkpointer run without weights."""
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if getattr(args, "allow_random_weights", False) and not cfg.MODEL.WEIGHTS \
            and "ALLOW_PARTIAL_WEIGHTS" in cfg.MODEL.ISDA:
        cfg.MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS = True
    threshold = getattr(args, "confidence_threshold", None)
    if threshold is not None and "SCORE_THRESHOLD" in cfg.MODEL.ISDA.TEST:
        # only the instances drawn get full-size masks: memory in proportion to them, not to
        # TOPK x the image size (a 12000x12000 image needed 13.4 GiB of masks)
        cfg.MODEL.ISDA.TEST.SCORE_THRESHOLD = max(cfg.MODEL.ISDA.TEST.SCORE_THRESHOLD,
                                                  float(threshold))
    cfg.freeze()
    return cfg


def get_parser():
    parser = argparse.ArgumentParser(description="ISDA demo (Detectron2)", epilog=OUTPUT_RULES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", nargs="+", help="images, folders or glob patterns")
    parser.add_argument("--video-input", metavar="FILE", help="a video file")
    parser.add_argument("--output", help="output folder, or a file for one image or a video "
                                         "(rules below)")
    parser.add_argument("--confidence-threshold", type=float, default=0.3,
                        help="minimum score of the instances drawn (default 0.3: an ISDA score is "
                             "the class probability times the mean mask probability inside the "
                             "mask, lower than a box detector's; the true detections of the "
                             "nuclei model score 0.3-0.5)")
    parser.add_argument("--min-drawing-side", type=int, default=512, metavar="PX",
                        help="images whose short side is smaller are drawn enlarged to PX (at most "
                             "4x) so labels stay readable; 0 draws every image at its own size")
    parser.add_argument("--exported", metavar="FOLDER",
                        help="run an exported model (a folder written by "
                             "tools/deploy/export_model.py: ONNX in onnxruntime or torch.export) "
                             "instead of MODEL.WEIGHTS (docs/deployment.md)")
    parser.add_argument("--setup-file", metavar="FILE",
                        help="a Python file run first, e.g. your dataset registrations, so that "
                             "DATASETS.TEST names the classes (docs/custom_dataset.md)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even though MODEL.WEIGHTS is empty (random, untrained model)")
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config overrides as KEY VALUE pairs")
    return parser


def expand_inputs(items):
    """Files, folders and glob patterns -> list of image paths (folders and patterns sorted; a
    path given twice kept once); raises FileNotFoundError naming what matched nothing."""
    paths, seen = [], set()
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS)
                           and os.path.isfile(os.path.join(item, f)))
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
        for path in found:
            key = os.path.normcase(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def _as_folder(output):
    """``--output`` names a folder: an existing folder, a trailing separator or no extension."""
    return (os.path.isdir(output) or output.endswith(("/", os.sep))
            or not os.path.splitext(output)[1])


def _image_name(path):
    name = os.path.basename(path)
    return name if name.lower().endswith(IMAGE_EXTENSIONS) else name + ".png"


def _check_outputs(inputs, outputs):
    """Refuse (DemoError) before anything is written: an output that is an input file (same
    file, however spelt), two inputs with one output, an output that is a folder or lies under
    an existing file."""
    input_ids = {}
    for path in inputs:
        st = os.stat(path)
        input_ids[(st.st_dev, st.st_ino)] = path
    taken = {}
    for src, out in zip(inputs, outputs):
        key = os.path.normcase(os.path.abspath(out))
        if key in taken:
            raise DemoError(f"inputs '{taken[key]}' and '{src}' would both be written to "
                            f"'{out}'; refusing (nothing was written)")
        taken[key] = src
        if os.path.isdir(out):
            raise DemoError(f"the output for '{src}' would be '{out}', an existing folder")
        if os.path.exists(out):
            st = os.stat(out)
            other = input_ids.get((st.st_dev, st.st_ino))
            if other is not None:
                raise DemoError(f"the output for '{src}' would be '{out}', which is the input "
                                f"file '{other}'; refusing to overwrite an input (nothing was "
                                f"written; choose another --output)")
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise DemoError(f"the output for '{src}' would be '{out}', but '{parent}' is a file, "
                            f"not a folder")


def plan_image_outputs(paths, output):
    """Output path of each image of ``paths`` (None each without ``--output``), checked: see
    ``OUTPUT_RULES``."""
    if not output:
        return [None] * len(paths)
    if _as_folder(output):
        if os.path.exists(output) and not os.path.isdir(output):
            raise DemoError(f"--output '{output}' has no extension, so it names a folder, but "
                            f"it is an existing file")
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
        outs = [os.path.join(output, os.path.dirname(os.path.relpath(os.path.abspath(p), root)),
                             _image_name(p)) for p in paths]
    else:
        ext = os.path.splitext(output)[1]
        if ext.lower() not in IMAGE_EXTENSIONS:
            raise DemoError(f"--output '{output}': '{ext}' is not an image extension "
                            f"({' '.join(IMAGE_EXTENSIONS)}); give an image file name, or a "
                            f"folder (no extension, or ending with '/')")
        if len(paths) > 1:
            raise DemoError(f"--output '{output}' names one image file but there are "
                            f"{len(paths)} input images; give a folder instead (no extension, "
                            f"or ending with '/')")
        outs = [output]
    _check_outputs(paths, outs)
    return outs


def plan_video_output(path, output):
    """Output path of the video ``path`` (None without ``--output``), checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video input '{path}' does not exist")
    if not output:
        return None
    if _as_folder(output):
        if os.path.exists(output) and not os.path.isdir(output):
            raise DemoError(f"--output '{output}' has no extension, so it names a folder, but "
                            f"it is an existing file")
        out = os.path.join(output, os.path.basename(path) + VIDEO_EXTENSION)
    else:
        if os.path.splitext(output)[1].lower() != VIDEO_EXTENSION:
            raise DemoError(f"--output '{output}': a video is written as MP4 (mp4v codec); give "
                            f"a file name ending with {VIDEO_EXTENSION}, or a folder")
        out = output
    _check_outputs([path], [out])
    return out


def check_weights(cfg, allow_random, logger):
    """Refuse an empty MODEL.WEIGHTS unless ``allow_random``; a local file must exist."""
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        if not allow_random:
            raise DemoError("MODEL.WEIGHTS is empty: the model would have random weights and draw "
                            "meaningless instances; give the weights with --opts MODEL.WEIGHTS "
                            "FILE, or pass --allow-random-weights to run an untrained model")
        logger.warning("--allow-random-weights: MODEL.WEIGHTS is empty, the model has random "
                       "weights; its drawings mean nothing")
    elif "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file '{weights}' (MODEL.WEIGHTS) does not exist")


def _read(path, image_format):
    try:
        return read_image(path, format=image_format)
    except Exception as e:  # PIL raises several types for unreadable files
        raise OSError(f"cannot read image '{path}': {type(e).__name__}: {e}") from None


def _temporary_beside(path, suffix=""):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp{suffix}")


def write_image(path, rgb):
    """Encode ``rgb`` in the format of ``path``'s extension, write it beside ``path`` and
    rename it into place (a failed write leaves no partial file)."""
    ok, data = cv2.imencode(os.path.splitext(path)[1], rgb[:, :, ::-1])
    if not ok:
        raise OSError(f"could not encode '{path}'")
    tmp = _temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _where(out, seconds):
    return f" -> {out} ({seconds:.2f}s)" if out is not None else f" (not saved, {seconds:.2f}s)"


def run_images(demo, paths, outputs, image_format, logger):
    """Predict and draw each image; an image that cannot be read or predicted is reported and
    skipped (the others go on). Returns the list of (path, reason) that failed."""
    failed = []
    for path, out in zip(paths, outputs):
        try:
            image = _read(path, image_format)
            start = time.time()
            instances, vis = demo.run_on_image(image)
        except (OSError, ValueError, MaskMemoryError) as e:
            reason = str(e) if path in str(e) else f"{path}: {e}"
            print(f"error: {reason} (skipped)", file=sys.stderr)
            failed.append((path, reason))
            continue
        seconds = time.time() - start
        if out is not None:
            write_image(out, vis.get_image())
        logger.info(f"{path}{_where(out, seconds)}: {len(instances)} instances")
    if failed and len(paths) > 1:
        logger.error("%d of %d images failed: %s", len(failed), len(paths),
                     ", ".join(p for p, _ in failed[:10]) + (" ..." if len(failed) > 10 else ""))
    return failed


def run_video(demo, path, out, logger):
    video = cv2.VideoCapture(path)
    if not video.isOpened():
        raise OSError(f"cannot open video '{path}'")
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    writer = tmp = None
    frames = count = 0
    start = time.time()
    try:
        if out is not None:
            tmp = _temporary_beside(out, VIDEO_EXTENSION)
            writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps),
                                     (width, height), True)
            if not writer.isOpened():
                raise OSError(f"cannot write video '{out}' (mp4v codec)")
        for instances, frame in demo.run_on_video_with_instances(video):
            frames += 1
            count += len(instances)
            if writer is not None:
                writer.write(frame)
        if frames == 0:
            raise OSError(f"no frame could be decoded from '{path}'")
        if writer is not None:
            writer.release()
            writer = None
            os.replace(tmp, out)
    finally:
        video.release()
        if writer is not None:
            writer.release()
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    logger.info(f"{path}{_where(out, time.time() - start)}: {frames} frames, {count} instances")


def main(argv=None):
    parser = get_parser()
    args = parse_args_anywhere(parser, argv)
    logger = setup_logger(name="isda.demo")
    logging.getLogger("detectron2").setLevel(logging.WARNING)
    if bool(args.input) == bool(args.video_input):
        parser.error("give either --input or --video-input")
    try:
        run_setup_file(args.setup_file)
        cfg = setup_cfg(args)
        if not args.exported:  # an export carries its weights
            check_weights(cfg, args.allow_random_weights, logger)
        if args.input:
            paths = expand_inputs(args.input)
            outputs = plan_image_outputs(paths, args.output)
        else:
            output = plan_video_output(args.video_input, args.output)
        if not args.output:
            logger.warning("no --output given: the drawings are not saved (only the instance "
                           "counts are logged); give --output FOLDER (or FILE) to save them")
        demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold,
                                 exported=args.exported, min_drawing_side=args.min_drawing_side)
        if args.input:
            failed = run_images(demo, paths, outputs, cfg.INPUT.FORMAT, logger)
            if failed:  # printed above; 2 when no image could be processed, else 1
                return 2 if len(failed) == len(paths) else 1
        else:
            run_video(demo, args.video_input, output, logger)
    except (DemoError, FileNotFoundError, OSError, CheckpointError, MaskMemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
