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

What is loaded is also checked, whoever wrote the file:

- a checkpoint written by ISDA carries a content checksum (``isda_sha256``: sha256 over every
  tensor's bytes and every other value, in key order; in a ``.safetensors`` file's metadata);
  a mismatch raises :class:`CorruptCheckpointError` naming the file;
- a tensor holding NaN or inf raises :class:`NonFiniteCheckpointError` (says "non-finite" and
  names the tensor), unless the environment sets ``ISDA_ALLOW_NON_FINITE_WEIGHTS=1``;
- :class:`ISDACheckpointer` is strict unless built with ``allow_partial=True`` (the trainer:
  fine-tuning from an ImageNet backbone or a converted Deformable DETR is a partial load):
  missing, unexpected or mis-shaped parameters, or no weights at all, raise
  :class:`IncompleteCheckpointError` with the list of what did not load.

``save`` (and :func:`atomic_torch_save`) refuses to write non-finite tensors, writes to a
temporary file in the same folder with the permissions the umask gives (``0o666 & ~umask``),
syncs it to disk and renames it, so a crash never leaves a half-written ``.pth`` behind; temporary
files left by an interrupted earlier process are removed at the next save in that folder. A
save that fails on an ``OSError`` (disk full) ends with ``OSError: ... while writing <file>``.
"""
import argparse
import collections
import errno
import hashlib
import logging
import os
import pickle
import re
import tempfile
import time
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
    "NonFiniteCheckpointError",
    "IncompleteCheckpointError",
    "CheckpointNotFoundError",
    "load_checkpoint_file",
    "atomic_torch_save",
    "atomic_write_text",
    "content_checksum",
    "find_non_finite",
    "clean_stale_temp_files",
    "umask_file_mode",
    "ALLOW_NON_FINITE_ENV",
    "CHECKSUM_KEY",
    "FINAL_NAME",
    "MODEL_ONLY_KEY",
]

ALLOW_NON_FINITE_ENV = "ISDA_ALLOW_NON_FINITE_WEIGHTS"
#: ``model_final.pth`` holds the model only (plus "iteration" and this flag set to True)
FINAL_NAME = "model_final"
MODEL_ONLY_KEY = "isda_model_only"
CHECKSUM_KEY = "isda_sha256"
_logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be loaded."""


class UnsafeCheckpointError(CheckpointError):
    """The file holds Python objects whose loading could run code: it is refused, not executed."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated or otherwise unreadable, or its content checksum does not match."""


class NonFiniteCheckpointError(CorruptCheckpointError, FloatingPointError):
    """Tensors holding NaN or inf: refused when loading (unless ``ISDA_ALLOW_NON_FINITE_WEIGHTS=1``)
    and always when saving."""


class IncompleteCheckpointError(CheckpointError):
    """A strict load (evaluation, demo) found missing, unexpected or mis-shaped parameters, or no
    weights at all."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


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


#: first bytes of what ``torch.save`` writes: a zip archive (torch >= 1.6) or a pickle
_PTH_MAGICS = (b"PK\x03\x04", b"\x80")


def _check_pth_magic(filename):
    """A file that is neither a zip archive nor a pickle is no checkpoint at all (a text file,
    random bytes, an HTML error page saved as ``.pth``): say so, naming it."""
    with open(filename, "rb") as f:
        head = f.read(4)
    if not head:
        raise CorruptCheckpointError(f"Cannot read checkpoint '{filename}': the file is empty")
    if not head.startswith(_PTH_MAGICS):
        kind = "a text file" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else \
            "unknown binary data"
        raise CorruptCheckpointError(
            f"Cannot read checkpoint '{filename}': it is not a checkpoint (it starts like "
            f"{kind}, {head!r}, not like a file written by torch.save: a zip archive or a "
            "pickle). Check MODEL.WEIGHTS, or download the file again")


def _load_pth(filename):
    if os.path.isdir(filename):
        raise CheckpointNotFoundError(_folder_message(filename))
    _check_pth_magic(filename)
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
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            IndexError, TypeError, AttributeError) as e:
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
    """-> (state dict, metadata dict)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        state = load_file(filename, device="cpu")
        with safe_open(filename, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # SafetensorError is not importable on every version
        raise CorruptCheckpointError(
            f"Cannot read safetensors file '{filename}': it is truncated or corrupt "
            f"({type(e).__name__}: {e})") from None
    return state, metadata


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


# --------------------------------------------------------------------------- content checks
def _sorted_keys(d):
    return sorted(d, key=lambda k: (type(k).__name__, str(k)))


def _hash_tree(h, obj, path):
    if torch.is_tensor(obj):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T|{path}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"N|{path}|{a.dtype.str}|{a.shape}|".encode())
        if a.dtype.hasobject:
            h.update(repr(a.tolist()).encode())
        elif a.size:
            h.update(a.reshape(-1).view(np.uint8))
    elif isinstance(obj, dict):
        keys = _sorted_keys(obj)
        h.update(f"D|{path}|{len(keys)}|".encode())
        for k in keys:
            h.update(f"K|{type(k).__name__}|{k}|".encode())
            _hash_tree(h, obj[k], f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}|{path}|{len(obj)}|".encode())
        for i, v in enumerate(obj):
            _hash_tree(h, v, f"{path}/{i}")
    else:  # numbers, strings, None, numpy scalars, argparse.Namespace: their repr
        h.update(f"S|{path}|{type(obj).__name__}|{obj!r}|".encode())


