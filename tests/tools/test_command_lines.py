"""Every command-line tool explains every option (--help), and a normal run prints no Python
warning a user cannot act on (Detectron2's import-time torch.jit.script deprecation, fvcore's
non-writable NumPy array, DDP's broadcast_buffers deprecation used to appear on every run)."""
import re
import subprocess
import sys

import pytest

from isda_helpers import ROOT

TOOLS = sorted(p for p in [*ROOT.glob("tools/*.py"), *ROOT.glob("tools/deploy/*.py"),
                           *ROOT.glob("tools/setup/*.py"), *ROOT.glob("benchmarks/*.py"),
                           ROOT / "train_net.py", ROOT / "demo" / "demo.py"]
               if 'if __name__ == "__main__"' in p.read_text())
WARNING = re.compile(r"\b\w*Warning: ")


def options_without_help(help_text):
    """Option lines of an argparse --help that carry no help text."""
    lines = help_text.splitlines()
    bad = []
    for i, line in enumerate(lines):
        if not line.startswith("  -") or "-h, --help" in line:
            continue
        if re.search(r"\S\s{2,}\S", line.strip()):  # option and its help on one line
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if not following.startswith("      ") or following.lstrip().startswith("-"):
            bad.append(line.strip())
    return bad


@pytest.mark.parametrize("tool", TOOLS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_option_has_help(tool):
    out = subprocess.run([sys.executable, str(tool), "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]
    assert options_without_help(out.stdout) == []
    assert not WARNING.search(out.stderr), out.stderr[-2000:]


def test_options_without_help_are_found():
    """The check itself: an option without help is reported, one with help is not."""
    text = ("options:\n  -h, --help  show\n  --seed SEED\n  --out OUT   where it goes\n"
            "  --size SIZE\n              the size\n")
    assert options_without_help(text) == ["--seed SEED"]


def test_training_and_evaluation_print_no_python_warning(tmp_path):
    cmd = [sys.executable, "train_net.py", "--config-file", "configs/nuclei/isda_R18_tiny.yaml",
           "SOLVER.MAX_ITER", "1", "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.DROPOUT", "0.1",
           "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "TEST.EVAL_PERIOD", "0",
           "OUTPUT_DIR", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in (out.stdout + out.stderr).splitlines() if WARNING.search(line)]
    assert warnings == []
