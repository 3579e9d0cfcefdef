"""``ISDACheckpointer``: Detectron2's checkpointer with safe loading and atomic saving.

Loading never executes code stored in a file:

- ``.safetensors``: read with ``safetensors.torch.load_file`` (no pickle at all);
- ``.pth`` / ``.pt``: ``torch.load(weights_only=True)``, allowing only the plain objects public
  checkpoints carry (``argparse.Namespace``, numpy arrays, scalars and dtypes);
- ``.pkl`` (Detectron2 / Caffe2 model zoo): a restricted unpickler that knows numpy arrays,
  dtypes, containers, numbers and strings only; Detectron2's ``__author__`` /
  ``matching_heuristics`` semantics are kept.

A file that would run code is refused with :class:`UnsafeCheckpointError`; a truncated or
corrupt file raises :class:`CorruptCheckpointError`. Both name the file.

``save`` writes to a temporary file in the same folder and renames it, so a crash never leaves a
half-written ``.pth`` behind.
"""
import argparse
import collections
import os
import pickle
import tempfile
import warnings
import zipfile

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

__all__ = [
    "ISDACheckpointer",
    "CheckpointError",
    "UnsafeCheckpointError",
    "CorruptCheckpointError",
    "load_checkpoint_file",
    "atomic_torch_save",
]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds Python objects whose loading could run code: it is refused, not executed."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated or otherwise unreadable."""


def _numpy_core():
    return getattr(np, "_core", None) or np.core


def _safe_pth_globals():
    """Types ``torch.load(weights_only=True)`` may rebuild besides tensors and containers."""
    core = _numpy_core()
    types = [
        argparse.Namespace,
        collections.OrderedDict,
        core.multiarray._reconstruct,
        core.multiarray.scalar,
        np.ndarray,
        np.dtype,
    ]
    # numpy >= 1.25 pickles a dtype through its class (e.g. numpy.dtypes.Float32DType)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        types += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return types


# (module, name) pairs the .pkl unpickler may resolve; everything else is refused.
_PKL_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),  # protocol-5 pickles of contiguous arrays
    ("_codecs", "encode"),  # how protocol-2 pickles store the bytes of an array
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array/dtype types and plain containers."""

    def find_class(self, module, name):
        core = _numpy_core()
        # numpy 1.x writes numpy.core.*, numpy 2.x numpy._core.*: resolve both on this numpy
        for sub in ("multiarray", "numeric"):
            if module in (f"numpy.core.{sub}", f"numpy._core.{sub}") and (sub, name) in _PKL_ALLOWED:
                return getattr(getattr(core, sub), name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return getattr(np.dtypes, name)
        if (module, name) in _PKL_ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _global_detail(exc):
    """The line of torch's refusal message that names the offending global."""
    lines = [ln.strip() for ln in str(exc).splitlines()
             if ln.strip() and ("unsupported" in ln.lower() or "global" in ln.lower())
             and "weights only load failed" not in ln.lower()]
    return lines[0] if lines else str(exc).splitlines()[0]


