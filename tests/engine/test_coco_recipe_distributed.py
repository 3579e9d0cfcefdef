"""The COCO recipe as shipped (``configs/coco/isda_R50_3x.yaml``: R50, 300 queries, 6 + 6 layers,
the paper's augmentation with crops on polygons, AdamW with lr multipliers, full-model clipping)
trained by ``train_net.py`` in 2 gloo processes x 1 image, as 8 GPUs x 1 image would run it.

Only the keys a user changes for their data and machine are overridden (weights, datasets, class
count, batch, iterations, periods, workers, output folder, image sizes). The training set mixes
the VOC photos' polygon instances with copies of the same photos whose only object is smaller
than a pixel at the training scale (it vanishes, as small COCO objects do at low resolution), so
some ranks train on images without any instance: the case that used to break
DistributedDataParallel ("Expected to have finished reduction in the prior iteration").

Run as a script, this file is ``train_net.py`` with that dataset registered and a trainer that
records each rank's instance counts and final parameters.
"""
import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isda_helpers import script_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/coco/isda_R50_3x.yaml"
ITERS = 8
OVERRIDES = [
    "MODEL.WEIGHTS", "", "MODEL.ISDA.NUM_CLASSES", "20",
    "DATASETS.TRAIN", "('voc_sample_with_vanishing_objects',)", "DATASETS.TEST", "('voc_sample',)",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(ITERS),
    "SOLVER.CHECKPOINT_PERIOD", "100000", "TEST.EVAL_PERIOD", "0", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(96, 128)", "INPUT.MAX_SIZE_TRAIN", "192",
    "INPUT.CROP.PRE_RESIZE_SIZES", "(112, 128)", "INPUT.CROP.SIZE", "[64, 96]",
    "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192",
]


def vanishing_object_records():
    """voc_sample's records, plus copies whose one object is a 0.5 px square."""
    from detectron2.data import DatasetCatalog

    records = [copy.deepcopy(r) for r in DatasetCatalog.get("voc_sample")]
    extra = []
    for r in records:
        x, y = 0.4 * r["width"], 0.4 * r["height"]
        tiny = dict(r["annotations"][0], bbox=[x, y, 0.5, 0.5], id=None,
                    segmentation=[[x, y, x + 0.5, y, x + 0.5, y + 0.5, x, y + 0.5]])
        extra.append(dict(copy.deepcopy(r), image_id=f"{r['image_id']}_tiny", annotations=[tiny]))
    return records + extra


if __name__ in ("__main__", "__mp_main__"):  # script mode (PYTHONPATH: the repository)
    import train_net
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.utils import comm

    DatasetCatalog.register("voc_sample_with_vanishing_objects", vanishing_object_records)
    MetadataCatalog.get("voc_sample_with_vanishing_objects").set(evaluator_type="coco")

    class _CountingLoader:
        """The trainer's loader, recording the number of instances of each batch."""

        def __init__(self, loader):
            self.loader, self.counts = loader, []

        def __getattr__(self, name):
            return getattr(self.loader, name)

        def __iter__(self):
            for batch in self.loader:
                self.counts.append([len(d["instances"]) for d in batch])
                yield batch

    class _RecordingTrainer(train_net.Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return _CountingLoader(super().build_train_loader(cfg))

        def train(self):
            result = super().train()
            model = getattr(self.model, "module", self.model)
            out = Path(self.cfg.OUTPUT_DIR)
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                       out / f"params_rank{comm.get_rank()}.pth")
            (out / f"counts_rank{comm.get_rank()}.json").write_text(
                json.dumps(self._trainer.data_loader.counts))
            return result

    train_net.Trainer = _RecordingTrainer


@pytest.fixture(scope="module")
def coco_recipe_run(module_tmp_path_factory):
    out = module_tmp_path_factory.mktemp("coco_recipe")
    proc = subprocess.run(
        [sys.executable, __file__, "--num-cpu-procs", "2", "--config-file", CONFIG, *OVERRIDES,
         "OUTPUT_DIR", str(out)],
        cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out


def test_recipe_is_the_shipped_one():
    """The run above uses the paper's model and recipe: nothing but the allowed keys changed."""
    import train_net

    args = train_net.argument_parser().parse_args(["--config-file", str(ROOT / CONFIG), *OVERRIDES])
    cfg = train_net.get_cfg()
    train_net.add_isda_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    assert cfg.MODEL.RESNETS.DEPTH == 50 and cfg.MODEL.ISDA.NUM_QUERIES == 300
    assert (cfg.MODEL.ISDA.ENC_LAYERS, cfg.MODEL.ISDA.DEC_LAYERS) == (6, 6)
    assert cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.PROB == 0.5
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.ENABLED and cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.INPUT.BAD_SAMPLE_POLICY == "raise"  # no sample may be skipped silently


def test_two_ranks_with_empty_images_train_identically(coco_recipe_run):
    out = coco_recipe_run
    counts = [json.loads((out / f"counts_rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(c) == ITERS and all(len(b) == 1 for b in c) for c in counts)
    flat = [b[0] for c in counts for b in c]
    assert 0 in flat, f"no rank drew an image without instances: {counts}"
    assert any(n > 0 for n in flat), counts
    p0 = torch.load(out / "params_rank0.pth", weights_only=True)
    p1 = torch.load(out / "params_rank1.pth", weights_only=True)
    assert p0.keys() == p1.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
        assert torch.isfinite(p0[k].float()).all(), k
    rows = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(ITERS))
    assert all(math.isfinite(r["total_loss"]) for r in rows)


def test_coco_evaluator_runs_on_the_result(coco_recipe_run):
    metrics = [json.loads(x) for x in (coco_recipe_run / "metrics.json").read_text().splitlines()]
    segm = [m for m in metrics if "segm/AP" in m]
    assert segm, "COCOEvaluator did not report segm metrics"
    assert {"segm/AP", "segm/AP50", "segm/AP75"} <= set(segm[-1])
    assert (coco_recipe_run / "inference" / "voc_sample" / "coco_instances_results.json").is_file()


if __name__ == "__main__":
    train_net.cli()
