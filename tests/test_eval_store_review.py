"""`splitdet eval --checkpoint` stored the threshold it calibrated on --data's val split into the
checkpoint whatever the checkpoint held: comparing a deployed v1 with v2 on new data rewrote
v1's checkpoint, which then no longer rebuilt v1's export. The checkpoint now records where its
threshold was calibrated (train's val split, or eval's calibration split); eval stores a new one
by default only over none, or over one calibrated on the same data and split, and says when it
keeps the checkpoint's (`--store` replaces it, and is refused with --no-store)."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from splitdet.shared.checkpoint import read_checkpoint, save_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.probability_format import format_probability
from splitdet.training.presets import TINY

from conftest import make_tiny_model
from support import make_tiny_voc

SOURCE_KEYS = ("gate_calibration_data", "gate_calibration_split")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Two VOC trees of other images (v1's data, the merged data v2 trained on)."""
    root = tmp_path_factory.mktemp("store_review")
    return (make_tiny_voc(root / "old", n_defective=3, n_free=1, seed=1),
            make_tiny_voc(root / "merged", n_defective=4, n_free=2, seed=2))  # fmt: skip


@pytest.fixture(scope="module")
def model_checkpoint(tmp_path_factory) -> Path:
    """A random tiny model saved as a checkpoint (threshold 0.5, never calibrated)."""
    path = tmp_path_factory.mktemp("store_ckpt") / "model.pt"
    save_checkpoint(path, make_tiny_model())
    return path


def _eval(data: Path, checkpoint: Path, out: Path, *options: str) -> dict:
    """`splitdet eval` of `checkpoint` on `data` (exit status 0): its JSON."""
    assert main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--no-progress",
                 "--json", str(out), *options]) == 0  # fmt: skip
    return json.loads(out.read_text())