def _load_pth(filename):
    try:
        with torch.serialization.safe_globals(_safe_pth_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(filename, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower() or "unsupported global" in str(e).lower():
            raise UnsafeCheckpointError(
                f"Refusing to load checkpoint '{filename}': it holds pickled content that could "
                f"run code when loaded (it is not executed); only tensors, containers, numbers, strings, numpy "
                f"arrays and argparse.Namespace are allowed. Convert it to plain tensors (e.g. "
                f"with tools/publish_model.py in a trusted environment). Detail: {_global_detail(e)}"
            ) from None
        raise CorruptCheckpointError(
            f"Cannot read checkpoint '{filename}': it is truncated or corrupt ({e})") from None
    except (FileNotFoundError, PermissionError):
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CorruptCheckpointError(
            f"Cannot read checkpoint '{filename}': it is truncated or corrupt "
            f"({type(e).__name__}: {e})") from None


def _load_pkl(filename):
    try:
        with PathManager.open(filename, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        if "is not allowed" in str(e):
            raise UnsafeCheckpointError(
                f"Refusing to load '{filename}': {e}. A Detectron2 .pkl may only hold numpy "
                f"arrays, dicts, lists, numbers and strings."
            ) from None
        raise CorruptCheckpointError(
            f"Cannot read '{filename}': it is truncated or corrupt ({e})") from None
    except (EOFError, ValueError, TypeError) as e:
        raise CorruptCheckpointError(
            f"Cannot read '{filename}': it is truncated or corrupt "
            f"({type(e).__name__}: {e})") from None


def _load_safetensors(filename):
    from safetensors.torch import load_file

    try:
        return load_file(filename, device="cpu")
    except Exception as e:  # SafetensorError is not importable on every version
        raise CorruptCheckpointError(
            f"Cannot read safetensors file '{filename}': it is truncated or corrupt "
            f"({type(e).__name__}: {e})") from None


def _to_tensors(state_dict):
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v
            for k, v in state_dict.items()}


def _unwrap(data):
    """Find the weights in ``data``: a plain state dict, or nested under "model"/"state_dict"
    (one or more levels). Returns (state_dict, other top-level entries)."""
    extra = {}
    while isinstance(data, dict):
        for key in ("model", "state_dict"):
            inner = data.get(key)
            if isinstance(inner, dict):
                if not extra:
                    extra = {k: v for k, v in data.items() if k != key}
                data = inner
                break
        else:
            break
    if not isinstance(data, dict):
        raise CheckpointError(f"expected a state dict, found {type(data).__name__}")
    return data, extra


def load_checkpoint_file(filename):
    """Load ``filename`` safely into Detectron2's checkpoint layout:
    ``{"model": state_dict, "matching_heuristics": bool, ...}``."""
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"Checkpoint '{filename}' not found")
    if filename.endswith(".safetensors"):
        return {"model": _load_safetensors(filename), "matching_heuristics": False}
    if filename.endswith(".pkl"):
        data = _load_pkl(filename)
        if not isinstance(data, dict):
            raise CheckpointError(f"'{filename}' holds a {type(data).__name__}, not a dict")
        if "model" in data and "__author__" in data:
            # Detectron2 model zoo format (converters set matching_heuristics themselves)
            data["model"] = _to_tensors(data["model"])
            return data
        # Caffe2 / Detectron1 model zoo: detection models keep their weights under "blobs"
        if "blobs" in data:
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": _to_tensors(data), "__author__": "Caffe2", "matching_heuristics": True}
    data = _load_pth(filename)
    try:
        state_dict, extra = _unwrap(data)
    except CheckpointError as e:
        raise CheckpointError(f"'{filename}': {e}") from None
    out = dict(extra)
    out["model"] = _to_tensors(state_dict)
    return out


def atomic_torch_save(obj, path):
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write_text(text, path):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ISDACheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads ``.safetensors`` / ``.pth`` / ``.pkl`` without
    running pickled code and saves atomically. Use it wherever Detectron2 uses
    ``DetectionCheckpointer`` (training, evaluation, :class:`isda.predictor.ISDAPredictor`)."""

    def load(self, path, *args, **kwargs):
        """Detectron2's ``load``; a file that fails to load leaves the checkpointer usable.

        Detectron2 after v0.6 keeps the URL being loaded in ``_parsed_url_during_load`` and
        asserts it is unset on entry, but does not reset it when loading raises: without the
        reset here, trying an earlier checkpoint after a corrupt one fails with AssertionError."""
        try:
            return super().load(path, *args, **kwargs)
        except BaseException:
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None
            raise

    def _load_file(self, filename):
        if filename.endswith(".pyth"):
            raise CheckpointError(f"'{filename}': pycls .pyth checkpoints are not supported")
        return load_checkpoint_file(filename)

    def _is_local(self):
        return "://" not in self.save_dir

    def save(self, name, **kwargs):
        """Like Detectron2's ``save`` (``{save_dir}/{name}.pth`` + ``last_checkpoint``), but the
        file appears only once it is complete."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        _atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))
