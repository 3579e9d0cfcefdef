"""The build: one extension, the deformable attention op (isda._C), and its flags."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_module():
    spec = importlib.util.spec_from_file_location("isda_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        spec.loader.exec_module(mod)  # setup() itself runs only as __main__
        extensions = {e.name: e for e in mod.get_extensions()}
    finally:
        os.chdir(cwd)
    return mod, extensions


def test_one_extension_the_op(setup_module):
    mod, extensions = setup_module
    assert set(extensions) == {"isda._C"}
    sources = [Path(s).as_posix() for s in extensions["isda._C"].sources]
    assert sources and all(s.startswith("ops/csrc/") for s in sources)


def _extensions(mod, monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    return {e.name: e for e in mod.get_extensions()}


def test_builds_without_debug_information_unless_asked(setup_module, monkeypatch):
    """Python's own -g comes first in the compile line; -g0 after it wins (torch's headers
    compile in less than half the time without debug information)."""
    if sys.platform == "win32":
        pytest.skip("MSVC flags")
    mod, _ = setup_module
    monkeypatch.delenv("ISDA_DEBUG_BUILD", raising=False)
    for ext in _extensions(mod, monkeypatch).values():
        assert ext.extra_compile_args["cxx"][-1] != "-g" and "-g0" in ext.extra_compile_args["cxx"]
    for ext in _extensions(mod, monkeypatch, ISDA_DEBUG_BUILD="1").values():
        assert "-g0" not in ext.extra_compile_args["cxx"]


def test_build_only_selects_extensions_and_names_unknown_ones(setup_module, monkeypatch):
    mod, _ = setup_module
    assert set(_extensions(mod, monkeypatch, ISDA_BUILD_ONLY="isda._C")) == {"isda._C"}
    assert set(_extensions(mod, monkeypatch, ISDA_BUILD_ONLY=" isda._C ")) == {"isda._C"}
    with pytest.raises(SystemExit, match="isda._nope"):
        _extensions(mod, monkeypatch, ISDA_BUILD_ONLY="isda._C,isda._nope")
