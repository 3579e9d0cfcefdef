"""Checkpoint files that never hold or pass on a number that is not true (docs/reliability.md,
"Checkpoints, counters and outputs"): non-finite tensors refused on save and on load, content
checksums, strict loading for evaluation and the demo, interrupted and failing saves, file
modes. The references are independent of the code under test: plain ``torch.save`` /
``safetensors`` / ``pickle`` writers, byte offsets read from the file formats themselves, state
dict key sets, and files created with ``open()`` under the same umask."""
import errno
import importlib.util
import json
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import isda  # noqa: F401
import isda.checkpoint as ckpt_mod
from isda import add_isda_config
from isda.checkpoint import (CorruptCheckpointError, ISDACheckpointer, IncompleteCheckpointError,
                             NonFiniteCheckpointError, load_checkpoint_file)

ROOT = Path(__file__).resolve().parents[2]
import train_net  # noqa: E402

CONFIG = "configs/nuclei/isda_R18_tiny.yaml"
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1",
         "MODEL.ISDA.DEC_LAYERS", "1", "INPUT.MIN_SIZE_TEST", "0", "DATASETS.TEST", "('nuclei_val',)"]


def _cfg(*opts):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(str(ROOT / CONFIG))
    cfg.merge_from_list([*SMALL, *opts])
    return cfg


def _model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(_cfg(*opts)).eval()


@pytest.fixture(scope="module")
def tiny_state():
    return {k: v.clone() for k, v in _model().state_dict().items()}


# --------------------------------------------------------------------------- non-finite tensors
def test_save_refuses_non_finite_weights_and_keeps_the_last_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 3)
    ckpt = ISDACheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_0000000", iteration=0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
        model.bias[0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError) as exc:
        ckpt.save("model_0000001", iteration=1)
    msg = str(exc.value)
    assert "non-finite" in msg and "model_0000001.pth" in msg
    assert "'weight' (1 NaN, 0 inf of 12 values)" in msg and "'bias' (0 NaN, 1 inf" in msg
    assert isinstance(exc.value, FloatingPointError)
    # nothing written: the same files, byte for byte, and last_checkpoint still names iteration 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def _write_foreign(path, state):
    """``state`` written as a third party would: plain torch.save / safetensors / pickle."""
    if path.suffix == ".pth":
        torch.save({"model": state, "epoch": 3}, path)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {k: v.numpy() for k, v in state.items()},
                         "__author__": "someone"}, f)


@pytest.mark.parametrize("ext", [".pth", ".safetensors", ".pkl"])
def test_non_finite_checkpoint_refused_whoever_wrote_it(tmp_path, ext, monkeypatch):
    monkeypatch.delenv("ISDA_ALLOW_NON_FINITE_WEIGHTS", raising=False)
    state = {"weight": torch.randn(3, 4), "bias": torch.randn(3)}
    state["weight"][0, :2] = float("nan")
    path = tmp_path / f"foreign{ext}"
    _write_foreign(path, state)
    with pytest.raises(NonFiniteCheckpointError, match=r"non-finite.*tensor 'weight' \(2 NaN, "
                                                      r"0 inf of 12 values\)") as exc:
        ISDACheckpointer(torch.nn.Linear(4, 3)).load(str(path))
    assert str(path) in str(exc.value) and "ISDA_ALLOW_NON_FINITE_WEIGHTS=1" in str(exc.value)
    # the documented override loads it as it is
    monkeypatch.setenv("ISDA_ALLOW_NON_FINITE_WEIGHTS", "1")
    model = torch.nn.Linear(4, 3)
    ISDACheckpointer(model).load(str(path))
    assert torch.isnan(model.weight[0, :2]).all() and torch.equal(model.bias.data, state["bias"])


