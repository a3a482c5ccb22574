"""Training: a tiny run lowers the loss; a checkpoint resumes to the same state (issue 3, 2)."""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
from tqdm import TqdmWarning

from splitdet.shared.checkpoint import load_model, read_checkpoint
from splitdet.shared.model import MultiTaskRCNN
from splitdet.training import cli_train, voc
from splitdet.training import dataset as dataset_module
from splitdet.training.dataset import CropSettings, VocDetection, collate
from splitdet.training.initial_weights import InitError, load_initial_weights
from splitdet.training.presets import PRESETS, TINY, TrainConfig
from splitdet.training.train import TrainClock, autocast_dtype, train, train_one_epoch

from support import make_tiny_voc


def tiny_config(**changes) -> TrainConfig:
    return replace(TINY, eval_every=0, **changes)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    return make_tiny_voc(tmp_path_factory.mktemp("voc"))


def test_presets_are_consistent():
    paper = PRESETS["paper"]
    assert paper.model.depth == 50 and paper.lr == 0.01 and paper.momentum == 0.9
    assert (paper.scheduler, paper.step_size, paper.gamma) == ("step", 3, 0.33)
    assert (paper.batch_size, paper.epochs) == (4, 200)
    assert (paper.model.min_size, paper.model.max_size) == (2048, 2448)
    cpu = PRESETS["cpu"]
    assert cpu.minutes is not None and cpu.minutes <= 30 and cpu.model.norm == "group"
    r50 = PRESETS["cpu-r50"]  # the benchmark's model: the paper's architecture, cpu's recipe
    assert (r50.model.depth, r50.model.fpn_channels) == (50, paper.model.fpn_channels)
    assert r50.model.box_head_dim == paper.model.box_head_dim
    assert (r50.optimizer, r50.crop, r50.model.gate_pooling) == ("adamw", cpu.crop, "dense")
    for config in PRESETS.values():
        assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_the_train_command_offers_every_preset():
    parser = argparse.ArgumentParser()
    cli_train.add_arguments(parser)
    (preset,) = [a for a in parser._actions if a.dest == "preset"]
    assert sorted(preset.choices) == sorted(PRESETS)


def test_dataset_crops_keep_boxes_inside_and_drop_difficult(tiny_voc):
    samples = voc.read_split(tiny_voc, "train")
    hard = replace(
        samples[0], objects=(*samples[0].objects, voc.VocObject("scratch", (1, 1, 9, 9), True))
    )
    data = VocDetection([hard, *samples[1:]], ["scratch"], train=True, crop=CropSettings(64, 1.0))
    for epoch in range(3):
        data.set_epoch(epoch)
        for i in range(len(data)):
            image, target = data[i]
            assert image.shape == (3, 64, 64) and image.dtype == torch.float32
            assert image.min() >= 0.0 and image.max() <= 1.0
            boxes = target["boxes"]
            assert boxes.dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert not target["difficult"].any()
            if len(boxes):
                assert (
                    (boxes[:, 2:] > boxes[:, :2]).all() and boxes.min() >= 0 and boxes.max() <= 64
                )
    # evaluation items: whole image, difficult objects kept and flagged
    image, target = VocDetection([hard], ["scratch"])[0]
    assert image.shape == (3, 128, 160) and target["difficult"].tolist()[-1] is True
    # the same item twice is the same crop (deterministic per seed, epoch, index)
    data.set_epoch(5)
    assert torch.equal(data[1][0], data[1][0])


def test_workers_give_each_epoch_its_own_crops_as_the_main_process_does(tiny_voc):
    """Before, the loader's workers were persistent: they kept the dataset as it was when they
    started, never saw `set_epoch`, and every epoch got epoch 0's crops and flips (a model
    that depended on --workers, and a resume that differed from a run never stopped)."""
    from splitdet.training.run_inputs import _train_loader

    samples = voc.read_split(tiny_voc, "train", ("scratch",))

    def epochs_of_crops(workers: int) -> list[list[torch.Tensor]]:
        dataset = VocDetection(
            samples, ["scratch"], train=True, crop=CropSettings(64, 1.0), flips=True, seed=3
        )
        loader = _train_loader(dataset, 2, replace(TINY, workers=workers, seed=3), 1, 0)
        seen = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            loader.dataset.set_epoch(epoch)
            seen.append([image for images, _ in loader for image in images])
        return seen

    inline, in_workers = epochs_of_crops(0), epochs_of_crops(1)
    assert not all(torch.equal(a, b) for a, b in zip(inline[0], inline[1], strict=True))
    for epoch, (expected, got) in enumerate(zip(inline, in_workers, strict=True)):
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), epoch


