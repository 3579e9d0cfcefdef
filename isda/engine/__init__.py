"""ISDA's training engine: the :class:`Trainer` (Detectron2's ``DefaultTrainer`` where ISDA
differs), CPU multi-process launch, an exactly resumable training loader with a bad-sample
policy, hooks for random states, bad-sample counts and per-iteration losses, and the policy for
an ``OUTPUT_DIR`` holding an earlier run (see docs/reliability.md)."""
from .hooks import BadSampleCounter, LossLogger, RNGStateHook
from .launch import launch_cpu
from .loader import ResumableTrainLoader, build_resumable_train_loader
from .output_dir import EarlierRunError, OutputDirBusyError, lock_output_dir, prepare_output_dir
from .sampler import ResumableBatchSampler
from .trainer import Trainer, save_results

__all__ = ["Trainer", "save_results", "EarlierRunError", "OutputDirBusyError", "lock_output_dir",
           "prepare_output_dir",
           "BadSampleCounter", "LossLogger", "RNGStateHook", "launch_cpu",
           "ResumableTrainLoader", "build_resumable_train_loader", "ResumableBatchSampler"]
