"""VOC "difficult" objects are ignored the VOC way, not as COCO crowd regions (review fault):
a detection matching one at the IoU threshold (standard IoU) is neither TP nor FP, any other
detection is a false positive, and `error_breakdown` ignores exactly what the mAP ignores."""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from splitdet.training.errors import error_breakdown
from splitdet.training.evaluate_coco import _matched, coco_metrics
from splitdet.training.voc_types import VocObject, VocSample

CLASSES = ("scratch", "dent")
REGULAR = VocObject("scratch", (10, 10, 50, 50))
# the reviewer's case: a 30 x 3 px difficult scratch
THIN = VocObject("scratch", (100, 100, 130, 103), difficult=True)
WIDE = VocObject("scratch", (100, 120, 130, 130), difficult=True)  # 300 px^2


def _run(objects, detections):
    """coco_metrics and error_breakdown of one 200 x 160 image's (box, score) scratches."""
    samples = [VocSample("a", Path("a.jpg"), 200, 160, tuple(objects))]
    boxes = [np.array([d[0] for d in detections], np.float32).reshape(-1, 4)]
    scores = [np.array([d[1] for d in detections], np.float32)]
    labels = [np.ones(len(detections), np.int64)]
    metrics = coco_metrics(samples, boxes, scores, labels, CLASSES)
    return metrics, error_breakdown(samples, boxes, scores, labels, CLASSES)


