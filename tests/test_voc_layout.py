"""Datasets laid out as annotation tools export them, not (yet) as the VOC tree splitdet reads:
`data check` and `data split` said "0 annotations", "folder not found (not a VOC dataset?)" or
"no annotation to split" and nothing of where the files were. Now they say what to move. And
an annotation whose <filename> holds a folder ("images/IMG_5513.jpg") finds its image by the
bare name, as one with a bare name does. Real files on disk, the real commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from splitdet.shared.cli import main
from splitdet.training import voc

W, H = 96, 64
BOX = (voc.VocObject("scratch", (10.0, 10.0, 50.0, 14.0)),)


def _image(path: Path, level: int = 60) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), level, np.uint8)).save(path)
    return path


def _annotation(path: Path, filename: str, objects=BOX) -> None:
    sample = voc.VocSample(path.stem, Path(filename), W, H, tuple(objects))
    voc.write_annotation(path, sample)
    path.write_text(path.read_text().replace(f">{sample.image_path.name}<", f">{filename}<"))


def _check(root: Path, capsys) -> tuple[int, list[str], list[str]]:
    code = main(["data", "check", str(root), "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    return (
        code,
        [line for line in lines if line.startswith("problem")],
        [line for line in lines if line.startswith("warning")],
    )


def test_a_cvat_export_with_task_sub_folders_is_named_with_what_to_move(tmp_path, capsys):
    for k in range(4):
        _image(tmp_path / "JPEGImages" / "line1" / f"f{k}.jpg")
        _annotation(tmp_path / "Annotations" / "line1" / f"f{k}.xml", f"line1/f{k}.jpg")
    code, problems, _ = _check(tmp_path, capsys)
    assert code == 1
    nested = [line for line in problems if "in sub-folders" in line]
    assert len(nested) == 1
    assert "Annotations holds 4 .xml annotations in sub-folders (e.g. line1/f0.xml)" in nested[0]
    assert "JPEGImages holds 4 images in sub-folders (e.g. line1/f0.jpg)" in nested[0]
    assert "move them up" in nested[0]
    assert main(["data", "split", str(tmp_path), "--write-empty"]) == 2
    err = capsys.readouterr().err
    assert "no annotation (*.xml) to split" in err and "in sub-folders (e.g. line1/f0.xml)" in err


def test_a_sub_folder_beside_a_readable_top_level_is_a_warning(tmp_path, capsys):
    for k in range(3):
        _image(tmp_path / "JPEGImages" / f"d{k}.jpg")
        _annotation(tmp_path / "Annotations" / f"d{k}.xml", f"d{k}.jpg")
    _image(tmp_path / "JPEGImages" / "old" / "x.jpg")
    (tmp_path / "JPEGImages" / "notes.webp").write_bytes(b"RIFF")
    (tmp_path / "JPEGImages" / "README").write_text("shots of line 1")
    _, problems, warnings = _check(tmp_path, capsys)
    assert not any("sub-folders" in line for line in problems)
    assert any("JPEGImages holds 1 images in sub-folders (e.g. old/x.jpg)" in w for w in warnings)
    unread = [w for w in warnings if "not read" in w]
    assert len(unread) == 1 and "2 file(s) not read (1 .webp, 1 (no extension))" in unread[0]


def test_a_labelimg_folder_and_an_images_folder_are_named(tmp_path, capsys):
    """LabelImg saves each .xml beside its image; many exports name the image folder
    `images/`: "folder not found" now says which folder holds what, and where it goes."""
    for k in range(3):
        _image(tmp_path / "images" / f"shot{k}.jpg")
        _annotation(tmp_path / "images" / f"shot{k}.xml", f"shot{k}.jpg")
    code, problems, _ = _check(tmp_path, capsys)
    assert code == 1
    jpeg = next(line for line in problems if "JPEGImages: folder not found" in line)
    assert f"{tmp_path / 'images'} holds 3 images: rename it {tmp_path / 'JPEGImages'}" in jpeg
    annotations = next(line for line in problems if "Annotations: folder not found" in line)
    assert f"{tmp_path / 'images'} holds 3 .xml annotations beside the images" in annotations
    assert main(["data", "split", str(tmp_path)]) == 2
    assert "holds 3 images: rename it" in capsys.readouterr().err


def test_a_filename_with_a_folder_finds_its_image_by_the_bare_name(tmp_path, capsys):
    """frame_002.xml said <filename>images/IMG_5513.jpg</filename>: its image was "not
    found", and IMG_5513.jpg, annotated by it, was called a defect-free image to write an
    empty annotation for (which would have taught a defective image as defect-free)."""
    _image(tmp_path / "JPEGImages" / "IMG_5513.jpg")
    _image(tmp_path / "JPEGImages" / "IMG_5514.jpg")
    _annotation(tmp_path / "Annotations" / "frame_002.xml", "images/IMG_5513.jpg")
    _annotation(tmp_path / "Annotations" / "frame_003.xml", "C:\\shots\\IMG_5514.jpg", ())
    assert voc.read_annotation(tmp_path, "frame_002").image_path.name == "IMG_5513.jpg"
    assert voc.read_annotation(tmp_path, "frame_003").image_path.name == "IMG_5514.jpg"
    _, problems, _ = _check(tmp_path, capsys)
    assert not any("IMG_551" in line for line in problems), problems
    _annotation(tmp_path / "Annotations" / "frame_004.xml", "../elsewhere/IMG_9999.jpg")
    _, problems, _ = _check(tmp_path, capsys)  # never a path out of JPEGImages
    assert any("frame_004.xml: image file not found" in line for line in problems)


def test_class_names_that_differ_only_in_case_are_pointed_out(tmp_path, capsys):
    for k, name in enumerate(["scratch", "scratch", "Scratch", "dent"]):
        _image(tmp_path / "JPEGImages" / f"d{k}.jpg")
        objects = (voc.VocObject(name, (10.0, 10.0, 50.0, 14.0)),)
        _annotation(tmp_path / "Annotations" / f"d{k}.xml", f"d{k}.jpg", objects)
    _, _, warnings = _check(tmp_path, capsys)
    twins = [w for w in warnings if "differ only in case" in w]
    assert len(twins) == 1
    assert "classes 'Scratch' and 'scratch' differ only in case (1 box(es), 2 box(es))" in twins[0]
