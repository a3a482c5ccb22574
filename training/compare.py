"""Two checkpoints' evaluations side by side (`splitdet eval --checkpoint V2 --baseline V1`):
the headline figures of each and their difference, and for mAP@.5 and mAP a paired bootstrap
over the split's images: is the difference more than which images the split happens to hold?

    comparison = compare(v2_metrics, v1_metrics, samples, v2_predictions, v1_predictions,
                         class_names, resamples=200, seed=0)
    comparison["figures"]["map50"]["interval"], comparison["verdict"]

The bootstrap draws the split's images with replacement (as many as it has), the same draw for
both models, and scores each model's detections on the draw as `evaluate_coco.coco_metrics`
would (pycocotools; an image drawn twice counts twice), re-accumulating each model's per-image
matching (`evaluate_coco.ResampledCoco`: one matching per model, not one per resample). The
difference's 95% interval is the 2.5th to 97.5th percentile of the resamples' differences
(candidate minus baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from splitdet.training.evaluate_predict import Prediction
    from splitdet.training.voc import VocSample

#: The figures compared: metrics key, name for people, shown as a percentage.
FIGURES = (
    ("map", "mAP", False),
    ("map50", "mAP@.5", False),
    ("ar100", "AR@100", False),
    ("gate_recall", "gate recall", True),
    ("gate_accuracy", "gate accuracy", True),
    ("gate_auc", "gate AUC", False),
    ("map_kept", "mAP kept", True),
)
#: The figures the bootstrap resamples, the verdict's first.
BOOTSTRAPPED = ("map50", "map")
#: Fewer resamples than this give no verdict of better or worse: the interval's percentiles
#: would be a few draws (3 resamples once called a model worse, 200 found no difference).
MIN_VERDICT_RESAMPLES = 100
#: The bootstrap's interval: its central share of the resamples' differences.
INTERVAL = 0.95


def resample_indices(images: int, resamples: int, seed: int) -> np.ndarray:
    """[resamples, images] indices of images drawn with replacement, the same for a seed."""
    return np.random.default_rng(seed).integers(0, images, size=(resamples, images))


def paired_bootstrap(
    samples: Sequence[VocSample],
    candidate: Sequence[Prediction],
    baseline: Sequence[Prediction],
    class_names: Sequence[str],
    *,
    resamples: int,
    seed: int,
    on_resample: Callable[[], object] | None = None,
) -> dict[str, list[tuple[float | None, float | None]]]:
    """Per `BOOTSTRAPPED` key, one (candidate, baseline) pair of figures per resample of the
    images (`resample_indices`): each model's `coco_metrics` figures of the drawn images (None
    where the draw holds no object to score). `on_resample` is called after each."""
    from splitdet.training.evaluate_coco import ResampledCoco

    if not len(samples) == len(candidate) == len(baseline):
        raise ValueError("one prediction of each model per sample is needed")
    models = [
        ResampledCoco(samples, *_columns(predictions), class_names)
        for predictions in (candidate, baseline)
    ]
    out: dict[str, list[tuple[float | None, float | None]]] = {key: [] for key in BOOTSTRAPPED}
    for drawn in resample_indices(len(samples), resamples, seed):
        figures = [model.metrics(drawn) for model in models]
        for key in BOOTSTRAPPED:
            out[key].append((figures[0][key], figures[1][key]))
        if on_resample is not None:
            on_resample()
    return out


def _columns(predictions: Sequence[Prediction]) -> tuple[list, list, list]:
    """(boxes, scores, labels) per image as numpy arrays, `coco_metrics`' arguments."""
    return (
        [p.boxes.numpy() for p in predictions],
        [p.scores.numpy() for p in predictions],
        [p.labels.numpy() for p in predictions],
    )


def _difference(candidate: float | None, baseline: float | None) -> float | None:
    return None if candidate is None or baseline is None else candidate - baseline


