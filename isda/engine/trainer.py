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

from ..checkpoint import (MODEL_ONLY_KEY, CheckpointError, CheckpointNotFoundError,
                          CorruptCheckpointError, ISDACheckpointer, atomic_write_text,
                          clean_stale_temp_files)
from ..data.catalog import dataset_dicts
from ..data.dataset_mapper import ISDADatasetMapper
from ..solver import build_isda_lr_scheduler, build_isda_optimizer
from ..utils.env import detectron2_has_compiled_ops
from .hooks import BadSampleCounter, LossLogger, RNGStateHook, StrictJSONWriter, dumps_strict
from .loader import build_resumable_train_loader
from .output_dir import (EarlierRunError, earlier_run_message, earlier_run_records,
                         lock_output_dir)

__all__ = ["Trainer", "save_results", "check_solver_config"]

class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with ISDA's data, evaluation, optimiser and checkpointer."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ (v0.6), except: DDP also on the CPU (no device_ids there),
        # ISDA's checkpointer, and the reliability hooks.
        TrainerBase.__init__(self)
        check_solver_config(cfg)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        if comm.is_main_process():  # one training run per OUTPUT_DIR at a time
            lock_output_dir(cfg.OUTPUT_DIR)
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
            note = self._resumed_weights_note()
            if "iteration=" in str(e) and not note:
                raise
            where = "" if "iteration=" in str(e) else f"at iteration={self.iter}: "
            raise FloatingPointError(f"{where}{e}{note}") from e
        self._trainer.optimizer.zero_grad(set_to_none=True)

    def _resumed_weights_note(self) -> str:
        """On the first iteration after a resume, a non-finite loss comes from the checkpoint
        itself (e.g. weights blown up by a huge learning rate before it was saved): every
        resume from it fails the same way, so the error says so."""
        path = getattr(self, "_resumed_from", None)
        if not path or self.iter != self.start_iter:
            return ""
        return (f"\nThis is the first iteration after resuming from '{path}': the weights or "
                "optimizer state in that checkpoint give non-finite values, so every --resume "
                "from it will fail the same way. Resume from an earlier model_XXXXXXX.pth "
                "(write its name into last_checkpoint), or start afresh (another OUTPUT_DIR, "
                "or OUTPUT_DIR_EXISTING move) with a lower SOLVER.BASE_LR")

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
        resuming = resume and self.checkpointer.has_checkpoint()
        # a resume continues the same model: a parameter of another shape (e.g. another
        # MODEL.ISDA.NUM_CLASSES) is refused here, before the optimizer state fails to load
        self.checkpointer.refuse_mis_shaped = resuming
        try:
            # DefaultTrainer.resume_or_load (v0.6 and later), keeping what the file holds
            checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
            if resuming:
                self._continue_after(checkpoint)
        except (CorruptCheckpointError, CheckpointNotFoundError) as e:
            if not resuming:
                raise
            self._resume_from_previous(e)
        finally:
            self.checkpointer.refuse_mis_shaped = False
        # the file the resume loaded (an earlier one when the last was corrupt)
        self._resumed_from = (getattr(self.checkpointer, "_loading", None)
                              or self.checkpointer.get_checkpoint_file()) if resuming else None
        loader = self._trainer.data_loader
        if hasattr(loader, "set_start"):
            loader.set_start(self.start_iter)
        if self._metrics_writer is not None:
            dropped = self._metrics_writer.drop_from(self.start_iter)
            if dropped:
                logging.getLogger("isda").info(
                    "metrics.json: dropped %d line(s) of iterations >= %d (replayed now)",
                    dropped, self.start_iter)

    def _continue_after(self, checkpoint):
        """start_iter after loading a checkpoint on --resume. ``model_final.pth`` holds the
        model only (no optimizer, schedule or random states): a finished run stays finished;
        continuing it past its iteration is refused with what to do instead."""
        checkpoint = checkpoint or {}
        if checkpoint.get(MODEL_ONLY_KEY):
            done = int(checkpoint.get("iteration", -1))
            path = self.checkpointer.get_checkpoint_file()
            full = os.path.join(os.path.dirname(path), f"model_{done:07d}.pth")
            if done + 1 < self.max_iter and os.path.isfile(full):
                # the periodic checkpoint of the same iteration holds the optimizer state
                logging.getLogger("isda").info(
                    "--resume: '%s' holds the model only; continuing from '%s' (same iteration "
                    "%d, with the optimizer, schedule and random states)", path, full, done)
                self.checkpointer._loading = full
                self.checkpointer.load(full)
                self.start_iter = self.iter + 1
                return
            if done + 1 < self.max_iter:
                raise CheckpointError(
                    f"--resume: '{path}' holds the final weights only (iteration {done}, no "
                    "optimizer, schedule or random states), so this run cannot continue to "
                    f"SOLVER.MAX_ITER {self.max_iter}. Start a new run from these weights "
                    f"(MODEL.WEIGHTS {path}, another OUTPUT_DIR), or write the name of a "
                    "periodic checkpoint (model_XXXXXXX.pth) into last_checkpoint to resume "
                    "from it")
            self.iter = done
            logging.getLogger("isda").warning(
                "--resume: '%s' is the final checkpoint of a finished run (iteration %d, "
                "SOLVER.MAX_ITER %d): nothing left to train", path, done, self.max_iter)
        self.start_iter = self.iter + 1

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
            self.checkpointer._loading = path
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
        evaluator = COCOEvaluator(dataset_name, tasks=("segm",), distributed=True,
                                  output_dir=output_folder,
                                  use_fast_impl=detectron2_has_compiled_ops())
        check_num_classes(cfg, dataset_name)
        return evaluator

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


def check_num_classes(cfg, dataset_name) -> bool:
    """Warn when the dataset's categories and the model's classes differ in number (a 2-class
    model on a 3-category dataset: the third category can only get AP 0, or classes are
    mismatched). Returns whether they agree (True when the dataset has no class names)."""
    names = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    num = cfg.MODEL.ISDA.NUM_CLASSES
    if names is None or len(names) == num:
        return True
    logging.getLogger("isda").warning(
        "dataset '%s' has %d categories (%s) but the model predicts MODEL.ISDA.NUM_CLASSES = %d "
        "classes: categories beyond the model's get no detection (AP 0) and the metrics mean "
        "little unless the classes correspond", dataset_name, len(names),
        ", ".join(map(str, names[:8])) + (" ..." if len(names) > 8 else ""), num)
    return False


def check_solver_config(cfg):
    """Refuse a schedule that cannot train (before anything is built or written)."""
    max_iter = cfg.SOLVER.MAX_ITER
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"SOLVER.MAX_ITER must be a positive number of iterations, got "
                         f"{max_iter!r}")
    if cfg.SOLVER.IMS_PER_BATCH < 1:
        raise ValueError(f"SOLVER.IMS_PER_BATCH must be >= 1, got {cfg.SOLVER.IMS_PER_BATCH!r}")


def save_results(cfg, results) -> str:
    """Write the evaluation results as strict JSON (``null`` for an undefined metric, e.g. NaN
    for a category without ground truth): ``OUTPUT_DIR/inference/results.json``."""
    path = os.path.join(cfg.OUTPUT_DIR, "inference", "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(dumps_strict({"datasets": list(cfg.DATASETS.TEST),
                                    "weights": cfg.MODEL.WEIGHTS, "results": results},
                                   indent=2) + "\n", path)
    return path