def test_eval_only_refuses_nan_weights_instead_of_reporting_an_ap(tmp_path, tiny_state):
    state = dict(tiny_state)
    name = "heads.class_embed.weight"
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    weights = tmp_path / "nan.pth"
    torch.save({"model": state}, weights)  # not written by ISDA: no checksum
    args = train_net.argument_parser().parse_args(
        ["--eval-only", "--config-file", str(ROOT / CONFIG), *SMALL,
         "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval")])
    with pytest.raises(NonFiniteCheckpointError, match=f"non-finite.*'{re.escape(name)}'"):
        train_net.main(args)
    assert not (tmp_path / "eval" / "inference" / "results.json").exists()


def test_finite_but_absurd_weights_give_no_predictions(tiny_state):
    """Weights of a run with SOLVER.BASE_LR 1e30 are finite (about 1e30) but every output is
    NaN / inf: inference raises instead of returning NaN scores."""
    model = _model()
    model.load_state_dict({k: v * 1e30 if v.is_floating_point() else v
                           for k, v in tiny_state.items()})
    image = torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        outputs = model.forward_features([{"image": image}])  # the reference: raw outputs
    assert not torch.isfinite(outputs["logits"][-1]).all()
    with torch.no_grad(), pytest.raises(FloatingPointError, match="Non-finite predictions"):
        model([{"image": image}])


