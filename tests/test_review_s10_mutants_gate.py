"""Mutant audit (session 10): training/evaluate_gate.py's calibration arithmetic at its edges.

Each test names the one-line mutants of evaluate_gate.py that the existing tests let through
and that it kills.
"""

from __future__ import annotations

import pytest

from splitdet.training.evaluate_gate import (
    best_accuracy_at_recall,
    classifier_metrics,
    highest_threshold_at_recall,
)


def test_a_recall_that_allows_a_whole_miss_allows_it_despite_float_rounding():
    """(1 - 0.9) * 10 is 0.9999999999999998 in floats: 10 defective images at a target recall
    of 0.9 may leave one under the threshold (9/10 = 0.9 >= 0.9, the docstring's recall).
    Kills: the `+ 1e-9` of `_misses_allowed` dropped (the threshold falls to the lowest
    defective score, flagging more images than the recall asks)."""
    positives = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    probs, labels = [*positives, 0.05], [True] * 10 + [False]
    t = highest_threshold_at_recall(probs, labels, 0.9)
    assert t == 0.2
    assert classifier_metrics(probs, labels, t)["recall"] == 0.9
    assert highest_threshold_at_recall(probs, labels, 0.95) == 0.1  # half an image: none


def test_best_accuracy_counts_a_defect_free_score_on_the_threshold_as_flagged():
    """`p >= t` flags an image scoring exactly t, defect-free or not. Kills: the true negatives
    counted with `searchsorted(..., side="right")` (a defect-free image on t called right)."""
    assert best_accuracy_at_recall([0.9, 0.3, 0.3], [True, False, True], 1.0) == (
        pytest.approx(2 / 3),
        0.3,
    )


def test_best_accuracy_takes_the_highest_threshold_among_ties():
    """Two thresholds reach the best accuracy (3 of 4 at 0.5 and at 0.9, one miss allowed):
    the docstring's "the highest t that reaches it". Kills: `best = int(np.argmax(accuracy))`
    (the lowest t among ties: more images flagged for the same accuracy)."""
    probs, labels = [0.9, 0.6, 0.5, 0.1], [True, False, True, False]
    assert highest_threshold_at_recall(probs, labels, 0.5) == 0.9
    assert best_accuracy_at_recall(probs, labels, 0.5) == (0.75, 0.9)


def test_classifier_metrics_f1_is_the_harmonic_mean_of_precision_and_recall():
    """Kills: F1 computed as tp / (tp + fp + fn) (the Jaccard index, not F1)."""
    probs = [0.9, 0.8, 0.2, 0.7, 0.1, 0.05]
    labels = [True, True, True, False, False, False]
    metrics = classifier_metrics(probs, labels, 0.5)  # tp 2, fp 1, fn 1, tn 2
    precision, recall = metrics["precision"], metrics["recall"]
    assert (precision, recall) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert metrics["accuracy"] == pytest.approx(4 / 6) and metrics["pass_rate"] == 0.5
