"""``MODEL.DEVICE auto`` (ISDA's configs): CUDA when available, else the CPU with one log
line; a literal ``cuda`` without CUDA stays an error. Without it, every command on a machine
without a GPU died with "Found no NVIDIA driver on your system". The value is resolved as soon
as a config of ``add_isda_config`` is merged, so Detectron2's own ``DefaultPredictor``,
``build_model`` and ``DefaultTrainer`` never see "auto" (issue 31)."""
import logging

import pytest
import torch
from detectron2.config import get_cfg

from isda import add_isda_config
from isda.config import resolve_device
from isda_helpers import ROOT


def _cfg(*opts):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / "configs" / "nuclei" / "isda_R18_tiny.yaml"))
    cfg.merge_from_list(list(opts))
    return cfg


def test_configs_say_auto():
    import yaml

    base = yaml.safe_load((ROOT / "configs" / "Base-ISDA.yaml").read_text())
    assert base["MODEL"]["DEVICE"] == "auto"


def test_auto_is_resolved_when_merged_cpu_without_cuda_with_one_line(monkeypatch, caplog):
    import isda.config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(isda.config, "_said", set())
    with caplog.at_level(logging.INFO, logger="isda"):
        cfg = _cfg()
        assert cfg.MODEL.DEVICE == "cpu"  # no "auto" left after the merge
        cfg.clone().merge_from_list(["MODEL.DEVICE", "auto"])
        assert resolve_device(cfg) == "cpu"
    lines = [r.getMessage() for r in caplog.records if "MODEL.DEVICE auto" in r.getMessage()]
    assert lines == ["MODEL.DEVICE auto: no CUDA device available, running on the CPU"]


def test_auto_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _cfg().MODEL.DEVICE == "cuda"
    assert resolve_device(_cfg()) == "cuda"


def test_detectron2_default_predictor_runs_on_an_isda_config():
    """Issue 31: ``DefaultPredictor(cfg)``, the first thing a Detectron2 user writes, failed
    with "Expected one of cpu, cuda, ... device string: auto"."""
    import numpy as np
    from detectron2.engine import DefaultPredictor

    cfg = _cfg()
    assert cfg.MODEL.DEVICE in ("cpu", "cuda")
    assert cfg.clone().MODEL.DEVICE == cfg.MODEL.DEVICE
    predictor = DefaultPredictor(cfg)  # MODEL.WEIGHTS "": Detectron2 warns and runs random init
    out = predictor(np.zeros((64, 80, 3), np.uint8))
    assert out["instances"].image_size == (64, 80)


def test_explicit_devices_are_kept(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(_cfg("MODEL.DEVICE", "cuda")) == "cuda"
    assert resolve_device(_cfg("MODEL.DEVICE", "cpu")) == "cpu"


def test_train_net_and_predictor_run_with_auto(tmp_path):
    import train_net
    from isda.predictor import ISDAPredictor

    args = train_net.argument_parser().parse_args(
        ["--config-file", str(ROOT / "configs" / "nuclei" / "isda_R18_tiny.yaml"),
         "OUTPUT_DIR", str(tmp_path)])
    cfg = train_net.setup(args)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert cfg.MODEL.DEVICE == expected
    pred_cfg = _cfg("MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS", True)
    pred_cfg.freeze()
    predictor = ISDAPredictor(pred_cfg)
    assert predictor.model.device.type == expected
    out = predictor(torch.zeros(64, 80, 3, dtype=torch.uint8).numpy())
    assert out["instances"].image_size == (64, 80)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_literal_cuda_without_cuda_is_an_error():
    from detectron2.modeling import build_model

    with pytest.raises((RuntimeError, AssertionError)):
        build_model(_cfg("MODEL.DEVICE", "cuda"))
