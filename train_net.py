#!/usr/bin/env python
"""Train and evaluate ISDA with Detectron2.

    python train_net.py --config-file configs/coco/isda_R50_3x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file ... --resume            # continue from last_checkpoint
    python train_net.py --config-file configs/nuclei/isda_R18_nuclei.yaml MODEL.DEVICE cpu
    python train_net.py --config-file ... --num-cpu-procs 2   # 2 CPU processes (gloo)

Only what differs from Detectron2's ``DefaultTrainer`` is overridden: the ISDA dataset mapper,
COCO instance evaluation, AdamW with lr multipliers and full-model gradient clipping, a
checkpointer that loads safely and saves atomically, and for reliability (docs/reliability.md):
a training loader that resumes exactly and can skip bad samples (``INPUT.BAD_SAMPLE_POLICY``),
random states saved in checkpoints, per-iteration losses in ``OUTPUT_DIR/losses.jsonl``, a
fallback to the previous checkpoint when the last one is corrupt, and CPU multi-process
training through ``torch.distributed`` (gloo).

Records stay true (docs/reliability.md, "Checkpoints, counters and outputs"): a training run
without ``--resume`` in an ``OUTPUT_DIR`` holding an earlier run stops (``OUTPUT_DIR_EXISTING
refuse``) or moves the earlier run aside (``move``); a ``last_checkpoint`` naming a missing or
corrupt file falls back to the newest loadable earlier checkpoint; non-finite outputs stop
training with ``FloatingPointError`` naming the iteration; ``metrics.json`` and
``inference/results.json`` are strict JSON (``null`` for undefined metrics); evaluation loads
weights strictly (``MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS``).
"""
import datetime
import fnmatch
import logging
import os
import shutil
import warnings
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader
from detectron2.engine import (DefaultTrainer, SimpleTrainer, AMPTrainer, create_ddp_model,
                               default_argument_parser, default_setup, launch)
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, TensorboardXWriter
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

import isda  # noqa: F401  (registers the meta-architecture and the embedded datasets)
from isda import add_isda_config
from isda.data.dataset_mapper import ISDADatasetMapper
from isda.solver import build_isda_optimizer
from isda.utils.env import detectron2_has_compiled_ops
from isda.checkpoint import (CheckpointNotFoundError, CorruptCheckpointError,
                             ISDACheckpointer as Checkpointer, atomic_write_text,
                             clean_stale_temp_files)
from isda.engine import build_resumable_train_loader, launch_cpu
from isda.engine.hooks import (BadSampleCounter, LossLogger, RNGStateHook, StrictJSONWriter,
                               dumps_strict)

# files that show an earlier training run in OUTPUT_DIR (non-empty ones)
RUN_RECORDS = ("last_checkpoint", "losses.jsonl", "metrics.json", "model_*.pth")
# what "OUTPUT_DIR_EXISTING move" moves aside (the records and the rest of that run's outputs)
RUN_OUTPUTS = RUN_RECORDS + ("config.yaml", "log.txt", "log.txt.rank*", "events.out.tfevents.*",
                             "inference")


class EarlierRunError(FileExistsError):
    """A training run without --resume was started in an OUTPUT_DIR holding an earlier run."""


def earlier_run_records(output_dir) -> list:
    """Names of the files in ``output_dir`` that show an earlier training run (RUN_RECORDS)."""
    if not output_dir or not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (any(fnmatch.fnmatch(name, pat) for pat in RUN_RECORDS) and os.path.isfile(path)
                and os.path.getsize(path) > 0):
            found.append(name)
    return found


def _earlier_run_message(output_dir, records, how):
    shown = ", ".join(records[:8]) + (f" and {len(records) - 8} more" if len(records) > 8 else "")
    return (f"OUTPUT_DIR '{output_dir}' holds an earlier training run ({shown}). A new run "
            f"without --resume would mix with its records or overwrite them, so {how}. Use "
            "--resume to continue it, choose another OUTPUT_DIR, or set OUTPUT_DIR_EXISTING move "
            "to move the earlier run into OUTPUT_DIR/previous-<timestamp>/ and start afresh")


