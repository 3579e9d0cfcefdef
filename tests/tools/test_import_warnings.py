"""The main job prints no Python warning (issue 30): Detectron2 / fvcore call the deprecated
``torch.jit.script`` when their modules are imported; ``import isda`` silences that one warning
for its own imports only, and the main job's drawing step imports isda before Detectron2."""
import ast
import subprocess
import sys

from isda_helpers import ROOT

JIT = "torch.jit.script` is deprecated"


def run_python(code: str) -> str:
    """stderr of a fresh interpreter running ``code`` with every warning shown."""
    proc = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


SCRIPT_A_FUNCTION = (  # the warning comes first; scripting then fails (no source file under -c)
    "import torch\n"
    "def f(x: torch.Tensor) -> torch.Tensor:\n"
    "    return x + 1\n"
    "try:\n"
    "    torch.jit.script(f)\n"
    "except Exception:\n"
    "    pass\n")


def test_isda_then_detectron2_imports_print_no_jit_warning_and_stay_narrow():
    err = run_python(
        "import isda\n"
        "import detectron2.data, detectron2.modeling, detectron2.engine, fvcore.nn\n"
        "from detectron2.utils.visualizer import Visualizer\n"
        "import sys; sys.stderr.write('--imports done--\\n'); sys.stderr.flush()\n"
        + SCRIPT_A_FUNCTION)
    imports, later = err.split("--imports done--")
    assert JIT not in imports, imports
    if JIT in run_python(SCRIPT_A_FUNCTION):  # this torch deprecates torch.jit.script:
        assert JIT in later, "the user's own torch.jit.script call must still warn"


def test_main_job_drawing_imports_isda_before_detectron2():
    """Imported before isda, ``detectron2.data`` printed the FutureWarning at the main job's end."""
    tree = ast.parse((ROOT / "tools" / "main_job.py").read_text())
    visualise = next(n for n in tree.body if isinstance(n, ast.FunctionDef)
                     and n.name == "visualise")
    order = []
    for node in visualise.body:
        if isinstance(node, ast.Import):
            order += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            order.append(node.module)
    first_d2 = next(i for i, m in enumerate(order) if m.startswith("detectron2"))
    assert "isda" in order[:first_d2], order