def bootstrap_summary(pairs: Sequence[tuple[float | None, float | None]]) -> dict[str, Any]:
    """The `INTERVAL` interval of the pairs' differences, and the shares of the resamples in
    which the candidate is better and worse (of those where both could be scored: `resamples`
    of them; interval and shares None when none could)."""
    differences = np.array(
        [d for d in (_difference(*pair) for pair in pairs) if d is not None], dtype=float
    )
    if not differences.size:
        return {"interval": None, "better_share": None, "worse_share": None, "resamples": 0}
    tail = (1.0 - INTERVAL) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return {
        "interval": [float(low), float(high)],
        "better_share": float(np.mean(differences > 0)),
        "worse_share": float(np.mean(differences < 0)),
        "resamples": int(differences.size),
    }


def labels(candidate: str | Path, baseline: str | Path) -> tuple[str, str]:
    """Short names for two checkpoint paths: the fewest trailing parts that tell them apart
    (runs/v2/best.pt and runs/v1/best.pt: "v2/best.pt", "v1/best.pt"); else the paths."""
    a, b = Path(candidate).parts, Path(baseline).parts
    for k in range(1, max(len(a), len(b)) + 1):
        short_a, short_b = str(Path(*a[-k:])), str(Path(*b[-k:]))
        if short_a != short_b:
            return short_a, short_b
    return str(candidate), str(baseline)


def compare(
    candidate: dict,
    baseline: dict,
    samples: Sequence[VocSample],
    candidate_predictions: Sequence[Prediction],
    baseline_predictions: Sequence[Prediction],
    class_names: Sequence[str],
    *,
    resamples: int,
    seed: int,
    names: tuple[str, str] = ("candidate", "baseline"),
    split: str = "test",
    on_resample: Callable[[], object] | None = None,
) -> dict[str, Any]:
    """The JSON's "comparison" of two `evaluate` metrics dicts on `samples` (one prediction of
    each model per sample): per figure of `FIGURES`, every one of them (a reader's
    `.figures.map_kept.difference` is always there), {"candidate", "baseline", "difference"}
    (each model's value, None where it has none, e.g. mAP kept under its floor; the difference
    candidate minus baseline, None without both), and for `BOOTSTRAPPED` ones
    with `resamples` > 0 the bootstrap's {"interval", "better_share", "worse_share",
    "resamples"}; "bootstrap" {"resamples", "seed", "interval"}, "images", "split" (its
    name), "per_class" (`per_class_comparison`), and "verdict": one line for people on
    mAP@.5 (`verdict`), naming the models by `names`."""
    pairs = (
        paired_bootstrap(samples, candidate_predictions, baseline_predictions, class_names,
                         resamples=resamples, seed=seed, on_resample=on_resample)
        if resamples > 0 else {}
    )  # fmt: skip
    figures: dict[str, dict[str, Any]] = {}
    for key, _, _ in FIGURES:
        ours, theirs = candidate.get(key), baseline.get(key)
        figures[key] = {"candidate": ours, "baseline": theirs,
                        "difference": _difference(ours, theirs)}  # fmt: skip
        if key in pairs:
            figures[key].update(bootstrap_summary(pairs[key]))
    comparison = {
        "candidate": names[0],
        "baseline": names[1],
        "images": len(samples),
        "split": split,
        "bootstrap": {"resamples": resamples, "seed": seed, "interval": INTERVAL},
        "figures": figures,
        "per_class": per_class_comparison(candidate, baseline),
    }
    comparison["verdict"] = verdict(comparison, BOOTSTRAPPED[0])
    return comparison


