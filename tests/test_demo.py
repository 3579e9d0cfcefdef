"""demo/demo.py on voc_sample: single image, folder, glob, video, and clear input errors."""
import glob
import importlib.util
import os
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
def weights(tmp_path_factory):
    """A tiny ISDA trained for 2 iterations on voc_sample, saved by ISDACheckpointer and
    published as .safetensors."""
    from isda.data.minimal_mapper import MinimalInstanceMapper

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from publish_model import publish
    finally:
        sys.path.pop(0)

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
    out = tmp_path_factory.mktemp("weights")
    ISDACheckpointer(model, save_dir=str(out), optimizer=opt).save("model_final", iteration=2)
    info = publish(str(out / "model_final.pth"), str(out), name="isda_voc_tiny")
    return {"pth": str(out / "model_final.pth"), "safetensors": info["safetensors"]}


def _run(demo, weights, *args, fmt="pth"):
    return demo.main(["--config-file", CONFIG, *args, "--confidence-threshold", "0.0",
                      "--opts", *OPTS, "MODEL.WEIGHTS", weights[fmt]])


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
    assert cv2.imread(out).shape == src_img.shape
    assert not np.array_equal(cv2.imread(out), src_img)  # something was drawn


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
