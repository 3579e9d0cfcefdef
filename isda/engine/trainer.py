"""ISDA's trainer: Detectron2's ``DefaultTrainer`` where ISDA differs.

The ISDA dataset mapper with an exactly resumable loader and a bad-sample policy, COCO instance
evaluation (the C++ implementation where Detectron2 is compiled), AdamW with lr multipliers and
full-model gradient clipping, a checkpointer that loads safely and saves atomically, random
states and bad-sample counts in checkpoints, per-iteration losses (``losses.jsonl``) and strict
JSON metrics, a fallback to the newest loadable checkpoint when the last one is corrupt or
missing, and DistributedDataParallel on the CPU too (gloo). ``train_net.py`` is its command
line; import it as ``from isda.engine import Trainer``.

Detectron2 compatibility: ``__init__`` follows ``DefaultTrainer.__init__`` (identical in v0.6 and
the current main) with the CPU difference that ``create_ddp_model`` must get
``device_ids=None`` there; the optimizer state is stored under ``"_trainer"`` on both versions.
"""
import logging
import os
import warnings
import weakref

from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, create_ddp_model
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

from ..checkpoint import (CheckpointNotFoundError, CorruptCheckpointError, ISDACheckpointer,
                          atomic_write_text, clean_stale_temp_files)
from ..data.catalog import dataset_dicts
from ..data.dataset_mapper import ISDADatasetMapper
from ..solver import build_isda_lr_scheduler, build_isda_optimizer
from ..utils.env import detectron2_has_compiled_ops
from .hooks import BadSampleCounter, LossLogger, RNGStateHook, StrictJSONWriter, dumps_strict
from .loader import build_resumable_train_loader
from .output_dir import EarlierRunError, earlier_run_message, earlier_run_records

__all__ = ["Trainer", "save_results"]

