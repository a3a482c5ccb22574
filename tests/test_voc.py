"""PASCAL VOC reading and writing."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

from splitdet.training import voc, voc_xml
from splitdet.training.voc import VocError, VocObject, VocSample

W, H = 64, 48


def _image(root: Path, image_id: str, ext: str = ".jpg", size=(W, H)) -> Path:
    path = root / "JPEGImages" / f"{image_id}{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(path)
    return path


def _samples(root: Path) -> list[VocSample]:
    return [
        VocSample(
            "a",
            _image(root, "a"),
            W,
            H,
            (
                VocObject("scratch", (0.0, 0.0, 1.0, 1.0), False),  # the top-left pixel
                VocObject("dent", (10.0, 5.0, 64.0, 48.0), True),  # reaches the far edges
            ),
        ),
        VocSample("b", _image(root, "b", ".png"), W, H, ()),  # defect-free
        VocSample("c", _image(root, "c"), W, H, (VocObject("scratch", (3, 4, 20, 9), False),)),
    ]


def _write(root: Path, samples: list[VocSample], split: str = "train") -> None:
    for s in samples:
        voc.write_annotation(root / "Annotations" / f"{s.image_id}.xml", s)
    voc.write_split(root, split, [s.image_id for s in samples])


def test_round_trip(tmp_path):
    samples = _samples(tmp_path)
    _write(tmp_path, samples)
    got = voc.read_split(tmp_path, "train")
    assert got == samples
    assert [s.is_defective for s in got] == [True, False, True]
    assert voc.read_split(tmp_path, "train", class_names=["scratch", "dent"]) == samples
    assert voc.class_names_of(tmp_path) == ["dent", "scratch"]


def test_written_xml_is_standard_voc(tmp_path):
    s = _samples(tmp_path)[0]
    path = tmp_path / "Annotations" / "a.xml"
    voc.write_annotation(path, s)
    root = ET.parse(path).getroot()
    assert root.tag == "annotation"
    assert root.findtext("filename") == "a.jpg"
    assert root.findtext("folder")
    assert [root.findtext(f"size/{k}") for k in ("width", "height", "depth")] == ["64", "48", "3"]
    objs = root.findall("object")
    assert [o.findtext("name") for o in objs] == ["scratch", "dent"]
    assert [o.findtext("difficult") for o in objs] == ["0", "1"]
    assert all(o.findtext("pose") and o.findtext("truncated") == "0" for o in objs)
    first = [objs[0].findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
    assert first == ["1", "1", "1", "1"]  # 1-based inclusive: pixel (0, 0)
    second = [objs[1].findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
    assert second == ["11", "6", "64", "48"]


def test_fractional_boxes_are_written_outwards(tmp_path):
    s = VocSample("f", _image(tmp_path, "f"), W, H, (VocObject("x", (2.4, 3.6, 9.2, 9.9)),))
    voc.write_annotation(tmp_path / "Annotations" / "f.xml", s)
    (obj,) = voc.read_annotation(tmp_path, "f").objects
    assert obj.box == (2.0, 3.0, 10.0, 10.0)


def test_zero_based_xmin_is_tolerated(tmp_path):
    _image(tmp_path, "z")
    _ann(tmp_path, "z", _obj("scratch", 0, 0, 5, 5))
    (obj,) = voc.read_annotation(tmp_path, "z").objects
    assert obj.box == (0.0, 0.0, 5.0, 5.0)


def test_split_file_comments_blank_lines_and_extra_columns(tmp_path):
    samples = _samples(tmp_path)
    _write(tmp_path, samples)
    (tmp_path / "ImageSets" / "Main" / "odd.txt").write_text("# header\n\na  1\nc -1\n")
    assert [s.image_id for s in voc.read_split(tmp_path, "odd")] == ["a", "c"]


def test_size_zero_falls_back_to_the_image_header(tmp_path):
    _image(tmp_path, "s", size=(40, 30))
    _ann(tmp_path, "s", "", width=0, height=0)
    s = voc.read_annotation(tmp_path, "s")
    assert (s.width, s.height) == (40, 30)


# ------------------------------------------------------------------------------ malformed inputs


def _obj(name="scratch", xmin="2", ymin="2", xmax="10", ymax="10", difficult="0") -> str:
    return (
        f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox>"
        f"<xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax>"
        "</bndbox></object>"
    )


def _ann(root: Path, image_id: str, body: str, width=W, height=H) -> Path:
    path = root / "Annotations" / f"{image_id}.xml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{image_id}.jpg</filename><size><width>{width}</width>"
        f"<height>{height}</height><depth>3</depth></size>{body}</annotation>"
    )
    return path


def _one(tmp_path: Path, image_id: str, text: str | None = None, image: bool = True, **obj):
    if image:
        _image(tmp_path, image_id)
    if text is None:
        _ann(tmp_path, image_id, _obj(**obj))
    else:
        (tmp_path / "Annotations").mkdir(exist_ok=True)
        (tmp_path / "Annotations" / f"{image_id}.xml").write_text(text)
    voc.write_split(tmp_path, "s", [image_id])


@pytest.mark.parametrize(
    ("image_id", "setup", "message"),
    [
        ("badxml", dict(text="<annotation><size>"), "malformed XML"),
        ("wrongroot", dict(text="<root/>"), "expected <annotation>"),
        ("outside", dict(xmax="65"), "outside"),
        ("outside_y", dict(ymax="49"), "outside"),
        ("negative", dict(xmin="-3"), "outside"),
        ("degenerate", dict(xmin="10", xmax="5"), "empty"),
        ("noimage", dict(image=False), "image file not found"),
        ("nonnumeric", dict(ymin="abc"), "not a number"),
        ("nan", dict(ymin="nan"), "not finite"),
        ("noname", dict(name=""), "missing <name>"),
        ("baddifficult", dict(difficult="maybe"), "difficult"),
        (
            "noxmax",
            dict(
                text="<annotation><size><width>64</width><height>48</height></size><object>"
                "<name>s</name><bndbox><xmin>1</xmin><ymin>1</ymin><ymax>3</ymax></bndbox>"
                "</object></annotation>"
            ),
            "missing <xmax>",
        ),
        (
            "nobndbox",
            dict(
                text="<annotation><size><width>64</width><height>48</height></size>"
                "<object><name>s</name></object></annotation>"
            ),
            "missing <bndbox>",
        ),
        (
            "entity",
            dict(
                text='<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "xx">]>'
                "<annotation><size><width>64</width><height>48</height></size></annotation>"
            ),
            "entity",
        ),
        (
            "badencoding",
            dict(text='<?xml version="1.0" encoding="bogus"?><annotation/>'),
            "malformed XML",
        ),
    ],
)
def test_malformed_inputs_name_the_file(tmp_path, image_id, setup, message):
    _one(tmp_path, image_id, **setup)
    with pytest.raises(VocError, match=message) as info:
        voc.read_split(tmp_path, "s")
    assert f"{image_id}.xml" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-8"])
def test_a_dtd_is_refused_in_any_encoding(tmp_path, encoding):
    """Before: the refusal searched the bytes for "<!ENTITY", which UTF-16 text never holds;
    entities expanding to 200 000 characters then passed. A DTD without entities is refused
    too: VOC annotations have none."""
    declared = encoding.upper().removesuffix("-LE")
    for image_id, dtd in (("entities", '<!ENTITY a "AAAAAAAAAA"><!ENTITY b "&a;&a;&a;">'),
                          ("doctype", "")):  # fmt: skip
        _image(tmp_path, image_id)
        text = (
            f'<?xml version="1.0" encoding="{declared}"?><!DOCTYPE annotation [{dtd}]>'
            f"<annotation><filename>{image_id}.png</filename><size><width>64</width>"
            "<height>48</height></size></annotation>"
        )
        path = tmp_path / "Annotations" / f"{image_id}.xml"
        path.parent.mkdir(exist_ok=True)
        bom = "\ufeff" if encoding == "utf-16-le" else ""  # "utf-16" writes its own
        path.write_bytes((bom + text).encode(encoding))
        voc.write_split(tmp_path, "s", [image_id])
        with pytest.raises(VocError, match=rf"{image_id}\.xml: a document type \(DTD\)"):
            voc.read_split(tmp_path, "s")


def test_a_bare_doctype_is_read(tmp_path):
    """`<!DOCTYPE annotation>` declares nothing (no subset, no external DTD): some converters
    write it, and ElementTree reads it."""
    _image(tmp_path, "bare", ".png")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "bare.xml").write_text(
        '<?xml version="1.0"?><!DOCTYPE annotation><annotation><filename>bare.png</filename>'
        "<size><width>64</width><height>48</height></size></annotation>"
    )
    voc.write_split(tmp_path, "s", ["bare"])
    assert voc.read_split(tmp_path, "s")[0].objects == ()


def test_an_external_dtd_is_refused(tmp_path):
    _image(tmp_path, "external", ".png")
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Annotations" / "external.xml").write_text(
        '<?xml version="1.0"?><!DOCTYPE annotation SYSTEM "voc.dtd"><annotation>'
        "<filename>external.png</filename><size><width>64</width><height>48</height></size>"
        "</annotation>"
    )
    voc.write_split(tmp_path, "s", ["external"])
    with pytest.raises(VocError, match=r"external\.xml: a document type \(DTD\)"):
        voc.read_split(tmp_path, "s")


def test_an_annotation_that_is_a_folder_names_the_file(tmp_path):
    _image(tmp_path, "folder")
    (tmp_path / "Annotations" / "folder.xml").mkdir(parents=True)
    voc.write_split(tmp_path, "s", ["folder"])
    with pytest.raises(VocError, match=r"folder\.xml: cannot read annotation"):
        voc.read_split(tmp_path, "s")


def test_size_mismatch_names_the_file(tmp_path):
    _image(tmp_path, "mm", size=(30, 30))
    _ann(tmp_path, "mm", _obj())
    voc.write_split(tmp_path, "s", ["mm"])
    with pytest.raises(VocError, match=r"mm\.xml.*30x30"):
        voc.read_split(tmp_path, "s")
    assert len(voc.read_split(tmp_path, "s", check_images=False)) == 1


def test_unknown_class_names_the_file(tmp_path):
    _one(tmp_path, "cls", name="dent")
    with pytest.raises(VocError, match=r"cls\.xml.*unknown class 'dent'"):
        voc.read_split(tmp_path, "s", class_names=["scratch"])


def test_missing_annotation_and_split_file(tmp_path):
    with pytest.raises(VocError, match=r"val\.txt"):
        voc.read_split(tmp_path, "val")
    voc.write_split(tmp_path, "s", ["ghost"])
    with pytest.raises(VocError, match=r"ghost\.xml"):
        voc.read_split(tmp_path, "s")


def test_duplicate_ids_and_oversized_files(tmp_path, monkeypatch):
    _one(tmp_path, "dup")
    (tmp_path / "ImageSets" / "Main" / "s.txt").write_text("dup\ndup\n")
    with pytest.raises(VocError, match=r"s\.txt:2.*twice"):
        voc.read_split(tmp_path, "s")
    voc.write_split(tmp_path, "s", ["dup"])
    monkeypatch.setattr(voc_xml, "MAX_ANNOTATION_BYTES", 10)  # read where _parse_xml is
    with pytest.raises(VocError, match=r"dup\.xml.*larger"):
        voc.read_split(tmp_path, "s")


def test_a_split_file_with_a_byte_order_mark_and_windows_line_ends(tmp_path):
    """Notepad's UTF-8 starts with a BOM: it was read into the first id ('\\ufeffa.xml: not
    found', the culprit invisible in the message)."""
    _write(tmp_path, _samples(tmp_path))
    (tmp_path / "ImageSets" / "Main" / "bom.txt").write_bytes(b"\xef\xbb\xbfa\r\nb\r\nc\r\n")
    assert [s.image_id for s in voc.read_split(tmp_path, "bom")] == ["a", "b", "c"]


