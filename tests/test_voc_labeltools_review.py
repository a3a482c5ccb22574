"""A reviewer whose annotators use real labelling tools (CVAT, LabelImg, Label Studio,
Roboflow, makesense.ai) found these faults in how splitdet reads PASCAL VOC:

1. CVAT's rotated rectangles (the unrotated <bndbox>, the angle in an <attribute> named
   ``rotation``) were read unrotated: now as the axis-aligned box around the rotated one,
   clipped to the image, with a warning per annotation; a rotation that is no number is a
   problem naming the file;
2. ``<difficult>Unspecified</difficult>`` (makesense.ai, every object) and ``0.0`` were refused;
3. a 0-byte annotation said "malformed XML: no element found": now that it is empty, and the fix;
4. a <filename> naming ``x.webp`` trained on it while `data check` said .webp files are "not
   read": the annotation is now refused, naming the fix (the edge's hot folder, `data check`
   and `data split` know images by .jpg .jpeg .png .bmp .tif .tiff alone);
5. Roboflow's "Pascal VOC" layout (``train/``, ``valid/``, ``test/``, images and .xml side by
   side) got "folder not found" alone: now a hint naming the layout and what to do;
6. an annotation whose name differs only in case from its image's: "image not found" now names
   the image, and the image is not advised an empty annotation from ``--write-empty``.

Real files in tmp_path, the real readers and commands.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.cli import main
from splitdet.training import voc

W, H = 100, 80


def _image(root: Path, name: str, fmt: str = "PNG") -> Path:
    path = root / "JPEGImages" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 60, np.uint8)).save(path, format=fmt)
    return path


def _object(box=(41, 31, 60, 40), difficult="0", rotation: str | None = None) -> str:
    attributes = (
        ""
        if rotation is None
        else "<attributes><attribute><name>occluded</name><value>false</value></attribute>"
        f"<attribute><name>rotation</name><value>{rotation}</value></attribute></attributes>"
    )
    xmin, ymin, xmax, ymax = box
    return (
        f"<object><name>scratch</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin>"
        f"<xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox>{attributes}</object>"
    )


def _annotation(root: Path, image_id: str, *objects: str, filename: str | None = None) -> Path:
    path = root / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><folder>JPEGImages</folder><filename>{filename or image_id + '.png'}"
        f"</filename><size><width>{W}</width><height>{H}</height><depth>3</depth></size>"
        f"{''.join(objects)}</annotation>"
    )
    return path


def _check(root: Path, capsys) -> tuple[list[str], list[str]]:
    main(["data", "check", str(root), "--no-progress", "--workers", "1"])
    lines = capsys.readouterr().out.splitlines()
    return (
        [line for line in lines if line.startswith("problem")],
        [line for line in lines if line.startswith("warning")],
    )


# ------------------------------------------------------------------ 1: CVAT rotated boxes


@pytest.mark.parametrize(
    ("rotation", "box"),
    [
        # the box 40..60 x 30..40 (w 20, h 10, centre 50, 35)
        ("0.0", (40.0, 30.0, 60.0, 40.0)),
        ("180", (40.0, 30.0, 60.0, 40.0)),
        ("90.0", (45.0, 25.0, 55.0, 45.0)),
        ("-90", (45.0, 25.0, 55.0, 45.0)),
        ("45", (50 - 7.5 * 2**0.5, 35 - 7.5 * 2**0.5, 50 + 7.5 * 2**0.5, 35 + 7.5 * 2**0.5)),
        ("315.0", (50 - 7.5 * 2**0.5, 35 - 7.5 * 2**0.5, 50 + 7.5 * 2**0.5, 35 + 7.5 * 2**0.5)),
    ],
)
def test_a_cvat_rotated_box_is_read_as_the_box_around_it(tmp_path, rotation, box):
    """Before: 90 and 45 degrees read as the unrotated 40..60 x 30..40."""
    _image(tmp_path, "a.png")
    _annotation(tmp_path, "a", _object(rotation=rotation))
    (obj,) = voc.read_annotation(tmp_path, "a").objects
    assert obj.box == pytest.approx(box, abs=1e-9)


def test_a_rotated_box_past_the_image_is_clipped_and_said(tmp_path):
    """A long box near the top turned 90 degrees: its unrotated box lies inside the image, the
    box around the turned one past the top edge; clipped (the reader refuses a box past the
    image), and the warning says how many were rotated and clipped."""
    from splitdet.training.voc_rotation import rotated_box_warnings

    _image(tmp_path, "a.png")
    _annotation(
        tmp_path, "a", _object((31, 6, 70, 10), rotation="90"), _object(rotation="30")
    )  # the first: 30..70 x 5..10, centre 50, 7.5, turned: 47.5..52.5 x -12.5..27.5
    _image(tmp_path, "b.png")
    _annotation(tmp_path, "b", _object())
    objects = voc.read_annotation(tmp_path, "a").objects
    assert objects[0].box == pytest.approx((47.5, 0.0, 52.5, 27.5))
    samples = {i: voc.read_annotation(tmp_path, i) for i in ("a", "b")}
    (warning,) = rotated_box_warnings(tmp_path, samples)
    assert warning.startswith(f"{tmp_path / 'Annotations' / 'a.xml'}: 2 rotated box(es)")
    assert "read as the axis-aligned box around it" in warning
    assert "1 of them clipped to the 100x80 image" in warning


def test_data_check_warns_of_rotated_boxes(tmp_path, capsys):
    _image(tmp_path, "a.png")
    _annotation(tmp_path, "a", _object(rotation="45"))
    problems, warnings = _check(tmp_path, capsys)
    assert not any("a.xml" in line for line in problems), problems
    assert any(f"{tmp_path / 'Annotations' / 'a.xml'}: 1 rotated box(es)" in w for w in warnings)


def test_a_rotation_that_is_no_number_is_a_problem_naming_the_file(tmp_path, capsys):
    _image(tmp_path, "a.png")
    path = _annotation(tmp_path, "a", _object(rotation="forty-five"))
    with pytest.raises(voc.VocError, match="rotation attribute that is not a number") as info:
        voc.read_annotation(tmp_path, "a")
    assert str(info.value).startswith(f"{path}: <object> #1")
    problems, _ = _check(tmp_path, capsys)
    assert any(str(path) in line and "'forty-five'" in line for line in problems), problems


# ---------------------------------------------------------------- 2: <difficult> as tools write it


@pytest.mark.parametrize(
    ("written", "difficult"),
    [
        ("Unspecified", False),
        ("UNSPECIFIED", False),
        ("", False),
        ("0.0", False),
        ("1.0", True),
        ("1", True),
    ],
)
def test_difficult_as_labelling_tools_write_it(tmp_path, written, difficult):
    """Before: makesense.ai's "Unspecified" and "0.0"/"1.0" were refused."""
    _image(tmp_path, "a.png")
    _annotation(tmp_path, "a", _object(difficult=written))
    assert voc.read_annotation(tmp_path, "a").objects[0].difficult is difficult


