"""What a folder given to `splitdet data check` or `data split` is when it is not (or not yet)
a VOC dataset to read: an interrupted `splitdet synth`'s remnant, or the parent folder of
datasets.

`splitdet synth` writes ``dataset.json`` first, with ``"complete": false``, and sets it true
only once every image, annotation and split file is written: a run stopped (SIGTERM, Ctrl-C, a
full disk) leaves a partial dataset that must not pass as one (`unfinished_synth_problem`).

Only the standard library: no numpy, no torch.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

__all__ = [
    "SYNTH_GENERATOR",
    "datasets_below",
    "datasets_below_hint",
    "is_unfinished_synth",
    "unfinished_synth_problem",
]

#: ``dataset.json``'s "generator" in a dataset `splitdet synth` writes.
SYNTH_GENERATOR = "splitdet.training.synth"
#: Sub-folders named, at most, in a hint (then "and N more").
SHOWN_DATASETS = 5


def is_unfinished_synth(root: Path) -> bool:
    """Whether ``ROOT/dataset.json`` is a `splitdet synth` dataset's that says
    ``"complete": false`` (an interrupted run; an unreadable file is not taken for one)."""
    try:
        meta = json.loads((Path(root) / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("generator") == SYNTH_GENERATOR
        and meta.get("complete") is False
    )


def unfinished_synth_problem(root: Path) -> str | None:
    """The problem line of an interrupted `splitdet synth`'s remnant at ``root``, naming what
    to do; None for any other folder."""
    if not is_unfinished_synth(root):
        return None
    return (
        f"{Path(root) / 'dataset.json'}: an interrupted `splitdet synth` (dataset.json "
        "complete: false): rerun it with --overwrite"
    )


def datasets_below(root: Path) -> list[Path]:
    """The visible sub-folders of ``root`` (one level down only) holding both
    ``Annotations/`` and ``JPEGImages/``, sorted; none when ``root`` cannot be listed."""
    try:
        subs = sorted(p for p in Path(root).iterdir() if not p.name.startswith("."))
    except OSError:
        return []
    found = []
    for sub in subs:
        try:
            if (sub / "Annotations").is_dir() and (sub / "JPEGImages").is_dir():
                found.append(sub)
        except OSError:  # (a sub-folder that cannot be looked into: not named)
            continue
    return found


def datasets_below_hint(root: Path, action: str) -> str:
    """For a ``root`` that is no VOC dataset: "; ..." naming its sub-folders that are one and
    the `splitdet data ACTION` command to give them, or "" when none is."""
    found = datasets_below(root)
    if not found:
        return ""
    command = shlex.quote(str(found[0]))
    if len(found) == 1:
        return f"; its sub-folder {found[0]} is one: splitdet data {action} {command}"
    shown = ", ".join(str(p) for p in found[:SHOWN_DATASETS])
    more = f" and {len(found) - SHOWN_DATASETS} more" if len(found) > SHOWN_DATASETS else ""
    return (
        f"; its sub-folders {shown}{more} are VOC datasets: give one of them "
        f"(splitdet data {action} {command})"
    )