def test_sixteen_bit_images_keep_their_scale(tmp_path):
    """A 16-bit grayscale image decodes as the edge decodes it (value / 65535), to 8 bits:
    convert("RGB") clipped every value above 255 to white, so training saw a blank image."""
    import numpy as np

    from splitdet.edge.preprocess import load_image

    values = np.array([[0, 255, 256, 1000, 32768, 65535]], dtype=np.uint16).repeat(3, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    decoded = np.asarray(voc.load_rgb(path))
    assert decoded.shape == (3, 6, 3) and (decoded == decoded[..., :1]).all()  # grey as RGB
    edge = load_image(path)[0] * 255.0
    assert np.abs(decoded[..., 0] - edge).max() <= 0.5
    assert decoded[0].tolist() == [[0] * 3, [1] * 3, [1] * 3, [4] * 3, [128] * 3, [255] * 3]


def test_a_size_swapped_by_exif_rotation_is_explained(tmp_path):
    """A JPEG tagged to be shown turned by 90 degrees, annotated on the turned view: the
    mismatch says why and what to do (splitdet, like the edge, reads the stored pixels)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    path = tmp_path / "JPEGImages" / "turned.jpg"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (W, H), (90, 90, 90)).save(path, exif=exif)
    box = (voc.VocObject("scratch", (2.0, 2.0, 20.0, 6.0)),)  # (a box-less one is taken)
    voc.write_annotation(
        tmp_path / "Annotations" / "turned.xml", VocSample("turned", path, H, W, box)
    )
    voc.write_split(tmp_path, "s", ["turned"])
    with pytest.raises(VocError, match=r"turned\.xml: <size> says 48x64 .*EXIF orientation"):
        voc.read_split(tmp_path, "s")
    Image.new("RGB", (W, H), (90, 90, 90)).save(path)  # no tag: a plain mismatch
    with pytest.raises(VocError) as info:
        voc.read_split(tmp_path, "s")
    assert "EXIF" not in str(info.value)
