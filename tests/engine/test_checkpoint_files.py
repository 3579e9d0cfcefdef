"""Checkpoint files: safe loading (no pickled code runs), atomic saving, publish_model."""
import argparse
import hashlib
import os
import pickle
import re

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

from isda_helpers import config_from, tool_module
from isda.checkpoint import (CorruptCheckpointError, ISDACheckpointer, UnsafeCheckpointError,
                             load_checkpoint_file)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_tool, _isda_cfg = tool_module, config_from


# --------------------------------------------------------------------------- safe loading
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("ext,writer", [("pth", "pickle"), ("pth", "torch"), ("pkl", "pickle")])
def test_malicious_pickle_refused_and_never_executed(tmp_path, ext, writer):
    marker = tmp_path / "pwned"
    path = str(tmp_path / f"evil.{ext}")
    payload = {"model": {"w": _Evil(str(marker))}, "__author__": "x"}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(path)):
        ISDACheckpointer(model).load(path)
    assert not marker.exists()


def test_deformable_detr_like_pth_with_namespace_loads(tmp_path):
    path = str(tmp_path / "r50_deformable_detr.pth")
    weights = {"weight": torch.randn(3, 2), "bias": torch.randn(3)}
    torch.save({"model": weights, "args": argparse.Namespace(lr=2e-4, dataset_file="coco"),
                "optimizer": {"state": {}, "param_groups": [{"lr": 2e-4}]}, "epoch": 49,
                "np_scalar": np.float64(0.5), "np_array": np.arange(3)}, path)
    model = torch.nn.Linear(2, 3)
    extra = ISDACheckpointer(model).load(path, checkpointables=[])
    assert torch.equal(model.weight.data, weights["weight"])
    assert extra["args"].dataset_file == "coco"


def test_nested_layouts(tmp_path):
    w = {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}
    for name, obj in [("plain", w), ("mmdet", {"state_dict": w, "meta": {"epoch": 1}}),
                      ("nested", {"model": {"model": w}})]:
        path = str(tmp_path / f"{name}.pth")
        torch.save(obj, path)
        model = torch.nn.Linear(2, 3)
        ISDACheckpointer(model).load(path)
        assert torch.equal(model.weight.data, w["weight"]), name


def test_pkl_restricted_unpickler_keeps_detectron2_semantics(tmp_path):
    arr = np.random.rand(3, 2).astype(np.float32)
    zoo = str(tmp_path / "zoo.pkl")
    with open(zoo, "wb") as f:
        pickle.dump({"model": {"weight": arr}, "__author__": "torchvision",
                     "matching_heuristics": True}, f, protocol=2)
    data = load_checkpoint_file(zoo)
    assert data["matching_heuristics"] and data["__author__"] == "torchvision"
    assert torch.equal(data["model"]["weight"], torch.from_numpy(arr))
    c2 = str(tmp_path / "c2.pkl")
    with open(c2, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": arr, "conv1_w_momentum": arr}}, f)
    data = load_checkpoint_file(c2)
    assert data["__author__"] == "Caffe2" and data["matching_heuristics"]
    assert list(data["model"]) == ["conv1_w"]


@pytest.mark.parametrize("ext", ["pth", "pkl", "safetensors"])
def test_truncated_checkpoint_clear_error(tmp_path, ext):
    from safetensors.torch import save_file

    full = str(tmp_path / f"full.{ext}")
    state = {"w": torch.randn(64, 64)}
    if ext == "pth":
        torch.save({"model": state}, full)
    elif ext == "pkl":
        with open(full, "wb") as f:
            pickle.dump({"model": {"w": state["w"].numpy()}, "__author__": "x"}, f)
    else:
        save_file(state, full)
    data = open(full, "rb").read()
    cut = str(tmp_path / f"cut.{ext}")
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=re.escape(cut)):
        load_checkpoint_file(cut)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = ISDACheckpointer(model, save_dir=str(tmp_path), optimizer=opt)
    ckpt.save("model_0000001", iteration=1)
    ckpt.save("model_0000002", iteration=2)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth",
                                            "model_0000002.pth"]
    assert ckpt.get_checkpoint_file().endswith("model_0000002.pth")
    fresh = torch.nn.Linear(4, 4)
    extra = ISDACheckpointer(fresh, save_dir=str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 2 and torch.equal(fresh.weight, model.weight)


def test_failed_save_keeps_previous_file(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    ckpt = ISDACheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_final")
    before = open(tmp_path / "model_final.pth", "rb").read()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ckpt.save("model_final")
    assert open(tmp_path / "model_final.pth", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


# --------------------------------------------------------------------------- publish_model
def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def test_publish_model(tmp_path):
    tool = _tool("publish_model")
    torch.manual_seed(0)
    cfg = _isda_cfg("nuclei/isda_R18_tiny.yaml")
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ckpt = ISDACheckpointer(model, save_dir=str(tmp_path / "train"), optimizer=opt)
    # a resumable checkpoint (model_final.pth holds the model only since issue 31)
    ckpt.save("model_0000299", iteration=299)
    info = tool.publish(str(tmp_path / "train" / "model_0000299.pth"), str(tmp_path / "pub"),
                        name="isda_tiny")
    pth, sft = info["pth"], info["safetensors"]
    md5 = _md5(pth)
    assert os.path.basename(pth) == f"isda_tiny-{md5[:8]}.pth" and info["pth_md5"] == md5
    assert os.path.basename(sft) == f"isda_tiny-{md5[:8]}.safetensors"
    assert info["safetensors_md5"] == _md5(sft)
    assert sorted(os.listdir(tmp_path / "pub")) == sorted([os.path.basename(pth),
                                                           os.path.basename(sft)])
    raw = torch.load(pth, weights_only=True)
    assert list(raw) == ["model", "isda_sha256"]
    assert set(info["stripped"]) == {"optimizer", "iteration"}
    # one content checksum for the pair: sha256 over the tensors, in the .safetensors metadata too
    from safetensors import safe_open

    with safe_open(sft, framework="pt") as f:
        assert f.metadata()["isda_sha256"] == raw["isda_sha256"] == info["content_sha256"]

    torch.manual_seed(1)
    fresh = build_model(cfg)
    ISDACheckpointer(fresh).load(sft)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_publish_handles_shared_storage(tmp_path):
    tool = _tool("publish_model")
    t = torch.randn(4, 4)
    src = str(tmp_path / "tied.pth")
    torch.save({"model": {"a": t, "b": t, "c": t[:, 1]}, "scheduler": {"last_epoch": 3}}, src)
    info = tool.publish(src, str(tmp_path / "out"))
    data = load_checkpoint_file(info["safetensors"])["model"]
    assert torch.equal(data["a"], t) and torch.equal(data["c"], t[:, 1])
