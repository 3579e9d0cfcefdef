"""The training loop with bad samples (INPUT.BAD_SAMPLE_POLICY), non-finite losses and
non-finite model outputs, through train_net's Trainer in this process on the embedded nuclei
tiles."""
import copy
import itertools
import json
import re
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.samplers import TrainingSampler

import isda  # noqa: F401
from isda.data.dataset_mapper import BadSampleError

ROOT = Path(__file__).resolve().parents[2]
import train_net  # noqa: E402

SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.ISDA.NUM_QUERIES", "10", "MODEL.ISDA.ENC_LAYERS", "1",
    "MODEL.ISDA.DEC_LAYERS", "1", "INPUT.MIN_SIZE_TRAIN", "(32,)", "INPUT.MAX_SIZE_TRAIN", "48",
    "INPUT.CROP.ENABLED", "False", "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TEST", "()",
    "DATALOADER.ASPECT_RATIO_GROUPING", "False", "SEED", "3",
]


def make_trainer(out, *opts, resume=False):
    args = train_net.argument_parser().parse_args(
        [*(["--resume"] if resume else []),
         "--config-file", str(ROOT / "configs/nuclei/isda_R18_tiny.yaml"), *SMALL, *opts,
         "OUTPUT_DIR", str(out)])
    trainer = train_net.Trainer(train_net.setup(args))
    trainer.resume_or_load(resume=resume)
    return trainer


@pytest.fixture(scope="module")
def bad_dataset(module_tmp_path_factory):
    """nuclei_train's 8 tiles + a missing file + a truncated PNG (indices 8 and 9)."""
    folder = module_tmp_path_factory.mktemp("bad")
    good = copy.deepcopy(DatasetCatalog.get("nuclei_train"))
    data = open(good[0]["file_name"], "rb").read()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    bad = [dict(good[0], file_name=str(folder / "missing.png"), image_id=100),
           dict(good[1], file_name=str(folder / "cut.png"), image_id=101)]
    name = f"rel_bad_{uuid.uuid4().hex[:8]}"
    records = good + bad
    DatasetCatalog.register(name, lambda: copy.deepcopy(records))
    MetadataCatalog.get(name).set(thing_classes=["nucleus"])
    return name, len(good), len(records)


def expected_skips(n_good, n_total, seed, n_samples):
    """Reference count: Detectron2's TrainingSampler stream; a bad record is replaced by the
    next one in the dataset, which may be bad again."""
    skips = 0
    for idx in itertools.islice(iter(TrainingSampler(n_total, seed=seed)), n_samples):
        while idx >= n_good:
            skips += 1
            idx = (idx + 1) % n_total
    return skips


def test_skip_policy_trains_logs_and_counts_bad_samples(bad_dataset, tmp_path):
    name, n_good, n_total = bad_dataset
    iters = 3
    expected = expected_skips(n_good, n_total, 3, 2 * iters)
    assert expected > 0, "choose a seed whose first batches include bad records"
    trainer = make_trainer(tmp_path, "DATASETS.TRAIN", f"('{name}',)", "SOLVER.MAX_ITER",
                           str(iters), "INPUT.BAD_SAMPLE_POLICY", "skip")
    trainer.train()
    log = (tmp_path / "log.txt").read_text()
    assert re.search(r"Skipping bad sample .*missing\.png: cannot read image", log) or \
        re.search(r"Skipping bad sample .*cut\.png: cannot read image", log)
    final = [ln for ln in log.splitlines() if "Bad samples skipped during training" in ln]
    assert final and final[-1].rstrip().endswith(f"training: {expected} (INPUT.BAD_SAMPLE_POLICY=skip)")
    assert trainer.storage.latest()["data/bad_samples"][0] == expected


def test_raise_policy_stops_with_the_file_named(bad_dataset, tmp_path):
    name, n_good, n_total = bad_dataset
    trainer = make_trainer(tmp_path, "DATASETS.TRAIN", f"('{name}',)", "SOLVER.MAX_ITER", "6")
    with pytest.raises(BadSampleError, match=r"(missing|cut)\.png: cannot read image"):
        trainer.train()


