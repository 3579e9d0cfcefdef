"""Where ISDA keeps its embedded datasets: ``$ISDA_DATASETS``, else ``datasets/`` at the
repository root.

``$DETECTRON2_DATASETS`` is Detectron2's variable for the datasets it knows (COCO under
``$DETECTRON2_DATASETS/coco``); it does not move the embedded datasets, so a Detectron2 user's
usual setting never hides them.
"""
import os
from pathlib import Path


def datasets_root() -> Path:
    env = os.environ.get("ISDA_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "datasets"
