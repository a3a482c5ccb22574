"""A reviewer's own PASCAL VOC dataset (LabelImg, CVAT, a Mac), as its faults were reproduced:

1. ``data split --write-empty`` wrote an empty annotation for every image without
   ``Annotations/ID.xml`` even when its real one lay where splitdet does not read it (beside
   the image, in a sub-folder of Annotations, as ``ID.XML``): defective images made
   defect-free. It now refuses, writing nothing, naming an example and the fix; `data check`
   names such an image's annotation and warns of the .xml files beside the images (it advised
   converting them as images);
2. class names that differ only in Unicode normalisation (NFC and NFD ``Kratzer-ä``) were two
   classes printed alike, with a ``--classes`` suggestion naming "both": now a warning naming
   both spellings, in `data check` and in train's unknown-class refusal, and no suggestion;
3. a class name with a comma was suggested in a ``--classes`` that splits it: now a problem
   naming the class and saying to rename it, and no suggestion;
4. a split file in UTF-16 (PowerShell's ``>``) is read as UTF-8 failed with a codec error:
   the message now says UTF-16 and to save it as UTF-8.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splitdet.shared.cli import main

from support import make_tiny_voc, train_argv

NFC = "Kratzer-\u00e4"
NFD = "Kratzer-a\u0308"


def _unsplit(root: Path) -> Path:
    """``make_tiny_voc`` at ``root`` (6 defective + 2 defect-free images) without split files."""
    make_tiny_voc(root)
    for split in ("train", "val", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").unlink()
    return root


def _move(root: Path, image_id: str, to: Path) -> None:
    to.parent.mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / f"{image_id}.xml").rename(to)


def _report(root: Path) -> dict:
    out = root.parent / f"{root.name}-report.json"
    main(["data", "check", str(root), "--no-progress", "--json", str(out)])
    return json.loads(out.read_text())


def _renamed_class(root: Path, image_id: str, name: str) -> None:
    path = root / "Annotations" / f"{image_id}.xml"
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("<name>scratch</name>", f"<name>{name}</name>"), "utf-8")


# --------------------------------------------- 1: --write-empty over annotations not read


@pytest.mark.parametrize(
    ("layout", "moved", "shown", "fix"),
    [
        ("beside, all", range(8), "JPEGImages/img_000.xml", "move it to "),
        ("beside, some", (0, 3), "JPEGImages/img_000.xml", "move it to "),
        ("CVAT sub-folder", (1,), "Annotations/line1/img_001.xml", "move it up to "),
        ("upper-case suffix", (2,), "Annotations/img_002.XML", "name it img_002.xml"),
    ],
)
def test_write_empty_refuses_images_whose_annotation_lies_elsewhere(
    tmp_path, capsys, layout, moved, shown, fix
):
    root = _unsplit(tmp_path / "d")
    for k in moved:
        image_id = f"img_{k:03d}"
        to = {
            "CVAT sub-folder": root / "Annotations" / "line1" / f"{image_id}.xml",
            "upper-case suffix": root / "Annotations" / f"{image_id}.XML",
        }.get(layout, root / "JPEGImages" / f"{image_id}.xml")
        _move(root, image_id, to)
    before = sorted(p.name for p in (root / "Annotations").iterdir())

    code = main(["data", "split", str(root), "--write-empty", "--val", "0.2"])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "--write-empty refused, nothing written" in err and "0 defective" not in err, err
    assert f"{len(moved)} image(s) without Annotations/ID.xml" in err, err
    assert shown in err and fix in err, err
    assert sorted(p.name for p in (root / "Annotations").iterdir()) == before
    assert not (root / "ImageSets" / "Main" / "train.txt").exists()

    # data check names each such image's annotation instead of advising --write-empty
    report = _report(root)
    assert not report["ok"]
    unannotated = [p for p in report["problems"] if "no annotation (Annotations/" in p]
    assert len(unannotated) == len(moved), report["problems"]
    assert all("is its annotation, which splitdet does not read" in p for p in unannotated)
    assert not any("--write-empty" in p for p in unannotated), unannotated


def test_write_empty_still_writes_for_images_with_no_annotation_anywhere(tmp_path, capsys):
    root = _unsplit(tmp_path / "d")
    (root / "Annotations" / "img_007.xml").unlink()  # a defect-free image LabelImg left bare
    assert main(["data", "split", str(root), "--write-empty", "--val", "0.2"]) == 0
    assert (root / "Annotations" / "img_007.xml").is_file()
    assert "wrote 1 empty annotation(s)" in capsys.readouterr().out


@pytest.mark.parametrize("layout", ["beside", "sub-folder"])
def test_data_check_is_not_plain_ok_with_annotations_it_cannot_read(tmp_path, layout):
    # every image has its annotation, as an earlier --write-empty left it; the real one of
    # img_000 lies where splitdet does not read it
    root = make_tiny_voc(tmp_path / "d")
    to = (
        root / "JPEGImages" / "img_000.xml"
        if layout == "beside"
        else root / "Annotations" / "line1" / "img_000.xml"
    )
    to.parent.mkdir(exist_ok=True)
    to.write_bytes((root / "Annotations" / "img_000.xml").read_bytes())

    report = _report(root)

    said = [w for w in report["warnings"] if "img_000.xml" in w and "Annotations" in w]
    assert said, report["warnings"]
    # (the .xml beside the images were "files not read: convert the others, or remove them")
    assert not any("convert the others" in w for w in report["warnings"]), report["warnings"]


# ------------------------------------------------- 2: classes alike but for Unicode normalisation


def test_classes_differing_in_unicode_normalisation_are_named_and_not_suggested(tmp_path):
    root = make_tiny_voc(tmp_path / "d")
    _renamed_class(root, "img_000", NFC)
    _renamed_class(root, "img_001", NFD)

    warnings = _report(root)["warnings"]

    twins = [w for w in warnings if "differ only in Unicode normalisation" in w]
    assert len(twins) == 1, warnings
    assert ascii(NFC) in twins[0] and ascii(NFD) in twins[0], twins[0]
    assert "make them one" in twins[0], twins[0]
    assert not any("train with --classes" in w for w in warnings), warnings


def test_train_names_classes_differing_in_unicode_normalisation(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "d")
    _renamed_class(root, "img_000", NFC)
    _renamed_class(root, "img_001", NFD)

    assert main(train_argv(root, tmp_path / "run")) == 2

    err = capsys.readouterr().err
    assert "unknown class" in err and "differ only in Unicode normalisation" in err, err
    assert ascii(NFC) in err and ascii(NFD) in err, err
    assert "train with --classes" not in err, err


# --------------------------------------------------------------- 3: a class name with a comma


def test_a_class_name_with_a_comma_is_a_problem_not_a_suggestion(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "d")
    _renamed_class(root, "img_000", "scratch, deep")

    report = _report(root)

    commas = [p for p in report["problems"] if "'scratch, deep'" in p]
    assert len(commas) == 1 and "cannot be given in --classes" in commas[0], report["problems"]
    assert "rename it in the annotations" in commas[0], commas[0]
    assert not any("--classes 'scratch" in w for w in report["warnings"]), report["warnings"]

    assert main(train_argv(root, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "'scratch, deep'" in err and "cannot be given in --classes" in err, err
    assert "train with --classes" not in err, err


# ------------------------------------------------------------------ 4: a UTF-16 split file


def test_a_utf16_split_file_says_to_save_it_as_utf8(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "d")
    train_txt = root / "ImageSets" / "Main" / "train.txt"
    ids = train_txt.read_text(encoding="utf-8")
    train_txt.write_bytes(ids.replace("\n", "\r\n").encode("utf-16"))  # (with its BOM)

    problems = _report(root)["problems"]

    said = [p for p in problems if p.startswith(str(train_txt))]
    assert said and "UTF-16" in said[0] and "save it as UTF-8" in said[0], problems
    assert "codec can't decode" not in said[0], said[0]
