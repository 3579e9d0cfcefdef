"""Reliability pieces of ISDA's training engine: CPU multi-process launch, an exactly resumable
training loader with a bad-sample policy, and hooks for random states, bad-sample counts and
per-iteration losses (see docs/reliability.md)."""
from .hooks import BadSampleCounter, LossLogger, RNGStateHook
from .launch import launch_cpu
from .loader import ResumableTrainLoader, build_resumable_train_loader
from .sampler import ResumableBatchSampler

__all__ = ["BadSampleCounter", "LossLogger", "RNGStateHook", "launch_cpu",
           "ResumableTrainLoader", "build_resumable_train_loader", "ResumableBatchSampler"]
