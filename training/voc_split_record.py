"""The record `splitdet data split` leaves of a split: ``ImageSets/Main/split.json``.

Split files say which images each split holds, not how they were chosen: without a record an
ML engineer cannot tell later which seed and shares made a dataset's train/val/test files, nor
redo them. `data split` writes this record last, after the split files it describes, with the
seed, the shares and options, the splitdet version, the time (UTC), and per split the images it
lists (defective and defect-free) and a digest of its ids in file order, which tells whether the
split files were edited since (`record_mismatch`). ``--add`` keeps the earlier records in
``history``. `data check` shows it (`record_line`); the other readers of a VOC tree (`train`,
`eval`, `data merge`, which reads ``*.txt`` split files only) do not read it: a merged dataset
has no record, its splits being none that one `data split` made.

Only the standard library: no numpy, no torch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

__all__ = [
    "RECORD_NAME",
    "ids_digest",
    "make_record",
    "read_record",
    "record_line",
    "record_mismatch",
    "record_path",
    "write_record",
]

#: The record's file name, in ``ImageSets/Main`` beside the split files it describes (not a
#: ``.txt``: no reader takes it for a split).
RECORD_NAME = "split.json"
#: What the record's "written_by" says: the command that wrote it.
WRITTEN_BY = "splitdet data split"
#: The record's format; a reader refuses nothing for another, it shows what it can.
RECORD_FORMAT = 1
#: Earlier records kept in ``history`` by ``--add`` (the oldest dropped past it).
MAX_HISTORY = 20


def record_path(root: Path) -> Path:
    """``ROOT/ImageSets/Main/split.json``."""
    return Path(root) / "ImageSets" / "Main" / RECORD_NAME


def ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 hex over ``ids`` in their order, one per line (UTF-8, a name that is not UTF-8
    by its escaped bytes): the same for the same split file's ids, whatever comments or other
    columns its lines hold."""
    text = "".join(f"{image_id}\n" for image_id in ids)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def make_record(
    *,
    seed: int,
    val: float,
    test: float,
    mode: str,
    class_names: Sequence[str] | None,
    write_empty: bool,
    empty_written: int,
    ids: Mapping[str, Sequence[str]],
    defective: set[str],
    added: Mapping[str, int],
    version: str,
    earlier: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record of one `data split` run (plain JSON types).

    Args:
        seed, val, test: the run's shuffle seed and shares (fractions of the images).
        mode: "new" (no split files before), "overwrite" (replaced) or "add" (ids kept).
        class_names: ``--classes``, or None (any).
        write_empty, empty_written: ``--write-empty``, and how many empty annotations it wrote.
        ids: the ids written per split, in file order; defective: the defective ones' ids.
        added: the ids new in each split (all of them but with ``--add``).
        version: splitdet's version (`provenance.splitdet_version`).
        earlier: the record found before (``--add``: kept in ``history``, its own history
            first, at most MAX_HISTORY records).

    The time recorded is now, in UTC to the second.
    """
    time = datetime.now(UTC)
    counts = {}
    for split, split_ids in ids.items():
        bad = sum(1 for image_id in split_ids if image_id in defective)
        counts[split] = {
            "images": len(split_ids),
            "defective": bad,
            "defect_free": len(split_ids) - bad,
            "added": int(added.get(split, 0)),
        }
    history: list[Any] = []
    if mode == "add" and earlier is not None:
        history = [
            *earlier.get("history", []),
            {k: v for k, v in earlier.items() if k != "history"},
        ]
        history = history[-MAX_HISTORY:]
    return {
        "format": RECORD_FORMAT,
        "written_by": WRITTEN_BY,
        "splitdet_version": version,
        "time": time.replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "seed": int(seed),
        "val": float(val),
        "test": float(test),
        "mode": mode,
        "classes": list(class_names) if class_names is not None else None,
        "write_empty": bool(write_empty),
        "empty_annotations_written": int(empty_written),
        "counts": counts,
        "ids_sha256": {split: ids_digest(split_ids) for split, split_ids in ids.items()},
        "history": history,
    }


def write_record(root: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` to `record_path` whole (an interrupted write leaves the one before);
    returns its path. OSError when it cannot be written."""
    from splitdet.shared.atomic_file import atomic_write

    path = record_path(root)
    atomic_write(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def read_record(root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(the record, None) of the dataset at ``root``; (None, None) when it has none; (None,
    the problem naming the file) when it cannot be read or is no `data split` record."""
    path = record_path(root)
    if not path.exists():
        return None, None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path}: cannot read the split record ({exc}); `data split` writes it"
    if not isinstance(record, dict) or record.get("written_by") != WRITTEN_BY:
        return None, f"{path}: not a record `splitdet data split` wrote; ignored"
    return record, None


def record_line(record: Mapping[str, Any]) -> str:
    """The record in one line, for `data check`: "split by splitdet data split (splitdet
    0.1.1) at 2025-01-02T03:04:05Z: --seed 0 --val 0.2 --test 0.1; train 5, val 2, test 1"."""
    options = [f"--seed {record.get('seed')}", f"--val {record.get('val')}"]
    options.append(f"--test {record.get('test')}")
    if record.get("classes"):
        options.append(f"--classes {','.join(map(str, record['classes']))}")
    if record.get("write_empty"):
        options.append("--write-empty")
    if record.get("mode") in ("overwrite", "add"):
        options.append(f"--{record['mode']}")
    counts = record.get("counts")
    held = ""
    if isinstance(counts, dict):
        held = "; " + ", ".join(
            f"{split} {c.get('images')}" for split, c in counts.items() if isinstance(c, dict)
        )
    earlier = len(record.get("history") or [])
    before = f"; {earlier} earlier split(s) in its history" if earlier else ""
    return (
        f"split by {WRITTEN_BY} (splitdet {record.get('splitdet_version')}) at "
        f"{record.get('time')}: {' '.join(options)}{held}{before}"
    )


def record_mismatch(
    root: Path, record: Mapping[str, Any], listed: Mapping[str, Sequence[str]]
) -> str | None:
    """The warning for split files that no longer list what ``record`` says was written
    (``listed``: the ids each split file lists now, in file order; splits without a file
    left out): edited, or written by other means, since. None when they match."""
    digests = record.get("ids_sha256")
    if not isinstance(digests, dict):
        return None
    changed = sorted(
        split
        for split in set(digests) | set(listed)
        if digests.get(split) != (ids_digest(listed[split]) if split in listed else None)
    )
    if not changed:
        return None
    return (
        f"{record_path(root)}: {', '.join(s + '.txt' for s in changed)} no longer "
        f"{'lists' if len(changed) == 1 else 'list'} what "
        f"`data split` wrote at {record.get('time')} (edited since?): the record's seed and "
        "options no longer make these splits"
    )
