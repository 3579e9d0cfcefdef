"""Where ISDA keeps its datasets: ``$ISDA_DATASETS``, else ``$DETECTRON2_DATASETS``, else
``datasets/`` at the repository root."""
import os
from pathlib import Path


def datasets_root() -> Path:
    env = os.environ.get("ISDA_DATASETS") or os.environ.get("DETECTRON2_DATASETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "datasets"
