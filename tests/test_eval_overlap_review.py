"""Review fix of eval: its figures were reported without a word when the evaluated split shares
images with the train split (the model has seen them) or with the split the gate is calibrated
on (the threshold was set on them). `data check` flagged each such image; eval now warns, and
its JSON's "split_overlap" says how many and which file lists them.

`tiny_voc` holds img_000..img_002 (defective) and img_003 (defect-free); each test writes its
own splits into a copy of it. `finished_run` trained on `tiny_voc`."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from splitdet.shared.cli import main
from splitdet.training import voc
from splitdet.training.run_checks import also_in_train

LOGGER = "splitdet.training.cli_eval"

# the machine's cores are shared: oversubscribed OpenMP threads made an eval take seconds
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dataset(tiny_voc: Path, root: Path, **splits: list[int]) -> Path:
    """A copy of `tiny_voc` at `root` whose split files list the images numbered in `splits`
    (train=[0, 1], ...)."""
    shutil.copytree(tiny_voc / "Annotations", root / "Annotations")
    shutil.copytree(tiny_voc / "JPEGImages", root / "JPEGImages")
    for split, numbers in splits.items():
        voc.write_split(root, split, [f"img_{k:03d}" for k in numbers])
    return root


def _eval(caplog, data: Path, what: list[str], out: Path, *options: str) -> tuple[dict, list]:
    """(The JSON, the log records) of `splitdet eval --data DATA WHAT... --json OUT`."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert main(["eval", "--data", str(data), *what, "--no-progress", "--json", str(out),
                     *options]) == 0  # fmt: skip
    return json.loads(out.read_text()), list(caplog.records)


def _checkpoint(finished_run: Path) -> list[str]:
    """eval's options for `finished_run`'s checkpoint, never written into (module fixture)."""
    return ["--checkpoint", str(finished_run / "last.pt"), "--no-store"]


def _overlaps(records: list) -> list[str]:
    """The overlap warnings among `records`."""
    return [r.getMessage() for r in records
            if r.levelno == logging.WARNING and "evaluated images" in r.getMessage()]  # fmt: skip


@pytest.mark.parametrize(
    "splits, shared",
    [
        # the reviewer's repro: cp train.txt test.txt
        (dict(train=[0, 1], val=[2, 3], test=[0, 1]), {"train": (2, "img_000")}),
        # some test images in train, some in val
        (dict(train=[0], val=[1, 2], test=[0, 2, 3]),
         {"train": (1, "img_000"), "val": (1, "img_002")}),
    ],
)  # fmt: skip
def test_eval_warns_of_test_images_also_in_train_or_val(
    tiny_voc, finished_run, tmp_path, caplog, capsys, splits, shared
):
    """Before: a normal summary and no warning, though `data check` flagged each image."""
    data = _dataset(tiny_voc, tmp_path / "data", **splits)
    metrics, records = _eval(caplog, data, _checkpoint(finished_run), tmp_path / "e.json")
    capsys.readouterr()
    main_dir = data / "ImageSets" / "Main"
    assert metrics["split_overlap"] == {
        split: {"file": str(main_dir / f"{split}.txt"), "images": n, "example": example}
        for split, (n, example) in shared.items()
    }
    warnings = _overlaps(records)
    assert len(warnings) == len(shared), warnings
    for warning, (split, (n, example)) in zip(warnings, shared.items(), strict=True):
        total = len(splits["test"])
        assert warning.startswith(
            f"{main_dir}: {n} of the {total} evaluated images (test.txt) are in {split}.txt too "
            f"(e.g. {example!r}): "
        ), warning
        assert "read better" in warning and "splitdet data split --overwrite" in warning
    assert ("gate threshold is calibrated on" in warnings[-1]) == ("val" in shared)


