"""What collecting the edge's images (`splitdet edge collect`, then `data split --add`) can
leave in a PASCAL VOC dataset, for `voc_check.check_dataset`: images the edge judged defect
whose annotation still holds no box (`unboxed_collected_warning`, from the ``collected.csv``
beside the tree), and the same image stored under two ids (`same_image_warning`).

Only the standard library, `voc` and the collect listing's names: no torch.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from splitdet.edge.collect import LISTING, NEEDS_BOXES, ListingError, read_listing
from splitdet.training import voc
from splitdet.training.voc_check_splits import SPLITS

__all__ = ["same_image_warning", "unboxed_collected_warning"]

#: How many ids or pairs a warning names.
SHOWN = 3


def unboxed_collected_warning(root: Path, samples: Mapping[str, voc.VocSample]) -> str | None:
    """A warning naming the images ``ROOT/collected.csv`` marks ``needs_boxes`` whose annotation
    (among ``samples``, the ones read) still holds no object; None when there are none, or no
    listing. An image's last row decides (one collected again has two); a reviewer who judged
    it defect-free sets its ``needs_boxes`` to ``no`` to say so. An older listing without the
    column says nothing; one that cannot be read (`read_listing`: a spreadsheet may save it
    with a byte order mark or semicolons, which it reads), a note."""
    listing = Path(root) / LISTING
    if not listing.is_file():
        return None
    try:
        read = read_listing(listing)
    except ListingError as exc:  # (a spreadsheet's other encoding or separators)
        return f"{exc}: images collected without boxes not checked"
    except OSError as exc:
        return f"{listing}: cannot read it ({exc}): images collected without boxes not checked"
    if read.damage is not None:
        return (
            f"{listing}: cannot read it ({read.damage}): images collected without boxes not checked"
        )
    marked = {
        row.get("image_id") or "": (row.get("needs_boxes") or "").strip().lower() == NEEDS_BOXES
        for row in read.rows
    }
    unboxed = sorted(
        i for i, flagged in marked.items() if flagged and i in samples and not samples[i].objects
    )
    if not unboxed:
        return None
    more = ", ..." if len(unboxed) > SHOWN else ""
    return (
        f"{listing}: {len(unboxed)} image(s) the edge judged defect still have no box in their "
        f"annotation (needs_boxes = {NEEDS_BOXES}), e.g. {', '.join(unboxed[:SHOWN])}{more}: "
        "draw their boxes, or remove the image: as they are they train as defect-free; or set "
        "needs_boxes to no in collected.csv for an image you judged defect-free"
    )


def _digest(path: Path) -> str:
    """sha256 of the file's bytes (OSError when it cannot be read)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def same_bytes_groups(paths: Iterable[Path], *, strict: bool = False) -> list[list[Path]]:
    """The groups (two files or more, each in the order of ``paths``) of ``paths`` holding the
    same bytes. Only files sharing a size are read. A file that cannot be read is left out
    (its problem is reported elsewhere), or with ``strict`` its OSError is raised."""
    by_size: dict[int, list[Path]] = {}
    for path in paths:
        try:
            by_size.setdefault(path.stat().st_size, []).append(path)
        except OSError:
            if strict:
                raise
    groups: list[list[Path]] = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_digest: dict[str, list[Path]] = {}
        for path in same_size:
            try:
                by_digest.setdefault(_digest(path), []).append(path)
            except OSError:
                if strict:
                    raise
        groups += [group for group in by_digest.values() if len(group) > 1]
    return groups


def same_image_warning(
    files: Mapping[str, list[Path]], owners: Mapping[Path, str], listed: Mapping[str, str]
) -> str | None:
    """A warning naming image files of the dataset with the same bytes (one image collected
    twice under two ids), and their splits; None when there are none. ``files``:
    `voc_check_images.image_files`; ``owners``: ``{image path: the id whose annotation reads
    it}`` (else its stem is its id); ``listed``: ``{id: its split}``. Only files sharing a size
    are read."""
    groups = [sorted(group) for group in same_bytes_groups(p for ps in files.values() for p in ps)]
    if not groups:
        return None
    groups.sort()

    def split_of(path: Path) -> str | None:
        return listed.get(owners.get(path.resolve(), path.stem))

    def named(path: Path) -> str:
        return f"{path.name} ({split_of(path) or 'in no split'})"

    def listed_of(group: list[Path]) -> str:
        # a group's first few copies: an image copied hundreds of times (a merge repeated, a
        # script's loop) would otherwise name every copy, a line of tens of kB
        more = f" (and {len(group) - SHOWN} more copies)" if len(group) > SHOWN else ""
        return " = ".join(named(p) for p in group[:SHOWN]) + more

    shown = [listed_of(group) for group in groups[:SHOWN]]
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