# --------------------------------------------------------------------------- checksums
def _zip_member_data_offset(path, member):
    """Byte offset of ``member``'s (stored, uncompressed) data: from the zip local header."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    assert header[:4] == b"PK\x03\x04" and info.compress_type == zipfile.ZIP_STORED
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _largest_tensor_bytes(path):
    """(offset, size) of the largest tensor data block, read from the file format."""
    if path.suffix == ".safetensors":
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        start, end = max((v["data_offsets"] for v in header.values()), key=lambda o: o[1] - o[0])
        return 8 + n + start, end - start
    with zipfile.ZipFile(path) as zf:
        member = max((i for i in zf.infolist() if "/data/" in i.filename),
                     key=lambda i: i.file_size).filename
    return _zip_member_data_offset(path, member)


def _flip_4_bytes(path):
    """Overwrite 4 bytes in the middle of the largest tensor with another finite float32."""
    offset, size = _largest_tensor_bytes(path)
    at = offset + (size // 2) // 4 * 4
    data = bytearray(path.read_bytes())
    old = data[at:at + 4]
    data[at:at + 4] = struct.pack("<f", 1234.5)
    assert data[at:at + 4] != old
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("ext", [".pth", ".safetensors"])
def test_flipped_bytes_in_an_isda_checkpoint_are_detected(tmp_path, ext, tiny_state):
    publish = _tool("publish_model")
    model = _model()
    ISDACheckpointer(model, save_dir=str(tmp_path / "train")).save("model_final", iteration=9)
    src = tmp_path / "train" / "model_final.pth"
    if ext == ".pth":
        path = src
    else:
        path = Path(publish.publish(str(src), str(tmp_path / "pub"), name="m")["safetensors"])
    assert load_checkpoint_file(str(path))  # intact: loads
    _flip_4_bytes(path)
    # the file formats themselves do not notice (the reference: their own readers)
    if ext == ".pth":
        raw = torch.load(path, weights_only=True)["model"]
    else:
        from safetensors.torch import load_file

        raw = load_file(str(path))
    assert all(torch.isfinite(v).all() for v in raw.values() if v.is_floating_point())
    assert any(not torch.equal(raw[k], tiny_state[k]) for k in tiny_state)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(path)) + ".*checksum"):
        load_checkpoint_file(str(path))
    with pytest.raises(CorruptCheckpointError, match="checksum does not match"):
        ISDACheckpointer(_model()).load(str(path))


# --------------------------------------------------------------------------- strict loading
def _names_in(message, heading):
    """The parameter names listed under ``heading`` in an IncompleteCheckpointError message
    (one module per line, indented by 4), with ``parent.{a, b}`` groups expanded."""
    lines = message.splitlines()
    at = [i for i, line in enumerate(lines) if heading in line]
    names = set()
    for line in lines[at[0] + 1:] if at else []:
        if not line.startswith("    "):
            break
        line = line.strip()
        m = re.fullmatch(r"(.*)\.\{(.*)\}", line)
        if m:
            names |= {f"{m.group(1)}.{leaf}" for leaf in m.group(2).split(", ")}
        else:
            names.add(line.split(" ")[0])
    return names


def test_another_architecture_is_refused_with_the_list_of_what_did_not_load(tmp_path):
    other = _model("MODEL.ISDA.DEC_LAYERS", "2", "MODEL.ISDA.NUM_QUERIES", "12").state_dict()
    state = dict(other)
    state["bbox_embed.0.weight"] = torch.zeros(4, 4)  # a box head ISDA does not have
    weights = tmp_path / "other.pth"
    torch.save({"model": state}, weights)
    target = _model().state_dict()
    # the reference: set arithmetic on the two state dicts
    missing = set(target) - set(state)
    unexpected = set(state) - set(target)
    shapes = {k for k in set(state) & set(target) if state[k].shape != target[k].shape}
    assert unexpected and shapes  # decoder layer 1 + the box head; the 12 queries
    args = train_net.argument_parser().parse_args(
        ["--eval-only", "--config-file", str(ROOT / CONFIG), *SMALL,
         "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(tmp_path / "eval")])
    with pytest.raises(IncompleteCheckpointError) as exc:
        train_net.main(args)
    msg = str(exc.value)
    assert str(weights) in msg and "MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS" in msg
    assert _names_in(msg, "unexpected (in the file, not in the model):") == unexpected
    assert _names_in(msg, "missing (in the model, not in the file):") == missing
    assert _names_in(msg, "mis-shaped (shape in the file vs in the model):") == shapes
    key = "decoder.query_embed.weight"
    assert f"{key} {tuple(state[key].shape)} vs {tuple(target[key].shape)}" in msg

    # the demo's predictor is strict as well
    from isda.predictor import ISDAPredictor

    cfg = _cfg("MODEL.WEIGHTS", str(weights))
    with pytest.raises(IncompleteCheckpointError, match="did not load"):
        ISDAPredictor(cfg)

    # the documented key accepts the partial load: the matching parameters are loaded
    model = _model(seed=1)
    ISDACheckpointer(model, allow_partial=True).load(str(weights))
    loaded = model.state_dict()
    for k in set(state) & set(target) - shapes:
        assert torch.equal(loaded[k], state[k]), k


def test_no_weights_for_evaluation_is_refused(tmp_path):
    args = train_net.argument_parser().parse_args(
        ["--eval-only", "--config-file", str(ROOT / CONFIG), *SMALL, "MODEL.WEIGHTS", "",
         "OUTPUT_DIR", str(tmp_path)])
    with pytest.raises(IncompleteCheckpointError, match="No weights to load"):
        train_net.main(args)
    from isda.predictor import ISDAPredictor

    with pytest.raises(IncompleteCheckpointError, match="MODEL.WEIGHTS is empty"):
        ISDAPredictor(_cfg("MODEL.WEIGHTS", ""))


def test_matching_weights_load_strictly(tmp_path, tiny_state):
    weights = tmp_path / "same.pth"
    torch.save({"model": tiny_state}, weights)
    from isda.predictor import ISDAPredictor

    predictor = ISDAPredictor(_cfg("MODEL.WEIGHTS", str(weights)))
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, tiny_state[k]), k


# --------------------------------------------------------------------------- failing saves
class _DiskFull:
    """A file whose writes fail with ENOSPC once ``limit`` bytes were written."""

    def __init__(self, f, limit):
        self._f, self._limit, self._n = f, limit, 0

    def write(self, data):
        if self._n + len(data) > self._limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._n += len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.mark.parametrize("limit", [10, 100000])
def test_disk_full_says_why_in_the_last_line(tmp_path, monkeypatch, limit):
    model = torch.nn.Linear(256, 256)  # 257 kB: the disk fills in the header or in the data
    ckpt = ISDACheckpointer(model, save_dir=str(tmp_path))
    ckpt.save("model_final")
    before = (tmp_path / "model_final.pth").read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(ckpt_mod.os, "fdopen", lambda fd, *a, **k: _DiskFull(
        real_fdopen(fd, *a, **k), limit))
    with pytest.raises(OSError) as exc:
        ckpt.save("model_final")
    monkeypatch.undo()
    last = traceback.format_exception_only(type(exc.value), exc.value)[-1].strip()
    target = str(tmp_path / "model_final.pth")
    assert last == f"OSError: [Errno {errno.ENOSPC}] No space left on device while writing {target}"
    assert exc.value.errno == errno.ENOSPC
    assert (tmp_path / "model_final.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    import torch
    import isda.checkpoint as c

    real = os.fdopen

    class Stalls:
        def __init__(self, f):
            self.f, self.n = f, 0
        def write(self, b):
            self.n += len(b)
            r = self.f.write(b)
            if self.n > 200000:
                self.f.flush()
                print("WRITING", flush=True)
                time.sleep(600)
            return r
        def __enter__(self):
            return self
        def __exit__(self, *a):
            self.f.close()
        def __getattr__(self, k):
            return getattr(self.f, k)

    os.fdopen = lambda fd, *a, **k: Stalls(real(fd, *a, **k))
    c.ISDACheckpointer(torch.nn.Linear(512, 512), sys.argv[1]).save("model_0000004", iteration=4)
""")

