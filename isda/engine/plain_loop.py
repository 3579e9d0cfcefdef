"""A plain training loop for small ISDA experiments without Detectron2's trainer: the model, the
un-augmented ``DATASETS.TRAIN`` images held in memory, AdamW with linear warm-up (and x GAMMA at
each of ``SOLVER.STEPS``) and global gradient-norm clipping. Used by the overfit test
(``tests/test_model_overfit.py``) and ``tools/learning_curve.py``."""
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model

import torch

from ..data.minimal_mapper import MinimalInstanceMapper


def build_plain_training(cfg):
    """-> (model seeded with ``cfg.SEED``, list of mapped training dicts, AdamW optimizer)."""
    torch.manual_seed(cfg.SEED)
    model = build_model(cfg)
    mapper = MinimalInstanceMapper(cfg, is_train=True)
    data = [mapper(d) for name in cfg.DATASETS.TRAIN for d in DatasetCatalog.get(name)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.SOLVER.BASE_LR,
                            weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    return model, data, opt


def plain_step(model, opt, cfg, batch, it: int):
    """One iteration (1-based ``it``) on ``batch`` -> (total loss, dict of losses)."""
    lr = cfg.SOLVER.BASE_LR * min(1.0, it / max(1, cfg.SOLVER.WARMUP_ITERS))
    lr *= cfg.SOLVER.GAMMA ** sum(it > s for s in cfg.SOLVER.STEPS)
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    losses = model(batch)
    loss = sum(losses.values())
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
    opt.step()
    return loss, losses


def evaluate_segm(model, cfg, output_dir):
    """Mask AP of ``model`` on ``cfg.DATASETS.TEST[0]`` (COCOEvaluator, Python COCO eval)."""
    name = cfg.DATASETS.TEST[0]
    mapper = MinimalInstanceMapper(cfg, is_train=False)
    loader = [[mapper(d)] for d in DatasetCatalog.get(name)]
    evaluator = COCOEvaluator(name, tasks=("segm",), distributed=False, output_dir=str(output_dir),
                              use_fast_impl=False)
    model.eval()
    return inference_on_dataset(model, loader, evaluator)["segm"]