def _lines(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def test_eval_on_other_data_keeps_the_threshold_calibrated_elsewhere(
    datasets, model_checkpoint, tmp_path, caplog, capsys, one_torch_thread
):
    old, merged = datasets
    checkpoint = tmp_path / "v1.pt"
    shutil.copy(model_checkpoint, checkpoint)
    caplog.set_level(logging.INFO, logger="splitdet.training.cli_eval")

    # never calibrated: eval stores its threshold, and where it calibrated it
    first = _eval(old, checkpoint, tmp_path / "first.json")
    stored = read_checkpoint(checkpoint)
    assert first["gate_threshold_stored"] is True
    assert stored["gate_threshold"] == first["gate_threshold"] == first[
        "checkpoint_gate_threshold"]  # fmt: skip
    assert [stored[k] for k in SOURCE_KEYS] == [str(old.resolve()), "val"]
    ours = stored["gate_threshold"]

    # on other data (v1 compared with v2 on the merged data): the checkpoint is left as it was
    unchanged = checkpoint.read_bytes()
    caplog.clear()
    capsys.readouterr()
    other = _eval(merged, checkpoint, tmp_path / "other.json")
    assert checkpoint.read_bytes() == unchanged
    theirs = other["gate_threshold"]
    assert theirs != ours  # the figures below tell the two apart
    # the JSON: the threshold calibrated here (its gate figures are at it), not stored
    assert other["gate_calibrated_on"] == "val"
    assert other["gate_threshold_stored"] is False
    assert other["checkpoint_gate_threshold"] == ours
    assert not _lines(caplog, "stored gate threshold")
    (kept,) = _lines(caplog, "kept its gate threshold")
    assert kept.levelno == logging.INFO and "\n" not in kept.getMessage()
    assert kept.getMessage() == (
        f"{checkpoint}: kept its gate threshold {format_probability(ours)} (calibrated on split "
        f"val of {old.resolve()}), not this evaluation's {format_probability(theirs)} "
        f"(calibrated on split val of {merged.resolve()}, the threshold its gate figures are "
        "at); --store replaces the checkpoint's with it"
    )
    summary = capsys.readouterr().out
    assert (
        f"gate: threshold {format_probability(theirs)} (calibrated on val for 99.5% recall; "
        f"not stored, the checkpoint keeps {format_probability(ours)}): "
    ) in summary

    # the same data and split, reached by another path: re-evaluated, the same threshold,
    # which the checkpoint holds already (not written again)
    caplog.clear()
    again = _eval(old / ".." / old.name, checkpoint, tmp_path / "again.json")
    assert again["gate_threshold_stored"] is True and _lines(caplog, "holds this gate threshold")
    assert [read_checkpoint(checkpoint)[k] for k in SOURCE_KEYS] == [str(old.resolve()), "val"]

    # --store replaces it with the other data's, recorded as such
    caplog.clear()
    forced = _eval(merged, checkpoint, tmp_path / "forced.json", "--store")
    now = read_checkpoint(checkpoint)
    assert forced["gate_threshold_stored"] is True and _lines(caplog, "stored gate threshold")
    assert now["gate_threshold"] == theirs
    assert [now[k] for k in SOURCE_KEYS] == [str(merged.resolve()), "val"]
    assert "stored in the checkpoint" in capsys.readouterr().out


def test_a_calibration_without_a_recorded_source_is_kept(
    datasets, model_checkpoint, tmp_path, caplog, one_torch_thread
):
    """A checkpoint an older splitdet calibrated records no source: it may have been
    calibrated on any data, so eval keeps it (the safe side) and says how to replace it."""
    old, _ = datasets
    from splitdet.shared.checkpoint import load_model

    model, _ = load_model(model_checkpoint)
    caplog.set_level(logging.INFO, logger="splitdet.training.cli_eval")
    for kind, extra in (
        ("training's validation", {"gate_calibrated": True}),
        ("an earlier `splitdet eval`", {"gate_calibrated": True, "gate_target_recall": 0.995}),
    ):
        checkpoint = tmp_path / "older.pt"
        save_checkpoint(checkpoint, model, gate_threshold=0.25, **extra)
        unchanged = checkpoint.read_bytes()
        caplog.clear()
        metrics = _eval(old, checkpoint, tmp_path / "older.json")
        assert checkpoint.read_bytes() == unchanged, kind
        assert metrics["gate_threshold_stored"] is False
        assert metrics["checkpoint_gate_threshold"] == 0.25
        (kept,) = _lines(caplog, "kept its gate threshold")
        assert (
            f"kept its gate threshold {format_probability(0.25)} (calibrated by {kind} of "
            "an older splitdet, which did not record on what data)"
        ) in kept.getMessage()
        assert "--store replaces" in kept.getMessage()
    _eval(old, checkpoint, tmp_path / "forced.json", "--store")
    assert read_checkpoint(checkpoint)["gate_calibration_data"] == str(old.resolve())


def test_an_older_training_checkpoint_tells_its_source_by_its_data(
    datasets, model_checkpoint, tmp_path, caplog, one_torch_thread
):
    """Training checkpoints have recorded their resolved --data all along, and training
    calibrates on its val split: eval on that data stores as before, on other data keeps."""
    old, merged = datasets
    from splitdet.shared.checkpoint import load_model

    model, _ = load_model(model_checkpoint)
    checkpoint = tmp_path / "trained_by_older.pt"
    save_checkpoint(checkpoint, model, gate_threshold=0.25, gate_calibrated=True,
                    data=str(old.resolve()))  # fmt: skip
    caplog.set_level(logging.INFO, logger="splitdet.training.cli_eval")
    unchanged = checkpoint.read_bytes()
    assert _eval(merged, checkpoint, tmp_path / "merged.json")["gate_threshold_stored"] is False
    assert checkpoint.read_bytes() == unchanged
    (kept,) = _lines(caplog, "kept its gate threshold")
    assert f"(calibrated on split val of {old.resolve()})" in kept.getMessage()
    assert _eval(old, checkpoint, tmp_path / "old.json")["gate_threshold_stored"] is True


def test_train_records_where_it_calibrated_its_threshold(
    datasets, tmp_path, caplog, one_torch_thread
):
    """`splitdet train` records its validation split as the threshold's source: an eval on
    the training data's val split updates it, one on other data keeps it."""
    from splitdet.training.train import train

    old, merged = datasets
    run = tmp_path / "run"
    train(replace(TINY, epochs=1, eval_every=1), old, run, progress=False, max_iters=1)
    best = run / "best.pt"
    trained = read_checkpoint(best)
    assert trained["gate_calibrated"] is True
    assert [trained[k] for k in SOURCE_KEYS] == [str(old.resolve()), "val"]

    caplog.set_level(logging.INFO, logger="splitdet.training.cli_eval")
    unchanged = best.read_bytes()
    assert _eval(merged, best, tmp_path / "merged.json")["gate_threshold_stored"] is False
    assert best.read_bytes() == unchanged and _lines(caplog, "kept its gate threshold")
    assert _eval(old, best, tmp_path / "old.json")["gate_threshold_stored"] is True

    # resumed for an epoch without validation: last.pt keeps the threshold's source
    train(replace(TINY, epochs=2, eval_every=0), old, run, resume=True, progress=False,
          max_iters=1)  # fmt: skip
    resumed = read_checkpoint(run / "last.pt")
    assert resumed["epoch"] == 1 and [resumed[k] for k in SOURCE_KEYS] == [
        str(old.resolve()), "val"]  # fmt: skip


def test_store_is_refused_where_it_cannot_mean_anything(datasets, model_checkpoint, capsys):
    old, _ = datasets
    base = ["eval", "--data", str(old), "--checkpoint", str(model_checkpoint), "--no-progress"]
    with pytest.raises(SystemExit) as stopped:
        main([*base, "--store", "--no-store"])
    assert stopped.value.code == 2
    assert "argument --no-store: not allowed with argument --store" in capsys.readouterr().err
    assert main([*base, "--store", "--calibrate-split", "none"]) == 2
    err = capsys.readouterr().err
    assert "--store writes the threshold eval calibrates into the checkpoint, and " in err
    assert "--calibrate-split none calibrates none" in err
    assert main(["eval", "--data", str(old), "--model", str(old), "--store"]) == 2
    assert "--store is for --checkpoint only, not --model" in capsys.readouterr().err


def test_a_checkpoint_that_cannot_be_written_is_not_said_stored(
    datasets, model_checkpoint, tmp_path, capsys, monkeypatch, one_torch_thread
):
    """The JSON on stdout was printed before the store was tried: a checkpoint that could not
    be written was said to hold the new threshold. Now the JSON tells what the file holds, is
    shown all the same, and the failure is the command's error."""
    import splitdet.shared.checkpoint as checkpoint_module
    from splitdet.shared.atomic_file import WriteError

    old, _ = datasets
    checkpoint = tmp_path / "full_disk.pt"
    shutil.copy(model_checkpoint, checkpoint)

    def no_room(_checkpoint, path):
        raise WriteError(path, "no space left on device", 28)

    monkeypatch.setattr(checkpoint_module, "save_torch", no_room)
    capsys.readouterr()
    code = main(["eval", "--data", str(old), "--checkpoint", str(checkpoint), "--no-progress",
                 "--json", "-"])  # fmt: skip
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    assert code == 2 and metrics["gate_threshold_stored"] is False
    assert metrics["checkpoint_gate_threshold"] == 0.5  # what the file holds
    assert f"{checkpoint}: cannot store the threshold (no space left on device)" in err


def test_json_naming_an_input_is_refused_and_a_second_eval_writes_nothing(
    datasets, model_checkpoint, tmp_path, caplog, capsys, one_torch_thread
):
    """`eval --json` wrote its JSON over the checkpoint (or a manifest, an annotation) it
    was given; and an eval finding the threshold the checkpoint holds rewrote the file."""
    old, _ = datasets
    checkpoint = tmp_path / "v1.pt"
    shutil.copy(model_checkpoint, checkpoint)
    unchanged = checkpoint.read_bytes()
    base = ["eval", "--data", str(old), "--checkpoint", str(checkpoint), "--no-progress"]
    assert main([*base, "--json", str(checkpoint)]) == 2
    assert f"--json {checkpoint}: is the --checkpoint file" in capsys.readouterr().err
    inside = old / "Annotations" / "img_000.xml"
    assert main([*base, "--json", str(inside)]) == 2
    assert f"--json {inside}: inside --data {old}" in capsys.readouterr().err
    assert checkpoint.read_bytes() == unchanged and inside.read_bytes().startswith(b"<")

    _eval(old, checkpoint, tmp_path / "first.json")  # stores
    stored = checkpoint.stat()
    caplog.set_level(logging.INFO, logger="splitdet.training.cli_eval")
    caplog.clear()
    again = _eval(old, checkpoint, tmp_path / "again.json")
    assert again["gate_threshold_stored"] is True  # (the checkpoint holds it)
    assert checkpoint.stat().st_mtime_ns == stored.st_mtime_ns  # not written again
    assert _lines(caplog, "holds this gate threshold")