@pytest.mark.parametrize("written", ["maybe", "2", "0.5", "nan"])
def test_any_other_difficult_stays_a_problem(tmp_path, written):
    _image(tmp_path, "a.png")
    _annotation(tmp_path, "a", _object(difficult=written))
    with pytest.raises(voc.VocError, match="<difficult> in <object> #1 must be 0 or 1"):
        voc.read_annotation(tmp_path, "a")


# ----------------------------------------------------------------- 3: an empty annotation file


@pytest.mark.parametrize("content", [b"", b"\n  \n"])
def test_an_empty_annotation_file_is_named_empty_with_the_fix(tmp_path, capsys, content):
    """Before: "malformed XML: no element found: line 1, column 0", from `data check` and
    from `data split --write-empty`, which refused the whole dataset with it."""
    _image(tmp_path, "a.png")
    _annotation(tmp_path, "a", _object())
    _image(tmp_path, "b.png")
    empty = tmp_path / "Annotations" / "b.xml"
    empty.write_bytes(content)
    fix = "delete the empty file and `splitdet data split --write-empty` writes one"
    problems, _ = _check(tmp_path, capsys)
    (line,) = [p for p in problems if str(empty) in p]
    assert "the annotation file is empty" in line and fix in line
    assert "malformed XML" not in line
    assert main(["data", "split", str(tmp_path), "--write-empty", "--val", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: the annotation file is empty" in err and fix in err
    empty.unlink()  # as it says: the image is then given an annotation with no object
    assert main(["data", "split", str(tmp_path), "--write-empty", "--val", "0"]) == 0
    assert voc.read_annotation(tmp_path, "b").objects == ()


# --------------------------------------------- 4: an image of an extension splitdet does not read


@pytest.mark.parametrize(
    ("name", "fmt", "filename", "fix"),
    [
        ("a.webp", "WEBP", "a.webp", "convert it to .png"),
        ("a.jfif", "JPEG", "a.jfif", "rename it a.jpg"),
        ("a.webp", "WEBP", "IMG_0001.jpg", "convert it to .png"),  # found by its id: a.*
    ],
)
def test_an_image_of_an_unread_format_is_a_problem(tmp_path, capsys, name, fmt, filename, fix):
    """Before: <filename>a.webp was found by its bare name and trained on, while `data check`
    warned that the .webp file was "not read"; now the two agree."""
    image = _image(tmp_path, name, fmt)
    path = _annotation(tmp_path, "a", _object(), filename=filename)
    with pytest.raises(voc.VocError) as info:
        voc.read_annotation(tmp_path, "a")
    assert str(info.value).startswith(f"{path}: its image {image} is a {image.suffix} file")
    assert fix in str(info.value) and ".jpg, .jpeg, .png" in str(info.value)
    problems, warnings = _check(tmp_path, capsys)
    assert any(f"its image {image}" in line for line in problems), problems
    (unread,) = [line for line in warnings if "1 file(s) not read" in line]
    assert (".jfif files are JPEGs: rename them .jpg" in unread) is name.endswith(".jfif")


# ------------------------------------------------------------------ 5: Roboflow's VOC layout


def test_roboflow_split_folders_get_a_hint(tmp_path, capsys):
    """Before: "Annotations: folder not found (not a VOC dataset?)" and nothing else."""
    for split in ("train", "valid", "test"):
        folder = tmp_path / split
        folder.mkdir()
        Image.new("RGB", (W, H)).save(folder / f"x_{split}_jpg.rf.0a1b.jpg")
        (folder / f"x_{split}_jpg.rf.0a1b.xml").write_text("<annotation/>")
    problems, _ = _check(tmp_path, capsys)
    (line,) = [p for p in problems if "Annotations: folder not found" in p]
    assert "a folder per split (train/, valid/, test/: Roboflow's Pascal VOC export)" in line
    assert f"move every .xml into {tmp_path / 'Annotations'}" in line
    assert f"splitdet data split {tmp_path} --write-empty" in line
    merge = f"splitdet data merge {tmp_path / 'train'} {tmp_path / 'valid'} {tmp_path / 'test'}"
    assert f"{merge} --out NEW" in line
    assert main(["data", "split", str(tmp_path)]) == 2
    assert "Roboflow's Pascal VOC export" in capsys.readouterr().err


# --------------------------------------------------------- 6: names differing only in case


def test_an_annotation_differing_in_case_from_its_image_is_named(tmp_path, capsys):
    """Before: "image not found" alone, and `--write-empty` advised for gasket_00000.jpg,
    which would have made the defective image defect-free."""
    from splitdet.training.voc_split import unannotated_samples

    _image(tmp_path, "gasket_00000.jpg", "JPEG")
    annotation = _annotation(tmp_path, "Gasket_00000", _object(), filename="Gasket_00000.jpg")
    if (tmp_path / "JPEGImages" / "Gasket_00000.jpg").exists():
        pytest.skip("a case-insensitive file system finds the image")
    _image(tmp_path, "b.png")
    _annotation(tmp_path, "b", _object())
    problems, _ = _check(tmp_path, capsys)
    (found,) = [p for p in problems if str(annotation) in p and "image file not found" in p]
    assert "JPEGImages has gasket_00000.jpg, which differs only in case: rename one" in found
    (image,) = [p for p in problems if "gasket_00000.jpg: no annotation" in p]
    assert "--write-empty" not in image
    assert f"{annotation} is its annotation" in image and "differs only in case" in image
    with pytest.raises(voc.VocError, match="--write-empty refused"):
        unannotated_samples(tmp_path, [voc.read_annotation(tmp_path, "b")])
