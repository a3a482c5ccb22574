"""What collecting the edge's images (`splitdet edge collect`, then `data split --add`) can
leave in a PASCAL VOC dataset, for `voc_check.check_dataset`: images the edge judged defect
whose annotation still holds no box (`unboxed_collected_warning`, from the ``collected.csv``
beside the tree), and the same image stored under two ids (`same_image_warning`).

Only the standard library, `voc` and the collect listing's names: no torch.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from splitdet.edge.collect import LISTING, NEEDS_BOXES
from splitdet.training import voc
from splitdet.training.voc_check_splits import SPLITS

__all__ = ["same_image_warning", "unboxed_collected_warning"]

#: How many ids or pairs a warning names.
SHOWN = 3


def unboxed_collected_warning(root: Path, samples: Mapping[str, voc.VocSample]) -> str | None:
    """A warning naming the images ``ROOT/collected.csv`` marks ``needs_boxes`` whose annotation
    (among ``samples``, the ones read) still holds no object; None when there are none, or no
    listing. An older listing without the column says nothing; one that cannot be read, a note."""
    listing = Path(root) / LISTING
    if not listing.is_file():
        return None
    try:
        with open(listing, newline="", encoding="utf-8", errors="replace") as fh:
            marked = [
                row.get("image_id") or ""
                for row in csv.DictReader(fh)
                if (row.get("needs_boxes") or "").strip() == NEEDS_BOXES
            ]
    except (OSError, csv.Error) as exc:
        return f"{listing}: cannot read it ({exc}): images collected without boxes not checked"
    unboxed = sorted({i for i in marked if i in samples and not samples[i].objects})
    if not unboxed:
        return None
    more = ", ..." if len(unboxed) > SHOWN else ""
    return (
        f"{listing}: {len(unboxed)} image(s) the edge judged defect still have no box in their "
        f"annotation (needs_boxes = {NEEDS_BOXES}), e.g. {', '.join(unboxed[:SHOWN])}{more}: "
        "draw their boxes, or remove the image: as they are they train as defect-free"
    )


def _digest(path: Path) -> str | None:
    """sha256 of the file's bytes; None when it cannot be read (its problem is reported)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def same_image_warning(
    files: Mapping[str, list[Path]], owners: Mapping[Path, str], listed: Mapping[str, str]
) -> str | None:
    """A warning naming image files of the dataset with the same bytes (one image collected
    twice under two ids), and their splits; None when there are none. ``files``:
    `voc_check_images.image_files`; ``owners``: ``{image path: the id whose annotation reads
    it}`` (else its stem is its id); ``listed``: ``{id: its split}``. Only files sharing a size
    are read."""
    by_size: dict[int, list[Path]] = {}
    for paths in files.values():
        for path in paths:
            try:
                by_size.setdefault(path.stat().st_size, []).append(path)
            except OSError:
                continue
    groups: list[list[Path]] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_digest: dict[str, list[Path]] = {}
        for path in same_size:
            digest = _digest(path)
            if digest is not None:
                by_digest.setdefault(digest, []).append(path)
        groups += [sorted(paths) for paths in by_digest.values() if len(paths) > 1]
    if not groups:
        return None
    groups.sort()

    def split_of(path: Path) -> str | None:
        return listed.get(owners.get(path.resolve(), path.stem))

    def named(path: Path) -> str:
        return f"{path.name} ({split_of(path) or 'in no split'})"

    shown = [" = ".join(named(p) for p in group) for group in groups[:SHOWN]]
    more = f"; and {len(groups) - SHOWN} more" if len(groups) > SHOWN else ""
    leak = ""
    for group in groups:
        splits = {split_of(p) for p in group} - {None}
        if len(splits) > 1:
            first, *_, last = sorted(splits, key=SPLITS.index)
            leak = f"; the same image in {first} and {last}: its {last} figures are not held out"
            break
    folder = os.path.commonpath([str(p.parent) for group in groups for p in group])
    return (
        f"{folder}: {len(groups)} image(s) stored twice or more under other ids (the same bytes; "
        f"collected again?): {'; '.join(shown)}{more}{leak}; keep one of each (remove the "
        "others' image, annotation and split-file line)"
    )
