#!/usr/bin/env python
"""The README's main job (placeholder until training lands): report the environment and check
that the embedded datasets load."""
import subprocess
import sys

from detectron2.data import DatasetCatalog

import isda  # noqa: F401  (registers datasets)


def main() -> int:
    subprocess.run([sys.executable, "-m", "isda.collect_env"], check=True)
    for name in ("nuclei_train", "nuclei_val", "voc_sample"):
        dicts = DatasetCatalog.get(name)
        n = sum(len(d["annotations"]) for d in dicts)
        print(f"{name}: {len(dicts)} images, {n} annotations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
