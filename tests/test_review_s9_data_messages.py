"""Problems in annotations written by tools and scripts say what to do, not only what is wrong.

An object exported as a polygon (no <bndbox>) was "missing <bndbox>", and a box whose corners a
script swapped "is empty (max < min)": neither said what to change.
"""

from __future__ import annotations

import pytest

from splitdet.training import voc

from support import make_tiny_voc

HEAD = "<annotation><filename>img_000.png</filename><object><name>scratch</name>"


@pytest.fixture
def root(tmp_path):
    return make_tiny_voc(tmp_path / "d", n_defective=1, n_free=0)


def _problem(root, obj: str) -> str:
    (root / "Annotations" / "img_000.xml").write_text(HEAD + obj + "</object></annotation>")
    with pytest.raises(voc.VocError) as caught:
        voc.read_annotation(root, "img_000")
    return str(caught.value)


def test_a_polygon_object_is_named_as_such(root):
    text = _problem(root, "<polygon><x1>2</x1><y1>3</y1><x2>20</x2><y2>3</y2></polygon>")

    assert "img_000.xml" in text and "is a <polygon>, not a box" in text, text
    assert "export the annotations as rectangles" in text, text


def test_a_missing_box_says_what_to_do(root):
    text = _problem(root, "")

    assert "img_000.xml" in text and "missing <bndbox>" in text, text
    assert "export the annotation again, or remove the object" in text, text


@pytest.mark.parametrize("rotation", ["", "<attributes><attribute><name>rotation</name><value>10"
                                          "</value></attribute></attributes>"])  # fmt: skip
def test_swapped_corners_say_what_to_correct(root, rotation):
    box = "<bndbox><xmin>40</xmin><ymin>5</ymin><xmax>10</xmax><ymax>30</ymax></bndbox>"
    text = _problem(root, box + rotation)

    assert "img_000.xml" in text and "is empty (max < min)" in text, text
    assert "correct the box in the annotation tool" in text, text
