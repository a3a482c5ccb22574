"""`splitdet predict`'s last line counted a model of several classes' boxes as one number
("12 defect (9 boxes)"): whether the rare `pit` was found at all took reading the JSON. It now
says how many of each class when there are several; one class's line is as before."""

from __future__ import annotations

from splitdet.edge.cli_predict import summary
from splitdet.edge.predict import Prediction


def _found(path: str, *names: str) -> Prediction:
    boxes = [[0.0, 0.0, 10.0, 10.0]] * len(names)
    return Prediction(path, "defect", 0.9, boxes=boxes, scores=[0.8] * len(names),
                      labels=[1] * len(names), class_names=list(names))  # fmt: skip


def test_the_summary_counts_the_boxes_of_each_class():
    line = summary([
        _found("a.png", "scratch", "Deep Dent", "scratch"),
        _found("b.png", "Kratzer-\u00e4", "scratch"),
        _found("c.png"),
        Prediction("d.png", "ok", 0.05),
    ], 4)  # fmt: skip
    assert "3 defect (5 boxes: 3 scratch, 1 Deep Dent, 1 Kratzer-\u00e4; 1 with no box)" in line


def test_one_class_keeps_the_plain_count():
    line = summary([_found("a.png", "scratch", "scratch")], 1)
    assert "1 defect (2 boxes)," in line
