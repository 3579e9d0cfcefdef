#!/usr/bin/env python
"""Train and evaluate ISDA with Detectron2.

    python train_net.py --config-file configs/coco/isda_R50_3x.yaml --num-gpus 8
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python train_net.py --config-file ... --resume            # continue from last_checkpoint
    python train_net.py --config-file configs/nuclei/isda_R18_nuclei.yaml MODEL.DEVICE cpu

Only what differs from Detectron2's ``DefaultTrainer`` is overridden: the ISDA dataset mapper,
COCO instance evaluation, AdamW with lr multipliers and full-model gradient clipping, and a
checkpointer that also reads ``.safetensors``.
"""
import json
import logging
import os
import warnings
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import isda  # noqa: F401  (registers the meta-architecture and the embedded datasets)
from isda import add_isda_config
from isda.data.dataset_mapper import ISDADatasetMapper
from isda.solver import build_isda_optimizer
from isda.utils.env import detectron2_has_compiled_ops
from isda.checkpoint import ISDACheckpointer as Checkpointer


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with ISDA's data, evaluation, optimiser and checkpointer."""

    def build_hooks(self):
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before building the hooks:
        # replace it (same arguments) so the periodic checkpointer and resume use ours.
        self.checkpointer = Checkpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        return super().build_hooks()

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
        return build_detection_train_loader(cfg, mapper=ISDADatasetMapper(cfg, is_train=True))

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
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        warnings.warn("SOLVER.AMP.ENABLED needs a CUDA device in Detectron2 v0.6: disabled on "
                      f"MODEL.DEVICE={cfg.MODEL.DEVICE}")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=0, name="isda")
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


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    if args.num_gpus > 1 and not torch.cuda.is_available():
        raise SystemExit("--num-gpus > 1 needs CUDA GPUs")
    return launch(main, args.num_gpus, num_machines=args.num_machines,
                  machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
