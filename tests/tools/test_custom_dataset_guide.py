"""docs/custom_dataset.md works as written, from a project folder outside the repository.

The guide's code blocks are taken from the document itself: every block whose first line is a
file name comment (``# register.py``, ``# my_cells.yaml``, ``# my_eval.py``) is written to that
file in a temporary project folder, and the lines of the ``bash`` block of step 4 run there with
``/path/to/isda`` replaced by this clone and ``python`` by this interpreter, nothing else (no
``PYTHONPATH``). The data are the embedded nuclei tiles in COCO format under ``data/``. To keep
the run short, ``my_cells.yaml`` is the guide's file under another name, with a two-iteration,
small-image override on top (a config whose ``_BASE_`` is the guide's).
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from isda.data.paths import datasets_root
from isda_helpers import ROOT

GUIDE = ROOT / "docs" / "custom_dataset.md"
FAST = """
_BASE_: "my_cells_guide.yaml"
MODEL:
  ISDA:
    NUM_QUERIES: 20
    ENC_LAYERS: 1
    DEC_LAYERS: 1
INPUT:
  MIN_SIZE_TRAIN: (64,)
  MAX_SIZE_TRAIN: 96
  CROP:
    ENABLED: False
  MIN_SIZE_TEST: 64
  MAX_SIZE_TEST: 96
SOLVER:
  MAX_ITER: 2
  STEPS: ()
  IMS_PER_BATCH: 2
  CHECKPOINT_PERIOD: 1000
TEST:
  EVAL_PERIOD: 0
DATALOADER:
  NUM_WORKERS: 0
"""


def guide_blocks():
    """[(language, text)] of the guide's fenced code blocks, in order."""
    return [(m.group(1), m.group(2)) for m in
            re.finditer(r"```(\w*)\n(.*?)```", GUIDE.read_text(), flags=re.S)]


def write_project(folder: Path):
    """The guide's files, the nuclei data under data/; -> the commands of its bash block."""
    files = {}
    for lang, text in guide_blocks():
        first = text.splitlines()[0].strip()
        m = re.fullmatch(r"# ([\w./-]+\.(?:py|yaml))", first)
        if lang in ("python", "yaml") and m:
            files[m.group(1)] = text.replace("/path/to/isda", str(ROOT))
    assert {"register.py", "my_cells.yaml", "my_eval.py"} <= set(files), sorted(files)
    for name, text in files.items():
        (folder / ("my_cells_guide.yaml" if name == "my_cells.yaml" else name)).write_text(text)
    (folder / "my_cells.yaml").write_text(FAST)
    nuclei = datasets_root() / "nuclei"
    (folder / "data" / "annotations").mkdir(parents=True)
    shutil.copytree(nuclei / "images", folder / "data" / "images")
    shutil.copy(nuclei / "nuclei_train.json", folder / "data" / "annotations" / "train.json")
    shutil.copy(nuclei / "nuclei_val.json", folder / "data" / "annotations" / "val.json")
    bash = [text for lang, text in guide_blocks() if lang == "bash" and "--setup-file" in text]
    assert len(bash) == 1
    commands = [line for line in bash[0].splitlines() if line.strip() and not line.startswith("cd ")]
    return [c.replace("/path/to/isda", str(ROOT)) for c in commands]


@pytest.fixture(scope="module")
def project(module_tmp_path_factory):
    folder = module_tmp_path_factory.mktemp("my_project")
    commands = write_project(folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    logs = []
    for cmd in commands:
        args = cmd.split()
        assert args[0] == "python", cmd
        proc = subprocess.run([sys.executable, *args[1:]], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=900)
        logs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{cmd}\n{logs[-1][-4000:]}"
    return folder, commands, logs


def test_guide_trains_evaluates_and_draws_from_a_project_folder(project):
    folder, commands, logs = project
    assert not str(folder).startswith(str(ROOT))
    assert (folder / "output" / "my_cells" / "model_final.pth").is_file()
    results = json.loads((folder / "output" / "my_cells" / "inference" / "results.json").read_text())
    assert results["datasets"] == ["cells_val"] and "AP" in results["results"]["segm"]
    drawn = sorted(p.name for p in (folder / "vis").iterdir())
    assert drawn == sorted(p.name for p in (folder / "data" / "images").iterdir())
    demo_log = logs[2]
    assert demo_log.count(" instances") >= len(drawn)
    assert "'AP':" in logs[3]  # my_eval.py prints the segm results dict


def test_demo_names_the_custom_classes(project):
    """The demo sees the custom registration (it used to draw classes as "0")."""
    folder, _, _ = project
    code = ("import runpy; runpy.run_path('register.py'); "
            "from detectron2.config import get_cfg; from isda import add_isda_config; "
            "from predictor import dataset_metadata; cfg = get_cfg(); add_isda_config(cfg); "
            "cfg.merge_from_file('my_cells.yaml'); print(dataset_metadata(cfg).thing_classes)")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "demo"))  # demo/predictor.py, as demo.py has it
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['nucleus']"
