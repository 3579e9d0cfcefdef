#!/usr/bin/env python
"""Train and evaluate ISDA with Detectron2: the command line of :class:`isda.engine.Trainer`.

    python train_net.py --config-file configs/coco/isda_R50_3x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file ... --resume            # continue from last_checkpoint
    python train_net.py --config-file configs/nuclei/isda_R18_nuclei.yaml SOLVER.MAX_ITER 100
    python train_net.py --config-file ... --num-cpu-procs 2   # 2 CPU processes (gloo)

``MODEL.DEVICE auto`` (ISDA's configs) runs on CUDA when it is available, else on the CPU.
What the trainer does differently from Detectron2's, and why: ``isda/engine/trainer.py`` and
docs/reliability.md. Your own project can import the same pieces (``from isda.engine import
Trainer``) or wrap this file's :func:`cli` (docs/custom_dataset.md).
"""
import logging
import warnings

import isda  # noqa: F401  first: registers ISDA and quiets Detectron2's import-time warnings
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from isda import add_isda_config
from isda.checkpoint import ISDACheckpointer as Checkpointer
from isda.config import resolve_device
from isda.engine import (Trainer, launch_cpu, lock_output_dir, prepare_output_dir,  # noqa: F401
                         save_results)
from isda.engine.launch import dist_timeout
from isda.engine.trainer import check_solver_config
from isda.utils.cli import parse_args_anywhere
from isda.utils.logs import quiet_setup_logs
from isda.utils.setup_file import run_setup_file


def setup(args):
    # the user's registrations (--setup-file) first: in every process, before the config is used
    run_setup_file(getattr(args, "setup_file", None))
    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    resolve_device(cfg)
    if getattr(args, "num_cpu_procs", 1) > 1 and cfg.MODEL.DEVICE != "cpu":
        logging.getLogger(__name__).warning(
            "--num-cpu-procs %d: MODEL.DEVICE %s -> cpu", args.num_cpu_procs, cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        warnings.warn("SOLVER.AMP.ENABLED needs a CUDA device in Detectron2 v0.6: disabled on "
                      f"MODEL.DEVICE={cfg.MODEL.DEVICE}")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    if not getattr(args, "eval_only", False):
        check_solver_config(cfg)  # SOLVER.MAX_ITER 0 / -1: refused before anything is written
    moved = None
    if not getattr(args, "eval_only", False) and comm.is_main_process():
        # before default_setup writes config.yaml and log.txt into OUTPUT_DIR: one training run
        # per folder (an OS lock, released when the process ends), then the earlier-run policy
        lock_output_dir(cfg.OUTPUT_DIR)
        moved = prepare_output_dir(cfg, resume=getattr(args, "resume", False))
    quiet_setup_logs()  # one line instead of the ANSI-coloured config dump; no CUDA_HOME notice
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
    """Detectron2's parser plus ``--num-cpu-procs`` and ``--dist-timeout``."""
    parser = default_argument_parser()
    parser.add_argument(
        "--num-cpu-procs", type=int, default=1, metavar="N",
        help="train/evaluate with N CPU processes per machine through torch.distributed (gloo); "
             "implies MODEL.DEVICE cpu. --num-machines, --machine-rank and --dist-url apply as "
             "for GPUs. --num-gpus keeps Detectron2's meaning (CUDA GPUs, NCCL)")
    parser.add_argument(
        "--setup-file", metavar="FILE",
        help="a Python file run in every process before the config is used, e.g. your dataset "
             "registrations (docs/custom_dataset.md); its folder is importable from it")
    parser.add_argument(
        "--dist-timeout", type=float, default=None, metavar="SECONDS",
        help="with several processes: a collective operation that waits longer than this (a "
             "stalled or dead process) ends the job with an error (default: $ISDA_DIST_TIMEOUT, "
             "else 1800)")
    return parser


def cli(argv=None):
    parser = argument_parser()
    # options are accepted after the KEY VALUE overrides too (e.g. "... MODEL.WEIGHTS x --resume")
    args = parse_args_anywhere(parser, argv)
    print("Command Line Args:", args)
    timeout = dist_timeout(args.dist_timeout)
    if args.num_cpu_procs > 1:
        if args.num_gpus > 1:
            raise SystemExit("use either --num-gpus or --num-cpu-procs, not both")
        dist_url = args.dist_url
        if args.num_machines == 1 and dist_url == parser.get_default("dist_url"):
            dist_url = "auto"  # a free local port: concurrent CPU jobs do not collide
        return launch_cpu(main, args.num_cpu_procs, num_machines=args.num_machines,
                          machine_rank=args.machine_rank, dist_url=dist_url, args=(args,),
                          timeout=timeout)
    if args.num_gpus > 1 and not torch.cuda.is_available():
        raise SystemExit("--num-gpus > 1 needs CUDA GPUs; on the CPU use --num-cpu-procs N")
    return launch(main, args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,),
                  timeout=timeout)


if __name__ == "__main__":
    cli()