_NEXT_SAVER = textwrap.dedent("""
    import sys
    import torch
    import isda.checkpoint as c

    c.ISDACheckpointer(torch.nn.Linear(8, 8), sys.argv[1]).save("model_0000005", iteration=5)
""")


def test_sigkill_during_a_save_leaves_a_temp_file_the_next_process_removes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    temps = [p.name for p in out.iterdir()]
    assert len(temps) == 1 and re.fullmatch(r"\.model_0000004\.pth\.\w{8}\.tmp", temps[0]), temps
    time.sleep(0.05)  # the next process starts strictly after the file's last write
    done = subprocess.run([sys.executable, "-c", _NEXT_SAVER, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["last_checkpoint", "model_0000005.pth"]
    assert temps[0] in done.stderr  # it says what it removed


def test_temp_files_of_a_live_process_are_left_alone(tmp_path):
    stale = tmp_path / ".model_0000001.pth.abcd_123.tmp"
    live = tmp_path / ".model_0000002.pth.efgh_456.tmp"  # modified after this process started
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    old = time.time() - 3600 * 24
    os.utime(stale, (old, old))
    ISDACheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path)).save("model_0000003")
    assert not stale.exists() and live.exists()


# --------------------------------------------------------------------------- permissions
def _tool(name):
    spec = importlib.util.spec_from_file_location(name, str(ROOT / "tools" / f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_files_respect_the_umask(tmp_path, umask):
    publish = _tool("publish_model")
    old = os.umask(umask)
    try:
        reference = tmp_path / "reference.txt"
        with open(reference, "w") as f:  # what any program's new file gets under this umask
            f.write("x")
        expected = reference.stat().st_mode & 0o777
        ckpt = ISDACheckpointer(torch.nn.Linear(3, 3), save_dir=str(tmp_path / "train"))
        ckpt.save("model_final", iteration=1)
        info = publish.publish(str(tmp_path / "train" / "model_final.pth"), str(tmp_path / "pub"))
    finally:
        os.umask(old)
    assert expected == 0o666 & ~umask
    for path in [tmp_path / "train" / "model_final.pth", tmp_path / "train" / "last_checkpoint",
                 Path(info["pth"]), Path(info["safetensors"])]:
        assert oct(path.stat().st_mode & 0o777) == oct(expected), path.name