def content_checksum(obj) -> str:
    """sha256 (hex) of a checkpoint's content: every tensor's dtype, shape and bytes and every
    other value, walked in sorted key order (the ``CHECKSUM_KEY`` entry itself excluded).
    Independent of the file format: a ``.pth`` ``{"model": sd}`` and a ``.safetensors`` file
    holding ``sd`` have the same checksum."""
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        obj = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    h = hashlib.sha256()
    _hash_tree(h, obj, "")
    return h.hexdigest()


def _walk_tensors(obj, path=""):
    if torch.is_tensor(obj) or isinstance(obj, np.ndarray):
        yield path, obj
    elif isinstance(obj, dict):
        for k in obj:
            yield from _walk_tensors(obj[k], f"{path}/{k}" if path else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk_tensors(v, f"{path}/{i}" if path else str(i))


def _all_finite(t) -> bool:
    """Whether tensor ``t`` holds no NaN / inf. Its minimum and maximum (NaN propagates) in one
    pass: ~20x faster on the CPU than ``torch.isfinite(t).all()``, which materialises a mask."""
    try:
        lo, hi = torch.aminmax(t.detach())
        return bool(torch.isfinite(lo) and torch.isfinite(hi))
    except RuntimeError:  # dtypes aminmax does not support (complex, ...)
        return bool(torch.isfinite(t).all())


def find_non_finite(obj):
    """[(name, #NaN, #inf, #values)] of the floating-point tensors / arrays in ``obj`` holding
    NaN or inf. Weights are named by their state-dict key (``model/`` is dropped)."""
    bad = []
    for path, t in _walk_tensors(obj):
        if isinstance(t, np.ndarray):
            if t.dtype.kind not in "fc":
                continue
            t = torch.from_numpy(np.ascontiguousarray(t))
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        if _all_finite(t):
            continue
        name = path[len("model/"):] if path.startswith("model/") else path
        bad.append((name, int(torch.isnan(t).sum()), int(torch.isinf(t).sum()), t.numel()))
    return bad


def _describe_non_finite(bad, limit=10):
    parts = [f"tensor '{n}' ({nan} NaN, {inf} inf of {total} values)"
             for n, nan, inf, total in bad[:limit]]
    more = f"; and {len(bad) - limit} more tensors" if len(bad) > limit else ""
    return "; ".join(parts) + more


def _non_finite_allowed() -> bool:
    return os.environ.get(ALLOW_NON_FINITE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _check_loaded(filename, data, allow_non_finite=None):
    """Verify the stored content checksum (if any), then refuse non-finite tensors."""
    if isinstance(data, dict) and CHECKSUM_KEY in data:
        stored = data.pop(CHECKSUM_KEY)
        actual = content_checksum(data)
        if stored != actual:
            raise CorruptCheckpointError(
                f"Cannot load checkpoint '{filename}': its content checksum does not match "
                f"(stored sha256 {str(stored)[:16]}..., computed {actual[:16]}...): the file "
                "was modified or damaged after ISDA wrote it (e.g. flipped bytes on disk)")
    if allow_non_finite is None:
        allow_non_finite = _non_finite_allowed()
    bad = find_non_finite(data)
    if bad:
        msg = (f"Checkpoint '{filename}' holds non-finite values (NaN/inf): "
               f"{_describe_non_finite(bad)}")
        if not allow_non_finite:
            raise NonFiniteCheckpointError(
                f"{msg}. Refusing to load it: such weights give NaN scores and meaningless "
                f"metrics. Set {ALLOW_NON_FINITE_ENV}=1 to load it anyway (e.g. to inspect it)")
        _logger.warning("%s; loaded anyway (%s=1)", msg, ALLOW_NON_FINITE_ENV)


def _folder_message(path):
    hint = ""
    last = os.path.join(path, "last_checkpoint")
    if os.path.isfile(last):
        with open(last) as f:
            hint = f" (its last_checkpoint names '{os.path.join(path, f.read().strip())}')"
    return (f"Checkpoint '{path}' is a folder, not a checkpoint file: give the file "
            f"itself{hint}")


def _check_values(filename, state_dict):
    """Every weight must be a tensor or a numpy array: name the first entry that is not."""
    for key, value in state_dict.items():
        if not (torch.is_tensor(value) or isinstance(value, np.ndarray)):
            raise CorruptCheckpointError(
                f"Cannot load checkpoint '{filename}': its weight '{key}' is a "
                f"{type(value).__name__}, not a tensor; this file is not a model checkpoint "
                "(or not one ISDA can read)")


def load_checkpoint_file(filename, allow_non_finite=None):
    """Load ``filename`` safely into Detectron2's checkpoint layout:
    ``{"model": state_dict, "matching_heuristics": bool, ...}``.

    The content checksum of a file written by ISDA is verified, and non-finite tensors are
    refused (``allow_non_finite``: default from ``ISDA_ALLOW_NON_FINITE_WEIGHTS``)."""
    if os.path.isdir(filename):
        raise CheckpointNotFoundError(_folder_message(filename))
    if not os.path.isfile(filename):
        raise CheckpointNotFoundError(f"Checkpoint '{filename}' not found")
    if filename.endswith(".safetensors"):
        state, metadata = _load_safetensors(filename)
        data = {"model": state}
        if CHECKSUM_KEY in metadata:
            data[CHECKSUM_KEY] = metadata[CHECKSUM_KEY]
        _check_loaded(filename, data, allow_non_finite)
        return {"model": state, "matching_heuristics": False}
    if filename.endswith(".pkl"):
        data = _load_pkl(filename)
        if not isinstance(data, dict):
            raise CheckpointError(f"'{filename}' holds a {type(data).__name__}, not a dict")
        _check_loaded(filename, data, allow_non_finite)
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
    _check_loaded(filename, data, allow_non_finite)
    try:
        state_dict, extra = _unwrap(data)
    except CheckpointError as e:
        raise CheckpointError(f"'{filename}': {e}") from None
    _check_values(filename, state_dict)
    out = dict(extra)
    out["model"] = _to_tensors(state_dict)
    return out


# --------------------------------------------------------------------------- writing files
# "older than this process": last modified before this module was imported (psutil's process
# start time is only exact to about a second: boot time in whole seconds)
_PROCESS_START = time.time()
# the names tempfile.mkstemp gives in _temp_file: ".<final name>.<8 random chars>.tmp"
_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def umask_file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` would give a new file (mkstemp gives 0o600)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no other way to read it; set back at once
    os.umask(mask)
    return 0o666 & ~mask


def clean_stale_temp_files(folder) -> list:
    """Remove temporary files of interrupted saves (``.<name>.XXXXXXXX.tmp``) in ``folder``
    last modified before this process started (so a save of a concurrent process is left alone).
    Returns the removed names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not _TEMP_RE.match(name):
            continue
        path = os.path.join(folder, name)
        try:
            if os.path.isfile(path) and os.path.getmtime(path) < _PROCESS_START:
                os.unlink(path)
                removed.append(name)
        except OSError:
            continue
    if removed:
        _logger.warning("Removed %d temporary file(s) of an interrupted earlier save in %s: %s",
                        len(removed), folder, ", ".join(sorted(removed)))
    return removed


def _temp_file(path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    clean_stale_temp_files(folder)
    return tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)


def _os_error_in_chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _interrupt_in_chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _atomic_write(path, write, binary=True):
    """``write(f)`` into a temporary file beside ``path``; fsync, chmod to the umask's mode,
    rename. On failure the temporary file is removed and ``path`` is unchanged; an OSError
    anywhere in the failure (e.g. ENOSPC under torch's RuntimeError) is raised as
    ``OSError: <reason> while writing <path>``."""
    fd, tmp = _temp_file(path)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, umask_file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        interrupt = _interrupt_in_chain(e)
        if interrupt is not None and interrupt is not e:
            # Ctrl-C inside torch.save: its zip writer then fails on closing the half-written
            # archive ("inline_container.cc ... PytorchStreamWriter failed"), which would hide
            # the interruption; path is unchanged and the temporary file is removed
            raise KeyboardInterrupt(f"interrupted while writing {path} (left unchanged)") \
                from None
        os_error = _os_error_in_chain(e) if isinstance(e, Exception) else None
        if os_error is not None:
            reason = os_error.strerror or os.strerror(os_error.errno)
            raise OSError(os_error.errno, f"{reason} while writing {path}") from e
        raise


def atomic_torch_save(obj, path, checksum=True):
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``.

    Refuses (:class:`NonFiniteCheckpointError`, nothing written) an ``obj`` holding NaN/inf
    tensors. A dict gets the content checksum under ``CHECKSUM_KEY`` (``checksum=True``)."""
    bad = find_non_finite(obj)
    if bad:
        raise NonFiniteCheckpointError(
            f"Refusing to write checkpoint '{path}': it would hold non-finite values (NaN/inf): "
            f"{_describe_non_finite(bad)}. The previous checkpoint files are left unchanged")
    if checksum and isinstance(obj, dict):
        obj = dict(obj)
        obj[CHECKSUM_KEY] = content_checksum(obj)
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename; umask's mode)."""
    _atomic_write(path, lambda f: f.write(text), binary=False)


_atomic_write_text = atomic_write_text  # the name earlier versions used


def _grouped(keys):
    """Parameter names one module per line: ``    decoder.layers.0.norm1.{bias, weight}``."""
    groups = collections.OrderedDict()
    for k in sorted(keys):
        parent, _, leaf = k.rpartition(".")
        groups.setdefault(parent, []).append(leaf)
    lines = []
    for parent, leaves in groups.items():
        if not parent:
            lines += [f"    {leaf}" for leaf in leaves]
        elif len(leaves) == 1:
            lines.append(f"    {parent}.{leaves[0]}")
        else:
            lines.append(f"    {parent}.{{{', '.join(leaves)}}}")
    return "\n".join(lines)


class ISDACheckpointer(DetectionCheckpointer):
    """:class:`DetectionCheckpointer` that loads ``.safetensors`` / ``.pth`` / ``.pkl`` without
    running pickled code, verifies what it loads and saves atomically. Use it wherever
    Detectron2 uses ``DetectionCheckpointer`` (training, evaluation,
    :class:`isda.predictor.ISDAPredictor`).

    Strict by default: missing, unexpected or mis-shaped parameters, or an empty path, raise
    :class:`IncompleteCheckpointError` listing them. ``allow_partial=True`` (training, or
    ``MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS`` for evaluation) keeps Detectron2's behaviour: the
    parameters that match are loaded and the others are reported in the log."""

    def __init__(self, model, save_dir="", *, allow_partial=False, save_to_disk=None,
                 **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.allow_partial = bool(allow_partial)

    def load(self, path, *args, **kwargs):
        """Detectron2's ``load``; a file that fails to load leaves the checkpointer usable.

        Detectron2 after v0.6 keeps the URL being loaded in ``_parsed_url_during_load`` and
        asserts it is unset on entry, but does not reset it when loading raises: without the
        reset here, trying an earlier checkpoint after a corrupt one fails with AssertionError."""
        if not path and not self.allow_partial:
            raise IncompleteCheckpointError(
                "No weights to load (MODEL.WEIGHTS is empty): evaluating or running a randomly "
                "initialised model gives meaningless results. Give MODEL.WEIGHTS, or set "
                "MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS True to run without weights")
        if path and "://" not in path and os.path.isdir(path):
            raise CheckpointNotFoundError(_folder_message(path))
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointNotFoundError(f"Checkpoint '{path}' not found")
        try:
            return super().load(path, *args, **kwargs)
        except BaseException:
            if hasattr(self, "_parsed_url_during_load"):
                self._parsed_url_during_load = None
            raise

    def _load_file(self, filename):
        if filename.endswith(".pyth"):
            raise CheckpointError(f"'{filename}': pycls .pyth checkpoints are not supported")
        self._loading = filename
        return load_checkpoint_file(filename)

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if incompatible is None:
            return incompatible
        problems = []
        # Detectron2 drops mis-shaped parameters before loading: they are listed as such only
        if getattr(self, "refuse_mis_shaped", False) and incompatible.incorrect_shapes:
            shapes = sorted(incompatible.incorrect_shapes)
            keys = {k for k, _, _ in shapes}
            hint = (" MODEL.ISDA.NUM_CLASSES differs from the run's (the class head has another "
                    "shape)." if any("class_embed" in k for k in keys) else "")
            filename = getattr(self, "_loading", "the checkpoint")
            raise IncompleteCheckpointError(
                f"--resume: '{filename}' does not match this config's model;{hint} Parameters "
                "of another shape (in the file vs in the model):\n"
                + "\n".join(f"    {k} {tuple(a)} vs {tuple(b)}" for k, a, b in shapes[:20])
                + "\nA resume continues the same model: use the run's config, or start a new "
                "run (another OUTPUT_DIR) with MODEL.WEIGHTS pointing at this file to fine-tune")
        if self.allow_partial or incompatible is None:
            return incompatible
        shaped = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in incompatible.missing_keys if k not in shaped]
        if missing:
            keys = missing
            problems.append(f"{len(keys)} missing (in the model, not in the file):\n"
                            + _grouped(keys))
        if incompatible.unexpected_keys:
            keys = incompatible.unexpected_keys
            problems.append(f"{len(keys)} unexpected (in the file, not in the model):\n"
                            + _grouped(keys))
        if incompatible.incorrect_shapes:
            shapes = sorted(incompatible.incorrect_shapes)
            problems.append(f"{len(shapes)} mis-shaped (shape in the file vs in the model):\n"
                            + "\n".join(f"    {k} {tuple(a)} vs {tuple(b)}" for k, a, b in shapes))
        if problems:
            filename = getattr(self, "_loading", "the checkpoint")
            raise IncompleteCheckpointError(
                f"'{filename}' does not match the model; these parameters did not load:\n  "
                + "\n  ".join(problems)
                + "\nThe file holds weights of another architecture or config, or of part of the "
                "model only (e.g. an ImageNet backbone). Set MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS "
                "True to accept a partial load")
        return incompatible

    def _is_local(self):
        return "://" not in self.save_dir

    def save(self, name, **kwargs):
        """Like Detectron2's ``save`` (``{save_dir}/{name}.pth`` + ``last_checkpoint``), but the
        file appears only once it is complete, carries a content checksum and is refused when a
        tensor holds NaN/inf (``last_checkpoint`` then keeps naming the previous file)."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        if name == FINAL_NAME:
            # the weights to share: the model alone (a third of a resumable checkpoint, which
            # adds the optimizer's two moments per parameter); the periodic model_XXXXXXX.pth
            # files keep the optimizer, scheduler and hook states for --resume
            data[MODEL_ONLY_KEY] = True
        else:
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
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))
