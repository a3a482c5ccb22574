"""`ResampledCoco`: the bootstrap's figures of a draw of images, from one per-image matching,
equal pycocotools' whole evaluation of the drawn samples (`coco_metrics`), repeats included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitdet.training.evaluate_coco import ResampledCoco, coco_metrics
from splitdet.training.voc_types import VocObject, VocSample

CLASSES = ("scratch", "dent")
KEYS = ("map", "map50", "map75", "ar100")


def _scene(seed: int, images: int = 9):
    """Random images: 0-3 objects of two classes (some difficult, some images without any),
    and detections near them or elsewhere, with random scores and labels."""
    rng = np.random.default_rng(seed)
    samples, boxes, scores, labels = [], [], [], []
    for n in range(images):
        objects, found = [], []
        for _ in range(int(rng.integers(0, 4))):
            x, y = rng.uniform(0, 200, 2)
            box = (float(x), float(y), float(x + rng.uniform(8, 60)), float(y + rng.uniform(8, 60)))
            name = CLASSES[int(rng.integers(0, 2))]
            objects.append(VocObject(name, box, difficult=bool(rng.random() < 0.15)))
            if rng.random() < 0.8:  # found, a few px off
                found.append(np.asarray(box) + rng.normal(0, 3, 4))
        for _ in range(int(rng.integers(0, 3))):  # false alarms
            x, y = rng.uniform(0, 200, 2)
            found.append(np.asarray([x, y, x + 20, y + 15]))
        samples.append(VocSample(f"img{n}", Path(f"img{n}.png"), 256, 256, tuple(objects)))
        boxes.append(np.asarray(found, dtype=np.float32).reshape(-1, 4))
        scores.append(rng.uniform(0.05, 1.0, len(found)).astype(np.float32))
        labels.append(rng.integers(1, 3, len(found)))
    return samples, boxes, scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_draw_scores_as_the_drawn_samples_evaluated_whole(seed):
    samples, boxes, scores, labels = _scene(seed)
    resampled = ResampledCoco(samples, boxes, scores, labels, CLASSES)
    rng = np.random.default_rng(seed + 10)
    draws = [rng.integers(0, len(samples), len(samples)) for _ in range(6)]
    draws += [np.arange(len(samples)), np.array([3, 3, 3, 0])]
    for drawn in draws:
        expected = coco_metrics(
            [samples[i] for i in drawn], [boxes[i] for i in drawn], [scores[i] for i in drawn],
            [labels[i] for i in drawn], CLASSES,
        )  # fmt: skip
        ours = resampled.metrics(drawn)
        assert {k: ours[k] for k in KEYS} == {k: expected[k] for k in KEYS}, list(drawn)


def test_a_draw_without_ground_truth_has_no_figures():
    samples, boxes, scores, labels = _scene(0)
    empty = [i for i, s in enumerate(samples) if not s.objects]
    assert empty, "the scene needs an image without objects"
    figures = ResampledCoco(samples, boxes, scores, labels, CLASSES).metrics([empty[0]] * 3)
    assert figures == {"map": None, "map50": None, "map75": None, "ar100": None}
