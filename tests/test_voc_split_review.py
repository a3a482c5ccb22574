"""`splitdet data split` and `data check`, as a review reproduced their faults:

3. ``data split --val 0 --test 0 --overwrite`` empties val.txt, which `train` reads as no val
   split (a warning) but `data check` refused as a val split without defective image: an
   empty val.txt is now a warning there too;
4. (a) `data split` on a tree whose images are in ``images/`` beside ``Annotations/`` says
   to rename that folder, as it does when Annotations/ is missing too; (b) `data check` of
   it counts the annotations it holds; (c) an image that is a FIFO is "not a regular file
   (a FIFO)", not "not found".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from splitdet.shared.cli import main
from splitdet.training import voc

from support import make_tiny_voc


def _check(root: Path, capsys) -> tuple[int, dict, str]:
    """`data check ROOT`: its exit status, its JSON report and its printed summary."""
    report = root.parent / "report.json"
    code = main(["data", "check", str(root), "--no-progress", "--json", str(report)])
    summary = main(["data", "check", str(root), "--no-progress"])
    assert summary == code
    return code, json.loads(report.read_text()), capsys.readouterr().out


def test_an_empty_val_split_is_a_warning_in_data_check_as_in_train(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "d")  # split files exist: --overwrite empties val, test
    assert main(["data", "split", str(root), "--val", "0", "--test", "0", "--overwrite"]) == 0
    assert voc.read_split_ids(root, "val") == [] and len(voc.read_split_ids(root, "train")) == 8

    code, report, _ = _check(root, capsys)

    assert code == 0 and report["problems"] == [], report["problems"]
    val = root / "ImageSets" / "Main" / "val.txt"
    assert f"{val}: lists no image; training then keeps no best.pt" in "\n".join(report["warnings"])
    voc.write_split(root, "train", [f"img_{k:03d}" for k in range(7)])
    voc.write_split(root, "val", ["img_007"])  # a val split, defect-free only: still refused
    code, report, _ = _check(root, capsys)
    assert code == 1 and report["problems"] == [
        f"{val}: no defective image, so the gate cannot be calibrated on it"
    ]


def _images_folder_tree(root: Path) -> Path:
    """A tree of 8 annotations whose images are in ``images/``, no split file."""
    make_tiny_voc(root)
    (root / "JPEGImages").rename(root / "images")
    for split in ("train", "val", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").unlink()
    return root


def test_split_beside_annotations_names_the_images_folder_to_rename(tmp_path, capsys):
    root = _images_folder_tree(tmp_path / "r2")

    code = main(["data", "split", str(root)])

    err = capsys.readouterr().err
    assert code == 2 and "image file not found" not in err
    assert (
        f"{root / 'JPEGImages'}: folder not found (not a VOC dataset?); {root / 'images'} "
        f"holds 8 images: rename it {root / 'JPEGImages'}"
    ) in err
    assert list((root / "ImageSets" / "Main").iterdir()) == []


def test_check_of_a_tree_without_jpegimages_counts_its_annotations(tmp_path, capsys):
    root = _images_folder_tree(tmp_path / "r2")

    code, report, text = _check(root, capsys)

    assert code == 1 and report["annotations"] == 8 and report["images"] == 0
    assert text.startswith(f"{root}: 8 annotations, 0 images")
    assert "holds 8 images: rename it" in report["problems"][0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_an_image_that_is_a_fifo_is_named_as_one_not_as_missing(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "r3")
    image = root / "JPEGImages" / "img_000.png"
    image.unlink()
    os.mkfifo(image)
    annotation = root / "Annotations" / "img_000.xml"

    with pytest.raises(voc.VocError) as caught:
        voc.read_annotation(root, "img_000")
    assert str(caught.value) == (
        f"{annotation}: image file {image}: not a regular file (a FIFO); put the image itself there"
    )
    code, report, _ = _check(root, capsys)
    assert code == 1 and str(caught.value) in report["problems"]
    assert not [p for p in report["problems"] if "image file not found" in p]


def test_split_add_keeps_what_the_kept_lines_hold_after_their_id(tmp_path, capsys):
    """`data split --add` rewrote the kept lines as bare ids, dropping what they held after
    them (a flag, a labelling tool's column), as `data merge` used to."""
    root = make_tiny_voc(tmp_path / "ds", n_defective=6, n_free=2)
    main_dir = root / "ImageSets" / "Main"
    for split in ("val", "test"):
        (main_dir / f"{split}.txt").unlink(missing_ok=True)
    ids = voc.read_split_ids(root, "train")
    (main_dir / "train.txt").write_text(f"{ids[0]}  1\n" + "".join(f"{i}\n" for i in ids[1:4]))
    assert main(["data", "split", str(root), "--add", "--seed", "1"]) == 0, capsys.readouterr()
    lines = (main_dir / "train.txt").read_text().splitlines()
    assert lines[0] == f"{ids[0]}  1" and lines[1:4] == ids[1:4]