def prepare_output_dir(cfg, resume: bool):
    """Before a training run writes anything (main process): if ``cfg.OUTPUT_DIR`` holds an
    earlier run and ``resume`` is False, refuse (``EarlierRunError``; nothing is changed) or,
    with ``OUTPUT_DIR_EXISTING move``, move that run's files into
    ``OUTPUT_DIR/previous-<timestamp>/``; returns that message (None when nothing moved)."""
    policy = cfg.get("OUTPUT_DIR_EXISTING", "refuse")
    if policy not in ("refuse", "move"):
        raise ValueError(f"OUTPUT_DIR_EXISTING must be 'refuse' or 'move', got {policy!r}")
    out = cfg.OUTPUT_DIR
    records = earlier_run_records(out)
    if resume or not records:
        return
    if policy == "refuse":
        raise EarlierRunError(_earlier_run_message(out, records, "nothing was started or "
                                                   "changed (OUTPUT_DIR_EXISTING refuse)"))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = os.path.join(out, f"previous-{stamp}")
    n = 1
    while os.path.exists(dest):
        dest = os.path.join(out, f"previous-{stamp}-{n}")
        n += 1
    os.makedirs(dest)
    moved = []
    for name in sorted(os.listdir(out)):
        if any(fnmatch.fnmatch(name, pat) for pat in RUN_OUTPUTS):
            shutil.move(os.path.join(out, name), os.path.join(dest, name))
            moved.append(name)
    # the logger is not set up yet: say it on stderr and again in the log (see setup)
    msg = (f"OUTPUT_DIR '{out}' held an earlier training run: moved {len(moved)} files "
           f"({', '.join(moved[:8])}{' ...' if len(moved) > 8 else ''}) into '{dest}' "
           "(OUTPUT_DIR_EXISTING move); this run starts afresh")
    print(msg, flush=True)
    return msg


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
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # training loads partially (ImageNet backbone, converted Deformable DETR): allow_partial
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, allow_partial=True,
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
        """Detectron2's step; a ``FloatingPointError`` of the model (non-finite outputs) is
        raised again with the iteration (Detectron2's own loss check already names it)."""
        try:
            super().run_step()
        except FloatingPointError as e:
            if "iteration=" in str(e):
                raise
            raise FloatingPointError(f"at iteration={self.iter}: {e}") from e

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
            raise EarlierRunError(_earlier_run_message(
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
        return build_detection_test_loader(cfg, dataset_name,
                                           mapper=ISDADatasetMapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_isda_optimizer(cfg, model)


def save_results(cfg, results) -> str:
    """Write the evaluation results as strict JSON (``null`` for an undefined metric, e.g. NaN
    for a category without ground truth): ``OUTPUT_DIR/inference/results.json``."""
    path = os.path.join(cfg.OUTPUT_DIR, "inference", "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(dumps_strict({"datasets": list(cfg.DATASETS.TEST),
                                    "weights": cfg.MODEL.WEIGHTS, "results": results},
                                   indent=2) + "\n", path)
    return path


def setup(args):
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if getattr(args, "num_cpu_procs", 1) > 1 and cfg.MODEL.DEVICE != "cpu":
        logging.getLogger(__name__).warning(
            "--num-cpu-procs %d: MODEL.DEVICE %s -> cpu", args.num_cpu_procs, cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        warnings.warn("SOLVER.AMP.ENABLED needs a CUDA device in Detectron2 v0.6: disabled on "
                      f"MODEL.DEVICE={cfg.MODEL.DEVICE}")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    moved = None
    if not getattr(args, "eval_only", False) and comm.is_main_process():
        # before default_setup writes config.yaml and log.txt into OUTPUT_DIR
        moved = prepare_output_dir(cfg, resume=getattr(args, "resume", False))
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="isda")
    if moved:
        logging.getLogger("isda").warning("%s", moved)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # strict unless MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS: a partial load evaluates a model that
        # is partly random and reports a number that is not the checkpoint's
        Checkpointer(model, save_dir=cfg.OUTPUT_DIR,
                     allow_partial=cfg.MODEL.ISDA.ALLOW_PARTIAL_WEIGHTS).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if cfg.TEST.AUG.ENABLED:
            logging.getLogger("isda").warning("TEST.AUG is not supported by ISDA; ignored")
        if comm.is_main_process():
            verify_results(cfg, res)
            save_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    """Detectron2's parser plus ``--num-cpu-procs``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--num-cpu-procs", type=int, default=1, metavar="N",
        help="train/evaluate with N CPU processes per machine through torch.distributed (gloo); "
             "implies MODEL.DEVICE cpu. --num-machines, --machine-rank and --dist-url apply as "
             "for GPUs. --num-gpus keeps Detectron2's meaning (CUDA GPUs, NCCL)")
    return parser


def cli(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    print("Command Line Args:", args)
    if args.num_cpu_procs > 1:
        if args.num_gpus > 1:
            raise SystemExit("use either --num-gpus or --num-cpu-procs, not both")
        dist_url = args.dist_url
        if args.num_machines == 1 and dist_url == parser.get_default("dist_url"):
            dist_url = "auto"  # a free local port: concurrent CPU jobs do not collide
        return launch_cpu(main, args.num_cpu_procs, num_machines=args.num_machines,
                          machine_rank=args.machine_rank, dist_url=dist_url, args=(args,))
    if args.num_gpus > 1 and not torch.cuda.is_available():
        raise SystemExit("--num-gpus > 1 needs CUDA GPUs; on the CPU use --num-cpu-procs N")
    return launch(main, args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
