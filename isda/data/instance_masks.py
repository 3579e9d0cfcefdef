"""Transformed instance masks at the output size, at a cost that follows the output.

:func:`transformed_masks` gives, for a record's annotations and the ``TransformList`` applied
to its image, each instance's mask (K, H_out, W_out) as Detectron2's per-instance route
(``transform_instance_annotations`` then ``polygons_to_bitmask``) would, pixel for pixel:

* COCO RLE: all of an image's RLEs are decoded with one pycocotools call into a stack
  (N, H, W), kept in a :class:`~isda.data.mask_cache.MaskCache`; the flips / transpose / crop /
  nearest resize are composed into one index map (:mod:`isda.data.mask_index_map`); only the
  instances whose box meets the selected pixels are gathered, in one indexing call.
* Polygons: the coordinate transforms run once on all points; the crop (fvcore's, with shapely)
  only sees the parts whose bounding box overlaps the crop window; all polygons are rasterised
  at the output size with one pycocotools call.

Transforms other than those (a custom augmentation) fall back to running them on each
decoded mask, as Detectron2 does.
"""
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import transforms as T
from pycocotools import mask as mask_util

from .mask_cache import MaskCache
from .mask_index_map import gather_masks, mask_index_map, touched_instances
from .transforms import TransposeTransform

#: Transforms whose ``apply_polygons`` moves each point on its own (``apply_coords`` row-wise):
#: one call on all points of all polygons gives each polygon's result.
_POINTWISE = (T.HFlipTransform, T.VFlipTransform, T.ResizeTransform, TransposeTransform)


def _flat_transforms(transforms) -> list:
    return list(transforms.transforms if isinstance(transforms, T.TransformList) else transforms)


def _each(fn: Callable, items: Sequence, on_error: Callable):
    """``[fn(x) for x in items]``, handing ``on_error(i, exc)`` the first item that raises."""
    out = []
    for i, x in enumerate(items):
        try:
            out.append(fn(x))
        except Exception as e:  # noqa: BLE001 - on_error re-raises (named) or lets it through
            on_error(i, e)
            raise
    return out


def _pointwise_on_all(t, parts: List[np.ndarray]) -> List[np.ndarray]:
    """``t.apply_coords`` on every (n_i, 2) array of ``parts`` with one call per dtype (the
    transform works in place and keeps the dtype, as it does on each part)."""
    out: List[np.ndarray] = [None] * len(parts)
    groups: Dict[np.dtype, List[int]] = {}
    for i, p in enumerate(parts):
        groups.setdefault(p.dtype, []).append(i)
    for idx in groups.values():
        moved = t.apply_coords(np.concatenate([parts[i] for i in idx]))
        for i, piece in zip(idx, np.split(moved, np.cumsum([len(parts[i]) for i in idx])[:-1])):
            out[i] = piece
    return out


def _crop_overlaps(crop, parts: List[np.ndarray]) -> List[bool]:
    """Whether each part's bounding box overlaps the crop window with a positive area (the
    others cannot leave a polygon in fvcore's crop)."""
    x0, y0, x1, y1 = crop.x0, crop.y0, crop.x0 + crop.w, crop.y0 + crop.h
    keep = []
    for p in parts:
        lo, hi = p.min(axis=0), p.max(axis=0)
        keep.append(bool(hi[0] > x0 and lo[0] < x1 and hi[1] > y0 and lo[1] < y1))
    return keep