def test_nan_loss_stops_with_iteration_and_loss_names_without_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "1")
    model = trainer._trainer.model
    forward = model.forward

    def poisoned(batched_inputs):
        losses = forward(batched_inputs)
        if trainer.iter == 2:
            losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses

    model.forward = poisoned
    with pytest.raises(FloatingPointError) as exc:
        trainer.train()
    msg = str(exc.value)
    assert "iteration=2" in msg and "loss_dice" in msg and "loss_focal" in msg
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth",
                                                              "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"
    state = torch.load(tmp_path / "model_0000001.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def _saved_bad_samples(path):
    hooks = torch.load(path, weights_only=True)["trainer"]["hooks"]
    return hooks["BadSampleCounter"]["ranks"]


def test_bad_sample_count_in_each_checkpoint_includes_its_iteration_and_survives_resume(
        bad_dataset, tmp_path):
    """Checkpoints after iterations 2 and 5; a resume from iteration 2's checkpoint must end
    with the count of an uninterrupted run (reference: Detectron2's TrainingSampler stream)."""
    name, n_good, n_total = bad_dataset
    opts = ("DATASETS.TRAIN", f"('{name}',)", "SOLVER.MAX_ITER", "6",
            "SOLVER.CHECKPOINT_PERIOD", "3", "INPUT.BAD_SAMPLE_POLICY", "skip")
    at_2, at_5 = expected_skips(n_good, n_total, 3, 2 * 3), expected_skips(n_good, n_total, 3, 2 * 6)
    assert 0 < at_2 < at_5, "choose a seed with bad records before and after iteration 2"
    run = tmp_path / "run"
    make_trainer(run, *opts).train()
    assert _saved_bad_samples(run / "model_0000002.pth") == [at_2]
    assert _saved_bad_samples(run / "model_0000005.pth") == [at_5]
    # model_final.pth holds the model only (issue 31): the counts live in the periodic files
    assert "trainer" not in torch.load(run / "model_final.pth", weights_only=True)

    resumed = tmp_path / "resumed"  # as if killed after the checkpoint of iteration 2
    shutil.copytree(run, resumed)
    for f in ("model_0000005.pth", "model_final.pth"):
        (resumed / f).unlink()
    (resumed / "last_checkpoint").write_text("model_0000002.pth")
    trainer = make_trainer(resumed, *opts, resume=True)
    assert trainer.start_iter == 3
    trainer.train()
    assert trainer.storage.latest()["data/bad_samples"][0] == at_5
    assert _saved_bad_samples(resumed / "model_0000005.pth") == [at_5]
    log = (resumed / "log.txt").read_text().splitlines()
    final = [ln for ln in log if "Bad samples skipped during training" in ln]
    assert final[-1].rstrip().endswith(f"training: {at_5} (INPUT.BAD_SAMPLE_POLICY=skip)")
    # losses.jsonl: every iteration once, the replayed ones from the resumed run
    rows = [json.loads(x) for x in (resumed / "losses.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(6))


def test_nan_outputs_stop_before_matching_with_iteration_and_losses(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, "SOLVER.MAX_ITER", "5", "SOLVER.CHECKPOINT_PERIOD", "1")
    model = trainer._trainer.model
    matcher = model.criterion.matcher
    matched_at = []
    match = matcher.forward

    def spy(*args, **kwargs):
        matched_at.append(trainer.iter)
        return match(*args, **kwargs)

    monkeypatch.setattr(matcher, "forward", spy)
    forward = model.forward

    def poisoned(batched_inputs):
        if trainer.iter == 2:  # broken weights: every class logit is NaN
            with torch.no_grad():
                model.heads.class_embed.bias.fill_(float("nan"))
        return forward(batched_inputs)

    model.forward = poisoned
    with pytest.raises(FloatingPointError) as exc:
        trainer.train()
    msg = str(exc.value)
    assert "iteration=2" in msg and "class logits" in msg and "20 NaN" in msg
    assert "Losses not computed: loss_focal, loss_dice" in msg
    assert "mask kernels" not in msg  # only the broken output is named
    assert 1 in matched_at and 2 not in matched_at  # the matcher never saw the NaNs
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth",
                                                              "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000001.pth"


def test_absurd_learning_rate_stops_with_floating_point_error(tmp_path):
    """SOLVER.BASE_LR 1e30: the first step makes the weights ~1e27 (finite, saved with
    iteration 0), the next forward pass gives NaN: FloatingPointError naming iteration 1 and the
    losses, not scipy's ValueError from inside the matcher, and no checkpoint of iteration 1."""
    trainer = make_trainer(tmp_path, "SOLVER.BASE_LR", "1e30", "SOLVER.MAX_ITER", "3",
                           "SOLVER.CHECKPOINT_PERIOD", "1")
    with pytest.raises(FloatingPointError) as exc:
        trainer.train()
    msg = str(exc.value)
    assert "iteration=1" in msg and "Non-finite model outputs before Hungarian matching" in msg
    assert "loss_focal" in msg and "loss_dice" in msg
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000000.pth"]
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_0000000.pth"
    state = torch.load(tmp_path / "model_0000000.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_gradients_are_freed_after_each_step_and_the_step_still_learns(tmp_path):
    """The trainer frees the gradients after the optimizer step (not only after the next
    forward pass, as Detectron2's SimpleTrainer does): none is held between iterations, and
    the parameters still move by the step."""
    trainer = make_trainer(tmp_path, "SOLVER.MAX_ITER", "2")
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert all(p.grad is None for p in model.parameters())
    moved = [n for n, p in model.named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(before) // 2
