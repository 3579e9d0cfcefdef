"""Dataset records with errors that name the dataset and its file.

Detectron2 loads a registered dataset lazily, the first time a loader asks for it; a JSON file
that is not JSON or lacks a required field then fails deep inside ``load_coco_json`` with a bare
``JSONDecodeError`` or ``KeyError: 'height'``. :func:`dataset_dicts` is Detectron2's
``get_detection_dataset_dicts`` whose load errors name the dataset, its annotation file and,
for COCO-format files, the first image or annotation that lacks what Detectron2 needs.
"""
import collections
import json
import logging
import os
from typing import List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

__all__ = ["DatasetLoadError", "dataset_dicts", "coco_json_problem", "register_coco_instances",
           "load_coco_instances", "check_coco_ids"]

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
    return _coco_data_problem(data)


def _coco_data_problem(data) -> Optional[str]:
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


logger = logging.getLogger(__name__)


def check_coco_ids(json_file: str, data: dict) -> None:
    """Duplicate image ids are an error (pycocotools keeps one of them silently: the other
    image's annotations then land on it); duplicate annotation ids too (evaluation matches by
    id). An empty ``annotations`` list is warned about (every image would train as
    background). Errors and warnings name the file and the ids."""
    problems = []
    for key in ("images", "annotations"):
        counts = collections.Counter(x.get("id") for x in data.get(key) or []
                                     if isinstance(x, dict))
        dup = sorted((i for i, n in counts.items() if n > 1), key=str)
        if dup:
            shown = ", ".join(map(str, dup[:10])) + (f" and {len(dup) - 10} more"
                                                     if len(dup) > 10 else "")
            problems.append(f"{len(dup)} duplicate {key[:-1]} id(s): {shown}")
    if problems:
        raise DatasetLoadError(f"{json_file}: " + "; ".join(problems) + " (ids must be unique)")
    if isinstance(data.get("annotations"), list) and not data["annotations"]:
        logger.warning("%s: the 'annotations' list is empty (%d images): training on it "
                       "learns background only and evaluation has nothing to match",
                       json_file, len(data.get("images") or []))
    elif isinstance(data.get("annotations"), list):
        annotated = {a.get("image_id") for a in data["annotations"] if isinstance(a, dict)}
        empty = [img.get("id") for img in data.get("images") or []
                 if isinstance(img, dict) and img.get("id") not in annotated]
        if empty and len(empty) == len(data.get("images") or []):
            logger.warning("%s: no image has an annotation (image ids %s)", json_file,
                           ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else ""))


def load_coco_instances(json_file: str, image_root: str, name: Optional[str] = None):
    """Detectron2's ``load_coco_json`` keeping each annotation's COCO ``id`` (key ``"id"``,
    which error messages show as ``annotation #i (id N)``), after checking the file's ids
    (:func:`check_coco_ids`)."""
    from detectron2.data.datasets.coco import load_coco_json

    where = f"dataset '{name}' ({json_file})" if name else json_file
    try:
        with open(json_file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    problem = coco_json_problem(json_file) if data is None else _coco_data_problem(data)
    if problem:
        raise DatasetLoadError(f"{where}: {problem}")
    check_coco_ids(json_file, data)
    del data
    return load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])


def register_coco_instances(name: str, metadata: dict, json_file: str, image_root: str):
    """Detectron2's ``register_coco_instances`` (same arguments and metadata), loading with
    :func:`load_coco_instances`: COCO annotation ids kept in the records, duplicate ids
    refused and an empty annotation list warned about, naming the file."""
    DatasetCatalog.register(name, lambda: load_coco_instances(json_file, image_root, name))
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root,
                                  evaluator_type="coco", **metadata)
