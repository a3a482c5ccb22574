"""Annotations in the encodings scripts and tools really write them in.

Expat reads UTF-8, UTF-16, ISO-8859-1 and US-ASCII under those names only: a declaration of
``encoding='utf8'`` (what ``ElementTree.write(path, encoding="utf8")`` writes), of ``GBK``,
``GB2312`` or ``Shift_JIS`` made `data check` and `train` refuse an annotation holding a
non-ASCII class name ("not well-formed (invalid token)", "multi-byte encodings are not
supported"), naming no fix. An ANSI file without a declaration is refused still (it is no XML),
but the message now says why and what to do.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from splitdet.shared.cli import main
from splitdet.training import voc, voc_layout

from support import make_tiny_voc

BODY = (
    "<annotation><filename>img_000.png</filename><object><name>{name}</name><difficult>0"
    "</difficult><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>40</xmax><ymax>30</ymax></bndbox>"
    "</object></annotation>\n"
)


@pytest.fixture
def root(tmp_path):
    root = make_tiny_voc(tmp_path / "d", n_defective=3, n_free=1)
    for split, ids in {
        "train": ["img_000", "img_003"],
        "val": ["img_001"],
        "test": ["img_002"],
    }.items():
        voc.write_split(root, split, ids)
    return root


@pytest.mark.parametrize(
    ("declared", "codec", "name"),
    [
        ("utf8", "utf-8", "Kratzer-ä"),
        ("UTF8", "utf-8", "Kratzer-ä"),
        ("GBK", "gbk", "划痕"),
        ("gb2312", "gb2312", "划痕"),
        ("Shift_JIS", "shift_jis", "傷"),
    ],
)
def test_a_declared_encoding_is_read(root, capsys, declared, codec, name):
    text = f'<?xml version="1.0" encoding="{declared}"?>\n' + BODY.format(name=name)
    (root / "Annotations" / "img_000.xml").write_bytes(text.encode(codec))

    sample = voc.read_annotation(root, "img_000")

    assert [o.name for o in sample.objects] == [name]
    code = main(["data", "check", str(root), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"{name} 1" in out


def test_what_elementtree_writes_with_utf8_is_read(root):
    ann = ET.fromstring(BODY.format(name="Kratzer-ä"))
    ET.ElementTree(ann).write(root / "Annotations" / "img_000.xml", encoding="utf8")

    assert [o.name for o in voc.read_annotation(root, "img_000").objects] == ["Kratzer-ä"]


def test_a_bom_and_a_utf8_declaration_are_read(root):
    text = "\ufeff<?xml version='1.0' encoding='utf8'?>\r\n" + BODY.format(name="Kratzer-ä")
    (root / "Annotations" / "img_000.xml").write_bytes(text.encode("utf-8"))

    assert [o.name for o in voc.read_annotation(root, "img_000").objects] == ["Kratzer-ä"]


def test_an_ansi_file_without_declaration_says_what_to_do(root, capsys):
    (root / "Annotations" / "img_000.xml").write_bytes(
        BODY.format(name="Kratzer-ä").encode("cp1252")
    )

    code = main(["data", "check", str(root), "--no-progress"])

    out = capsys.readouterr().out
    assert code == 1
    line = next(x for x in out.splitlines() if "img_000.xml" in x)
    assert "not UTF-8" in line and "save it as UTF-8" in line, line


def test_a_gbk_labelimg_annotation_beside_the_images_is_one(root, capsys):
    """`data split --write-empty` must not write an empty annotation over a defective image
    whose LabelImg annotation (GBK) lies beside it in JPEGImages."""
    (root / "Annotations" / "img_000.xml").unlink()
    text = '<?xml version="1.0" encoding="gbk"?>\n' + BODY.format(name="划痕")
    beside = root / "JPEGImages" / "img_000.xml"
    beside.write_bytes(text.encode("gbk"))

    assert voc_layout.is_annotation(beside)
    code = main(["data", "split", str(root), "--write-empty", "--overwrite"])

    assert code == 2, capsys.readouterr()
    assert not (root / "Annotations" / "img_000.xml").exists()
