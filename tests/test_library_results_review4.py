"""Results that came out wrong or as an internal error when splitdet is used as a Python
library (review 4).

1. `cloud.local.LocalDetector.detect` given the edge result of an image the gate passed
   (`encoded` None) raised the wire layer's `InvalidRequest: expected a sequence of
   EncodedTensor`; now a ValueError says the image was not flagged, with its p_defect and
   the threshold.
2. `training.evaluate_coco.coco_metrics` scored 0-based labels (or any label outside
   1..len(class_names)) as mAP 0.0 and NaN scores as the most confident, without a word; now
   a ValueError names the image and the value.
3. `training.train.train` drew its progress bar into any stderr by default; now only into a
   terminal, as `splitdet train` does.

Real components: the tiny export's ONNX gate and torch cloud half, pycocotools, a real
one-iteration training run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitdet.cloud.local import LocalDetector
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.runtime import EdgeRuntime
from splitdet.shared.probability_format import format_probability
from splitdet.training import voc
from splitdet.training.evaluate_coco import ResampledCoco, coco_metrics
from splitdet.training.train import train

from conftest import ONE_EPOCH

# ---------------------------------------------------------------- 1. LocalDetector.detect


def test_detect_on_an_image_the_gate_passed_says_so(tiny_model_dir, one_torch_thread):
    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=1), threshold=1.0)
    result = pipeline.process_array(np.full((3, 64, 80), 0.5, np.float32))
    assert not result.flagged and result.encoded is None
    detector = LocalDetector(tiny_model_dir)
    with pytest.raises(ValueError) as refused:
        detector.detect("req-1", result, "frame-1")
    p = format_probability(result.p_defect)
    assert str(refused.value) == (
        f"frame-1: the image was not flagged (p_defect {p} < threshold 1.000): nothing to detect"
    )
    # a flagged one is detected as ever
    flagged = EdgePipeline(pipeline.runtime, gate=False).process_array(
        np.full((3, 64, 80), 0.5, np.float32)
    )
    detections, timings = detector.detect("req-2", flagged, "frame-2")
    assert isinstance(timings, dict) and all(d.score >= 0 for d in detections)


# ---------------------------------------------------------------- 2. coco_metrics


@pytest.fixture(scope="module")
def test_split(tiny_dataset):
    samples = voc.read_split(tiny_dataset, "test", ["scratch"])
    boxes = [np.array([o.box for o in s.objects], np.float32).reshape(-1, 4) for s in samples]
    return samples, boxes


def _first_with_objects(samples) -> int:
    return next(i for i, s in enumerate(samples) if s.objects)


@pytest.mark.parametrize("label", [0, 2, 7, -1])
def test_a_label_outside_the_classes_is_refused_naming_the_image(test_split, label):
    samples, boxes = test_split
    first = _first_with_objects(samples)
    ones = [np.ones(len(b)) for b in boxes]
    labels = [np.full(len(b), label) for b in boxes]
    with pytest.raises(ValueError) as refused:
        coco_metrics(samples, boxes, ones, labels, ["scratch"])
    assert str(refused.value).startswith(
        f"image {first} ({samples[first].image_id}): detection label {label} is not one of 1..1"
    )
    with pytest.raises(ValueError, match=r"is not one of 1\.\.1"):
        ResampledCoco(samples, boxes, ones, labels, ["scratch"])


def test_a_nan_score_is_refused_naming_the_image(test_split):
    samples, boxes = test_split
    first = _first_with_objects(samples)
    scores = [np.ones(len(b)) for b in boxes]
    scores[first][0] = np.nan
    labels = [np.ones(len(b), int) for b in boxes]
    with pytest.raises(ValueError) as refused:
        coco_metrics(samples, boxes, scores, labels, ["scratch"])
    assert str(refused.value).startswith(
        f"image {first} ({samples[first].image_id}): detection score nan is not a finite number"
    )


def test_right_labels_and_scores_as_tensors_still_score(test_split):
    samples, boxes = test_split
    metrics = coco_metrics(
        samples,
        [torch.from_numpy(b) for b in boxes],
        [torch.ones(len(b)) for b in boxes],
        [torch.ones(len(b), dtype=torch.int64) for b in boxes],
        ["scratch"],
    )
    assert metrics["map50"] == pytest.approx(1.0)


# ---------------------------------------------------------------- 3. train's progress default


def test_train_draws_no_bar_into_a_captured_stderr_by_default(
    tiny_voc, tmp_path, capsys, one_torch_thread
):
    train(ONE_EPOCH, tiny_voc, tmp_path, max_iters=1)
    err = capsys.readouterr().err
    assert "training:" not in err and "%|" not in err, err
