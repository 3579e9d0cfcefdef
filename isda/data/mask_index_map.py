"""A chain of pixel-moving transforms as one index map, so masks are moved in a single gather.

Flips, the transpose, crops and Detectron2's nearest-neighbour mask resize
(``ResizeTransform.apply_segmentation``, done with PIL) only *select* source pixels: the output
mask of such a chain is ``M = S[rows][:, cols]`` (or its transpose) for a source mask ``S``
(H, W). :func:`mask_index_map` composes the chain into ``(rows, cols, transposed)``;
:func:`gather_masks` applies it to a stack of masks (N, H, W) in one numpy indexing call, so
the cost is that of the output (K, H_out, W_out), not N full-size masks.

The nearest-neighbour source indices are taken from PIL itself (a resize of an index image), so
they are exactly those PIL picks for every mask.
"""
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple

import numpy as np
from PIL import Image
from detectron2.data import transforms as T

from .transforms import TransposeTransform


class IndexMap(NamedTuple):
    """Output mask ``M = S[rows][:, cols]`` (``transposed``: ``M = S[rows][:, cols].T``)."""

    rows: np.ndarray  # (n_r,) int64 source row indices
    cols: np.ndarray  # (n_c,) int64 source column indices
    transposed: bool

    @property
    def shape(self) -> Tuple[int, int]:
        n_r, n_c = len(self.rows), len(self.cols)
        return (n_c, n_r) if self.transposed else (n_r, n_c)


@lru_cache(maxsize=512)
def pil_nearest_indices(size: int, new_size: int, axis: int) -> np.ndarray:
    """Source index of each of the ``new_size`` outputs of PIL's NEAREST resize of ``size``
    pixels along ``axis`` (0: rows, 1: columns), read off the resize of an int32 index image.
    -> (new_size,) int64"""
    index = np.arange(size, dtype=np.int32)
    if axis == 0:
        out = Image.fromarray(index[:, None]).resize((1, new_size), Image.NEAREST)
        result = np.asarray(out)[:, 0]
    else:
        out = Image.fromarray(index[None, :]).resize((new_size, 1), Image.NEAREST)
        result = np.asarray(out)[0]
    result = result.astype(np.int64)
    result.setflags(write=False)
    return result


def mask_index_map(transforms, source_hw: Tuple[int, int]) -> Optional[IndexMap]:
    """Compose a ``TransformList`` (or list of transforms) applied to (H, W) masks into an
    :class:`IndexMap`; ``None`` if a transform is not a pure pixel selection known here (the
    caller then applies the transforms themselves)."""
    tfms = transforms.transforms if isinstance(transforms, T.TransformList) else list(transforms)
    rows, cols = np.arange(source_hw[0]), np.arange(source_hw[1])
    transposed = False
    for t in tfms:
        kind = type(t)
        if kind is T.NoOpTransform:
            continue
        if kind is T.HFlipTransform or kind is T.VFlipTransform:
            flip_cols = (kind is T.HFlipTransform) != transposed
            if flip_cols:
                cols = cols[::-1]
            else:
                rows = rows[::-1]
        elif kind is TransposeTransform:
            transposed = not transposed
        elif kind is T.CropTransform:
            ys, xs = slice(t.y0, t.y0 + t.h), slice(t.x0, t.x0 + t.w)
            rows, cols = (rows[ys], cols[xs]) if not transposed else (rows[xs], cols[ys])
        elif kind is T.ResizeTransform:
            if IndexMap(rows, cols, transposed).shape != (t.h, t.w):
                return None  # the transform's own size check will fail: let it say so
            ry = pil_nearest_indices(t.h, t.new_h, 0)
            rx = pil_nearest_indices(t.w, t.new_w, 1)
            rows, cols = (rows[ry], cols[rx]) if not transposed else (rows[rx], cols[ry])
        else:
            return None
    return IndexMap(np.ascontiguousarray(rows), np.ascontiguousarray(cols), transposed)


def gather_masks(stack: np.ndarray, index: np.ndarray, imap: IndexMap) -> np.ndarray:
    """``stack`` (N, H, W), ``index`` (K,) instances to keep -> (K, H_out, W_out), contiguous.
    Instances and rows are taken together from the window the map reads, then the columns
    (much faster than one three-array fancy index)."""
    rows, cols = imap.rows, imap.cols
    if len(index) == 0 or len(rows) == 0 or len(cols) == 0:
        return np.zeros((len(index), *imap.shape), stack.dtype)
    r0, c0 = int(rows.min()), int(cols.min())
    window = stack[:, r0:int(rows.max()) + 1, c0:int(cols.max()) + 1]
    out = window[index[:, None], (rows - r0)[None, :]].take(cols - c0, axis=2)
    return np.ascontiguousarray(out.transpose(0, 2, 1)) if imap.transposed else out


def touched_instances(boxes_xywh: np.ndarray, imap: IndexMap, source_hw) -> np.ndarray:
    """Indices of the instances whose source bounding box (N, 4: x, y, w, h as pycocotools'
    ``toBbox``) contains at least one selected source row and one selected column: the only
    ones whose mask can survive the chain. (K,) int64"""
    if len(boxes_xywh) == 0:
        return np.zeros(0, np.int64)
    hit_rows = np.zeros(source_hw[0] + 1, np.int64)
    hit_rows[imap.rows + 1] = 1
    hit_cols = np.zeros(source_hw[1] + 1, np.int64)
    hit_cols[imap.cols + 1] = 1
    rows_before, cols_before = np.cumsum(hit_rows), np.cumsum(hit_cols)  # selected in [0, i)
    b = np.asarray(boxes_xywh, dtype=np.float64)
    x0 = np.clip(np.floor(b[:, 0]).astype(np.int64), 0, source_hw[1])
    y0 = np.clip(np.floor(b[:, 1]).astype(np.int64), 0, source_hw[0])
    x1 = np.clip(np.ceil(b[:, 0] + b[:, 2]).astype(np.int64), 0, source_hw[1])
    y1 = np.clip(np.ceil(b[:, 1] + b[:, 3]).astype(np.int64), 0, source_hw[0])
    keep = ((rows_before[y1] - rows_before[y0]) > 0) & ((cols_before[x1] - cols_before[x0]) > 0)
    return np.nonzero(keep)[0]
