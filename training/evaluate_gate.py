"""The defect gate's metrics and threshold: ROC AUC and the accuracy, precision, recall and F1
of `p >= threshold` (`classifier_metrics`); the threshold calibrated for a target recall
(`calibrated_threshold`) and the warning when too few defective images set it
(`calibration_shortfall`); the best accuracy any threshold allows at that recall; and the
operating points (`gate_operating_points`: per target recall, its threshold and what it costs
in images flagged and mAP kept).

Scores are p(defect) per image, in [0, 1]; labels say which images are defective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from splitdet.shared.config import EXPORT_TOLERANCE
from splitdet.training.evaluate_coco import GatedCoco, _kept

if TYPE_CHECKING:
    from splitdet.training.evaluate_predict import Prediction
    from splitdet.training.voc import VocSample

DEFAULT_TARGET_RECALL = 0.995
#: The target recalls `gate_operating_points` calibrates a threshold for: what each costs in
#: images flagged and mAP kept, for choosing `edge run --threshold`.
OPERATING_RECALLS = (1.0, 0.995, 0.99, 0.98, 0.95, 0.9)


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
    score under t, and at least `EXPORT_TOLERANCE` of t under it (relative).

    A defective image scoring a little under the lowest one kept is still flagged. t itself sits
    on that lowest defective score: with few defective images to calibrate on, new ones fall
    below it about as often as not (a split of 6 defective images at `target_recall` 0.995 takes
    the lowest of them, and a quarter of the next ones can score under it). And the edge's ONNX
    Runtime gate scores an image up to `EXPORT_TOLERANCE` of its score off PyTorch's (a float32
    step under t was called ok on the edge, the image calibrated as kept). No calibration image
    changes side unless a score lies within that tolerance under t: it is then flagged too
    (recall first); without any score under t, t goes down by the tolerance.
    """
    highest = highest_threshold_at_recall(probabilities, labels, target_recall)
    ceiling = highest * (1.0 - EXPORT_TOLERANCE)  # (relative: a score of 8e-5 stays above 0)
    p = np.asarray(probabilities, dtype=np.float64)
    below = p[p < highest]
    if len(below) == 0:
        return ceiling
    middle = (_logit(highest) + _logit(below.max())) / 2.0
    threshold = float(1.0 / (1.0 + np.exp(-middle)))
    # rounding at the ends of the sigmoid must not take it past the score under t
    return min(max(threshold, float(np.nextafter(below.max(), 1.0))), ceiling)


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


def gate_operating_points(
    calibration_probabilities: Sequence[float],
    calibration_labels: Sequence[bool],
    samples: Sequence[VocSample],
    predictions: Sequence[Prediction],
    class_names: Sequence[str],
    map50: float | None,
    recalls: Sequence[float] = OPERATING_RECALLS,
    *,
    coco: GatedCoco | None = None,
) -> list[dict[str, float | None]]:
    """Per target recall in `recalls`, the gate threshold `calibrated_threshold` sets for it on
    the calibration scores, and what it does on `samples`/`predictions` (one per sample): its
    recall and accuracy, the share of images flagged (sent on to the heads: the rest skip
    them), the share of its defect-free images flagged (what sets the saving at any defect
    rate r: flagged = r x recall + (1 - r) x free_flagged) and the gated system's mAP@.5 over
    the detector's `map50` (None without one).

    ``coco``: the `GatedCoco` of `samples`/`predictions` when the caller has one (`evaluate`
    does): the images are matched once for every point, not once per point.

    Returns [{"target_recall", "threshold", "recall", "accuracy", "flagged", "free_flagged",
    "map50_kept"}]."""
    labels = [s.is_defective for s in samples]
    probs = [p.p_defect for p in predictions]
    if coco is None:
        coco = GatedCoco(samples, predictions, class_names)
    points = []
    for target in recalls:
        threshold = calibrated_threshold(calibration_probabilities, calibration_labels, target)
        gate = classifier_metrics(probs, labels, threshold)
        gated = coco.gated(threshold)
        kept = _kept(gated["map50"], map50)
        free = [p >= threshold for p, y in zip(probs, labels, strict=True) if not y]
        points.append({"target_recall": target, "threshold": threshold,
                       "recall": gate["recall"], "accuracy": gate["accuracy"],
                       "flagged": gate["pass_rate"],
                       "free_flagged": sum(free) / len(free) if free else None,
                       "map50_kept": kept})  # fmt: skip
    return points