def _plain_pycocotools(objects, detections) -> list[float]:
    """pycocotools' own COCOeval stats of one image's (box, score) scratches, unaltered."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 200, "height": 160}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
             "bbox": [o.box[0], o.box[1], o.box[2] - o.box[0], o.box[3] - o.box[1]],
             "area": (o.box[2] - o.box[0]) * (o.box[3] - o.box[1])}
            for k, o in enumerate(objects)
        ],
        "categories": [{"id": 1, "name": "scratch"}, {"id": 2, "name": "dent"}],
    }  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        results = [
            {"image_id": 1, "category_id": 1, "score": s,
             "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]}
            for b, s in detections
        ]  # fmt: skip
        reference = COCOeval(gt, gt.loadRes(results), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    return [float(s) for s in reference.stats]


def test_a_fragment_inside_a_difficult_box_is_a_false_positive():
    """The reviewer's case: a confident box on the left 5 px of the 30 x 3 px difficult scratch
    (IoU 0.17) matches nothing at any threshold, so it is a false positive ranked first: the
    same figures as pycocotools on the image without the difficult object at all."""
    fragment = ((100, 100, 105, 103), 0.99)
    hit = ((10, 10, 50, 50), 0.5)
    metrics, errors = _run([REGULAR, THIN], [fragment, hit])
    # FP then TP: precision 1/2 at every recall point
    assert metrics["map"] == pytest.approx(0.5) and metrics["map50"] == pytest.approx(0.5)
    assert metrics["ar100"] == pytest.approx(1.0)
    reference = _plain_pycocotools([REGULAR], [fragment, hit])
    assert metrics["map"] == reference[0] and metrics["map50"] == reference[1]
    assert metrics["map75"] == reference[2] and metrics["ar100"] == reference[8]
    # the same detection is a false positive to the error breakdown: one JSON, one story
    assert (errors["localisation"], errors["ignored"], errors["true_positives"]) == (1, 0, 1)


def test_a_detection_on_a_difficult_object_is_ignored_only_at_thresholds_it_meets():
    """A box inside the difficult object at IoU 0.62 is ignored at IoU thresholds .5-.6 and a
    false positive (ranked first) at .65-.95, where crowd matching would have ignored it."""
    partial = ((100, 120, 118.6, 130), 0.9)  # 186 of 300 px^2: IoU 0.62
    metrics, errors = _run([REGULAR, WIDE], [partial, ((10, 10, 50, 50), 0.5)])
    assert metrics["map50"] == pytest.approx(1.0)
    assert metrics["map75"] == pytest.approx(0.5)
    assert metrics["map"] == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)
    assert metrics["per_class"]["scratch"]["objects"] == 1
    assert (errors["ignored"], errors["true_positives"], errors["missed"]) == (1, 1, 0)


def test_every_detection_matching_a_difficult_object_is_ignored():
    """VOC ignores each detection on a difficult object, a second one too (no duplicate), and
    a difficult object nobody found is no miss."""
    on_it = [((100, 120, 130, 130), 0.95), ((101, 120, 130, 130), 0.9)]
    metrics, errors = _run([REGULAR, WIDE], [*on_it, ((10, 10, 50, 50), 0.5)])
    assert metrics["map"] == pytest.approx(1.0) and metrics["ar100"] == pytest.approx(1.0)
    assert (errors["ignored"], errors["duplicates"]) == (2, 0)
    missed, _ = _run([REGULAR, WIDE], [((10, 10, 50, 50), 0.5)])
    assert missed["map"] == pytest.approx(1.0) and missed["ar100"] == pytest.approx(1.0)


def test_a_second_box_on_a_found_object_that_also_matches_a_difficult_one_is_ignored():
    """pycocotools skips a taken regular object and matches the difficult one beside it: the
    mAP ignores the second box, so the error breakdown counts it ignored, not a duplicate."""
    near = VocObject("scratch", (10, 10, 50, 52), difficult=True)  # IoU 0.95 with REGULAR
    detections = [((10, 10, 50, 50), 0.9), ((10, 10, 50, 51), 0.8)]
    metrics, errors = _run([REGULAR, near], detections)
    assert metrics["map"] == pytest.approx(1.0)
    assert (errors["true_positives"], errors["ignored"], errors["duplicates"]) == (1, 1, 0)


def _scene(seed: int, images: int = 12):
    """Random images of two classes with difficult objects, boxes near them, fragments inside
    them and false alarms; every detection confident."""
    rng = np.random.default_rng(seed)
    samples, boxes, scores, labels = [], [], [], []
    for n in range(images):
        objects, found = [], []
        for _ in range(int(rng.integers(0, 5))):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(4, 60, 2)
            box = (float(x), float(y), float(x + w), float(y + h))
            objects.append(VocObject(CLASSES[int(rng.integers(0, 2))], box, rng.random() < 0.4))
            for _ in range(int(rng.integers(0, 3))):  # near it, a few px off
                found.append(np.asarray(box) + rng.normal(0, 0.15 * min(w, h), 4))
            if rng.random() < 0.5:  # a fragment inside it
                found.append(np.asarray([x, y, x + w * rng.uniform(0.1, 0.5), y + h]))
        for _ in range(int(rng.integers(0, 3))):
            x, y = rng.uniform(0, 200, 2)
            found.append(np.asarray([x, y, x + 20, y + 15]))
        found = [np.sort(b.reshape(2, 2), axis=0).reshape(4) for b in found]  # x1 <= x2
        samples.append(VocSample(f"i{n}", Path(f"i{n}.png"), 256, 256, tuple(objects)))
        boxes.append(np.asarray(found, dtype=np.float64).reshape(-1, 4))
        scores.append(rng.uniform(0.5, 1.0, len(found)))
        labels.append(rng.integers(1, 3, len(found)))
    return samples, boxes, scores, labels


@pytest.mark.parametrize("seed", range(6))
def test_error_breakdown_ignores_exactly_what_the_map_ignores(seed):
    """At IoU .5, per image: the mAP's ignored detections and true positives (pycocotools'
    matching, all areas, 100 detections) are the error breakdown's."""
    samples, boxes, scores, labels = _scene(seed)
    coco_eval = _matched(samples, boxes, scores, labels, CLASSES)
    assert coco_eval.params.iouThrs[0] == 0.5
    images = len(samples)
    areas = len(coco_eval.params.areaRng)
    for i, sample in enumerate(samples):
        ignored = true_positives = 0
        for k in range(len(CLASSES)):
            matched = coco_eval.evalImgs[k * areas * images + i]  # area range "all"
            if matched is None:
                continue
            ignored += int(matched["dtIgnore"][0].sum())
            true_positives += int(((matched["dtMatches"][0] > 0) & ~matched["dtIgnore"][0]).sum())
        errors = error_breakdown([sample], boxes[i : i + 1], scores[i : i + 1],
                                 labels[i : i + 1], CLASSES)  # fmt: skip
        assert (errors["ignored"], errors["true_positives"]) == (ignored, true_positives), i


@pytest.mark.parametrize("seed", range(3))
def test_without_difficult_objects_the_figures_are_pycocotools_own(seed):
    """No difficult object: every figure and the whole precision table are plain COCOeval's."""
    from pycocotools.cocoeval import COCOeval

    from splitdet.training.evaluate_coco import _coco_dt, _coco_gt

    samples, boxes, scores, labels = _scene(seed)
    samples = [
        replace(s, objects=tuple(replace(o, difficult=False) for o in s.objects)) for s in samples
    ]
    ours = _matched(samples, boxes, scores, labels, CLASSES)
    gt = _coco_gt(samples, CLASSES)
    plain = COCOeval(gt, _coco_dt(gt, boxes, scores, labels), "bbox")
    plain.params.imgIds = sorted(gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        plain.evaluate()
        for coco_eval in (ours, plain):
            coco_eval.accumulate()
            coco_eval.summarize()
    assert np.array_equal(ours.eval["precision"], plain.eval["precision"])
    assert np.array_equal(ours.eval["recall"], plain.eval["recall"])
    assert list(ours.stats) == list(plain.stats)