def per_class_comparison(candidate: dict, baseline: dict) -> dict[str, dict[str, Any]]:
    """Per class name of the candidate's `per_class` (the baseline's are the same classes,
    perhaps in another order: matched by name), {"objects", "candidate", "baseline",
    "difference"} of its AP@.5 (None where the split holds no object of it): whether a rare
    class got better or worse, which the mAP averages away."""
    ours, theirs = candidate.get("per_class") or {}, baseline.get("per_class") or {}
    out: dict[str, dict[str, Any]] = {}
    for name, figures in ours.items():
        a, b = figures.get("ap50"), (theirs.get(name) or {}).get("ap50")
        out[name] = {"objects": figures.get("objects"), "candidate": a, "baseline": b,
                     "difference": _difference(a, b)}  # fmt: skip
    return out


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def verdict(comparison: dict, key: str) -> str:
    """One line on figure `key` of `comparison` (`compare`'s): which model is better, if its
    bootstrap interval says one is; else that it does not, and why."""
    name = dict((k, n) for k, n, _ in FIGURES)[key]
    ours, theirs = comparison["candidate"], comparison["baseline"]
    figure = comparison["figures"][key]
    difference = figure["difference"]
    if difference is None:
        return f"{name} cannot be compared: the split holds no object to score it on"
    resamples = comparison["bootstrap"]["resamples"]
    if not figure.get("resamples"):
        said = "no bootstrap" if not resamples else "no resample held an object to score"
        return (
            f"{ours} {_signed(difference)} on {name} against {theirs} ({said}: "
            "--bootstrap N tells whether the difference means anything)"
        )
    low, high = figure["interval"]
    interval = f"{INTERVAL:.0%} interval {_signed(low)}..{_signed(high)}"
    if figure["better_share"] == figure["worse_share"] == 0:
        return (
            f"no clear difference on {name} between {ours} and {theirs}: the {interval} "
            "includes 0 (the two score the same on every resample)"
        )
    if figure["resamples"] < MIN_VERDICT_RESAMPLES:  # (its percentiles are a few draws)
        return (
            f"{ours} {_signed(difference)} on {name} against {theirs} ({interval} from only "
            f"{figure['resamples']} resamples, too few to call either better: --bootstrap "
            f"{MIN_VERDICT_RESAMPLES * 2} or more)"
        )
    if low > 0:
        return (
            f"{ours} better than {theirs} on {name} ({_signed(difference)}, {interval}, "
            f"better in {figure['better_share']:.0%} of {figure['resamples']} resamples)"
        )
    if high < 0:
        return (
            f"{ours} worse than {theirs} on {name} ({_signed(difference)}, {interval}, "
            f"worse in {figure['worse_share']:.0%} of {figure['resamples']} resamples)"
        )
    return (
        f"no clear difference on {name} between {ours} and {theirs}: the {interval} "
        f"includes 0 ({comparison['images']} images: a larger {comparison['split']} split "
        "would narrow it)"
    )


def comparison_table(comparison: dict) -> str:
    """`compare`'s figures as a table for people (figure, baseline, candidate, difference,
    interval), for several classes each one's AP@.5, and its verdict line."""

    def value(number: float | None, percent: bool) -> str:
        if number is None:
            return "n/a"
        return f"{number:.1%}" if percent else f"{number:.3f}"

    def change(number: float | None, percent: bool) -> str:
        if number is None:
            return "n/a"
        return f"{number * 100:+.1f} pt" if percent else _signed(number)

    ours, theirs = comparison["candidate"], comparison["baseline"]
    lines = [
        f"against the baseline {theirs} ({comparison['images']} images; candidate {ours}):",
        f"  {'figure':<13}  {'baseline':>9}  {'candidate':>9}  {'difference':>10}  "
        f"{INTERVAL:.0%} interval",
    ]
    for key, name, percent in FIGURES:
        figure = comparison["figures"].get(key)
        if figure is None:
            continue
        interval = figure.get("interval")
        span = "-" if interval is None else f"{_signed(interval[0])}..{_signed(interval[1])}"
        lines.append(
            f"  {name:<13}  {value(figure['baseline'], percent):>9}  "
            f"{value(figure['candidate'], percent):>9}  "
            f"{change(figure['difference'], percent):>10}  {span}"
        )
    per_class = comparison.get("per_class") or {}
    if len(per_class) > 1:  # (one class: its AP@.5 is the mAP@.5 above)
        for name, figure in per_class.items():
            shown = f"AP@.5 {name}"
            lines.append(
                f"  {shown:<13}  {value(figure['baseline'], False):>9}  "
                f"{value(figure['candidate'], False):>9}  "
                f"{change(figure['difference'], False):>10}  - ({figure['objects']} objects)"
            )
    lines.append(comparison["verdict"])
    return "\n".join(lines)
