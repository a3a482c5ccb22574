"""`evaluate`'s figures on a large split: pycocotools' per-image matching (minutes of Python on
thousands of images) is done once for the detector, its gate and every operating point, not
once per threshold (it was eight times: 59 s of metrics on 750 test images, 20 s now)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from splitdet.training import voc
from splitdet.training.evaluate import (
    Prediction,
    coco_metrics,
    evaluate,
    gate_operating_points,
    gated_coco_metrics,
)

from support import make_tiny_voc


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> list[voc.VocSample]:
    root = make_tiny_voc(tmp_path_factory.mktemp("voc"), n_defective=24, n_free=12)
    return voc.read_split(root, "test", ["scratch"])


def _predictions(samples: list[voc.VocSample]) -> list[Prediction]:
    """Per image: each object found, jittered, plus stray boxes; p(defect) spread over [0, 1]
    so that the operating points' thresholds gate different images."""
    rng = np.random.default_rng(0)
    out = []
    for k, sample in enumerate(samples):
        boxes = [np.asarray(o.box) + rng.normal(0, 1.5, 4) for o in sample.objects]
        boxes += [np.array([x, y, x + 20, y + 10]) for x, y in rng.uniform(0, 100, (3, 2))]
        p = (0.35 + 0.65 * rng.random()) if sample.is_defective else 0.6 * rng.random()
        out.append(
            Prediction(
                torch.tensor(np.array(boxes), dtype=torch.float32),
                torch.tensor(rng.random(len(boxes)), dtype=torch.float32),
                torch.ones(len(boxes), dtype=torch.int64),
                float(p) if k else 0.0,
            )
        )
    return out


def test_evaluate_matches_each_image_once_for_every_threshold(tiny_model, split, monkeypatch):
    calls = []
    original = COCOeval.evaluate

    def counted(self):
        calls.append(len(self.params.imgIds))
        return original(self)

    monkeypatch.setattr(COCOeval, "evaluate", counted)
    metrics = evaluate(tiny_model, split, predictions=_predictions(split), split_name="test")
    assert len(metrics["gate_operating_points"]) == 6
    # the detector's matching, and the one without detections the gate's dropped images take
    assert len(calls) <= 2, f"pycocotools matched the split {len(calls)} times"


def test_figures_are_those_of_matching_at_each_threshold(tiny_model, split):
    predictions = _predictions(split)
    names = tiny_model.config.class_names
    metrics = evaluate(tiny_model, split, predictions=predictions, split_name="test")
    detector = coco_metrics(
        split,
        [p.boxes.numpy() for p in predictions],
        [p.scores.numpy() for p in predictions],
        [p.labels.numpy() for p in predictions],
        names,
    )
    for key in ("map", "map50", "map75", "ar100", "per_class"):
        assert metrics[key] == detector[key]
    gated = gated_coco_metrics(split, predictions, names, metrics["gate_threshold"])
    assert metrics["map_gated"] == gated["map"] and metrics["map50_gated"] == gated["map50"]
    labels = [s.is_defective for s in split]
    probs = [p.p_defect for p in predictions]
    points = metrics["gate_operating_points"]
    assert len({p["threshold"] for p in points}) > 2  # several gates, not one
    for point in points:
        alone = gated_coco_metrics(split, predictions, names, point["threshold"])
        assert point["map50_kept"] == alone["map50"] / detector["map50"]
    # called alone (no GatedCoco given), the same points
    assert (
        gate_operating_points(probs, labels, split, predictions, names, detector["map50"]) == points
    )


def test_gated_image_has_no_detections(tiny_model, split: list, tmp_path: Path):
    """An image under the threshold counts as one without detections: a threshold over every
    p(defect) leaves the gated system nothing, mAP 0, as matching no detection at all gives."""
    predictions = _predictions(split)
    names = tiny_model.config.class_names
    from splitdet.training.evaluate import GatedCoco

    coco = GatedCoco(split, predictions, names)
    none = coco.gated(1.5)
    assert none["map50"] == gated_coco_metrics(split, predictions, names, 1.5)["map50"] == 0.0
    assert coco.gated(0.0)["map50"] == coco.detector()["map50"]
