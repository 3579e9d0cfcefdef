"""Register ISDA's embedded datasets with Detectron2 (done on ``import isda``).

* ``nuclei_train``: 8 tiles (128x176) of stardist's nuclei image, columns 0-351
* ``nuclei_train_region``: the same columns as one 512x352 image (random-crop training)
* ``nuclei_val``: columns 384-511 of the same image, as 4 tiles of 128x128
* ``nuclei3d_train`` / ``nuclei3d_val``: z-slices 0-19 / 24-30 (61x57) of stardist's 3-D nuclei
  stack (held-out slices: nuclei also seen in training are crowd)
* ``voc_sample``: 3 VOC photos with 12 polygon instances (labelme)

All are built by ``tools/setup/prepare_datasets.py`` (part of ``make setup``).
Files live under ``$ISDA_DATASETS`` (default ``datasets/`` in the repository).
"""
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from ..catalog import load_coco_instances
from ..paths import datasets_root

# name -> (folder, json file)
EMBEDDED = {
    "nuclei_train": ("nuclei", "nuclei_train.json"),
    "nuclei_train_region": ("nuclei", "nuclei_train_region.json"),
    "nuclei_val": ("nuclei", "nuclei_val.json"),
    "nuclei3d_train": ("nuclei3d", "nuclei3d_train.json"),
    "nuclei3d_val": ("nuclei3d", "nuclei3d_val.json"),
    "voc_sample": ("voc_sample", "voc_sample.json"),
}
NUCLEI_CLASSES = ["nucleus"]


def _paths(name):
    folder, json_name = EMBEDDED[name]
    root = datasets_root() / folder
    return root / json_name, root / "images"


def _loader(name):
    def load():
        json_file, image_root = _paths(name)
        if not json_file.is_file():
            raise FileNotFoundError(
                f"dataset '{name}': {json_file} does not exist. Build the embedded datasets with "
                f"`make setup` (tools/setup/prepare_datasets.py)."
            )
        # (COCO annotation ids kept in the records: errors name them)
        return load_coco_instances(str(json_file), str(image_root), name)

    return load


def register_all():
    for name, (folder, _) in EMBEDDED.items():
        if name in DatasetCatalog.list():
            continue
        json_file, image_root = _paths(name)
        DatasetCatalog.register(name, _loader(name))
        MetadataCatalog.get(name).set(
            json_file=str(json_file), image_root=str(image_root), evaluator_type="coco",
        )
        if folder in ("nuclei", "nuclei3d"):  # voc_sample's classes come from its JSON when it is loaded
            MetadataCatalog.get(name).set(thing_classes=NUCLEI_CLASSES)


register_all()
