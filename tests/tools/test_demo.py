"""demo/demo.py on voc_sample: single image, folder, glob, video, and clear input errors."""
import glob
import importlib.util
import logging
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from isda import add_isda_config
from isda.checkpoint import ISDACheckpointer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "nuclei", "isda_R18_tiny.yaml")
VOC_IMAGES = os.path.join(ROOT, "datasets", "voc_sample", "images")
# tiny model, 20 VOC classes, small test size; top-5 queries keep the drawing fast
OPTS = ["MODEL.ISDA.NUM_CLASSES", "20", "DATASETS.TEST", "('voc_sample',)",
        "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192", "MODEL.ISDA.TEST.TOPK", "5",
        "MODEL.DEVICE", "cpu"]


def _load_demo():
    spec = importlib.util.spec_from_file_location("isda_demo", os.path.join(ROOT, "demo", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def weights(module_tmp_path_factory):
    """A tiny ISDA trained for 2 iterations on voc_sample, saved by ISDACheckpointer and
    published as .safetensors."""
    from plain_loop import MinimalInstanceMapper

    from publish_model import publish  # tools/

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(OPTS + ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "160"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    mapper = MinimalInstanceMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get("voc_sample")]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        losses = model(batch)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = module_tmp_path_factory.mktemp("weights")
    ISDACheckpointer(model, save_dir=str(out), optimizer=opt).save("model_final", iteration=2)
    info = publish(str(out / "model_final.pth"), str(out), name="isda_voc_tiny")
    return {"pth": str(out / "model_final.pth"), "safetensors": info["safetensors"]}


def _run(demo, weights, *args, fmt="pth"):
    """The demo at native drawing size (--min-drawing-side 0): output sizes are the inputs'."""
    return demo.main(["--config-file", CONFIG, *args, "--confidence-threshold", "0.0",
                      "--min-drawing-side", "0", "--opts", *OPTS, "MODEL.WEIGHTS", weights[fmt]])


def _is_image(path):
    img = cv2.imread(path)
    return img is not None and img.ndim == 3 and img.shape[0] > 0


def test_single_image_cli(weights, tmp_path):
    """Runs the script as a user would (separate process), output given as a file name."""
    src = os.path.join(VOC_IMAGES, "2011_000003.jpg")
    out = str(tmp_path / "drawn.png")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "demo", "demo.py"), "--config-file", CONFIG,
         "--input", src, "--output", out, "--confidence-threshold", "0.0",
         "--opts", *OPTS, "MODEL.WEIGHTS", weights["safetensors"]],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _is_image(out)
    src_img = cv2.imread(src)
    # a 338 px short side is drawn enlarged to 512 px (--min-drawing-side): labels stay readable
    h, w = src_img.shape[:2]
    assert cv2.imread(out).shape == (512, round(w * 512 / h), 3)
    drawn = cv2.resize(cv2.imread(out), (w, h), interpolation=cv2.INTER_AREA)
    assert np.abs(drawn.astype(int) - src_img.astype(int)).mean() > 1  # something was drawn


def test_folder_and_glob(weights, tmp_path):
    demo = _load_demo()
    assert _run(demo, weights, "--input", VOC_IMAGES, "--output", str(tmp_path / "folder")) == 0
    names = sorted(os.listdir(VOC_IMAGES))
    assert sorted(os.listdir(tmp_path / "folder")) == names
    assert all(_is_image(str(tmp_path / "folder" / n)) for n in names)

    pattern = os.path.join(VOC_IMAGES, "2011_00000*.jpg")
    expected = sorted(os.path.basename(p) for p in glob.glob(pattern))
    assert len(expected) == 2
    assert _run(demo, weights, "--input", pattern, "--output", str(tmp_path / "glob")) == 0
    assert sorted(os.listdir(tmp_path / "glob")) == expected


