#!/usr/bin/env python
"""Install Detectron2 into the current Python environment, preferring the real thing.

Order of preference (the first that works wins):

1. ``native``   - an importable Detectron2 whose compiled ``detectron2._C`` loads: used as is.
2. ``source``   - a build of Detectron2's source with its compiled ``detectron2._C`` (CPU, plus
                  CUDA where a GPU toolkit is usable), from
                  * a local source archive (``.tar.gz``/``.tgz``/``.zip``) or folder named by
                    ``ISDA_DETECTRON2_SOURCE`` or ``--source`` (the offline install), else
                  * the official GitHub repository, when it is reachable.
3. ``fallback`` - the registry sdist ``pb1-detectron2==0.6``: Detectron2 v0.6's Python code,
                  published without its C++ sources. We unpack it, apply a handful of
                  compatibility fixes programmatically (today's Pillow, numpy 2, setuptools
                  without ``pkg_resources``) and add a placeholder ``detectron2._C`` whose
                  attributes raise a clear error. Nothing of Detectron2 is committed to ISDA.

``ISDA_DETECTRON2_FLAVOUR=fallback`` (or ``--force-fallback``) installs the fallback whatever
else is possible (the second test flavour of CI). Source builds get one compatibility fix at
set-up time: ``detectron2.model_zoo`` imports ``pkg_resources``, which setuptools >= 81 no
longer ships; the import is replaced by a small stand-in for the one function it uses.

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


def _source_tree(src: Path, workdir: Path) -> Path:
    """A writable copy of a Detectron2 source tree from an archive or a folder: the folder that
    holds ``setup.py`` and the ``detectron2`` package."""
    dest = workdir / "src"
    if src.is_dir():
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".git", "build", "*.so"))
    elif src.name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(src) as tf:
            tf.extractall(dest, filter="data")
    elif src.name.endswith(".zip"):
        import zipfile

        with zipfile.ZipFile(src) as zf:
            zf.extractall(dest)
    else:
        raise SystemExit(f"ISDA_DETECTRON2_SOURCE={src}: not a folder, .tar.gz, .tgz, .tar or .zip")
    for setup_py in sorted(dest.rglob("setup.py"), key=lambda p: len(p.parts)):
        if (setup_py.parent / "detectron2" / "__init__.py").is_file():
            return setup_py.parent
    raise SystemExit(f"ISDA_DETECTRON2_SOURCE={src}: no Detectron2 source tree in it (expected "
                     "setup.py next to a detectron2/ package)")


def patch_source_tree(tree: Path) -> None:
    """The one set-up fix a source build needs today: ``pkg_resources`` in ``model_zoo``."""
    for py in sorted((tree / "detectron2").rglob("*.py")):
        text = py.read_text(encoding="utf-8")
        new = re.sub(r"^import pkg_resources\n", lambda _: PKG_RESOURCES_SHIM, text, flags=re.M)
        if new != text:
            py.write_text(new, encoding="utf-8")
            log(f"patched the pkg_resources import of {py.relative_to(tree)}")


def build_source_tree(src: Path | None) -> bool:
    """Build and install Detectron2 from a local archive/folder ``src``, or from GitHub."""
    with tempfile.TemporaryDirectory(prefix="isda-d2-") as tmp:
        if src is None:
            log(f"official repository reachable: building Detectron2 from {OFFICIAL_REPO}")
            tree = Path(tmp) / "src"
            r = subprocess.run(["git", "clone", "--depth", "1", OFFICIAL_REPO, str(tree)])
            if r.returncode != 0:
                return False
        else:
            log(f"building Detectron2 from the local source {src} (compiles detectron2._C: a few "
                "CPU-minutes)")
            tree = _source_tree(src, Path(tmp))
        patch_source_tree(tree)
        env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))}
        # --no-deps: requirements.txt already holds what ISDA needs of Detectron2's dependencies
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                            "--no-deps", "--force-reinstall", str(tree)], env=env)
        return r.returncode == 0


def source_identity(src: Path) -> str:
    """What a local source is, for the record: the archive's sha256, or the folder's path."""
    return f"sha256:{sha256(src)}" if src.is_file() else f"folder:{src.resolve()}"


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--cache", type=Path, default=Path(".cache/setup"),
                    help="where downloaded archives are kept")
    ap.add_argument("--source", type=Path, default=os.environ.get("ISDA_DETECTRON2_SOURCE") or None,
                    help="a Detectron2 source archive (.tar.gz/.tgz/.zip) or folder to build "
                         "offline (default: $ISDA_DETECTRON2_SOURCE)")
    ap.add_argument("--force-fallback", action="store_true",
                    default=os.environ.get("ISDA_DETECTRON2_FLAVOUR", "").lower() == "fallback",
                    help="install the registry fallback even if another flavour is possible "
                         "(default: on when ISDA_DETECTRON2_FLAVOUR=fallback)")
    args = ap.parse_args()
    src = args.source.expanduser().resolve() if args.source else None
    if src is not None and not src.exists():
        raise SystemExit(f"ISDA_DETECTRON2_SOURCE / --source: {src} does not exist")

    info = probe_installed()
    previous = json.loads(RECORD.read_text()) if RECORD.exists() else {}
    if info and not args.force_fallback:
        wanted = source_identity(src) if src else None
        if info["flavour"] == "native" and (wanted is None or previous.get("from") == wanted):
            log(f"using the installed Detectron2 {info['version']} with compiled ops "
                f"({info['path']})")
            if previous.get("flavour") not in ("native", "source"):
                write_record({"flavour": "native", "version": info["version"]})
            return 0
        if info["flavour"] == "fallback" and info["version"] == FALLBACK_VERSION and src is None:
            log(f"registry fallback Detectron2 {info['version']} already installed")
            if not RECORD.exists():
                write_record({"flavour": "fallback", "version": info["version"]})
            return 0
        log(f"found Detectron2 {info['version']} ({info['flavour']}): replacing it")
    elif info and info["flavour"] == "fallback" and info["version"] == FALLBACK_VERSION:
        log(f"registry fallback Detectron2 {info['version']} already installed (forced)")
        write_record({**previous, "flavour": "fallback", "version": info["version"]})
        return 0

    if not args.force_fallback and (src is not None or official_repo_reachable()):
        if build_source_tree(src):
            info = probe_installed()
            if info and info["flavour"] == "native":
                write_record({"flavour": "source", "version": info["version"],
                              "from": source_identity(src) if src else OFFICIAL_REPO})
                log(f"built Detectron2 {info['version']} from source, with compiled ops")
                return 0
        if src is not None:
            raise SystemExit(f"building Detectron2 from {src} failed (see the compiler output "
                             "above and docs/troubleshooting.md)")
        log("source build failed; using the registry fallback")
    elif args.force_fallback:
        log("ISDA_DETECTRON2_FLAVOUR=fallback: installing the registry fallback")
    else:
        log("official Detectron2 repository not reachable and no ISDA_DETECTRON2_SOURCE: using "
            "the registry fallback")

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