class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with ISDA's data, evaluation, optimiser and checkpointer."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ (v0.6), except: DDP also on the CPU (no device_ids there),
        # ISDA's checkpointer, and the reliability hooks.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        # what an earlier run left here, seen before this one creates any file (checked by
        # resume_or_load(resume=False): setup() normally deals with it first)
        self._earlier_run = earlier_run_records(cfg.OUTPUT_DIR) if comm.is_main_process() else []
        self._metrics_writer = None
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = {} if cfg.MODEL.DEVICE.startswith("cuda") else {"device_ids": None}
        with warnings.catch_warnings():
            # torch 2.14 deprecates broadcast_buffers and advises keeping False until its
            # replacement exists: a warning no user can act on
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated")
            model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # training loads partially (ImageNet backbone, converted Deformable DETR): allow_partial
        self.checkpointer = ISDACheckpointer(model, cfg.OUTPUT_DIR, allow_partial=True,
                                         trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        period = self.cfg.SOLVER.CHECKPOINT_PERIOD
        # the random-state snapshot and the bad-sample count of an iteration must be taken
        # before the checkpointer saves them (Detectron2's hooks run in list order)
        ret = [RNGStateHook(period)]
        loader = self._trainer.data_loader
        counter = None
        if hasattr(loader, "num_bad_samples"):
            counter = BadSampleCounter(loader, period, report_at_end=False)
            ret.append(counter)
        ret += super().build_hooks()
        ret.append(LossLogger(self.cfg.OUTPUT_DIR))
        if counter is not None:
            ret.append(counter.report_hook())  # the total: the last line of the training log
        return ret

    def build_writers(self):
        """Detectron2's default writers, with ``metrics.json`` written as strict JSON."""
        PathManager.mkdirs(self.cfg.OUTPUT_DIR)
        self._metrics_writer = StrictJSONWriter(os.path.join(self.cfg.OUTPUT_DIR, "metrics.json"))
        return [CommonMetricPrinter(self.max_iter), self._metrics_writer,
                TensorboardXWriter(self.cfg.OUTPUT_DIR)]

    def run_step(self):
        """Detectron2's step, then the gradients are freed (``set_to_none``): Detectron2 frees
        them only after the next forward pass, so they would sit beside that pass's activations
        (168 MB for ISDA-R50; its peak training memory, docs/benchmarks.md). Hooks therefore see
        no ``.grad`` after the step. A ``FloatingPointError`` of the model (non-finite outputs)
        is raised again with the iteration (Detectron2's own loss check already names it)."""
        try:
            super().run_step()
        except FloatingPointError as e:
            if "iteration=" in str(e):
                raise
            raise FloatingPointError(f"at iteration={self.iter}: {e}") from e
        self._trainer.optimizer.zero_grad(set_to_none=True)

    def state_dict(self):
        # v0.6's DefaultTrainer does not save its SimpleTrainer's state (the optimizer); later
        # Detectron2 versions store it under "_trainer", as done here on both
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        # TrainerBase's part (iteration, hooks) directly: DefaultTrainer's own version after
        # v0.6 requires "_trainer", which checkpoints of older ISDA versions do not hold
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger("isda").warning(
                "The checkpoint holds no optimizer state (written by an older train_net.py): "
                "the optimizer restarts from scratch")

    def resume_or_load(self, resume=True):
        """Detectron2's ``resume_or_load``; then the loader skips the batches already trained
        on. A last checkpoint that is corrupt, non-finite or missing is reported and the newest
        loadable earlier one is used. Without ``resume``, an OUTPUT_DIR holding an earlier run
        is refused (``EarlierRunError``). Replayed iterations are dropped from metrics.json."""
        if comm.is_main_process():
            clean_stale_temp_files(self.cfg.OUTPUT_DIR)
        if not resume and self._earlier_run:
            raise EarlierRunError(earlier_run_message(
                self.cfg.OUTPUT_DIR, self._earlier_run, "training was not started (start through "
                "train_net.setup() to apply OUTPUT_DIR_EXISTING)"))
        try:
            super().resume_or_load(resume=resume)
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            if not (resume and self.checkpointer.has_checkpoint()):
                raise
            self._resume_from_previous(e)
        loader = self._trainer.data_loader
        if hasattr(loader, "set_start"):
            loader.set_start(self.start_iter)
        if self._metrics_writer is not None:
            dropped = self._metrics_writer.drop_from(self.start_iter)
            if dropped:
                logging.getLogger("isda").info(
                    "metrics.json: dropped %d line(s) of iterations >= %d (replayed now)",
                    dropped, self.start_iter)

    def _resume_from_previous(self, error):
        log = logging.getLogger("isda")
        bad = os.path.abspath(self.checkpointer.get_checkpoint_file())
        folder = os.path.dirname(bad)
        missing = isinstance(error, CheckpointNotFoundError)
        if missing:
            error = (f"last_checkpoint in '{folder}' names '{os.path.basename(bad)}', which does "
                     "not exist (deleted or moved)")
        candidates = sorted((os.path.join(folder, f) for f in os.listdir(folder)
                             if f.endswith(".pth") and os.path.join(folder, f) != bad),
                            key=os.path.getmtime, reverse=True)
        for path in candidates:
            try:
                self.checkpointer.load(path)
            except (CorruptCheckpointError, CheckpointNotFoundError) as e2:
                log.warning("%s", e2)
                continue
            log.warning("%s\nResuming from the previous good checkpoint '%s' instead (%s).",
                        error, path, "last_checkpoint is left as it is" if missing
                        else "the corrupt file is left in place")
            self.start_iter = self.iter + 1
            return
        cls = CheckpointNotFoundError if missing else CorruptCheckpointError
        raise cls(f"{error}\nNo earlier loadable checkpoint in '{folder}': "
                  + ("remove last_checkpoint" if missing else "remove the file")
                  + " to start from MODEL.WEIGHTS") from None

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type not in ("coco", "coco_panoptic_seg", "lvis"):
            raise NotImplementedError(f"no evaluator for {dataset_name} (type {evaluator_type})")
        # the C++ fast evaluation only when this Detectron2 was compiled; identical numbers
        return COCOEvaluator(dataset_name, tasks=("segm",), distributed=True,
                             output_dir=output_folder,
                             use_fast_impl=detectron2_has_compiled_ops())

    @classmethod
    def build_train_loader(cls, cfg):
        return build_resumable_train_loader(cfg, ISDADatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # the records through dataset_dicts: a dataset that fails to load is named with its file
        return build_detection_test_loader(dataset_dicts([dataset_name], filter_empty=False),
                                           mapper=ISDADatasetMapper(cfg, is_train=False),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_isda_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # warm-up and steps may be fractions of SOLVER.MAX_ITER (SOLVER.WARMUP_FRACTION,
        # SOLVER.STEP_FRACTIONS)
        return build_isda_lr_scheduler(cfg, optimizer)


def save_results(cfg, results) -> str:
    """Write the evaluation results as strict JSON (``null`` for an undefined metric, e.g. NaN
    for a category without ground truth): ``OUTPUT_DIR/inference/results.json``."""
    path = os.path.join(cfg.OUTPUT_DIR, "inference", "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(dumps_strict({"datasets": list(cfg.DATASETS.TEST),
                                    "weights": cfg.MODEL.WEIGHTS, "results": results},
                                   indent=2) + "\n", path)
    return path
