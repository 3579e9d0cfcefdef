"""The suite's temporary folders do not pile up: CI once ran out of disk after one flavour kept
~8 GB of training checkpoints (~150 MB each) under pytest's temporary folder.

A small suite runs in a pytest subprocess with the project's ``pytest.ini`` and ``conftest.py``:
a passed test's ``tmp_path`` and a module fixture's folder are gone when the run ends, a failed
test's ``tmp_path`` is kept for inspection."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_SUITE = '''
import pytest

# No Detectron2 code runs here (compiled extensions, their Python side, build and test
# tooling): `make test-fallback` deselects it (README, "Detectron2 flavours").
pytestmark = pytest.mark.flavour_independent

@pytest.fixture(scope="module")
def shared(module_tmp_path_factory):
    folder = module_tmp_path_factory.mktemp("shared")
    (folder / "module_checkpoint.pth").write_bytes(b"0" * 4096)
    return folder

def test_passes(tmp_path, shared):
    (tmp_path / "passed_checkpoint.pth").write_bytes(b"0" * 4096)

def test_fails(tmp_path, shared):
    (tmp_path / "failed_checkpoint.pth").write_bytes(b"0" * 4096)
    assert False
'''


def test_passed_tests_and_module_fixtures_leave_no_files(tmp_path):
    (tmp_path / "test_small_suite.py").write_text(SMALL_SUITE)
    base = tmp_path / "base"
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pytest.ini"), "--rootdir", ROOT,
         "-p", "conftest", "-p", "no:cacheprovider", f"--basetemp={base}", "-q",
         str(tmp_path / "test_small_suite.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert "1 failed, 1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    left = sorted(p.name for p in base.rglob("*.pth"))
    assert left == ["failed_checkpoint.pth"], left