def test_disjoint_splits_give_no_warning(tiny_voc, finished_run, tmp_path, caplog, capsys):
    """The usual case says nothing new: the JSON's split_overlap is empty."""
    data = _dataset(tiny_voc, tmp_path / "data", train=[0], val=[1, 3], test=[2])
    metrics, records = _eval(caplog, data, _checkpoint(finished_run), tmp_path / "e.json")
    capsys.readouterr()
    assert metrics["split_overlap"] == {}
    assert not _overlaps(records)
    assert not [r for r in records if "evaluated split itself" in r.getMessage()]


def test_an_image_file_in_two_splits_under_two_ids_is_found(
    tiny_voc, finished_run, tmp_path, caplog, capsys
):
    """As `also_in_train` compares: an annotation of another id whose <filename> is a train
    image is that image."""
    data = _dataset(tiny_voc, tmp_path / "data", train=[0], val=[1, 3])
    copy = (data / "Annotations" / "img_000.xml").read_text()
    (data / "Annotations" / "dup_000.xml").write_text(copy)  # <filename>img_000.png
    voc.write_split(data, "test", ["img_002", "dup_000"])
    metrics, records = _eval(caplog, data, _checkpoint(finished_run), tmp_path / "e.json")
    capsys.readouterr()
    assert metrics["split_overlap"]["train"]["example"] == "dup_000"
    (warning,) = _overlaps(records)
    assert "1 of the 2 evaluated images (test.txt) are in train.txt too (e.g. 'dup_000')" in warning


def test_a_calibration_split_in_another_folder_is_compared_by_image_file(
    tiny_voc, finished_run, tmp_path, caplog, capsys
):
    """--calibrate-data DIR: its ids name its own images (no warning for the same ids), its
    image files may be the evaluated split's (a warning naming its split file)."""
    data = _dataset(tiny_voc, tmp_path / "data", train=[0], test=[1, 2, 3])
    copied = _dataset(tiny_voc, tmp_path / "copied", val=[1, 2])  # the same ids, other files
    what = [*_checkpoint(finished_run), "--calibrate-data", str(copied)]
    metrics, records = _eval(caplog, data, what, tmp_path / "e.json")
    assert metrics["split_overlap"] == {} and not _overlaps(records)

    linked = tmp_path / "linked"  # another tree of the same image files
    shutil.copytree(tiny_voc / "Annotations", linked / "Annotations")
    (linked / "JPEGImages").symlink_to(data / "JPEGImages")
    voc.write_split(linked, "val", ["img_001", "img_002"])
    what = [*_checkpoint(finished_run), "--calibrate-data", str(linked)]
    metrics, records = _eval(caplog, data, what, tmp_path / "e.json")
    capsys.readouterr()
    val = linked / "ImageSets" / "Main" / "val.txt"
    assert metrics["split_overlap"] == {
        f"val of {linked}": {"file": str(val), "images": 2, "example": "img_001"}
    }
    (warning,) = _overlaps(records)
    assert f"2 of the 3 evaluated images (test.txt) are in {val} (the same image files) too" in (
        warning
    )
    assert "--calibrate-data" in warning and "splitdet data check" not in warning


def test_calibrating_on_the_evaluated_split_itself_is_said_not_warned(
    tiny_voc, finished_run, tmp_path, caplog, capsys
):
    """`--split val` (calibrated on val) and `--calibrate-split none` are the user's choices:
    no overlap warning. The first is said at INFO (its gate figures read better); the second
    calibrates nothing, so val is no calibration split. The train split is still compared."""
    data = _dataset(tiny_voc, tmp_path / "data", train=[0], val=[1, 2, 3], test=[1, 2, 3])
    metrics, records = _eval(
        caplog, data, _checkpoint(finished_run), tmp_path / "e.json", "--split", "val"
    )
    assert metrics["split_overlap"] == {} and not _overlaps(records)
    (itself,) = [r for r in records if "evaluated split itself" in r.getMessage()]
    assert itself.levelno == logging.INFO
    assert itself.getMessage().startswith(f"{data / 'ImageSets' / 'Main' / 'val.txt'}: ")

    metrics, records = _eval(
        caplog, data, _checkpoint(finished_run), tmp_path / "e.json", "--calibrate-split", "none"
    )
    assert metrics["split_overlap"] == {} and not _overlaps(records)
    assert not [r for r in records if "evaluated split itself" in r.getMessage()]

    voc.write_split(data, "train", ["img_000", "img_001"])
    metrics, records = _eval(
        caplog, data, _checkpoint(finished_run), tmp_path / "e.json", "--split", "val"
    )
    capsys.readouterr()
    assert set(metrics["split_overlap"]) == {"train"}
    (warning,) = _overlaps(records)
    assert "1 of the 3 evaluated images (val.txt) are in train.txt too" in warning


