"""Evaluation: COCO mAP through pycocotools, the defect classifier, and the calibrated gate.

    metrics = evaluate(model, test_samples, calibration_samples=val_samples, target_recall=0.995)
    metrics["map50"], metrics["gate_threshold"], metrics["map_kept"]

Detection metrics are pycocotools' own COCOeval on COCO objects built in memory: every image of
the split is an image of the evaluation (defect-free ones included: a detection there is a false
positive), and VOC "difficult" objects are ignored, measured by standard IoU (not a crowd
region's): a detection matching no free regular object at the IoU threshold but matching one is
neither a true nor a false positive, and a difficult object missed is no miss
(`evaluate_coco._difficult_eval`; pycocotools' matching order, which prefers a free regular
object, where the VOC devkit takes each detection's best-overlapping object of either kind).

The gate: p(defect) per image from the defect head. Its threshold is calibrated on a separate
split (validation) to keep at least `target_recall` of that split's defective images, halfway (in
logits) between the lowest score it must keep and the next score under it. The gated system is
the detector whose detections are dropped for images under the threshold; "mAP kept" is its mAP
over the detector's alone.

This module puts them together (`evaluate`, and `metrics_at_threshold` at a given threshold);
the rest lives beside it, one job a module, and is re-exported from here (`__all__`): the
model's predictions on a split (`evaluate_predict`), the detection metrics (`evaluate_coco`),
the gate's metrics, calibration and operating points (`evaluate_gate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from splitdet.training.errors import error_breakdown
from splitdet.training.evaluate_coco import (
    GatedCoco,
    _coco_dt,
    _coco_gt,
    _kept,
    coco_metrics,
    gated_coco_metrics,
    kept_absence,
)
from splitdet.training.evaluate_gate import (
    DEFAULT_TARGET_RECALL,
    OPERATING_RECALLS,
    best_accuracy_at_recall,
    calibrated_threshold,
    calibration_shortfall,
    classifier_metrics,
    gate_operating_points,
    highest_threshold_at_recall,
    roc_auc,
)
from splitdet.training.evaluate_predict import Prediction, gate_probabilities, predict

if TYPE_CHECKING:
    import torch

    from splitdet.shared.model import MultiTaskRCNN
    from splitdet.training.voc import VocSample

#: What callers import from here, wherever it is defined.
__all__ = [
    "DEFAULT_TARGET_RECALL",
    "OPERATING_RECALLS",
    "GatedCoco",
    "Prediction",
    "_coco_dt",
    "_coco_gt",
    "best_accuracy_at_recall",
    "calibrated_threshold",
    "calibration_shortfall",
    "classifier_metrics",
    "coco_metrics",
    "evaluate",
    "gate_operating_points",
    "gate_probabilities",
    "gated_coco_metrics",
    "highest_threshold_at_recall",
    "metrics_at_threshold",
    "predict",
    "roc_auc",
]


def evaluate(
    model: MultiTaskRCNN,
    samples: Sequence[VocSample],
    *,
    calibration_samples: Sequence[VocSample] | None = None,
    gate_threshold: float | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = False,
    predictions: Sequence[Prediction] | None = None,
    split_name: str = "evaluated split",
    calibration_name: str = "calibration split",
) -> dict:
    """Detection, classifier and gated-system metrics of `model` on `samples`.

    The gate threshold is, in order: calibrated on `calibration_samples` for `target_recall`;
    `gate_threshold`; else calibrated on `samples` themselves. "gate_calibrated_on" and
    "gate_operating_points_calibrated_on" say which: `calibration_name` (what to call the
    calibration split, e.g. "val", or "val of DIR"), "given", or `split_name` (the evaluated
    split's, e.g. "test").

    Returns a JSON-able dict: map, map50, map75, ar100 (detector alone); gate_threshold,
    gate_calibrated_on, gate_calibration_defective (how many defective images set the
    threshold; None when given), gate_recall, gate_accuracy, gate_precision, gate_f1, gate_auc,
    gate_pass_rate (on `samples`); gate_best_accuracy and gate_best_threshold (the best accuracy
    any threshold reaches on `samples` at `target_recall`: how far calibration, not the scores,
    holds the gate back); top_box_auc and top_box_best_accuracy (the same for the detector's
    highest box score per image: would the detector make a better gate); map_gated, map50_gated,
    map_kept (map_gated / map; None when map is under `evaluate_coco.MAP_KEPT_FLOOR`, and
    map_kept_absent then says why, else None), map50_kept (map50_kept_absent); images,
    defective_images; errors (the detector's confident detections by kind of error and its
    recall by object length, see `training.errors`).
    """
    class_names = model.config.class_names
    if predictions is None:
        predictions = predict(
            model, samples, device=device, batch_size=batch_size, progress=progress
        )
    labels = [s.is_defective for s in samples]
    probs = [p.p_defect for p in predictions]
    calibrated_with: int | None = None  # defective images the threshold was calibrated on
    calib, calib_labels = probs, labels  # where the operating points are calibrated
    if calibration_samples is not None:
        calib = gate_probabilities(
            model, calibration_samples, device=device, batch_size=batch_size, progress=progress
        )
        calib_labels = [s.is_defective for s in calibration_samples]
        threshold = calibrated_threshold(calib, calib_labels, target_recall)
        calibrated_on, calibrated_with = calibration_name, sum(calib_labels)
    elif gate_threshold is not None:
        threshold, calibrated_on = float(gate_threshold), "given"
    else:
        threshold = calibrated_threshold(probs, labels, target_recall)
        calibrated_on, calibrated_with = split_name, sum(labels)
    # the images matched once for the detector, its gate and every operating point
    coco = GatedCoco(samples, predictions, class_names)
    metrics = metrics_at_threshold(
        samples,
        predictions,
        class_names,
        threshold,
        calibrated_on=calibrated_on,
        target_recall=target_recall,
        coco=coco,
    )
    metrics["gate_calibration_defective"] = calibrated_with
    if any(calib_labels):
        metrics["gate_operating_points"] = gate_operating_points(
            calib, calib_labels, samples, predictions, class_names, metrics["map50"], coco=coco
        )
        metrics["gate_operating_points_calibrated_on"] = (
            calibration_name if calibration_samples is not None else split_name
        )
    return metrics


def metrics_at_threshold(
    samples: Sequence[VocSample],
    predictions: Sequence[Prediction],
    class_names: Sequence[str],
    threshold: float,
    *,
    calibrated_on: str,
    target_recall: float = DEFAULT_TARGET_RECALL,
    coco: GatedCoco | None = None,
) -> dict:
    """`evaluate`'s metrics of `predictions` (one per sample, same order) with the gate
    threshold fixed at `threshold`; `calibrated_on` says where it came from. The gated system
    keeps an image's detections when its p_defect >= threshold and has none otherwise.
    ``coco``: the `GatedCoco` of `samples`/`predictions` when the caller has one (matching
    is the costly part of the figures: done once for the detector and every threshold)."""
    labels = [s.is_defective for s in samples]
    probs = [p.p_defect for p in predictions]
    boxes = [p.boxes.numpy() for p in predictions]
    scores = [p.scores.numpy() for p in predictions]
    det_labels = [p.labels.numpy() for p in predictions]
    if coco is None:
        coco = GatedCoco(samples, predictions, class_names)
    detector = coco.detector()
    gated = coco.gated(threshold)
    gate = classifier_metrics(probs, labels, threshold)
    # the detector's highest box score as the image's score, beside the gate's p(defect)
    top_box = [float(p.scores.max()) if len(p.scores) else 0.0 for p in predictions]
    gate_best, top_box_best = (None, None), (None, None)  # no defective image: no recall
    if any(labels):
        gate_best = best_accuracy_at_recall(probs, labels, target_recall)
        top_box_best = best_accuracy_at_recall(top_box, labels, target_recall)

    return {
        **detector,
        "images": len(samples),
        "defective_images": sum(labels),
        "gate_threshold": threshold,
        "gate_calibrated_on": calibrated_on,
        "gate_target_recall": target_recall,
        "gate_recall": gate["recall"],
        "gate_accuracy": gate["accuracy"],
        "gate_precision": gate["precision"],
        "gate_f1": gate["f1"],
        "gate_auc": gate["auc"],
        "gate_pass_rate": gate["pass_rate"],
        "gate_best_accuracy": gate_best[0],
        "gate_best_threshold": gate_best[1],
        "top_box_auc": roc_auc(top_box, labels),
        "top_box_best_accuracy": top_box_best[0],
        "map_gated": gated["map"],
        "map50_gated": gated["map50"],
        "map_kept": _kept(gated["map"], detector["map"]),
        "map50_kept": _kept(gated["map50"], detector["map50"]),
        # why map_kept is null though the detector was scored (its mAP under the floor)
        "map_kept_absent": kept_absence(detector["map"]),
        "map50_kept_absent": kept_absence(detector["map50"]),
        "errors": error_breakdown(samples, boxes, scores, det_labels, class_names),
    }
