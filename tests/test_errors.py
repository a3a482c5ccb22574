"""The error breakdown: every kind of mistake counted on a hand-made set with a known answer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitdet.training.errors import error_breakdown
from splitdet.training.voc import VocObject, VocSample

CLASSES = ("scratch", "dent")
SAMPLES = [
    # a long scratch (longer side 100 px), a 40 px scratch, a 10 px dent, a difficult scratch
    VocSample(
        "a",
        Path("a.jpg"),
        300,
        200,
        (
            VocObject("scratch", (0, 0, 10, 100)),
            VocObject("scratch", (50, 50, 60, 90)),
            VocObject("dent", (200, 100, 210, 110)),
            VocObject("scratch", (250, 150, 270, 170), difficult=True),
        ),
    ),
    VocSample("b", Path("b.jpg"), 300, 200, ()),  # defect-free
]
# (box, score, label) per image; the comment names what each one is
DETECTIONS = {
    "a": [
        ((0, 0, 10, 100), 0.95, 1),  # true positive on the long scratch
        ((0, 1, 10, 101), 0.90, 1),  # duplicate of it (IoU 0.98)
        ((50, 50, 60, 62), 0.80, 1),  # fragment of the 40 px scratch (IoU 0.3): localisation
        ((200, 100, 210, 110), 0.75, 1),  # on the dent, called a scratch: wrong class
        ((250, 150, 270, 170), 0.70, 1),  # on the difficult scratch: ignored
        ((150, 20, 160, 30), 0.60, 1),  # on nothing: background
        ((50, 50, 60, 90), 0.40, 1),  # would be a hit, but under the score threshold
    ],
    "b": [((100, 100, 120, 104), 0.85, 1)],  # background on a defect-free image
}


def _arrays():
    rows = [DETECTIONS[s.image_id] for s in SAMPLES]
    boxes = [np.array([r[0] for r in row], np.float32).reshape(-1, 4) for row in rows]
    scores = [np.array([r[1] for r in row], np.float32) for row in rows]
    labels = [np.array([r[2] for r in row], np.int64) for row in rows]
    return boxes, scores, labels


def test_every_confident_detection_gets_its_kind():
    errors = error_breakdown(SAMPLES, *_arrays(), CLASSES)
    assert errors["detections"] == 7  # the 0.40 one is not confident
    expected = {"true_positives": 1, "duplicates": 1, "localisation": 1, "wrong_class": 1,
                "ignored": 1, "background": 2, "background_on_defect_free": 1}  # fmt: skip
    assert {k: errors[k] for k in expected} == expected
    kinds = ("true_positives", "duplicates", "localisation", "wrong_class", "ignored", "background")
    assert sum(errors[k] for k in kinds) == errors["detections"]


def test_recall_by_length_counts_found_and_missed_objects():
    errors = error_breakdown(SAMPLES, *_arrays(), CLASSES)
    assert errors["objects"] == 3 and errors["missed"] == 2  # the difficult one is not counted
    by_length = errors["recall_by_length"]
    assert list(by_length) == ["<20", "20-40", "40-80", ">=80"]
    assert by_length["<20"] == {"found": 0, "objects": 1, "recall": 0.0}  # the dent
    assert by_length["20-40"] == {"found": 0, "objects": 0, "recall": None}
    assert by_length["40-80"] == {"found": 0, "objects": 1, "recall": 0.0}  # 40 px: its bucket
    assert by_length[">=80"] == {"found": 1, "objects": 1, "recall": 1.0}


def test_a_lower_score_threshold_turns_the_fragment_scratch_into_a_hit():
    errors = error_breakdown(SAMPLES, *_arrays(), CLASSES, score_threshold=0.3)
    # the 0.40 box now takes the 40 px scratch; the higher-scoring fragment stays localisation
    assert errors["true_positives"] == 2 and errors["missed"] == 1
    assert errors["recall_by_length"]["40-80"]["recall"] == 1.0


def test_mismatched_inputs_are_refused():
    boxes, scores, labels = _arrays()
    with pytest.raises(ValueError, match="one detection list per sample"):
        error_breakdown(SAMPLES, boxes[:1], scores, labels, CLASSES)
    with pytest.raises(ValueError, match="length_edges"):
        error_breakdown(SAMPLES, boxes, scores, labels, CLASSES, length_edges=(40, 20))


def test_a_difficult_object_of_another_class_does_not_excuse_a_detection():
    sample = VocSample(
        "c", Path("c.jpg"), 100, 100, (VocObject("dent", (10, 10, 20, 20), difficult=True),)
    )
    box = np.array([[10, 10, 20, 20]], np.float32)
    as_scratch = error_breakdown([sample], [box], [np.array([0.9])], [np.array([1])], CLASSES)
    as_dent = error_breakdown([sample], [box], [np.array([0.9])], [np.array([2])], CLASSES)
    assert (as_scratch["wrong_class"], as_scratch["ignored"]) == (1, 0)
    assert (as_dent["wrong_class"], as_dent["ignored"]) == (0, 1)
    assert as_dent["objects"] == 0  # difficult objects are not counted for recall