def test_video(weights, tmp_path):
    demo = _load_demo()
    video = str(tmp_path / "clip.mp4")
    writer = cv2.VideoWriter(video, cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (160, 120), True)
    for path in (sorted(glob.glob(os.path.join(VOC_IMAGES, "*.jpg"))) * 2)[:5]:
        writer.write(cv2.resize(cv2.imread(path), (160, 120)))
    writer.release()
    cap = cv2.VideoCapture(video)
    assert cap.get(cv2.CAP_PROP_FRAME_COUNT) >= 5
    cap.release()

    out = str(tmp_path / "drawn.mp4")
    assert _run(demo, weights, "--video-input", video, "--output", out) == 0
    cap = cv2.VideoCapture(out)
    frames = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        assert frame.shape == (120, 160, 3)
        frames += 1
    cap.release()
    assert frames == 5


def test_missing_and_unreadable_inputs(weights, tmp_path, capsys):
    demo = _load_demo()
    missing = str(tmp_path / "nope.jpg")
    assert _run(demo, weights, "--input", missing, "--output", str(tmp_path / "o")) == 2
    assert missing in capsys.readouterr().err
    pattern = str(tmp_path / "*.png")
    assert _run(demo, weights, "--input", pattern, "--output", str(tmp_path / "o")) == 2
    assert pattern in capsys.readouterr().err
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    assert _run(demo, weights, "--input", str(bad), "--output", str(tmp_path / "o")) == 2
    assert str(bad) in capsys.readouterr().err
    video = str(tmp_path / "nope.mp4")
    assert _run(demo, weights, "--video-input", video, "--output", str(tmp_path / "o")) == 2
    assert video in capsys.readouterr().err


# ---------------------------------------------------------------- outputs never lose data (#12)
def _run_with(demo, *args, weights_opts):
    return demo.main(["--config-file", CONFIG, *args, "--confidence-threshold", "0.0",
                      "--opts", *OPTS, *weights_opts])


@pytest.fixture
def demo_log():
    """Records of the 'isda.demo' logger (Detectron2's setup_logger does not propagate)."""
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Keep(level=logging.DEBUG)
    logger = logging.getLogger("isda.demo")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _small_image(path, index, size):
    """A VOC image resized to ``size`` (w, h), saved at ``path``; returns it (BGR)."""
    src = sorted(glob.glob(os.path.join(VOC_IMAGES, "*.jpg")))[index]
    img = cv2.resize(cv2.imread(src), size, interpolation=cv2.INTER_AREA)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return img


