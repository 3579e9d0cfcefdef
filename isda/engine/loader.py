"""A resumable training loader with a bad-sample policy.

- batches come from :class:`~isda.engine.sampler.ResumableBatchSampler`, so a resumed run starts
  at the batch an uninterrupted run would have drawn next (:meth:`ResumableTrainLoader.set_start`);
- each sample is mapped under its own seed (from ``SEED``, rank and its stream position): data
  augmentation replays exactly, with or without loader workers, and does not touch the
  training process' random state;
- ``INPUT.BAD_SAMPLE_POLICY``: ``"raise"`` lets the mapper's :class:`BadSampleError` (which names
  the file and annotation) stop training; ``"skip"`` logs it, counts it and uses the next record
  of the dataset instead (a deterministic choice, so resumes stay exact).
"""
import contextlib
import logging
import random
from typing import List

import numpy as np
import torch
from detectron2.data import DatasetFromList
from detectron2.data.build import worker_init_reset_seed
from detectron2.utils import comm
from torch.utils.data import DataLoader, Dataset

from isda.data.catalog import dataset_dicts
from isda.data.dataset_mapper import BadSampleError

from .sampler import ResumableBatchSampler

__all__ = ["RobustMapDataset", "ResumableTrainLoader", "build_resumable_train_loader",
           "BAD_SAMPLE_POLICIES"]

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES = ("raise", "skip")


@contextlib.contextmanager
def seeded_rng(seed: int):
    """Seed python ``random``, numpy and torch (CPU) for the block, then restore their states."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class RobustMapDataset(Dataset):
    """``dataset[(position, index)] -> (mapped dict, [messages of the skipped records])``."""

    def __init__(self, records, mapper, *, seed: int, rank: int = 0, policy: str = "raise"):
        if policy not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"INPUT.BAD_SAMPLE_POLICY must be one of {BAD_SAMPLE_POLICIES}, "
                             f"got {policy!r}")
        self.records = records
        self.mapper = mapper
        self.seed, self.rank, self.policy = int(seed), int(rank), policy

    def __len__(self):
        return len(self.records)

    def _sample_seed(self, position: int, attempt: int) -> int:
        seq = np.random.SeedSequence([self.seed, self.rank, position, attempt])
        return int(seq.generate_state(1)[0])

    def __getitem__(self, key):
        position, index = key
        skipped: List[str] = []
        for attempt in range(len(self.records)):
            cur = (index + attempt) % len(self.records)
            try:
                with seeded_rng(self._sample_seed(position, attempt)):
                    return self.mapper(self.records[cur]), skipped
            except BadSampleError as e:
                if self.policy == "raise":
                    raise
                logger.warning("Skipping bad sample (INPUT.BAD_SAMPLE_POLICY=skip): %s", e)
                skipped.append(str(e))
        raise BadSampleError(f"all {len(self.records)} training records are bad; last: "
                             f"{skipped[-1] if skipped else '?'}")


def _collate(batch):
    return batch  # a list of (dict, skipped) pairs; split in the main process


class ResumableTrainLoader:
    """Iterable of training batches (lists of dicts) that can start at any batch and counts the
    bad samples it skipped (``num_bad_samples``, this rank only)."""

    def __init__(self, dataset: RobustMapDataset, batch_sampler: ResumableBatchSampler,
                 num_workers: int = 0):
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.num_workers = num_workers
        self.num_bad_samples = 0

    def set_start(self, start_batch: int) -> None:
        """Skip ``start_batch`` batches; call before the first batch is drawn."""
        self.batch_sampler.start = int(start_batch)

    def __iter__(self):
        # a generator: nothing is read (and no worker starts) before the first ``next``, so
        # ``set_start`` after the trainer's eager ``iter(loader)`` still takes effect
        # a private generator: creating the iterator must not draw from the global torch RNG
        # (a resumed run creates it at another point of the random stream)
        generator = torch.Generator()
        generator.manual_seed(self.dataset.seed * 1000 + self.dataset.rank)
        loader = DataLoader(self.dataset, batch_sampler=self.batch_sampler,
                            num_workers=self.num_workers, collate_fn=_collate,
                            worker_init_fn=worker_init_reset_seed, generator=generator)
        for batch in loader:
            self.num_bad_samples += sum(len(skipped) for _, skipped in batch)
            yield [sample for sample, _ in batch]


def build_resumable_train_loader(cfg, mapper) -> ResumableTrainLoader:
    """Detectron2's ``build_detection_train_loader(cfg, mapper)`` with exact resume and
    ``INPUT.BAD_SAMPLE_POLICY``; only ``DATALOADER.SAMPLER_TRAIN = "TrainingSampler"``."""
    if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
        raise NotImplementedError(
            f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN}: ISDA's resumable loader "
            "supports TrainingSampler only")
    dicts = dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
    world_size = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is not divisible by "
                         f"the number of processes ({world_size})")
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    group_ids = None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        group_ids = [0 if d.get("width", 1) > d.get("height", 0) else 1 for d in dicts]
    sampler = ResumableBatchSampler(len(dicts), cfg.SOLVER.IMS_PER_BATCH // world_size,
                                    seed=seed, group_ids=group_ids)
    dataset = RobustMapDataset(DatasetFromList(dicts, copy=False), mapper, seed=seed,
                               rank=comm.get_rank(), policy=cfg.INPUT.BAD_SAMPLE_POLICY)
    return ResumableTrainLoader(dataset, sampler, cfg.DATALOADER.NUM_WORKERS)
