"""Print what ISDA runs on: ``python -m isda.collect_env``.

Reports Python, torch (and its CUDA), the Detectron2 version and flavour (native / source /
registry fallback), whether ISDA's compiled op is built and for which devices, the compiler and
the thread settings. Paste its output into bug reports.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def detectron2_info() -> dict:
    try:
        import detectron2
    except ImportError as e:
        return {"version": None, "flavour": f"not installed ({e})"}
    info = {"version": detectron2.__version__, "path": os.path.dirname(detectron2.__file__)}
    record = Path(sys.prefix) / "isda-detectron2.json"
    if record.is_file():
        info.update(json.loads(record.read_text()))
    try:
        from detectron2 import _C

        if getattr(_C, "ISDA_PLACEHOLDER", False):
            info["flavour"] = "fallback"
            info.setdefault("missing", "compiled ops (placeholder detectron2._C)")
        else:
            info.setdefault("flavour", "native")
            info["compiler"] = _C.get_compiler_version()
            info["cuda_compiler"] = _C.get_cuda_version()
    except Exception as e:  # noqa: BLE001 - report, never crash
        info["flavour"] = f"broken ({type(e).__name__}: {e})"
    return info


def isda_extension_info() -> dict:
    try:
        from isda import _C
    except ImportError as e:
        return {"built": False, "error": str(e),
                "note": "the PyTorch reference path is used (slow); see docs/troubleshooting.md"}
    import torch

    devices = ["cpu"] + (["cuda"] if _C.has_cuda() else [])
    registered = hasattr(torch.ops.isda, "ms_deform_attn")
    info = {"built": True, "devices": devices, "file": _C.__file__,
            "torch.ops.isda.ms_deform_attn": registered}
    if not registered:
        info["note"] = "an extension built before the torch operator: rebuild it"
    return info


def compiler_version() -> str:
    cc = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0] if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "not found"


def nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    if not CUDA_HOME:
        return "no CUDA toolkit found"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=10)
        return f"{CUDA_HOME}: " + out.stdout.strip().splitlines()[-1]
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return f"{CUDA_HOME}: nvcc not runnable"


def collect() -> list[tuple[str, str]]:
    import numpy as np
    import torch
    import torchvision

    d2 = detectron2_info()
    ext = isda_extension_info()
    rows = [
        ("sys.platform", f"{sys.platform} ({platform.machine()})"),
        ("Python", sys.version.replace("\n", " ")),
        ("numpy", np.__version__),
        ("PyTorch", f"{torch.__version__} @ {os.path.dirname(torch.__file__)}"),
        ("PyTorch CUDA", f"{torch.version.cuda} (GPU available: {torch.cuda.is_available()})"),
        ("torchvision", torchvision.__version__),
        ("Detectron2", f"{d2.get('version')} @ {d2.get('path', '-')}"),
        ("Detectron2 flavour", str(d2.get("flavour"))),
    ]
    if "missing" in d2:
        rows.append(("Detectron2 lacks", d2["missing"]))
    if "compiler" in d2:
        rows.append(("Detectron2 compiler", f"{d2['compiler']} / {d2.get('cuda_compiler')}"))
    try:
        import isda

        rows.append(("ISDA", f"{isda.__version__} @ {os.path.dirname(isda.__file__)}"))
    except Exception as e:  # noqa: BLE001
        rows.append(("ISDA", f"import failed: {type(e).__name__}: {e}"))
    if ext["built"]:
        rows.append(("ISDA extension", f"built for {', '.join(ext['devices'])} ({ext['file']})"))
    else:
        rows.append(("ISDA extension", f"NOT built: {ext['error']} - {ext['note']}"))
    rows += [
        ("C++ compiler", compiler_version()),
        ("CUDA toolkit", nvcc_version()),
        ("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "(unset)")),
        ("CPU threads", f"torch {torch.get_num_threads()} / os {os.cpu_count()}"
                        f" (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})"),
        ("torch parallel backend", torch.__config__.parallel_info().splitlines()[-1].strip()),
    ]
    return rows


def main() -> int:
    rows = collect()
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
