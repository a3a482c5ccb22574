"""Annotated images of a model of several classes (scratch, dent, pit): every box and label was
drawn in the one orange-red, so a dent could not be told from a scratch without reading each
label, and a label's thin text had nothing behind it, lost on a bright gasket. Each class now
has its colour (class 1 keeps the old one) and a label's text is drawn on black; `predict
--save` colours its copies by each box's label."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.annotate import BOX_COLOUR, CLASS_COLOURS, class_colour, draw_detections
from splitdet.training.export import export_model

from conftest import make_tiny_model
from support import make_tiny_voc, predict_records

NAMES = ("scratch", "dent", "pit")


def _grey(height: int = 256, width: int = 256) -> np.ndarray:
    return np.full((3, height, width), 0.8, dtype=np.float32)  # a bright gasket


def _is(picture, colour) -> np.ndarray:
    return (np.asarray(picture) == np.array(colour, dtype=np.uint8)).all(axis=-1)


def test_each_class_is_drawn_in_its_own_colour_and_labels_on_black():
    boxes = [[20, 60, 100, 120], [140, 60, 220, 120], [20, 160, 100, 220]]
    picture = draw_detections(_grey(), boxes, [0.9, 0.8, 0.7], list(NAMES), labels=[1, 2, 3])
    for (x1, y1, _, _), label in zip(boxes, (1, 2, 3), strict=True):
        assert _is(picture, class_colour(label))[y1 + 30, x1], label  # the left edge
    assert len({class_colour(k) for k in (1, 2, 3)}) == 3
    assert class_colour(1) == BOX_COLOUR
    assert class_colour(len(CLASS_COLOURS) + 2) == CLASS_COLOURS[1]  # again from the start
    black = (np.asarray(picture) < 30).all(axis=-1)
    assert black[40:58, 20:100].sum() > 200  # behind the first label, above its box
    # without labels (the edge daemon's --save-annotated): one colour, as before
    plain = draw_detections(_grey(), boxes, [0.9, 0.8, 0.7], list(NAMES))
    assert _is(plain, BOX_COLOUR)[90, 140]


@pytest.fixture(scope="module")
def three_class_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("three_class_model")
    export_model(make_tiny_model(2, class_names=NAMES), out, gate_threshold=0.0,
                 default_codec="int8")  # fmt: skip
    return out


def test_predict_save_colours_each_box_by_its_class(three_class_model, tmp_path, one_torch_thread):
    root = make_tiny_voc(tmp_path / "voc", n_defective=2, n_free=0, size=(224, 224))
    images = tmp_path / "images"
    images.mkdir()
    for path in (root / "JPEGImages").iterdir():
        shutil.copy(path, images / path.name)
    records = predict_records(three_class_model, images, tmp_path / "p.json", "--save",
                              str(tmp_path / "annotated"), "--score-threshold", "0.0")  # fmt: skip
    record = max(records, key=lambda r: len(set(r["labels"])))
    assert len(set(record["labels"])) >= 2, json.dumps(records)[:400]
    assert [NAMES[k - 1] for k in record["labels"]] == record["class_names"]
    picture = np.asarray(Image.open(record["annotated"]).convert("RGB")).astype(int)
    for label in set(record["labels"]):  # a JPEG: colours within its rounding
        near = (np.abs(picture - np.array(class_colour(label))) < 40).all(axis=-1)
        assert near.sum() > 50, (label, int(near.sum()))


def test_the_edge_daemons_save_annotated_colours_each_box_by_its_class(tmp_path):
    """`edge run --save-annotated` drew every class in one colour (it passed names only)."""
    from splitdet.edge.client_answers import CloudDetections
    from splitdet.edge.sender import annotate_hook
    from splitdet.edge.store_types import OutboxItem

    image = tmp_path / "shot.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(image)
    boxes = np.array([[20, 60, 100, 120], [140, 60, 220, 120]], np.float32)
    answer = CloudDetections("r1", "f" * 64, boxes, np.array([0.9, 0.8], np.float32),
                             np.array([1, 2]), ("scratch", "dent"), {}, False)  # fmt: skip
    item = OutboxItem(7, "r1", b"", 0.0, 1, None, str(image), "f" * 64, None)
    annotate_hook(tmp_path / "annotated")(item, answer)
    (written,) = (tmp_path / "annotated").iterdir()
    picture = np.asarray(Image.open(written).convert("RGB")).astype(int)
    for (x1, y1, _, _), label in zip(boxes.astype(int), (1, 2), strict=True):
        edge = picture[y1 + 30, x1 : x1 + 2]  # the box's left edge (a JPEG: within rounding)
        assert (np.abs(edge - np.array(class_colour(label))) < 40).all(axis=-1).any(), label
