"""``ResumableBatchSampler``: Detectron2's infinite training stream, batched, that can start at
any batch.

The index stream is :class:`detectron2.data.samplers.TrainingSampler`'s (a seeded
``randperm`` per epoch, rank ``r`` of ``W`` takes every ``W``-th index). Batches are formed
from index metadata only (aspect-ratio grouping uses each record's width/height, like
Detectron2's ``AspectRatioGroupedDataset`` does on loaded images), so batch ``k`` is a function
of (seed, rank, world size, k) alone: a resumed run skips ``start`` batches and continues with
exactly the batches an uninterrupted run would have drawn, whatever the number of loader
workers or prefetching. Each element is ``(position, index)``: ``position`` numbers the
samples of this rank's stream and seeds the per-sample augmentation.
"""
import itertools
from typing import Iterator, List, Optional, Sequence, Tuple

from detectron2.data.samplers import TrainingSampler
from torch.utils.data import Sampler

__all__ = ["ResumableBatchSampler"]


class ResumableBatchSampler(Sampler):
    """Infinite batches of ``(position, index)`` for this rank, starting at batch ``start``."""

    def __init__(self, size: int, batch_size: int, *, seed: int, shuffle: bool = True,
                 group_ids: Optional[Sequence[int]] = None, start: int = 0):
        """
        Args:
            size: number of records; batch_size: per rank;
            seed: shuffle seed, the same on every rank;
            group_ids: per record group (e.g. 0 = landscape, 1 = portrait); batches hold one
                group only. None: no grouping.
            start: the first batch to yield (number of batches already consumed).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self._indices = TrainingSampler(size, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.group_ids = list(group_ids) if group_ids is not None else None
        self.start = int(start)

    def _batches(self) -> Iterator[List[Tuple[int, int]]]:
        stream = enumerate(iter(self._indices))
        if self.group_ids is None:
            while True:
                yield list(itertools.islice(stream, self.batch_size))
        buckets = {}
        for pos, idx in stream:
            bucket = buckets.setdefault(self.group_ids[idx], [])
            bucket.append((pos, idx))
            if len(bucket) == self.batch_size:
                yield bucket[:]
                bucket.clear()

    def __iter__(self):
        return itertools.islice(self._batches(), self.start, None)
