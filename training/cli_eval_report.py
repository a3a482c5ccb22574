"""What `splitdet eval` says: where the JSON goes (stdout, or --json FILE and a `summary`), the
summary's lines (`THRESHOLD_SOURCES` for where a threshold came from), the gate operating
points as a table (`operating_points_table`), and the words of its errors about the data
(`eval_hint`, the split file `_split_path` names). For the checkpoint and the export paths
alike.

Part of `splitdet.training.cli_eval`, which registers the command and re-exports the public
names. Top-level imports are stdlib only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def _json_on_stdout(json_file: str | None) -> bool:
    """Whether eval prints its JSON on stdout: without --json, and with ``--json -``; with
    ``--json FILE`` it writes the JSON there and prints a `summary`."""
    return json_file is None or json_file == "-"


def _show_unwritten(text: str, shown: bool) -> None:
    """Print the JSON ``text`` on stdout when a write failed before --json FILE held it (and
    it was not printed already): the evaluation is not lost."""
    if not shown:
        print(text)


#: How `summary` says where a threshold it was not told a calibration split of came from.
THRESHOLD_SOURCES = {
    "given": "the checkpoint's",
    "manifest": "the export's",
    "--threshold": "from --threshold",
}


def summary(metrics: dict, json_file: str) -> str:
    """A few lines of `metrics` (a checkpoint's or an export's) for people, printed when the
    JSON goes to ``json_file``: mAP, mAP@.5, AR@100; the gate threshold, where it comes from
    (and, for a threshold a checkpoint evaluation calibrated, whether the checkpoint now holds
    it), its recall and accuracy; the mAP the gated system keeps; for several classes, each
    class's AP (`per_class_lines`)."""
    from splitdet.shared.probability_format import format_probability
    from splitdet.training.evaluate_coco import MAP_KEPT_FLOOR

    def figure(key: str, percent: bool = False) -> str:
        value = metrics.get(key)
        if value is None:
            return "n/a"
        return f"{value:.1%}" if percent else f"{value:.3f}"

    def kept(key: str) -> str:
        if metrics.get(f"{key}_kept") is None and metrics.get(f"{key}_kept_absent"):
            name = {"map": "mAP", "map50": "mAP@.5"}[key]
            return f"n/a ({name} under {MAP_KEPT_FLOOR:g}: a ratio of noise)"
        return figure(f"{key}_kept", True)

    on = metrics["gate_calibrated_on"]
    source = THRESHOLD_SOURCES.get(on) or (
        f"calibrated on {on} for {metrics['gate_target_recall']:.1%} recall"
    )
    if on not in THRESHOLD_SOURCES and "gate_threshold_stored" in metrics:
        held = metrics["checkpoint_gate_threshold"]
        source += (
            ", stored in the checkpoint"
            if metrics["gate_threshold_stored"]
            else f"; not stored, the checkpoint keeps {format_probability(held)}"
            if held != metrics["gate_threshold"]
            else "; not stored, the checkpoint holds the same"
        )
    return "\n".join([
        f"split {metrics['split']} of {metrics['data']}: {metrics['images']} images "
        f"({metrics['defective_images']} defective)",
        f"  detector: mAP {figure('map')}, mAP@.5 {figure('map50')}, AR@100 {figure('ar100')}",
        f"  gate: threshold {format_probability(metrics['gate_threshold'])} ({source}): recall "
        f"{figure('gate_recall', True)}, accuracy {figure('gate_accuracy', True)}, flagged "
        f"{figure('gate_pass_rate', True)}",
        f"  gated system: mAP kept {kept('map')}, mAP@.5 kept {kept('map50')}",
        *per_class_lines(metrics.get("per_class") or {}),
        f"every metric in {json_file}",
    ])  # fmt: skip


def absent_classes(metrics: dict, split: str, data: object) -> list[str]:
    """A WARNING's text for each class of `metrics`' per_class with no object in split `split`
    of `data` (a checkpoint's or an export's evaluation alike)."""
    return [
        f"class {name!r} has no object in split {split!r} of {data}: its AP cannot be measured here"
        for name, figures in (metrics.get("per_class") or {}).items()
        if not figures["objects"]
    ]


def per_class_lines(per_class: dict) -> list[str]:
    """`summary`'s line of a model of several classes (none for one: its AP is the mAP): each
    class's AP@.5 and AP@[.5:.95] on the split with its number of objects, "n/a" for a class
    the split holds no object of, so that a rare class's low AP is not hidden in the mean."""
    if len(per_class) < 2:
        return []

    def figure(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    shown = [
        f"{name!r} {figure(f['ap50'])} / {figure(f['ap'])} ({f['objects']} objects)"
        for name, f in per_class.items()
    ]
    return [f"  per class AP@.5 / AP: {', '.join(shown)}"]


def operating_points_table(metrics: dict) -> str:
    """`evaluate`'s gate_operating_points as a table for people: per target recall, the
    threshold to give `edge run --threshold` and what it does on the evaluated split."""
    from splitdet.shared.probability_format import format_probability

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    on, split = metrics["gate_operating_points_calibrated_on"], metrics["split"]
    itself = " itself, the evaluated one: optimistic" if on == split else ""
    lines = [
        f"gate operating points (thresholds calibrated on split {on}{itself}; on split "
        f"{split}: flagged images go on to the cloud heads, the others end at the edge):",
        f"  {'target recall':>13}  {'threshold':>11}  {'recall':>7}  {'accuracy':>8}  "
        f"{'flagged':>7}  {'defect-free flagged':>19}  {'mAP@.5 kept':>11}",
    ]
    for point in metrics["gate_operating_points"]:
        lines.append(
            f"  {percent(point['target_recall']):>13}  "
            f"{format_probability(point['threshold']):>11}  {percent(point['recall']):>7}  "
            f"{percent(point['accuracy']):>8}  {percent(point['flagged']):>7}  "
            f"{percent(point['free_flagged']):>19}  {percent(point['map50_kept']):>11}"
        )
    return "\n".join(lines)


def eval_hint(exc: Exception, root: Path | str, class_names: Sequence[str]) -> str:
    """`exc`'s message (a VocError reading `root`) with what to do about it in eval.

    An object of a class the model does not know (`class_names`, the checkpoint's or the
    export's) cannot be scored: eval takes the model's classes, it has no --classes to give
    (train's advice, `voc.check_hint`'s). Other problems get `voc.check_hint`'s advice."""
    import shlex

    from splitdet.training import voc

    message = str(exc)
    if "unknown class" in message and class_names:
        known = ",".join(class_names)
        return (
            f"{message}; eval scores the model's classes only ({known}): relabel or remove the "
            f"objects of other classes in {root} (`splitdet data check {shlex.quote(str(root))} "
            f"--classes {shlex.quote(known)}` lists them all), or evaluate a model trained with "
            f"them (`splitdet train --classes {shlex.quote(known + ',...')}`)"
        )
    return voc.check_hint(exc, root)


def _split_path(root: Path | str, split: str) -> Path:
    """The file listing `split` in the VOC tree at `root`."""
    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"
