"""Dataset records with errors that name the dataset and its file.

Detectron2 loads a registered dataset lazily, the first time a loader asks for it; a JSON file
that is not JSON or lacks a required field then fails deep inside ``load_coco_json`` with a bare
``JSONDecodeError`` or ``KeyError: 'height'``. :func:`dataset_dicts` is Detectron2's
``get_detection_dataset_dicts`` whose load errors name the dataset, its annotation file and,
for COCO-format files, the first image or annotation that lacks what Detectron2 needs.
"""
import json
import os
from typing import List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

__all__ = ["DatasetLoadError", "dataset_dicts", "coco_json_problem"]

#: Fields ``load_coco_json`` reads from every image / annotation of an instances file.
IMAGE_FIELDS = ("id", "file_name", "height", "width")
ANNOTATION_FIELDS = ("image_id", "category_id")
#: What a failing dataset loader may raise for bad content (anything else propagates as is).
LOAD_ERRORS = (ValueError, KeyError, TypeError, IndexError, AssertionError, OSError)


class DatasetLoadError(RuntimeError):
    """A registered dataset cannot be loaded; the message names the dataset and its file."""


def _describe(index: int, item) -> str:
    ident = item.get("id") if isinstance(item, dict) else None
    return f"#{index}" + (f" (id {ident})" if ident is not None else "")


def coco_json_problem(json_file: str) -> Optional[str]:
    """The first reason ``json_file`` is not a usable COCO instances file, or None."""
    try:
        with open(json_file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        return f"cannot read it ({type(e).__name__}: {e})"
    except UnicodeDecodeError as e:
        return f"it is not UTF-8 text ({e})"
    except json.JSONDecodeError as e:
        return f"it is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
    if not isinstance(data, dict):
        return f"its top level is a JSON {type(data).__name__}, not an object"
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            return f"it has no '{key}' list"
    for i, img in enumerate(data["images"]):
        missing = [k for k in IMAGE_FIELDS if not isinstance(img, dict) or k not in img]
        if missing:
            return f"image {_describe(i, img)} lacks {', '.join(repr(k) for k in missing)}"
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ANNOTATION_FIELDS if not isinstance(ann, dict) or k not in ann]
        if missing:
            return f"annotation {_describe(i, ann)} lacks {', '.join(repr(k) for k in missing)}"
        if ann["image_id"] not in image_ids:
            return f"annotation {_describe(i, ann)} refers to image_id {ann['image_id']!r}, " \
                   "which is not in 'images'"
    return None


def dataset_dicts(names: Sequence[str], filter_empty: bool = True) -> List[dict]:
    """Detectron2's ``get_detection_dataset_dicts(names, filter_empty)``; a dataset whose
    loading fails raises :class:`DatasetLoadError` naming the dataset, its file and the cause."""
    names = [names] if isinstance(names, str) else list(names)
    try:
        return get_detection_dataset_dicts(names, filter_empty=filter_empty)
    except LOAD_ERRORS as e:
        failing, error = names[0], e
        if len(names) > 1:  # which one? (only on this error path: each is loaded again)
            for name in names:
                try:
                    DatasetCatalog.get(name)
                except LOAD_ERRORS as e_name:
                    failing, error = name, e_name
                    break
        raise DatasetLoadError(_explain(failing, error)) from e


def _explain(name: str, error: BaseException) -> str:
    meta = MetadataCatalog.get(name)
    json_file = meta.get("json_file", None)
    where = f"dataset '{name}'" + (f" ({json_file})" if json_file else "")
    cause = f"{type(error).__name__}: {error}"
    if json_file and os.path.isfile(json_file) and json_file.endswith(".json"):
        problem = coco_json_problem(json_file)
        if problem:
            return f"{where}: {problem} [{cause}]"
    return f"{where} cannot be loaded: {cause}"