def test_calibrating_on_train_is_one_warning_saying_both(
    tiny_voc, finished_run, tmp_path, caplog, capsys
):
    data = _dataset(tiny_voc, tmp_path / "data", train=[0, 1, 2], test=[1, 3])
    metrics, records = _eval(
        caplog, data, _checkpoint(finished_run), tmp_path / "e.json", "--calibrate-split", "train"
    )
    capsys.readouterr()
    assert set(metrics["split_overlap"]) == {"train"}
    assert metrics["split_overlap"]["train"]["images"] == 1
    (warning,) = _overlaps(records)
    assert "a model trained on this dataset has seen them" in warning
    assert "it is also the split the gate threshold is calibrated on" in warning


def test_eval_of_an_export_warns_of_test_images_in_train(
    tiny_voc, tiny_model_dir, tmp_path, caplog, capsys
):
    """`eval --model` evaluates a split too; its threshold is the manifest's (calibrated
    nowhere eval knows), so only train.txt is compared with, when the data has one."""
    data = _dataset(tiny_voc, tmp_path / "data", train=[0, 1], val=[2], test=[1, 2, 3])
    what = ["--model", str(tiny_model_dir)]
    metrics, records = _eval(caplog, data, what, tmp_path / "e.json")
    assert set(metrics["split_overlap"]) == {"train"}
    (warning,) = _overlaps(records)
    assert "1 of the 3 evaluated images (test.txt) are in train.txt too (e.g. 'img_001')" in (
        warning
    )

    (data / "ImageSets" / "Main" / "train.txt").unlink()  # nothing to compare with
    metrics, records = _eval(caplog, data, what, tmp_path / "e.json")
    capsys.readouterr()
    assert metrics["split_overlap"] == {} and not _overlaps(records)


def test_trains_warning_reads_as_it_did(tiny_voc):
    """`also_in_train`, now built from the pieces eval shares, says what it said."""
    samples = voc.read_split(tiny_voc, "train")
    text = also_in_train(samples[:2], samples[1:], tiny_voc)
    assert text == (
        f"{tiny_voc / 'ImageSets' / 'Main'}: 1 of the 3 validation images are in train.txt too "
        "(e.g. 'img_001'): validation, best.pt and the gate threshold it calibrates then judge "
        "on images the model trains on, and read better than the model is; `splitdet data "
        "check` lists them, `splitdet data split --overwrite` writes disjoint splits"
    )
    assert also_in_train(samples[:1], samples[1:], tiny_voc) is None


def test_a_hard_link_to_an_image_is_the_same_image(tmp_path):
    """`data merge` hard-links its sources' images: eval of a merged tree calibrated on a
    source (--calibrate-data) compared resolved paths and missed them all."""
    from splitdet.training.run_checks import shared_images
    from splitdet.training.voc_types import VocSample

    source, merged = tmp_path / "a.png", tmp_path / "A_a.png"
    source.write_bytes(b"an image")
    os.link(source, merged)
    other = tmp_path / "b.png"
    other.write_bytes(b"an image")  # the same bytes, another file
    held_out = [VocSample("A_a", merged, 8, 8), VocSample("b", other, 8, 8)]
    assert shared_images(held_out, [VocSample("a", source, 8, 8)], by_id=False) == ["A_a"]
