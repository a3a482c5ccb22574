"""Annotated pictures a plant's quality engineer shows: a reviewer found labels unreadable on
2448x2048 images (Pillow's 10 px font on 2048 rows), a label at the right edge cut before its
score, and a box touching the right or bottom edge losing part of its outline (its exclusive
x2/y2 drawn as Pillow's inclusive corner, one pixel outside the box)."""

from __future__ import annotations

import numpy as np

from splitdet.edge.annotate import BOX_COLOUR, draw_detections


def _red(picture) -> np.ndarray:
    """Bool[H, W]: the pixels drawn in the box colour."""
    return (np.asarray(picture) == np.array(BOX_COLOUR, dtype=np.uint8)).all(axis=-1)


def _drawn(picture) -> np.ndarray:
    """Bool[H, W]: the pixels drawn on the black picture at all (labels are anti-aliased)."""
    return np.asarray(picture).max(axis=-1) > 40


def _black(height: int, width: int) -> np.ndarray:
    return np.zeros((3, height, width), dtype=np.float32)


def test_a_label_at_the_right_edge_is_moved_left_whole():
    drawn = _drawn(draw_detections(_black(256, 256), [[226, 60, 256, 90]], [0.93], ["scratch"]))
    label_rows = drawn[30:58]  # above the box's top edge (60), where its label goes
    columns = np.flatnonzero(label_rows.any(axis=0))
    assert columns.size and columns.min() < 226  # "scratch 0.93" starts left of the box
    assert columns.max() <= 255


def test_a_box_at_the_image_edge_keeps_its_whole_outline():
    red = _red(draw_detections(_black(256, 256), [[100, 100, 256, 256]], [0.9], ["scratch"]))
    assert red[180, 254:256].all() and red[254:256, 180].all()  # 2 px lines inside the image
    assert red[180, 100:102].all() and not red[180, 102]  # the left edge as wide, no wider


def test_labels_grow_with_the_image():
    small = _drawn(draw_detections(_black(256, 256), [[100, 100, 140, 140]], [0.9], ["scratch"]))
    large = _drawn(draw_detections(_black(2048, 2448), [[1000, 1000, 1400, 1400]], [0.9],
                                 ["scratch"]))  # fmt: skip
    small_rows = np.flatnonzero(small[:98, 100:].any(axis=1))
    large_rows = np.flatnonzero(large[:990, 1000:].any(axis=1))
    small_height = small_rows.max() - small_rows.min() + 1
    large_height = large_rows.max() - large_rows.min() + 1
    assert small_height <= 12 and large_height >= 16, (small_height, large_height)


def test_p_defect_stays_readable_under_a_box():
    """A box whose top edge runs through the p(defect) text at (8, 8) no longer crosses it out:
    the text is drawn last, on black."""
    picture = draw_detections(_black(256, 256), [[0, 12, 120, 60]], [0.9], ["scratch"], 0.97)
    red = _red(picture)
    assert red[12:14, 100:118].all()  # the box's top edge, right of the text
    assert not red[12:14, 30:60].all(axis=1).any()  # not through the text
