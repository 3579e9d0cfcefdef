"""The build: the deformable attention op (isda._C) never depends on an optional speed-up. The
compiled dropout (isda._dropout) and the CPU block cache (isda._cpu_cache) are extensions of
their own whose build failures are reported and skipped; a failure of the op's own build still fails the install."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest
from setuptools import Distribution
from torch.utils.cpp_extension import BuildExtension

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent

ROOT = Path(__file__).resolve().parents[1]


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


def test_op_sources_hold_no_optional_code(setup_module):
    mod, extensions = setup_module
    optional = {"isda._dropout": "ops/dropout/"}
    if sys.platform.startswith("linux"):
        optional["isda._cpu_cache"] = "ops/cpu_allocator/"
    assert set(extensions) == {"isda._C", *optional}
    assert set(mod.OPTIONAL_EXTENSIONS) == {"isda._dropout", "isda._cpu_cache"}
    op_sources = [Path(s).as_posix() for s in extensions["isda._C"].sources]
    assert op_sources and all("dropout" not in s and "allocator" not in s for s in op_sources)
    for name, folder in optional.items():
        assert extensions[name].sources
        assert all(Path(s).as_posix().startswith(folder) for s in extensions[name].sources)


def test_failed_optional_build_is_skipped_but_op_failure_is_not(setup_module, monkeypatch,
                                                               capsys):
    mod, extensions = setup_module

    def broken(self, ext):
        raise RuntimeError(f"compiler error in {ext.name}")

    monkeypatch.setattr(BuildExtension, "build_extension", broken)
    cmd = mod.BuildExtensionWithOptional(Distribution({"name": "isda"}))
    for name in mod.OPTIONAL_EXTENSIONS:
        if name in extensions:
            cmd.build_extension(extensions[name])
            assert f"optional extension {name} did not build" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="compiler error in isda._C"):
        cmd.build_extension(extensions["isda._C"])


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
    assert set(_extensions(mod, monkeypatch, ISDA_BUILD_ONLY=" isda._C, isda._dropout ")) == {
        "isda._C", "isda._dropout"}
    with pytest.raises(SystemExit, match="isda._nope"):
        _extensions(mod, monkeypatch, ISDA_BUILD_ONLY="isda._C,isda._nope")
