"""ISDA on both Detectron2 flavours it supports: a real build with the compiled ``detectron2._C``
(``source`` / ``native``) and the registry fallback (v0.6 Python code, placeholder ``_C``).

CI runs the whole suite once per flavour; these tests state what differs and run on both: the
flavour recorded by set-up is the one imported, ``model_zoo`` imports and finds its configs, the
compiled operators work (or fail with a clear error on the fallback), and COCO evaluation uses
the C++ implementation exactly where it exists, with the same numbers as pycocotools.
"""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, Instances, polygons_to_bitmask

import isda  # noqa: F401  (registers voc_sample)
from isda.utils.env import detectron2_has_compiled_ops


def recorded_flavour() -> str:
    """What set-up installed, from its record (independent of the import-time probe)."""
    record = Path(sys.prefix) / "isda-detectron2.json"
    if not record.is_file():
        pytest.fail(f"{record} is missing: run the project's set-up (make setup)")
    return json.loads(record.read_text())["flavour"]


def test_recorded_flavour_is_the_one_imported():
    flavour = recorded_flavour()
    assert flavour in ("source", "native", "fallback")
    assert detectron2_has_compiled_ops() == (flavour != "fallback")


def test_model_zoo_imports_and_finds_its_configs():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
    assert os.path.isfile(path) and "mask_rcnn_R_50_FPN_3x.yaml" in path
    assert "_BASE_" in Path(path).read_text()


def test_compiled_operators_or_a_clear_error():
    from detectron2 import _C

    if recorded_flavour() == "fallback":
        with pytest.raises(ImportError, match="deformable convolution.*Install Detectron2 from"):
            _C.deform_conv_forward  # noqa: B018
        return
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    # two 2x2 squares whose centres are 1 apart: overlap 2, union 6 (hand-computed)
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0, 0.0]])
    b = torch.tensor([[1.0, 0.0, 2.0, 2.0, 0.0], [0.0, 0.0, 2.0, 2.0, 90.0]])
    iou = pairwise_iou_rotated(a, b)
    assert torch.allclose(iou, torch.tensor([[1.0 / 3.0, 1.0]]), atol=1e-5)


def _predictions(records):
    """Ground-truth masks as predictions plus one wrong extra per image, which scores highest."""
    outputs = []
    for k, r in enumerate(records):
        h, w = r["height"], r["width"]
        masks = [polygons_to_bitmask(a["segmentation"], h, w) for a in r["annotations"]]
        masks.append(np.roll(masks[0], w // 3, axis=1))
        inst = Instances((h, w))
        inst.pred_masks = torch.from_numpy(np.stack(masks))
        inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
        inst.scores = torch.cat([torch.linspace(0.9, 0.55, len(masks) - 1), torch.ones(1)])
        inst.pred_classes = torch.tensor([a["category_id"] for a in r["annotations"]]
                                         + [r["annotations"][0]["category_id"]])
        outputs.append({"instances": inst})
    return outputs


def _evaluate(fast: bool, tmp_path):
    from detectron2.evaluation import COCOEvaluator

    records = DatasetCatalog.get("voc_sample")
    MetadataCatalog.get("voc_sample")  # thing classes set by the load above
    ev = COCOEvaluator("voc_sample", tasks=("segm",), distributed=False,
                       output_dir=str(tmp_path / ("fast" if fast else "slow")),
                       use_fast_impl=fast)
    ev.reset()
    ev.process([{"image_id": r["image_id"], "height": r["height"], "width": r["width"]}
                for r in records], _predictions(records))
    return ev.evaluate()["segm"]


def test_coco_evaluation_uses_the_cpp_implementation_where_it_exists(tmp_path):
    from train_net import Trainer
    from detectron2.config import get_cfg
    from isda import add_isda_config

    cfg = get_cfg()
    add_isda_config(cfg)
    cfg.OUTPUT_DIR = str(tmp_path)
    compiled = recorded_flavour() != "fallback"
    assert Trainer.build_evaluator(cfg, "voc_sample")._use_fast_impl == compiled
    slow = _evaluate(False, tmp_path)
    assert 50.0 < slow["AP"] < 100.0  # every GT is found, after a wrong extra that costs precision
    if compiled:
        fast = _evaluate(True, tmp_path)
        for key in ("AP", "AP50", "AP75"):
            assert fast[key] == pytest.approx(slow[key], abs=1e-9), key
