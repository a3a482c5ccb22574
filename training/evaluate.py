"""Evaluation: COCO mAP through pycocotools, the defect classifier, and the calibrated gate.

    metrics = evaluate(model, test_samples, calibration_samples=val_samples, target_recall=0.995)
    metrics["map50"], metrics["gate_threshold"], metrics["map_kept"]

Detection metrics are pycocotools' own COCOeval on COCO objects built in memory: every image of
the split is an image of the evaluation (defect-free ones included: a detection there is a false
positive), and VOC "difficult" objects become `iscrowd` regions (pycocotools ignores detections
matched to them, as the VOC protocol ignores difficult objects).

The gate: p(defect) per image from the defect head. Its threshold is calibrated on a separate
split (validation) to keep at least `target_recall` of that split's defective images, halfway (in
logits) between the lowest score it must keep and the next score under it. The gated system is
the detector whose detections are dropped for images under the threshold; "mAP kept" is its mAP
over the detector's alone.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from splitdet.training.errors import error_breakdown
from splitdet.training.voc import VocSample, load_rgb

if TYPE_CHECKING:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from splitdet.shared.model import MultiTaskRCNN

DEFAULT_TARGET_RECALL = 0.995
#: The target recalls `gate_operating_points` calibrates a threshold for: what each costs in
#: images flagged and mAP kept, for choosing `edge run --threshold`.
OPERATING_RECALLS = (1.0, 0.995, 0.99, 0.98, 0.95, 0.9)


@dataclass
class Prediction:
    """One image's output: boxes FloatTensor[K, 4] x1y1x2y2 in original px, scores [K],
    labels Int64[K] (1-based), p_defect the gate's probability."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    p_defect: float


def _same_shape_batches(samples: Sequence[VocSample], batch_size: int) -> list[list[int]]:
    """Indices of `samples` in batches of at most `batch_size` whose images share one size.

    torchvision's transform pads a batch to its largest image, and the padding is part of what
    the backbone's GroupNorm, the gate's pooling and the dense gate see: an image batched with
    one of another size (a 320x256 beside a 256x320) is scored on other numbers than alone,
    as the edge scores it. Images of one (width, height) px resize and pad alike, so batching
    only those gives every image its batch-of-1 result. The size is the annotation's
    (`VocSample.width`, `height`, the image header's when the split was read with its images
    checked); `_image_batches` splits a batch again by the decoded size should they differ.
    Batches follow the samples' order by their first index."""
    groups: dict[tuple[int, int], list[int]] = {}
    batches: list[list[int]] = []
    for index, sample in enumerate(samples):
        group = groups.setdefault((sample.width, sample.height), [])
        if not group:  # a new batch takes its place in the order here
            batches.append(group)
        group.append(index)
        if len(group) == batch_size:
            del groups[(sample.width, sample.height)]  # full: the next of this size starts anew
    return batches


