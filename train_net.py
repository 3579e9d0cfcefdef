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
"""
import json
import logging
import os
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
from detectron2.utils.logger import setup_logger

import isda  # noqa: F401  (registers the meta-architecture and the embedded datasets)
from isda import add_isda_config
from isda.data.dataset_mapper import ISDADatasetMapper
from isda.solver import build_isda_optimizer
from isda.utils.cpu_allocator import keep_freed_memory
from isda.utils.env import detectron2_has_compiled_ops
from isda.checkpoint import CorruptCheckpointError, ISDACheckpointer as Checkpointer
from isda.engine import (BadSampleCounter, LossLogger, RNGStateHook, build_resumable_train_loader,
                         launch_cpu)


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with ISDA's data, evaluation, optimiser and checkpointer."""

    def __init__(self, cfg):
        # DefaultTrainer.__init__ (v0.6), except: DDP also on the CPU (no device_ids there),
        # ISDA's checkpointer, and the reliability hooks.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        ddp_kwargs = {} if cfg.MODEL.DEVICE.startswith("cuda") else {"device_ids": None}
        model = create_ddp_model(model, broadcast_buffers=False, **ddp_kwargs)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = Checkpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        period = self.cfg.SOLVER.CHECKPOINT_PERIOD
        # the random-state snapshot must be taken before the checkpointer saves it
        ret = [RNGStateHook(period)] + super().build_hooks()
        loader = self._trainer.data_loader
        if hasattr(loader, "num_bad_samples"):
            ret.append(BadSampleCounter(loader, period))
        ret.append(LossLogger(self.cfg.OUTPUT_DIR))
        return ret

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
        on. A corrupt last checkpoint is reported and the newest loadable earlier one is used."""
        try:
            super().resume_or_load(resume=resume)
        except CorruptCheckpointError as e:
            if not resume:
                raise
            self._resume_from_previous(e)
        loader = self._trainer.data_loader
        if hasattr(loader, "set_start"):
            loader.set_start(self.start_iter)

    def _resume_from_previous(self, error):
        log = logging.getLogger("isda")
        bad = os.path.abspath(self.checkpointer.get_checkpoint_file())
        folder = os.path.dirname(bad)
        candidates = sorted((os.path.join(folder, f) for f in os.listdir(folder)
                             if f.endswith(".pth") and os.path.join(folder, f) != bad),
                            key=os.path.getmtime, reverse=True)
        for path in candidates:
            try:
                self.checkpointer.load(path)
            except CorruptCheckpointError as e2:
                log.warning("%s", e2)
                continue
            log.warning("%s\nResuming from the previous good checkpoint '%s' instead (the "
                        "corrupt file is left in place).", error, path)
            self.start_iter = self.iter + 1
            return
        raise CorruptCheckpointError(f"{error}\nNo earlier loadable checkpoint in '{folder}': "
                                     "remove the file to start from MODEL.WEIGHTS") from None

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
    """Write the evaluation results as JSON: ``OUTPUT_DIR/inference/results.json``."""
    path = os.path.join(cfg.OUTPUT_DIR, "inference", "results.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"datasets": list(cfg.DATASETS.TEST), "weights": cfg.MODEL.WEIGHTS,
                   "results": results}, f, indent=2)
    os.replace(tmp, path)
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
    if cfg.MODEL.DEVICE == "cpu":
        keep_freed_memory()  # no page faults for re-allocated activations (isda/utils/cpu_allocator.py)
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="isda")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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