def _digest(folder):
    """{relative path: bytes} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def test_output_over_an_input_is_refused(weights, tmp_path, capsys):
    """--input a/ --output a/ overwrote the originals (exit 0); now refused, file named,
    nothing written, under every spelling and for outputs that hit another input."""
    demo = _load_demo()
    a = tmp_path / "a"
    _small_image(a / "img.png", 0, (120, 80))
    _small_image(a / "two.jpg", 1, (120, 90))
    _small_image(tmp_path / "img.png", 2, (120, 80))
    before = _digest(tmp_path)
    cases = [
        (["--input", str(a), "--output", str(a)], str(a / "img.png")),
        (["--input", str(a) + "/", "--output", str(a) + "/"], str(a / "img.png")),
        (["--input", str(a / "img.png"), "--output", str(a / "img.png")], str(a / "img.png")),
        (["--input", str(a / "img.png"), "--output", str(tmp_path / "a" / ".." / "a" / "img.png")],
         "img.png"),
        # the output of tmp/img.png would be a/img.png, another input
        (["--input", str(tmp_path / "img.png"), str(a / "img.png"), "--output", str(a)],
         str(a / "img.png")),
    ]
    for args, named in cases:
        assert _run(demo, weights, *args) == 2, args
        err = capsys.readouterr().err
        assert "refusing to overwrite an input" in err and named in err, (args, err)
        assert _digest(tmp_path) == before, args  # nothing written, nothing changed


def test_same_names_in_different_folders_are_mirrored(weights, tmp_path, demo_log):
    """x/img.png and y/img.png wrote one output; now DIR/x/img.png and DIR/y/img.png, each
    the drawing of its own input, and one log line per input naming its output."""
    demo = _load_demo()
    x = _small_image(tmp_path / "in" / "x" / "img.png", 0, (120, 80))
    y = _small_image(tmp_path / "in" / "y" / "img.png", 1, (112, 96))
    out = tmp_path / "out"
    # threshold 2: no instance is drawn, so each drawing is its input pixel for pixel (PNG)
    assert demo.main(["--config-file", CONFIG, "--input", str(tmp_path / "in" / "x" / "img.png"),
                      str(tmp_path / "in" / "y"), "--output", str(out),
                      "--confidence-threshold", "2", "--min-drawing-side", "0", "--opts", *OPTS,
                      "MODEL.WEIGHTS", weights["pth"]]) == 0
    assert sorted(_digest(out)) == [os.path.join("x", "img.png"), os.path.join("y", "img.png")]
    assert np.array_equal(cv2.imread(str(out / "x" / "img.png")), x)
    assert np.array_equal(cv2.imread(str(out / "y" / "img.png")), y)
    lines = [r.getMessage() for r in demo_log if r.levelno == logging.INFO]
    assert len(lines) == 2
    for src, dst in ((tmp_path / "in" / "x" / "img.png", out / "x" / "img.png"),
                     (tmp_path / "in" / "y" / "img.png", out / "y" / "img.png")):
        line = [m for m in lines if m.startswith(f"{src} -> ")]
        assert len(line) == 1 and f"-> {dst} (" in line[0], lines
        assert line[0].endswith(": 0 instances"), line[0]


def test_output_rules_for_one_and_several_images(weights, tmp_path, capsys, demo_log):
    """--output noext wrote noext.png then said it could not write 'noext'; --output many.png
    with several inputs made a folder named many.png."""
    demo = _load_demo()
    src = tmp_path / "in" / "img.jpg"
    _small_image(src, 0, (120, 80))
    _small_image(tmp_path / "in" / "b.png", 1, (120, 80))

    # no image extension: a folder
    assert _run(demo, weights, "--input", str(src), "--output", str(tmp_path / "noext")) == 0
    assert os.listdir(tmp_path / "noext") == ["img.jpg"]
    assert cv2.imread(str(tmp_path / "noext" / "img.jpg")).shape == (80, 120, 3)
    assert not os.path.exists(tmp_path / "noext.png")
    msg = [r.getMessage() for r in demo_log if r.levelno == logging.INFO]
    assert len(msg) == 1 and f"-> {tmp_path / 'noext' / 'img.jpg'} (" in msg[0]
    assert re.search(r": \d+ instances$", msg[0])
    assert capsys.readouterr().err == ""

    # an image extension with one input: that file, in that format
    assert _run(demo, weights, "--input", str(src), "--output", str(tmp_path / "one.png")) == 0
    with open(tmp_path / "one.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # several inputs and one image file: refused, nothing created
    before = _digest(tmp_path)
    assert _run(demo, weights, "--input", str(tmp_path / "in"),
                "--output", str(tmp_path / "many.png")) == 2
    err = capsys.readouterr().err
    assert "many.png" in err and "2 input images" in err and "folder" in err
    assert not os.path.exists(tmp_path / "many.png")

    # another extension: refused
    assert _run(demo, weights, "--input", str(src), "--output", str(tmp_path / "out.txt")) == 2
    err = capsys.readouterr().err
    assert "out.txt" in err and "not an image extension" in err
    assert _digest(tmp_path) == before


def test_no_output_warns_once_and_saves_nothing(weights, tmp_path, demo_log):
    demo = _load_demo()
    _small_image(tmp_path / "in" / "a.png", 0, (120, 80))
    _small_image(tmp_path / "in" / "b.png", 1, (120, 80))
    before = _digest(tmp_path)
    assert _run(demo, weights, "--input", str(tmp_path / "in")) == 0
    warnings = [r.getMessage() for r in demo_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no --output given" in warnings[0]
    assert "not saved" in warnings[0]
    lines = [r.getMessage() for r in demo_log if r.levelno == logging.INFO]
    assert len(lines) == 2
    assert all("(not saved," in m and re.search(r": 5 instances$", m) for m in lines), lines
    assert _digest(tmp_path) == before


def _write_video(path, fourcc, frames=2):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 5.0, (96, 64), True)
    for i in range(frames):
        src = sorted(glob.glob(os.path.join(VOC_IMAGES, "*.jpg")))[i]
        writer.write(cv2.resize(cv2.imread(src), (96, 64)))
    writer.release()


def _frames(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    cap.release()
    return n


def test_video_names_keep_the_container_extension(weights, tmp_path, capsys, demo_log):
    """clip.mp4 and clip.avi both wrote out/clip.mp4; now out/clip.mp4.mp4 and
    out/clip.avi.mp4."""
    demo = _load_demo()
    _write_video(tmp_path / "clip.mp4", "mp4v")
    _write_video(tmp_path / "clip.avi", "MJPG")
    out = tmp_path / "out"
    for name in ("clip.mp4", "clip.avi"):
        assert _run(demo, weights, "--video-input", str(tmp_path / name),
                    "--output", str(out) + os.sep) == 0
    assert sorted(os.listdir(out)) == ["clip.avi.mp4", "clip.mp4.mp4"]
    assert _frames(out / "clip.mp4.mp4") == 2 and _frames(out / "clip.avi.mp4") == 2
    lines = [r.getMessage() for r in demo_log if r.levelno == logging.INFO]
    assert len(lines) == 2
    assert f"-> {out / 'clip.avi.mp4'} (" in lines[1]
    assert re.search(r": 2 frames, 10 instances$", lines[1]), lines[1]

    before = _digest(tmp_path)
    video = str(tmp_path / "clip.mp4")
    assert _run(demo, weights, "--video-input", video, "--output", video) == 2
    err = capsys.readouterr().err
    assert "refusing to overwrite an input" in err and video in err
    assert _run(demo, weights, "--video-input", video, "--output", str(tmp_path / "v.png")) == 2
    assert "v.png" in capsys.readouterr().err
    assert _digest(tmp_path) == before


def test_empty_weights_are_refused_unless_allowed(tmp_path, capsys, demo_log):
    """MODEL.WEIGHTS "" drew a random model's output without a word."""
    demo = _load_demo()
    src = str(tmp_path / "img.png")
    _small_image(src, 0, (64, 48))
    out = tmp_path / "out"
    assert _run_with(demo, "--input", src, "--output", str(out),
                     weights_opts=["MODEL.WEIGHTS", ""]) == 2
    err = capsys.readouterr().err
    assert "MODEL.WEIGHTS is empty" in err and "--allow-random-weights" in err
    assert not out.exists()

    missing = str(tmp_path / "nope.safetensors")
    assert _run_with(demo, "--input", src, "--output", str(out),
                     weights_opts=["MODEL.WEIGHTS", missing]) == 2
    assert missing in capsys.readouterr().err
    assert not out.exists()

    assert _run_with(demo, "--input", src, "--output", str(out), "--allow-random-weights",
                     weights_opts=["MODEL.WEIGHTS", ""]) == 0
    assert _is_image(str(out / "img.png"))
    warnings = [r.getMessage() for r in demo_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "random weights" in warnings[0]


def test_help_documents_the_output_rules(capsys):
    demo = _load_demo()
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for words in ("FOLDER/x/img.png and FOLDER/y/img.png", "clip.avi.mp4", "no extension",
                  "--allow-random-weights", "refused before anything is written",
                  "N instances", "nothing is saved"):
        assert words in text, words
