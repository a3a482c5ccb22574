"""`splitdet train / eval / export / synth` refuse option values that would train nothing, train
forever, fail after the work or give a wrong model: one line naming the option and the value,
exit status 2, before any work."""

from __future__ import annotations

import pytest
import torch

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.model import build_model
from splitdet.training import evaluate as evaluate_module
from splitdet.training import voc
from splitdet.training.presets import TINY

from support import make_tiny_voc

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_voc(tmp_path_factory):
    return make_tiny_voc(tmp_path_factory.mktemp("voc"), n_defective=2, n_free=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, build_model(TINY.model).eval())
    return path


def _error(capsys, *needles: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--lr", "0", "lr must be a positive number, got 0.0"),  # trained nothing
        ("--lr", "nan", "lr must be a positive number, got nan"),  # a traceback
        ("--lr", "-1", "lr must be a positive number, got -1.0"),  # torch's "Invalid lr"
        ("--minutes", "-1", "minutes must be a number >= 0, got -1.0"),  # ended before a step
        ("--minutes", "nan", "minutes must be a number >= 0, got nan"),  # never ended
        ("--minutes", "inf", "minutes must be a number >= 0, got inf"),  # failed after epoch 1
        ("--eval-every", "-1", "--eval-every must be >= 0, got -1"),  # validated every epoch
        ("--workers", "-1", "workers must be >= 0, got -1"),
        ("--seed", "-1", "seed must be 0-"),  # "expected non-negative integer"
        ("--seed", str(2**70), f"got {2**70}"),  # "Overflow when unpacking long long"
        ("--epochs", "0", "epochs must be >= 1, got 0"),
        ("--batch-size", "0", "--batch-size must be >= 1, got 0"),  # was: batch_size
        ("--whole-image-fraction", "1", "--whole-image-fraction must be in [0, 1), got 1.0"),
        ("--crop", "32000", "crop 32000 is larger than the model's input"),  # a traceback
        ("--classes", "scratch, scratch", "'scratch' is listed twice"),  # class 1 never trained
        ("--detections-per-image", "0", "--detections-per-image must be an integer 1-1000, got 0"),
        ("--detections-per-image", "1001", "--detections-per-image must be an integer 1-1000"),
    ],
)
def test_train_refuses_option_values_before_training(
    tiny_voc, tmp_path, capsys, option, value, message
):
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_voc), "--out", str(run), "--preset", "tiny"]
    assert main([*argv, "--epochs", "1", "--no-progress", option, value]) == 2
    _error(capsys, message)
    assert not run.exists()


def test_eval_checks_its_options_and_splits_before_evaluating(
    tiny_voc, checkpoint, capsys, monkeypatch
):
    """A bad --target-recall was found only after predicting every image; an empty split was
    'evaluated' (0 images, exit 0); a calibration split without defects was named by no file."""

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated")

    monkeypatch.setattr(evaluate_module, "evaluate", no_evaluation)
    argv = ["eval", "--data", str(tiny_voc), "--checkpoint", str(checkpoint), "--no-progress"]
    for recall in ("0", "1.5", "nan"):
        assert main([*argv, "--target-recall", recall]) == 2
        _error(capsys, f"--target-recall must be in (0, 1], got {float(recall)}")
    voc.write_split(tiny_voc, "nothing", [])
    assert main([*argv, "--split", "nothing"]) == 2
    _error(capsys, "nothing.txt: lists no images")
    free = [s.image_id for s in voc.read_split(tiny_voc, "val") if not s.is_defective]
    voc.write_split(tiny_voc, "free", free)
    assert main([*argv, "--calibrate-split", "free"]) == 2
    _error(capsys, "free.txt: no defective image", "--calibrate-split none")


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("eval", "--batch-size", "0"),  # "range() arg 3 must not be zero"
        ("eval", "--batch-size", "-1"),  # a traceback
        ("export", "--calibration-images", "0"),  # "no train images to calibrate on"
        ("synth", "--seed", "-1"),  # "expected non-negative integer"
    ],
)
def test_counts_below_their_range_are_refused_by_name(
    tiny_voc, checkpoint, tmp_path, capsys, command, option, value
):
    argv = {
        "eval": ["--data", str(tiny_voc), "--checkpoint", str(checkpoint)],
        "export": ["--checkpoint", str(checkpoint), "--quantize-edge", str(tiny_voc)],
        "synth": ["--size", "256x256", "--defective", "1", "--free", "0", "--workers", "1"],
    }[command]
    if command != "eval":
        argv += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exited:
        main([command, *argv, option, value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be >= " in err and value in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_calibration_images_without_quantize_edge_are_refused(checkpoint, tmp_path, capsys):
    """It was ignored without a word: the user asked for a calibration and got a float edge."""
    out = tmp_path / "out"
    argv = ["export", "--checkpoint", str(checkpoint), "--out", str(out)]
    assert main([*argv, "--calibration-images", "32"]) == 2
    _error(capsys, "--calibration-images calibrates --quantize-edge, which was not given")
    assert not out.exists()


def test_a_folder_given_as_checkpoint_is_named_as_such(tiny_voc, checkpoint, tmp_path, capsys):
    """`--checkpoint runs/tiny` (the run, not its best.pt) said "no such checkpoint file" of a
    folder that exists; and an export given as a checkpoint likewise."""
    run = checkpoint.parent
    assert main(["eval", "--data", str(tiny_voc), "--checkpoint", str(run), "--no-progress"]) == 2
    _error(capsys, f"{run}: a folder, not a checkpoint file", "model.pt")
    export = tmp_path / "export"
    export.mkdir()
    (export / "manifest.json").write_text("{}")
    (export / "cloud_heads.pt").write_bytes(b"")
    assert main(["export", "--checkpoint", str(export), "--out", str(tmp_path / "x")]) == 2
    _error(capsys, "a folder, not a checkpoint file", "model export", "--model")
    assert not (tmp_path / "x").exists()
