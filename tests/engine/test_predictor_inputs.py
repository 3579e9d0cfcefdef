"""ISDAPredictor input checks: empty, grey, float, RGBA, other dtypes / types refused with a clear
ValueError; the smallest and very elongated images run and match an independent reference
(the model called on an image resized with PIL)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from isda import add_isda_config
from isda.predictor import ISDAPredictor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "nuclei", "isda_R18_tiny.yaml")
MIN_SIZE, MAX_SIZE = 128, 192


def _cfg(min_size, weights=""):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(CONFIG)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.ISDA.TEST.TOPK", "5",
                         "INPUT.MIN_SIZE_TEST", str(min_size), "INPUT.MAX_SIZE_TEST",
                         str(MAX_SIZE), "MODEL.WEIGHTS", weights])
    return cfg


@pytest.fixture(scope="module")
def weights(module_tmp_path_factory):
    """The tiny model's random initialisation (seed 0) saved as a complete checkpoint (the
    predictor loads its weights strictly)."""
    torch.manual_seed(0)
    model = build_model(_cfg(0))
    path = str(module_tmp_path_factory.mktemp("weights") / "random_init.pth")
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def resizing(weights):
    """Resizes the short side to 128, long side at most 192 (as Detectron2 configs do)."""
    return ISDAPredictor(_cfg(MIN_SIZE, weights))


@pytest.fixture(scope="module")
def native(weights):
    """MIN_SIZE_TEST 0: the image goes to the network at its own size."""
    return ISDAPredictor(_cfg(0, weights))


def _image(h, w, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8)


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0, 3), (0, 0, 3)])
def test_empty_image_is_refused(resizing, native, shape):
    # old code: ZeroDivisionError (resizing) / RuntimeError from a convolution (native size)
    for predictor in (resizing, native):
        with pytest.raises(ValueError) as e:
            predictor(np.zeros(shape, np.uint8))
        msg = str(e.value)
        assert f"shape {shape}" in msg and "H >= 1 and W >= 1" in msg and "empty" in msg


@pytest.mark.parametrize("shape", [(24, 32), (24, 32, 1)])
def test_grey_image_is_refused_with_stacking_hint(resizing, shape):
    # old code: IndexError (2-D) / RuntimeError (1 channel)
    with pytest.raises(ValueError) as e:
        resizing(np.zeros(shape, np.uint8))
    msg = str(e.value)
    assert f"shape {shape}" in msg and "dtype uint8" in msg
    assert "grey" in msg and "stack it to 3 channels" in msg and "[H, W, 3]" in msg


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_image_is_refused(resizing, dtype):
    # old code: 5 detections on an image that the network sees as black, no word said
    image = np.random.RandomState(0).rand(24, 32, 3).astype(dtype)
    with pytest.raises(ValueError) as e:
        resizing(image)
    msg = str(e.value)
    assert "shape (24, 32, 3)" in msg and f"dtype {np.dtype(dtype).name}" in msg
    assert "float images are not accepted" in msg and "uint8 0..255" in msg
    assert "values in [0" in msg


def test_other_inputs_are_refused(resizing):
    cases = [
        (np.zeros((8, 8, 4), np.uint8), ["shape (8, 8, 4)", "alpha"]),
        (np.zeros((8, 8, 3), np.int64), ["dtype int64", "convert to uint8"]),
        (np.zeros((8, 8, 3), np.uint16), ["dtype uint16", "convert to uint8"]),
        (np.zeros((8, 8, 3), bool), ["dtype bool", "convert to uint8"]),
        (np.zeros((2, 8, 8, 3), np.uint8), ["shape (2, 8, 8, 3)"]),
        (np.zeros((3, 8, 8), np.uint8), ["shape (3, 8, 8)"]),
        (torch.zeros(8, 8, 3, dtype=torch.uint8), ["torch.Tensor", "(8, 8, 3)"]),
        ([[[0, 0, 0]]], ["list"]),
    ]
    for image, words in cases:
        with pytest.raises(ValueError) as e:
            resizing(image)
        msg = str(e.value)
        assert "numpy uint8 array of shape [H, W, 3]" in msg, msg
        for word in words:
            assert word in msg, (word, msg)


def _reference(predictor, image_bgr, new_hw):
    """The model on ``image_bgr`` resized with PIL (bilinear) to ``new_hw`` (None: native)."""
    h, w = image_bgr.shape[:2]
    rgb = np.ascontiguousarray(image_bgr[:, :, ::-1])  # the tiny config's INPUT.FORMAT is RGB
    if new_hw is not None:
        rgb = np.asarray(Image.fromarray(rgb).resize((new_hw[1], new_hw[0]), Image.BILINEAR))
    tensor = torch.from_numpy(rgb.astype(np.float32).transpose(2, 0, 1).copy())
    with torch.no_grad():
        return predictor.model([{"image": tensor, "height": h, "width": w}])[0]["instances"]


def _assert_same(got, ref, hw):
    assert got.image_size == hw and ref.image_size == hw
    assert tuple(got.pred_masks.shape) == (5, *hw)
    assert torch.isfinite(got.scores).all()
    torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.pred_classes, ref.pred_classes)
    assert torch.equal(got.pred_masks, ref.pred_masks)


@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (7, 1), (2, 2)])
def test_smallest_images_run_at_native_size(native, hw):
    """1x1, 1xN, Nx1 and 2x2 are valid: the network pads its input to a multiple of 32."""
    image = _image(*hw)
    _assert_same(native(image)["instances"], _reference(native, image, None), hw)


@pytest.mark.parametrize("hw,new_hw", [
    # short side -> 128, long side capped at 192 (computed by hand)
    ((2, 2), (128, 128)),
    ((1, 7), (27, 192)),  # 128x896 -> x 192/896 -> 27.4x192
    # 128x128000 -> x 192/128000 -> 0.19x192: rounds to 0 rows (old code: ValueError from the
    # resize), kept at 1 row now
    ((1, 1000), (1, 192)),
    ((1000, 1), (192, 1)),
])
def test_tiny_and_elongated_images_resized(resizing, hw, new_hw):
    image = _image(*hw)
    _assert_same(resizing(image)["instances"], _reference(resizing, image, new_hw), hw)


def test_rgb_and_bgr_orders_agree(resizing):
    image = _image(40, 56)
    got_bgr = resizing(image)["instances"]
    got_rgb = resizing(np.ascontiguousarray(image[:, :, ::-1]), image_format="RGB")["instances"]
    ref = _reference(resizing, image, (128, 179))  # 40x56 -> 128x179.2
    _assert_same(got_bgr, ref, (40, 56))
    _assert_same(got_rgb, ref, (40, 56))
