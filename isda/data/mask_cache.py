"""A bounded in-memory cache of an image's decoded RLE masks (one stack per image).

Decoding a COCO RLE writes a full-image mask; training visits each image many times, so the
mapper decodes an image's RLE annotations once, with one pycocotools call, and keeps the stack
(N, H, W) bool here, least recently used first out, up to ``limit_mb`` megabytes
(``INPUT.MASK_CACHE_MB``; 0 disables it). Each process has its own cache: with DataLoader
workers, each worker holds up to the limit. Entries are keyed by the file name, the image size
and the RLE strings themselves, so a record read again (Detectron2 unpickles dataset records on
each access) finds its entry, and a changed annotation never meets a stale stack.
"""
from collections import OrderedDict
from typing import Hashable, Optional, Tuple

import numpy as np


class MaskCache:
    """LRU map ``key -> (stack (N, H, W) bool, boxes (N, 4) x, y, w, h)`` bounded in bytes."""

    def __init__(self, limit_mb: float):
        if limit_mb < 0:
            raise ValueError(f"INPUT.MASK_CACHE_MB must be >= 0 (0 disables the cache), "
                             f"got {limit_mb}")
        self.limit_bytes = int(limit_mb * 2 ** 20)
        self._entries: "OrderedDict[Hashable, Tuple[np.ndarray, np.ndarray]]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: Hashable, stack: np.ndarray, boxes: np.ndarray) -> bool:
        """Keep the stack if it fits under the limit (evicting the oldest); True if kept."""
        size = stack.nbytes + boxes.nbytes
        if size > self.limit_bytes:
            return False
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old[0].nbytes + old[1].nbytes
        while self._entries and self.bytes + size > self.limit_bytes:
            _, (s, b) = self._entries.popitem(last=False)
            self.bytes -= s.nbytes + b.nbytes
        stack.setflags(write=False)
        self._entries[key] = (stack, boxes)
        self.bytes += size
        return True

    def __len__(self) -> int:
        return len(self._entries)