def test_crops_avoid_cutting_objects(tmp_path, monkeypatch):
    """Two 30 px objects in a 160x128 image, 64 px crops. Centred on an object, a crop never cuts
    one (a clipped box of a diagonal stroke would be a wrong target); placed at random, it cuts
    far fewer than a single random placement does."""
    samples = voc.read_split(make_tiny_voc(tmp_path, n_defective=1, n_free=0, seed=3), "train")
    objects = (
        voc.VocObject("scratch", (20, 20, 50, 50)),
        voc.VocObject("scratch", (70, 50, 100, 80)),
    )
    sample = replace(samples[0], objects=objects)

    def cut_boxes(fraction: float) -> tuple[int, int]:
        data = VocDetection([sample], ["scratch"], train=True, crop=CropSettings(64, fraction))
        cut = kept = 0
        for epoch in range(60):
            data.set_epoch(epoch)
            for box in data[0][1]["boxes"]:
                kept += 1
                cut += (float(box[2] - box[0]), float(box[3] - box[1])) != (30.0, 30.0)
        return cut, kept

    cut, kept = cut_boxes(1.0)
    assert cut == 0 and kept >= 60
    searched, _ = cut_boxes(0.0)
    monkeypatch.setattr(dataset_module, "CROP_TRIES", 1)
    single, _ = cut_boxes(0.0)
    assert searched < single / 2, (searched, single)


# bf16 runs fewer epochs: on a CPU without native bfloat16 autocast is emulated and each
# epoch takes about 7x longer than in fp32 (3 epochs bring the loss to ~0.73x its first).
@pytest.mark.parametrize(("precision", "epochs"), [("fp32", 8), ("bf16", 3)])
def test_tiny_training_lowers_the_loss(tiny_voc, tmp_path, precision, epochs):
    config = tiny_config(epochs=epochs, lr=0.02, warmup_iters=1, precision=precision)
    train(config, tiny_voc, tmp_path, progress=False)
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert len(history) == epochs
    assert history[-1]["data"] == tiny_voc.name  # (the learning curve's title names it)
    # the lowest of the last three epochs after the first
    first, last = history[0]["loss"], min(row["loss"] for row in history[1:][-3:])
    assert last < 0.8 * first, (first, last)
    assert (tmp_path / "metrics.csv").read_text().startswith("epoch,")
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    _, checkpoint = load_model(tmp_path / "last.pt")
    assert checkpoint["epoch"] == epochs - 1 and checkpoint["class_names"] == ["scratch"]
    assert set(checkpoint) >= {"model", "optimizer", "lr_scheduler", "config", "epoch"}


def test_a_time_budget_ends_the_run_on_the_epoch_nearest_it(tiny_voc, tmp_path):
    clock = TrainClock(seconds=90.0, budget_seconds=100.0)
    assert not clock.exhausted() and not clock.exhausted(epoch_seconds=19.0)
    assert clock.exhausted(epoch_seconds=21.0)  # the next epoch would end 11 s past the budget
    assert not TrainClock(seconds=1e9).exhausted(epoch_seconds=1e9)  # no budget, no end
    # a real run whose budget any epoch exceeds: one epoch, validated as the final one
    # with progress bars: the run's bar ends full, not past its total (tqdm would warn)
    config = replace(TINY, epochs=5, minutes=1e-6, eval_every=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TqdmWarning)
        train(config, tiny_voc, tmp_path, progress=True)
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [0] and history[0]["val_map50"] is not None