def transform_polygons(polygons: List[List[np.ndarray]], transforms,
                       on_error: Callable) -> List[List[np.ndarray]]:
    """Per instance, its polygon parts ((n, 2) arrays) through ``transforms`` -> its parts after
    them (a crop may split or drop parts). ``on_error(k, exc)`` names instance k on failure."""
    for t in _flat_transforms(transforms):
        kind = type(t)
        if kind is T.NoOpTransform:
            continue
        if kind in _POINTWISE:
            sizes = [len(parts) for parts in polygons]
            flat = [p for parts in polygons for p in parts]
            if not flat:
                continue
            try:
                moved = _pointwise_on_all(t, flat)
            except Exception:  # name the instance: redo it instance by instance
                _each(lambda parts: _pointwise_on_all(t, [p.copy() for p in parts]),
                      polygons, on_error)
                raise
            ends = np.cumsum(sizes)
            polygons = [moved[e - n:e] for n, e in zip(sizes, ends)]
        elif kind is T.CropTransform:
            def crop(parts):
                kept = [p for p, ok in zip(parts, _crop_overlaps(t, parts)) if ok]
                return t.apply_polygons(kept) if kept else []
            polygons = _each(crop, polygons, on_error)
        else:
            polygons = _each(t.apply_polygons, polygons, on_error)
    return polygons


def rasterise_polygons(polygons: List[List[np.ndarray]], hw) -> np.ndarray:
    """Per instance, flat polygon parts (each at least 3 points) -> masks (K, H, W) bool, with
    one pycocotools rasterisation and one decode (as ``polygons_to_bitmask`` on each)."""
    h, w = hw
    if not polygons:
        return np.zeros((0, h, w), bool)
    flat = [p for parts in polygons for p in parts]
    rles = mask_util.frPyObjects(flat, h, w)
    merged, start = [], 0
    for parts in polygons:
        merged.append(mask_util.merge(rles[start:start + len(parts)]))
        start += len(parts)
    return mask_util.decode(merged).transpose(2, 0, 1).astype(bool, order="C")


def _decode_stack(rles: List[dict]) -> np.ndarray:
    """COCO RLEs of one size -> (N, H, W) bool, one pycocotools call."""
    return mask_util.decode(list(rles)).transpose(2, 0, 1).astype(bool, order="C")


def transform_rles(rles: List[dict], transforms, source_hw, out_hw, cache: MaskCache,
                   cache_key: Optional[Hashable]) -> Tuple[np.ndarray, np.ndarray]:
    """RLEs of the source image (all of size ``source_hw``) -> ``(index (K,), masks (K, H_out,
    W_out) bool)``: the masks of ``rles[index]`` after ``transforms``, as decoding each and
    ``transforms.apply_segmentation`` on it gives; the instances left out are empty there (some
    in ``index`` may be empty too). ``cache_key`` None: no caching."""
    n = len(rles)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, *out_hw), bool)
    imap = mask_index_map(transforms, source_hw)
    if imap is None:  # a transform not known to be a pixel selection: run it on each mask
        masks = np.zeros((n, *out_hw), bool)
        for k, rle in enumerate(rles):
            m = transforms.apply_segmentation(mask_util.decode(rle))
            if tuple(m.shape[:2]) != tuple(out_hw):
                raise ValueError(f"mask shape {m.shape} after the transforms != image "
                                 f"shape {tuple(out_hw)}")
            masks[k] = m
        return np.arange(n), masks
    if imap.shape != tuple(out_hw):
        raise ValueError(f"mask shape {imap.shape} after the transforms != image shape "
                         f"{tuple(out_hw)}")
    use_cache = cache_key is not None and cache.limit_bytes > 0
    entry = cache.get(cache_key) if use_cache else None
    if entry is None:
        boxes = mask_util.toBbox(list(rles))
        if use_cache and cache.limit_bytes >= n * source_hw[0] * source_hw[1]:
            entry = (_decode_stack(rles), boxes)
            cache.put(cache_key, *entry)
    if entry is not None:
        stack, boxes = entry
        touched = touched_instances(boxes, imap, source_hw)
        return touched, gather_masks(stack, touched, imap)
    touched = touched_instances(boxes, imap, source_hw)
    if len(touched) == 0:
        return touched, np.zeros((0, *out_hw), bool)
    stack = _decode_stack([rles[k] for k in touched])  # not cached: only what reaches the output
    return touched, gather_masks(stack, np.arange(len(touched)), imap)
