"""Review fixes of `data check` and `eval`: every bad split-file line reported in one run, an
annotation whose <filename> names another image warned of, `eval --json FILE` printing a
summary instead of the whole JSON, and the calibration split named by name."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from splitdet.shared.cli import main
from splitdet.training import voc
from splitdet.training.voc_check import check_dataset

from conftest import make_tiny_model
from support import make_tiny_voc


@pytest.fixture
def dataset(tmp_path) -> Path:
    """A tiny VOC tree of 6 defective + 2 defect-free images: train img_000..003 and the
    defect-free img_006, val img_004, test img_005; the defect-free img_007 in no split."""
    root = make_tiny_voc(tmp_path / "voc", n_defective=6, n_free=2)
    ids = voc.read_split_ids(root, "train")
    voc.write_split(root, "train", [*ids[:4], ids[6]])
    voc.write_split(root, "val", ids[4:5])
    voc.write_split(root, "test", ids[5:6])
    return root


# --------------------------------------------------------- 1. every bad split-file line at once


def test_data_check_reports_every_bad_split_line_and_still_sums_up_the_split(dataset, capsys):
    """One line holding a path hid every other problem of its split file, and the split's
    summary line: now each bad line, each id without annotation (one written with its image's
    extension says the id to write) and the counts of the lines that are fine."""
    train_txt = dataset / "ImageSets" / "Main" / "train.txt"
    with open(train_txt, "a", newline="") as fh:  # CRLF, padded: as a Windows editor leaves it
        fh.write("ghost_99\r\n  img_006.png  \r\nJPEGImages/img_007\r\nimg_001\r\n")

    report = check_dataset(dataset)
    assert report.problems == [
        f"{train_txt}:8: image id 'JPEGImages/img_007' holds a path separator",
        f"{train_txt}:9: image id 'img_001' listed twice",
        f"{train_txt}: lists 'ghost_99', which has no Annotations/ghost_99.xml",
        f"{train_txt}: lists 'img_006.png', which has no Annotations/img_006.png.xml; write "
        "the id without its extension: img_006",
    ]
    train = report.splits["train"]
    # the path line is an image with a problem; the repeat is img_001, counted once
    assert (train.images, train.defective, train.unreadable) == (5, 4, 1)
    assert report.unlisted == []  # not img_007: the bad line may be meant to list it

    assert main(["data", "check", str(dataset), "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "  train: 5 images (4 defective + 1 defect-free), and 1 more with a problem" in text
    assert "4 problem(s)" in text
    # train and eval still stop at the first bad line
    with pytest.raises(voc.VocError, match=r"train\.txt:8: image id 'JPEGImages/img_007'"):
        voc.read_split_ids(dataset, "train")


def test_a_repeated_id_hides_no_other_problem_of_its_split(dataset):
    """A line repeating an id was counted as an image with a problem: the split's summary
    counted one image too many, and its "no defective image" problem and the images-in-no-split
    warning were held back, as for a line naming no image."""
    free = voc.read_split_ids(dataset, "train")[-1]  # img_006, defect-free
    voc.write_split(dataset, "val", [free, free])
    report = check_dataset(dataset)
    val_txt = dataset / "ImageSets" / "Main" / "val.txt"
    assert f"{val_txt}:2: image id {free!r} listed twice" in report.problems
    assert any("val.txt" in p and "no defective image" in p for p in report.problems), (
        report.problems
    )
    assert report.splits["val"].unreadable == 0
    assert "img_007" in report.unlisted


# ------------------------------------------------- 2. a <filename> naming another image is warned


def _set_filename(root: Path, image_id: str, filename: str) -> None:
    path = root / "Annotations" / f"{image_id}.xml"
    text = path.read_text()
    start, end = text.index("<filename>") + len("<filename>"), text.index("</filename>")
    path.write_text(text[:start] + filename + text[end:])


def test_data_check_warns_of_an_annotation_whose_filename_names_another_image(dataset):
    """An annotation copied from another image's, boxes and all, keeps that image's name in
    <filename>: one warning each. <filename>s naming no image of the dataset (a camera's names):
    one line for all. The own image's name in another case, extension or folder: none."""
    _set_filename(dataset, "img_001", "img_000.png")  # copied from img_000's annotation
    _set_filename(dataset, "img_002", "IMG_1234.JPG")  # the camera's name
    _set_filename(dataset, "img_003", "DSC_0042.jpg")
    _set_filename(dataset, "img_004", "IMG_004.jpg")  # its own, other case and extension
    _set_filename(dataset, "img_005", "C:\\shots\\img_005.png")  # its own, with folders

    report = check_dataset(dataset)
    assert report.ok and report.problems == []
    annotations = dataset / "Annotations"
    named = [w for w in report.warnings if "<filename>" in w]
    assert named == [
        f"{annotations / 'img_001.xml'}: <filename> names img_000.png, the image of id img_000, "
        "but splitdet pairs this annotation with its own image img_001.png: copied from "
        "img_000's annotation, boxes and all? Check its boxes on img_001.png, then write that "
        "name in <filename>",
        f"{annotations}: 2 annotation(s) name a <filename> other than their own image, e.g. "
        "img_002.xml names 'IMG_1234.JPG' (its image: img_002.png); splitdet pairs each "
        "annotation with its own id's image",
    ]
    assert voc.read_annotation(dataset, "img_001").image_path.name == "img_001.png"  # unchanged


# ------------------------------------------------ 3 and 4. eval's stdout; the calibration split


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A random tiny model saved as a checkpoint."""
    from splitdet.shared.checkpoint import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(path, make_tiny_model())
    return path


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory) -> Path:
    """4 images (3 defective), train = val = test = all."""
    return make_tiny_voc(tmp_path_factory.mktemp("eval_voc"), n_defective=3, n_free=1)


def _eval(data: Path, checkpoint: Path, *options: str) -> int:
    return main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--no-store",
                 "--no-progress", *options])  # fmt: skip


def test_eval_json_file_prints_a_summary_and_json_dash_the_json(
    eval_data, checkpoint, tmp_path, capsys, monkeypatch, one_torch_thread
):
    """`eval --json FILE` printed the whole JSON on stdout too: now a few lines for people;
    `--json -` prints the JSON (and writes no file named '-'), as eval does without --json."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval.json"
    assert _eval(eval_data, checkpoint, "--json", str(out)) == 0
    text = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert not text.lstrip().startswith("{") and '"map"' not in text and len(text) < 600, text
    lines = text.splitlines()
    assert lines[0] == f"split test of {eval_data}: 4 images (3 defective)"
    assert lines[1].startswith("  detector: mAP ") and ", AR@100 " in lines[1]
    assert f"gate: threshold {metrics['gate_threshold']:.3f} (calibrated on val for 99.5% " in text
    assert f"recall {metrics['gate_recall']:.1%}, accuracy {metrics['gate_accuracy']:.1%}" in text
    assert "gated system: mAP kept " in text and lines[-1] == f"every metric in {out}"

    assert _eval(eval_data, checkpoint, "--json", "-") == 0
    assert json.loads(capsys.readouterr().out)["gate_threshold"] == metrics["gate_threshold"]
    assert not (tmp_path / "-").exists()


def test_eval_names_the_split_the_gate_was_calibrated_on(
    eval_data, checkpoint, tmp_path, capsys, caplog, one_torch_thread
):
    """gate_calibrated_on and gate_operating_points_calibrated_on said "calibration split",
    and the stderr table "the calibration split": now the split used, with its dataset when
    --calibrate-data names another one, or the evaluated split with --calibrate-split none."""
    other = tmp_path / "other"
    shutil.copytree(eval_data, other)
    runs = {
        "val": ("--calibrate-split", "val"),
        f"val of {other}": ("--calibrate-data", str(other)),
        "none": ("--calibrate-split", "none"),
    }
    found = {}
    for name, options in runs.items():
        out = tmp_path / "eval.json"
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="splitdet.training.cli_eval"):
            assert _eval(eval_data, checkpoint, "--json", str(out), *options) == 0
        capsys.readouterr()
        metrics = json.loads(out.read_text())
        table = next(m for r in caplog.records if "operating points" in (m := r.getMessage()))
        on = (metrics["gate_calibrated_on"], metrics["gate_operating_points_calibrated_on"])
        found[name] = (*on, table.splitlines()[0])
    assert found["val"][:2] == ("val", "val")
    assert "thresholds calibrated on split val; on split test:" in found["val"][2]
    assert found[f"val of {other}"][:2] == (f"val of {other}",) * 2
    assert f"calibrated on split val of {other};" in found[f"val of {other}"][2]
    assert found["none"][:2] == ("given", "test")  # the checkpoint's; the points on test itself
    assert "calibrated on split test itself, the evaluated one" in found["none"][2]
    assert not any("calibration split" in line for entry in found.values() for line in entry)


def test_an_empty_json_name_is_refused_before_the_evaluation(tmp_path, capsys):
    """`--json ""` (an unset shell variable) tried to write a file named "" at the end, after
    the whole evaluation; `predict` wrote no JSON at all, without a word."""
    for argv in (
        ["eval", "--data", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "x.pt")],
        ["predict", str(tmp_path / "a.png"), "--model", str(tmp_path / "m")],
    ):
        assert main([*argv, "--json", ""]) == 2
        assert "--json '': give a file name, or - for stdout" in capsys.readouterr().err