def test_minutes_zero_fixes_the_run_by_its_epochs(tiny_voc, tmp_path):
    """`--minutes 0`: no time budget, every epoch runs and the cosine anneals over the epochs'
    steps, so a run takes the same steps on a fast and a slow machine."""
    config = replace(TINY, epochs=2, minutes=0.0, eval_every=0, scheduler="cosine")
    train(config, tiny_voc, tmp_path, progress=False)
    history = json.loads((tmp_path / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [0, 1]
    steps = sum(row["iters"] for row in history)
    # warm-up over, cosine at its end: the lr after the last step is the schedule's 0
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and steps > config.warmup_iters


def test_the_last_share_of_a_run_trains_on_whole_images(tiny_voc, tmp_path, monkeypatch):
    """`whole_image_fraction`: crops first, then whole images at their own batch size, so that
    GroupNorm has seen the statistics of the images inference gets before the run ends."""
    seen: list[tuple[int, int]] = []
    original = dataset_module.VocDetection.__getitem__

    def recording(self, index):
        image, target = original(self, index)
        seen.append(tuple(image.shape[-2:]))
        return image, target

    monkeypatch.setattr(dataset_module.VocDetection, "__getitem__", recording)
    config = tiny_config(epochs=4, whole_image_fraction=0.5, whole_image_batch_size=4)
    train(config, tiny_voc, tmp_path, progress=False)
    history = json.loads((tmp_path / "metrics.json").read_text())
    n_train = len(voc.read_split(tiny_voc, "train", ("scratch",)))
    crop_steps, whole_steps = math.ceil(n_train / 2), math.ceil(n_train / 4)
    assert [row["iters"] for row in history] == [crop_steps] * 2 + [whole_steps] * 2
    assert [row["inputs"] for row in history] == ["crops"] * 2 + ["whole images"] * 2
    assert set(seen[: 2 * n_train]) == {(96, 96)}
    assert set(seen[2 * n_train :]) == {(128, 160)}  # the files' own size, as inference reads
    with pytest.raises(ValueError, match="needs crops"):
        tiny_config(crop=None, whole_image_fraction=0.1)
    with pytest.raises(ValueError, match="whole_image_fraction"):
        tiny_config(whole_image_fraction=1.0)


def test_bf16_training_computes_in_bf16_and_keeps_fp32_weights(tiny_voc):
    """Under precision bf16 the convolutions really run in bfloat16 (a forward hook sees their
    outputs), while the weights, their gradients and the losses stay float32."""
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        tiny_config(precision="fp16")
    model = MultiTaskRCNN(TINY.model)
    seen = []
    model.backbone.body.conv1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    data = VocDetection(voc.read_split(tiny_voc, "train"), ["scratch"], train=True)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
    before = model.backbone.body.conv1.weight.detach().clone()
    stats = train_one_epoch(
        model, torch.optim.SGD(model.parameters(), lr=0.01), loader, max_iters=1,
        progress=False, autocast=torch.bfloat16,
    )  # fmt: skip
    assert seen == [torch.bfloat16] and stats["iters"] == 1 and math.isfinite(stats["loss"])
    weight = model.backbone.body.conv1.weight
    assert weight.dtype == weight.grad.dtype == torch.float32
    assert not torch.equal(weight.detach(), before)


def test_bf16_training_keeps_sub_pixel_boxes_finite():
    """A scratch box 0.3 px wide near x = 140: bfloat16 has a 1 px grid there, so if boxes were
    decoded and matched in bf16 the box would collapse to zero width and the regression target
    would be log(0). The box arithmetic stays fp32 under autocast; the losses stay finite."""
    torch.manual_seed(0)
    model = MultiTaskRCNN(TINY.model)
    model.train()
    images = [torch.rand(3, 128, 160) for _ in range(2)]
    thin = torch.tensor([[140.1, 10.0, 140.4, 120.0], [20.0, 30.0, 60.0, 31.0]])
    targets = [{"boxes": thin, "labels": torch.ones(2, dtype=torch.int64)}] * 2
    seen = []
    model.rpn.register_forward_hook(lambda m, i, out: seen.append(out[0][0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert seen == [torch.float32]  # the proposals
    assert all(torch.isfinite(v).all() for v in losses.values()), losses


def test_resume_reaches_the_same_state(tiny_voc, tmp_path):
    config = tiny_config(epochs=3)
    train(config, tiny_voc, tmp_path / "straight", progress=False)
    train(config, tiny_voc, tmp_path / "split", progress=False, stop_after=1)
    middle = read_checkpoint(tmp_path / "split" / "last.pt")
    assert middle["epoch"] == 0 and middle["lr_scheduler"]["step_count"] > 0
    train(config, tiny_voc, tmp_path / "split", progress=False, resume=True)
    a = read_checkpoint(tmp_path / "straight" / "last.pt")
    b = read_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    # the same schedule position (its clock holds wall seconds, which differ)
    assert {**a["lr_scheduler"], "seconds": 0} == {**b["lr_scheduler"], "seconds": 0}
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key]["momentum_buffer"], state_b[key]["momentum_buffer"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert len(b["history"]) == 3


def test_the_train_command_resumes_a_run_with_its_own_recipe(tiny_voc, tmp_path, capsys):
    """`splitdet train --out RUN --resume` without --preset continues RUN's recipe (here not
    the default preset's model); an explicit --preset of another model is refused by name."""
    from splitdet.shared.cli import main

    run = tmp_path / "run"
    train(tiny_config(epochs=2), tiny_voc, run, progress=False, stop_after=1)
    assert read_checkpoint(run / "last.pt")["epoch"] == 0
    argv = ["train", "--data", str(tiny_voc), "--out", str(run), "--resume", "--no-progress"]
    assert main(argv) == 0
    assert read_checkpoint(run / "last.pt")["epoch"] == 1
    assert main([*argv, "--preset", "cpu", "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "'tiny'" in err and "--preset" in err
    assert "Traceback" not in err and read_checkpoint(run / "last.pt")["epoch"] == 1
    # the refused resume left the run's recipe in place: resuming it still works
    assert json.loads((run / "train_config.json").read_text())["name"] == "tiny"
    assert main([*argv, "--epochs", "3"]) == 0
    assert read_checkpoint(run / "last.pt")["epoch"] == 2


def test_the_train_command_sets_the_crop(tiny_voc, tmp_path, capsys):
    """`--crop N` trains on N px crops, `--crop 0` on whole images, `--crop-object-fraction F`
    centres that share of the crops on objects (recorded in the run's recipe); a crop that is not
    a positive multiple of 32, or a fraction outside [0, 1], is refused by name, before training."""
    from splitdet.shared.cli import main

    argv = ["train", "--data", str(tiny_voc), "--preset", "tiny", "--epochs", "1", "--no-progress"]
    for crop, recorded in (("64", 64), ("0", None)):
        run = tmp_path / f"crop{crop}"
        assert main([*argv, "--out", str(run), "--crop", crop]) == 0
        assert json.loads((run / "train_config.json").read_text())["crop"] == recorded
        assert read_checkpoint(run / "last.pt")["epoch"] == 0
    run = tmp_path / "fraction"
    assert main([*argv, "--out", str(run), "--crop-object-fraction", "0.85"]) == 0
    assert json.loads((run / "train_config.json").read_text())["crop_object_fraction"] == 0.85
    assert main([*argv, "--out", str(tmp_path / "bad"), "--crop-object-fraction", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--crop-object-fraction must be in [0, 1], got 1.5" in err and "Traceback" not in err
    for bad in ("50", "-32"):
        assert main([*argv, "--out", str(tmp_path / "bad"), "--crop", bad]) == 2
        err = capsys.readouterr().err
        assert "crop must be a positive multiple of 32" in err and bad in err
        assert "Traceback" not in err and not (tmp_path / "bad" / "last.pt").exists()


def test_the_train_command_sets_where_the_gate_reads(tiny_voc, tmp_path, capsys):
    """`--gate-on P2` trains a gate on the stride-4 map (recorded in the recipe and the
    checkpoint's model config); resuming that run with the gate elsewhere is refused by name."""
    from splitdet.shared.cli import main

    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_voc), "--out", str(run), "--preset", "tiny"]
    argv.append("--no-progress")
    assert main([*argv, "--epochs", "1", "--gate-on", "P2"]) == 0
    assert json.loads((run / "train_config.json").read_text())["model"]["gate_level"] == "0"
    model, _ = load_model(run / "last.pt")
    assert model.config.gate_level == "0" and model.config.split_spec.lazy_levels == ()
    assert main([*argv, "--epochs", "2", "--resume", "--gate-on", "P5"]) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "Traceback" not in err
    assert read_checkpoint(run / "last.pt")["epoch"] == 0


def test_init_errors_are_clear(tmp_path):
    from splitdet.shared.model import MultiTaskRCNN

    model = MultiTaskRCNN(TINY.model)
    with pytest.raises(InitError, match="norm batch or frozen"):
        load_initial_weights(model, "imagenet", progress=False)
    with pytest.raises(InitError, match="not imagenet, coco, none"):
        load_initial_weights(model, str(tmp_path / "missing.pt"), progress=False)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    report = load_initial_weights(MultiTaskRCNN(TINY.model), str(tmp_path / "plain.pt"))
    assert report["loaded"] == len(model.state_dict()) and not report["skipped"]


def test_hub_failure_names_the_cache(monkeypatch):
    from torchvision.models import ResNet18_Weights

    from splitdet.shared.config import ModelConfig
    from splitdet.shared.model import MultiTaskRCNN

    def offline(self, *args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(ResNet18_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    model = MultiTaskRCNN(ModelConfig(depth=18, norm="frozen", fpn_channels=64))
    with pytest.raises(InitError, match="torch hub cache"):
        load_initial_weights(model, "imagenet", progress=False)


@pytest.fixture(scope="module")
def three_images(tmp_path_factory):
    """2 defective images (one of two scratches, img_001) and a defect-free one: 2 steps of the
    tiny preset an epoch, validation on the same 3."""
    return make_tiny_voc(tmp_path_factory.mktemp("voc3"), n_defective=2, n_free=1)


def test_best_pt_breaks_ties_on_map50_by_the_stricter_map(
    three_images, tmp_path, monkeypatch, capsys
):
    """On a small validation split mAP@.5 saturates at 1.0 (epoch 0 here) while mAP@[.5:.95]
    goes on rising: best.pt kept the first epoch at 1.0, the loosest, and nothing said which
    epoch it held. Ties on mAP@.5 now go to the higher mAP@[.5:.95], and the final line names
    the epoch and the metrics. The model is trained and validated for real; only the two mAPs
    the validation reports are those of the reviewer's run (the tiny model reaches neither)."""
    from splitdet.shared.cli import main
    from splitdet.training import evaluate as evaluate_module

    real_evaluate = evaluate_module.evaluate
    reported = iter([(1.0, 0.194), (1.0, 0.658), (1.0, 0.5), (0.9, 0.9)])

    def with_the_reviewers_maps(*args, **kwargs):
        metrics = real_evaluate(*args, **kwargs)
        metrics["map50"], metrics["map"] = next(reported)
        return metrics

    monkeypatch.setattr(evaluate_module, "evaluate", with_the_reviewers_maps)
    run = tmp_path / "run"
    argv = ["train", "--data", str(three_images), "--out", str(run), "--preset", "tiny"]
    assert main([*argv, "--epochs", "4", "--eval-every", "1", "--no-progress"]) == 0
    best = read_checkpoint(run / "best.pt")
    assert best["epoch"] == 1 and best["best_epoch"] == 1
    assert (best["best_value"], best["best_tie_value"]) == (1.0, 0.658)
    assert read_checkpoint(run / "last.pt")["best_epoch"] == 1  # what a resume goes on from
    out = capsys.readouterr().out
    assert "trained to epoch 3 " in out
    assert "best.pt holds epoch 1 (val mAP@.5 1.000, mAP@[.5:.95] 0.658: the highest mAP@.5, " \
        "ties broken by mAP@[.5:.95])" in out  # fmt: skip


def test_a_resumed_run_breaks_ties_against_the_epoch_its_best_pt_holds():
    """A run's last.pt says which epoch best.pt holds and its tie-break value; one written
    before ties were broken records only best_value, and best.pt then holds the first epoch
    of its history at that value."""
    from splitdet.training.epoch_records import BestEpoch

    best = BestEpoch("map50")
    rows = [(0.2, 0.1), (1.0, 0.194), (1.0, 0.658), (1.0, 0.658), (1.0, 0.3), (0.99, 0.99)]
    chosen = []
    for epoch, (map50, map_) in enumerate(rows):
        if best.offer({"epoch": epoch, "val_map50": map50, "val_map": map_}):
            chosen.append(epoch)
    assert chosen == [0, 1, 2] and best.epoch == 2  # a full tie keeps the earlier
    assert not best.offer({"epoch": 9})  # not validated
    history = [{"epoch": e, "val_map50": a, "val_map": b} for e, (a, b) in enumerate(rows)]
    old = BestEpoch.of_checkpoint({"best_value": 1.0}, history, "map50")
    assert (old.epoch, old.tie_value) == (1, 0.194)
    again = BestEpoch.of_checkpoint({**best.to_checkpoint()}, history, "map50")
    assert again == best
    assert BestEpoch("map").tie_metric == "map50"


def test_images_with_more_objects_than_the_model_returns_are_warned_of_once(
    three_images, tmp_path, caplog, capsys
):
    """An image with more objects than `box_detections_per_img` trained and validated with
    its recall silently capped: train warns once, naming the image with the most and the cap;
    `--detections-per-image N` sets the cap, kept in the checkpoint's model config (what eval
    and export read); a resume may raise it (no weight depends on it)."""
    from splitdet.shared.cli import main

    capped = replace(TINY, epochs=1, eval_every=1, model=replace(TINY.model,
                     box_detections_per_img=1))  # fmt: skip
    with caplog.at_level("WARNING", logger="splitdet.training.train"):
        train(capped, three_images, tmp_path / "capped", progress=False, max_iters=1)
    warned = [r.getMessage() for r in caplog.records if "per image" in r.getMessage()]
    # make_tiny_voc: img_001 holds two scratches; train = val there
    assert len(warned) == 1 and "(box_detections_per_img 1)" in warned[0], warned
    assert "the most, 2, in 'img_001' (train and val)" in warned[0]
    assert "--detections-per-image 2" in warned[0]
    caplog.clear()

    run = tmp_path / "run"
    argv = ["train", "--data", str(three_images), "--out", str(run), "--preset", "tiny"]
    argv += ["--eval-every", "0", "--no-progress"]
    with caplog.at_level("WARNING", logger="splitdet.training.train"):
        assert main([*argv, "--epochs", "1", "--detections-per-image", "5"]) == 0
    assert not [r for r in caplog.records if "per image" in r.getMessage()]
    assert json.loads((run / "train_config.json").read_text())["model"][
        "box_detections_per_img"
    ] == 5  # fmt: skip
    model, _ = load_model(run / "last.pt")
    assert model.config.box_detections_per_img == 5 and model.roi_heads.detections_per_img == 5
    assert main([*argv, "--epochs", "2", "--resume", "--detections-per-image", "7"]) == 0
    model, checkpoint = load_model(run / "last.pt")
    assert checkpoint["epoch"] == 1 and model.config.box_detections_per_img == 7
    assert main([*argv, "--epochs", "3", "--resume"]) == 0  # the run's own, 7, goes on
    assert load_model(run / "last.pt")[0].config.box_detections_per_img == 7
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(("name", "init", "events"), [
    ("paper", "none", {"paper_from_scratch", "paper_on_cpu"}),
    ("tiny", "none", set()),
])  # fmt: skip
def test_the_paper_preset_says_where_it_departs_from_the_paper(name, init, events, caplog):
    """A paper-preset run from random weights, or on the CPU, is told so before its first step
    (the paper started from an ImageNet ResNet50 on GPUs; a CPU step at 2448x2048 took 20 GB);
    another preset is not. The model is a tiny one: only the recipe's name and device count."""
    from types import SimpleNamespace

    from splitdet.training.run_start import start_afresh

    run = SimpleNamespace(config=replace(PRESETS[name], model=TINY.model), rank=0, progress=False,
                          model=MultiTaskRCNN(TINY.model), device=torch.device("cpu"))  # fmt: skip
    with caplog.at_level("WARNING", logger="splitdet"):
        start_afresh(run, init, resume=False)
    said = {getattr(r, "fields", {}).get("event") for r in caplog.records}
    assert said - {None} == events