def _image_batches(
    samples: Sequence[VocSample],
    batch_size: int,
    device: torch.device | str,
    progress: bool,
    desc: str,
    pixel_bits: int,
) -> Iterator[tuple[list[int], list[Tensor]]]:
    """The samples' images in batches of one size each (see `_same_shape_batches`): pairs of
    (indices into `samples`, images Tensor[3, H, W] float32 in [0, 1] of one H, W), every
    index once (`pixel_bits`: the model's `ModelConfig.pixel_bits`)."""
    from torchvision.transforms.functional import pil_to_tensor

    batches = _same_shape_batches(samples, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    for indices in batches:
        by_shape: dict[tuple[int, ...], tuple[list[int], list[Tensor]]] = {}
        for index in indices:
            img = load_rgb(samples[index].image_path, pixel_bits)
            image = pil_to_tensor(img).float().div_(255.0).to(device)
            kept, images = by_shape.setdefault(tuple(image.shape), ([], []))
            kept.append(index)
            images.append(image)
        yield from by_shape.values()  # one pair unless an annotation's size was wrong


@torch.inference_mode()
def gate_probabilities(
    model: MultiTaskRCNN,
    samples: Sequence[VocSample],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = False,
) -> list[float]:
    """p(defect) for every sample (in `samples`' order) from the gate alone (backbone + defect
    head, no RPN or ROI heads): what calibrating the threshold needs. Equals `predict`'s
    p_defect, and the batch-of-1 value at any `batch_size` (images of one size share a batch)."""
    model.eval()
    out: list[float] = [math.nan] * len(samples)
    batches = _image_batches(
        samples, batch_size, device, progress, "calibrate", model.config.pixel_bits
    )
    for indices, images in batches:
        for index, p in zip(indices, model.defect_probability(images).tolist(), strict=True):
            out[index] = p
    return out


@torch.inference_mode()
def predict(
    model: MultiTaskRCNN,
    samples: Sequence[VocSample],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = False,
) -> list[Prediction]:
    """Detections and p(defect) for every sample (in `samples`' order), with one backbone pass
    per image. Any `batch_size` gives the batch-of-1 result: only images of one size share a
    batch (torchvision pads a batch to its largest image, and the padding would change what
    GroupNorm and the gate compute)."""
    model.eval()
    gate_level = model.config.gate_level
    out: list[Prediction | None] = [None] * len(samples)
    batches = _image_batches(samples, batch_size, device, progress, "eval", model.config.pixel_bits)
    for indices, images in batches:
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        # FasterRCNN.forward, with the defect head reading the same features
        images_t, _ = model.transform(images)
        features = model.backbone(images_t.tensors)
        p_defect = torch.sigmoid(model.defect_head(features[gate_level])[0])
        proposals, _ = model.rpn(images_t, features)
        detections, _ = model.roi_heads(features, proposals, images_t.image_sizes)
        detections = model.transform.postprocess(detections, images_t.image_sizes, original_sizes)
        for index, det, p in zip(indices, detections, p_defect.tolist(), strict=True):
            out[index] = Prediction(det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(), p)
    return out  # type: ignore[return-value]  # every index was filled


# ----------------------------------------------------------------------------------- detection


def _coco_gt(samples: Sequence[VocSample], class_names: Sequence[str]) -> COCO:
    from pycocotools.coco import COCO

    label_of = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, sample in enumerate(samples, start=1):
        images.append({"id": image_id, "width": sample.width, "height": sample.height})
        for obj in sample.objects:
            x1, y1, x2, y2 = obj.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label_of[obj.name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    # Difficult as crowd: COCOeval's `_prepare` overwrites every `ignore` with
                    # `iscrowd`, its only way to ignore a box. A crowd box is matched by
                    # intersection over the detection's area, by any number of detections (one
                    # that also matches a free regular box takes that instead); a detection
                    # matched to it is neither TP nor FP, and the box is never a missed object.
                    "iscrowd": int(obj.difficult),
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _coco_dt(
    gt: COCO,
    boxes_per_image: Sequence,
    scores_per_image: Sequence,
    labels_per_image: Sequence,
) -> COCO:
    """Detections as a COCO object, as `COCO.loadRes` would build it (works for none at all)."""
    from pycocotools.coco import COCO

    annotations = []
    for image_id, (boxes, scores, labels) in enumerate(
        zip(boxes_per_image, scores_per_image, labels_per_image, strict=True), start=1
    ):
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
            w, h = float(x2 - x1), float(y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(x1), float(y1), w, h],
                    "area": w * h,
                    "score": float(score),
                    "iscrowd": 0,
                }
            )
    dt = COCO()
    dt.dataset = {
        "images": list(gt.dataset["images"]),
        "annotations": annotations,
        "categories": list(gt.dataset["categories"]),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def coco_metrics(
    samples: Sequence[VocSample],
    boxes_per_image: Sequence,
    scores_per_image: Sequence,
    labels_per_image: Sequence,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """pycocotools' bbox COCOeval over all `samples` (images without objects included).

    Args:
        samples: ground truth; object boxes x1y1x2y2 in 0-based continuous original-image px
            (`VocSample`), difficult ones ignored (see `_coco_gt`).
        boxes_per_image: per sample, the detections' boxes (K, 4) x1y1x2y2 in the same frame,
            original-image px (not the model's resized input), any float array-like (Tensor,
            ndarray; read as Python floats), as `Prediction.boxes`.
        scores_per_image: per sample, scores (K,) floats (only their order counts).
        labels_per_image: per sample, labels (K,) ints, 1-based indices into `class_names`.
        class_names: the classes; label k + 1 is class_names[k].

    Returns {"map": mAP@[.5:.95], "map50": mAP@.5, "map75", "ar100": AR@100}; None where
    pycocotools has nothing to average (no ground truth at all); and "per_class": per class
    name, {"ap", "ap50", "objects"}: its AP@[.5:.95] and AP@.5 (pycocotools' own precision
    table, averaged as its summary averages it; None for a class without ground truth here)
    and its number of objects, `difficult` ones not counted.
    """
    from pycocotools.cocoeval import COCOeval

    if not len(samples) == len(boxes_per_image) == len(scores_per_image) == len(labels_per_image):
        raise ValueError("one detection list per sample is needed")
    gt = _coco_gt(samples, class_names)
    dt = _coco_dt(gt, boxes_per_image, scores_per_image, labels_per_image)
    coco_eval = COCOeval(gt, dt, iouType="bbox")
    coco_eval.params.imgIds = sorted(gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [None if s < 0 else float(s) for s in coco_eval.stats]
    return {
        "map": stats[0],
        "map50": stats[1],
        "map75": stats[2],
        "ar100": stats[8],
        "per_class": _per_class(coco_eval, samples, class_names),
    }


def _per_class(
    coco_eval: COCOeval, samples: Sequence[VocSample], class_names: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """{class name: {"ap", "ap50", "objects"}} from an accumulated COCOeval: its precision
    table [IoU thresholds, recall points, classes, areas, max detections], read at all areas and
    100 detections, cells of -1 (nothing to measure) left out as pycocotools' summary does."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    iou_50 = int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.5)))
    out: dict[str, dict[str, float | int | None]] = {}
    for k, name in enumerate(class_names):

        def mean(cells: np.ndarray) -> float | None:
            cells = cells[cells > -1]
            return float(cells.mean()) if cells.size else None

        objects = sum(1 for s in samples for o in s.objects if o.name == name and not o.difficult)
        out[name] = {
            "ap": mean(precision[:, :, k]),
            "ap50": mean(precision[iou_50, :, k]),
            "objects": objects,
        }
    return out


# ---------------------------------------------------------------------------------- the gate


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None with one class only."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _misses_allowed(defective: int, target_recall: float) -> int:
    """How many of `defective` images a threshold may leave under it at `target_recall`."""
    return math.floor((1.0 - target_recall) * defective + 1e-9)


def highest_threshold_at_recall(
    probabilities: Sequence[float], labels: Sequence[bool], target_recall: float
) -> float:
    """The highest threshold t with recall (fraction of positives with p >= t) >= target_recall."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    positives = np.sort(np.asarray(probabilities, dtype=np.float64)[np.asarray(labels, bool)])
    if len(positives) == 0:
        raise ValueError("cannot calibrate the gate: the calibration split has no defective image")
    misses = _misses_allowed(len(positives), target_recall)
    return float(positives[misses])


def _logit(p: np.ndarray | float) -> np.ndarray:
    clipped = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1.0 - 1e-12)
    return np.log(clipped) - np.log1p(-clipped)


def calibrated_threshold(
    probabilities: Sequence[float], labels: Sequence[bool], target_recall: float
) -> float:
    """The gate threshold calibrated for `target_recall`: `highest_threshold_at_recall`'s t
    lowered into the gap below it, to the midpoint in logit space between t and the highest
    score under t.

    No calibration image changes side (its recall, accuracy and pass rate are those of t), but a
    defective image scoring a little under the lowest one kept is still flagged. t itself sits
    on that lowest defective score: with few defective images to calibrate on, new ones fall
    below it about as often as not (a split of 6 defective images at `target_recall` 0.995 takes
    the lowest of them, and a quarter of the next ones can score under it). Without any score
    under t, t stays.
    """
    highest = highest_threshold_at_recall(probabilities, labels, target_recall)
    p = np.asarray(probabilities, dtype=np.float64)
    below = p[p < highest]
    if len(below) == 0:
        return highest
    middle = (_logit(highest) + _logit(below.max())) / 2.0
    threshold = float(1.0 / (1.0 + np.exp(-middle)))
    # rounding at the ends of the sigmoid must not take it past either score
    return min(max(threshold, float(np.nextafter(below.max(), 1.0))), highest)


def _expected_recall(defective: int, target_recall: float) -> float:
    """The recall on new defective images of a threshold calibrated on `defective` of them: it
    keeps all but the lowest m, so a new one scores under it with probability (m + 1) / (n + 1)
    (order statistics of exchangeable scores)."""
    misses = _misses_allowed(defective, target_recall)
    return 1.0 - (misses + 1) / (defective + 1)


def calibration_shortfall(defective: int, target_recall: float) -> str | None:
    """Why `defective` calibration images set too uncertain a threshold for `target_recall`,
    or None.

    The threshold keeps all but the lowest m of the n defective images; a new defective image
    falls under it with probability (m + 1) / (n + 1). Warned of when that is more than twice
    the misses `target_recall` allows (n < 99 at 0.995): 6 images, for example, give new ones
    about 86% recall, not 99.5%."""
    allowed = 2.0 * (1.0 - target_recall)
    expected = _expected_recall(defective, target_recall)
    if target_recall >= 1.0 or 1.0 - expected <= allowed:
        return None
    needed = next(
        n for n in range(defective, 10**7) if 1.0 - _expected_recall(n, target_recall) <= allowed
    )
    return (
        f"the gate threshold is calibrated on {defective} defective image(s): on new images "
        f"expect about {expected:.0%} recall, not {target_recall:.1%} (a new defective image "
        f"scores under the lowest ones kept about 1 time in {1 / (1 - expected):.0f}); "
        f"calibrate on a split with {needed} or more defective images (eval --calibrate-data "
        "DIR) before trusting the gate"
    )


def best_accuracy_at_recall(
    probabilities: Sequence[float], labels: Sequence[bool], target_recall: float
) -> tuple[float, float]:
    """(accuracy, threshold): the best accuracy of `p >= t` over every threshold t that keeps
    at least `target_recall` of the positives, and the highest t that reaches it.

    Read on the evaluated split itself, it is what the scores allow whatever the calibration: an
    upper bound on the calibrated gate's accuracy. The best t can lie below the highest one that
    keeps the recall (`highest_threshold_at_recall`) when positives crowd just under it."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    highest = highest_threshold_at_recall(p, y, target_recall)
    candidates = np.unique(p[p <= highest])  # ascending; includes `highest`
    positives, negatives = np.sort(p[y]), np.sort(p[~y])
    true_pos = len(positives) - np.searchsorted(positives, candidates, side="left")
    true_neg = np.searchsorted(negatives, candidates, side="left")
    accuracy = (true_pos + true_neg) / len(p)
    best = len(accuracy) - 1 - int(np.argmax(accuracy[::-1]))  # the highest t among ties
    return float(accuracy[best]), float(candidates[best])


def classifier_metrics(
    probabilities: Sequence[float], labels: Sequence[bool], threshold: float
) -> dict[str, float | None]:
    """Accuracy, precision, recall, F1 of `p >= threshold` as "defective", and ROC AUC."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    pred = p >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {
        "accuracy": (tp + tn) / len(y) if len(y) else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "auc": roc_auc(p, y),
        "pass_rate": float(pred.mean()) if len(y) else None,  # share of images sent to the cloud
    }


# ---------------------------------------------------------------------------------- together


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
    map_kept (map_gated / map), map50_kept; images, defective_images; errors (the detector's
    confident detections by kind of error and its recall by object length, see
    `training.errors`).
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
    metrics = metrics_at_threshold(
        samples,
        predictions,
        class_names,
        threshold,
        calibrated_on=calibrated_on,
        target_recall=target_recall,
    )
    metrics["gate_calibration_defective"] = calibrated_with
    if any(calib_labels):
        metrics["gate_operating_points"] = gate_operating_points(
            calib, calib_labels, samples, predictions, class_names, metrics["map50"]
        )
        metrics["gate_operating_points_calibrated_on"] = (
            calibration_name if calibration_samples is not None else split_name
        )
    return metrics


def gate_operating_points(
    calibration_probabilities: Sequence[float],
    calibration_labels: Sequence[bool],
    samples: Sequence[VocSample],
    predictions: Sequence[Prediction],
    class_names: Sequence[str],
    map50: float | None,
    recalls: Sequence[float] = OPERATING_RECALLS,
) -> list[dict[str, float | None]]:
    """Per target recall in `recalls`, the gate threshold `calibrated_threshold` sets for it on
    the calibration scores, and what it does on `samples`/`predictions` (one per sample): its
    recall and accuracy, the share of images flagged (sent on to the heads: the rest skip
    them), the share of its defect-free images flagged (what sets the saving at any defect
    rate r: flagged = r x recall + (1 - r) x free_flagged) and the gated system's mAP@.5 over
    the detector's `map50` (None without one).

    Returns [{"target_recall", "threshold", "recall", "accuracy", "flagged", "free_flagged",
    "map50_kept"}]."""
    labels = [s.is_defective for s in samples]
    probs = [p.p_defect for p in predictions]
    points = []
    for target in recalls:
        threshold = calibrated_threshold(calibration_probabilities, calibration_labels, target)
        gate = classifier_metrics(probs, labels, threshold)
        gated = gated_coco_metrics(samples, predictions, class_names, threshold)
        kept = _kept(gated["map50"], map50)
        free = [p >= threshold for p, y in zip(probs, labels, strict=True) if not y]
        points.append({"target_recall": target, "threshold": threshold,
                       "recall": gate["recall"], "accuracy": gate["accuracy"],
                       "flagged": gate["pass_rate"],
                       "free_flagged": sum(free) / len(free) if free else None,
                       "map50_kept": kept})  # fmt: skip
    return points


def _kept(gated: float | None, alone: float | None) -> float | None:
    """The share of the detector's metric `alone` the gated system keeps; None without both."""
    return gated / alone if gated is not None and alone else None


def gated_coco_metrics(
    samples: Sequence[VocSample],
    predictions: Sequence[Prediction],
    class_names: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """`coco_metrics` of the gated system: an image's detections are kept when its p_defect
    >= `threshold`, and it has none otherwise."""
    # an image under the threshold keeps none of its detections: [:0] of each
    kept = [slice(None) if p.p_defect >= threshold else slice(0) for p in predictions]
    return coco_metrics(
        samples,
        [p.boxes.numpy()[k] for p, k in zip(predictions, kept, strict=True)],
        [p.scores.numpy()[k] for p, k in zip(predictions, kept, strict=True)],
        [p.labels.numpy()[k] for p, k in zip(predictions, kept, strict=True)],
        class_names,
    )


def metrics_at_threshold(
    samples: Sequence[VocSample],
    predictions: Sequence[Prediction],
    class_names: Sequence[str],
    threshold: float,
    *,
    calibrated_on: str,
    target_recall: float = DEFAULT_TARGET_RECALL,
) -> dict:
    """`evaluate`'s metrics of `predictions` (one per sample, same order) with the gate
    threshold fixed at `threshold`; `calibrated_on` says where it came from. The gated system
    keeps an image's detections when its p_defect >= threshold and has none otherwise."""
    labels = [s.is_defective for s in samples]
    probs = [p.p_defect for p in predictions]
    boxes = [p.boxes.numpy() for p in predictions]
    scores = [p.scores.numpy() for p in predictions]
    det_labels = [p.labels.numpy() for p in predictions]
    detector = coco_metrics(samples, boxes, scores, det_labels, class_names)
    gated = gated_coco_metrics(samples, predictions, class_names, threshold)
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
        "errors": error_breakdown(samples, boxes, scores, det_labels, class_names),
    }
