"""train_net.py with 2 CPU processes (torch.distributed, gloo): both ranks end with identical
parameters, and the evaluation gathered from both ranks equals a 1-process evaluation of the
same weights.

Run as a script, this file is ``train_net.py`` whose trainer also saves each rank's parameters
to ``OUTPUT_DIR/params_rank{r}.pth`` after training (the independent per-rank evidence).
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from isda_helpers import script_env

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/nuclei/isda_R18_tiny.yaml"
SMALL = [
    "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1", "MODEL.ISDA.DEC_LAYERS", "1",
    "MODEL.ISDA.DROPOUT", "0.1", "INPUT.MIN_SIZE_TRAIN", "(32, 48)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.CROP.PRE_RESIZE_SIZES", "(48,)", "INPUT.CROP.SIZE", "[32, 48]",
    "INPUT.MIN_SIZE_TEST", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "1e-5",  # stays near init: non-empty masks
    "DATASETS.TEST", "('nuclei_train',)", "TEST.EVAL_PERIOD", "0",
]

if __name__ in ("__main__", "__mp_main__"):  # script mode (PYTHONPATH: the repository)
    import train_net
    from detectron2.utils import comm

    class _RankDumpingTrainer(train_net.Trainer):
        def train(self):
            result = super().train()
            model = getattr(self.model, "module", self.model)
            torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                       Path(self.cfg.OUTPUT_DIR) / f"params_rank{comm.get_rank()}.pth")
            return result

    train_net.Trainer = _RankDumpingTrainer


def run(*cmd):
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=script_env(), capture_output=True,
                          text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def two_procs(module_tmp_path_factory):
    out = module_tmp_path_factory.mktemp("ddp")
    log = run(__file__, "--num-cpu-procs", "2", "--config-file", CONFIG, *SMALL,
              "SOLVER.MAX_ITER", "4", "OUTPUT_DIR", str(out))
    return out, log


def test_two_cpu_processes_train_with_identical_parameters(two_procs):
    out, log = two_procs
    assert "World size: 2" in (out / "log.txt").read_text()
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    p0 = torch.load(out / "params_rank0.pth", weights_only=True)
    p1 = torch.load(out / "params_rank1.pth", weights_only=True)
    final = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert p0.keys() == p1.keys() == final.keys()
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
        assert torch.equal(p0[k], final[k]), k
    rows = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert len({r["total_loss"] for r in rows}) == 4  # it did train


def test_gathered_evaluation_equals_one_process(two_procs, tmp_path):
    out, _ = two_procs
    metrics = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    two = [m for m in metrics if "segm/AP" in m][-1]
    # the reference: train_net's --eval-only in this single process, same weights
    import train_net

    args = train_net.argument_parser().parse_args(
        ["--eval-only", "--config-file", str(ROOT / CONFIG), *SMALL, "MODEL.DEVICE", "cpu",
         "MODEL.WEIGHTS", str(out / "model_final.pth"), "OUTPUT_DIR", str(tmp_path)])
    train_net.main(args)
    one = json.loads((tmp_path / "inference" / "results.json").read_text())["results"]["segm"]
    for key in ("AP", "AP50", "AP75"):
        a, b = one[key], two[f"segm/{key}"]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9), key

    def predictions(folder):
        rows = json.loads((folder / "inference" / "nuclei_train" /
                           "coco_instances_results.json").read_text())
        return sorted((r["image_id"], -r["score"], r["segmentation"]["counts"]) for r in rows)

    gathered, single = predictions(out), predictions(tmp_path)
    assert len({r[0] for r in gathered}) == 8  # every image, from both ranks
    assert len(gathered) == len(single) > 8 and max(-r[1] for r in single) > 0.01
    for a, b in zip(gathered, single):
        assert a[0] == b[0] and a[1] == pytest.approx(b[1], rel=1e-4, abs=1e-12)
    same_masks = sum(a[2] == b[2] for a, b in zip(gathered, single))
    assert same_masks >= 0.95 * len(single)


if __name__ == "__main__":
    train_net.cli()
