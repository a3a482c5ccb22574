"""Turn what the line saw into training data: results database → VOC tree with pre-labels.

The factory's own images are what the synthetic set cannot be. `collect_results` copies the
images of chosen final results (``ok``/``defect``) into a PASCAL VOC tree, each with an
annotation holding the model's boxes as pre-labels (a reviewer corrects them in LabelImg,
CVAT or Label Studio instead of drawing from nothing), and lists in ``collected.csv`` where
each came from and what the model said. Running it again into the same folder adds the new
results and never touches an image already collected: a reviewed annotation is never
overwritten.

Then: review, ``splitdet data split``, ``splitdet data check``, ``splitdet train``.

Only the standard library and Pillow (through `splitdet.training.voc`): no torch, no numpy.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from splitdet.edge.store import iter_results
from splitdet.training import voc

__all__ = ["COLLECTABLE", "CollectSummary", "collect_results", "voc_image_id"]

#: Verdicts whose images can be collected (pending ones have no answer yet; an error row's
#: file is unreadable or was never detected).
COLLECTABLE = ("ok", "defect")

#: The listing written beside the VOC tree, one row per collected image.
LISTING = "collected.csv"
LISTING_COLUMNS = (
    "image_id", "result_id", "source", "verdict", "p_defect", "fingerprint", "boxes", "scores",
    "labels",
)  # fmt: skip

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class CollectSummary:
    """What `collect_results` did, by result."""

    collected: list[str] = field(default_factory=list)  # image ids written
    already: int = 0  # collected by an earlier run (left as they are)
    missing: list[str] = field(default_factory=list)  # "path: why" of files not copied
    matched: int = 0  # results the selection matched

    def to_json(self) -> dict:
        """Plain JSON types."""
        return {
            "matched": self.matched,
            "collected": len(self.collected),
            "already_collected": self.already,
            "missing": self.missing,
        }


def voc_image_id(result_id: int, path: str) -> str:
    """The VOC id of a result: its row id (unique, in arrival order) and the file's stem made
    safe for a split file (no spaces, no separators), e.g. ``00001234-cam2_0815``."""
    stem = _UNSAFE.sub("_", Path(path).stem).strip("_.")[:80]
    return f"{result_id:08d}-{stem}" if stem else f"{result_id:08d}"


def _selected(
    db: sqlite3.Connection,
    since: float | None,
    verdict: str | None,
    p_range: tuple[float, float] | None,
    limit: int | None,
) -> list[dict]:
    rows: Iterator[dict] = iter_results(db, since=since, verdict=verdict)
    chosen = [
        row
        for row in rows
        if row["verdict"] in COLLECTABLE
        and (
            p_range is None
            or (row["p_defect"] is not None and p_range[0] <= row["p_defect"] <= p_range[1])
        )
    ]
    return voc.evenly_spaced(chosen, limit)


def _objects(row: dict, width: int, height: int, min_score: float) -> tuple[voc.VocObject, ...]:
    """The row's boxes scoring at least ``min_score``, clipped to the image, as VOC objects."""
    names = row["class_names"] or []
    objects = []
    for box, score, label in zip(
        row["boxes"] or [], row["scores"] or [], row["labels"] or [], strict=False
    ):
        if score < min_score:
            continue
        x1, y1 = max(0.0, float(box[0])), max(0.0, float(box[1]))
        x2, y2 = min(float(width), float(box[2])), min(float(height), float(box[3]))
        if x2 <= x1 or y2 <= y1:
            continue
        name = names[label - 1] if 0 < label <= len(names) else f"class{label}"
        objects.append(voc.VocObject(name, (x1, y1, x2, y2)))
    return tuple(objects)


def collect_results(
    db: sqlite3.Connection,
    out: Path,
    *,
    since: float | None = None,
    verdict: str | None = None,
    p_range: tuple[float, float] | None = None,
    limit: int | None = None,
    min_score: float = 0.5,
) -> CollectSummary:
    """Copy the chosen results' images and pre-labels into the VOC tree at ``out``.

    ``db``: an open store connection (read only is enough). Results are final ``ok``/``defect``
    rows, optionally changed ``since`` (unix s), of one ``verdict``, with p(defect) within
    ``p_range`` (inclusive); ``limit`` spreads that many evenly over them. Boxes scoring at
    least ``min_score`` become objects (original-image px). An image whose file is gone
    (``--after delete``, moved away) or unreadable is listed in ``missing``, not an error.
    """
    out = Path(out)
    images, annotations = out / "JPEGImages", out / "Annotations"
    summary = CollectSummary()
    rows = _selected(db, since, verdict, p_range, limit)
    summary.matched = len(rows)
    out.mkdir(parents=True, exist_ok=True)
    listing = out / LISTING
    new_listing = not listing.is_file()
    with open(listing, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, LISTING_COLUMNS)
        if new_listing:
            writer.writeheader()
        for row in rows:
            image_id = voc_image_id(row["id"], row["path"])
            target_xml = annotations / f"{image_id}.xml"
            if target_xml.exists():
                summary.already += 1
                continue
            problem = _copy_one(row, image_id, images, target_xml, min_score)
            if problem is not None:
                summary.missing.append(problem)
                continue
            summary.collected.append(image_id)
            writer.writerow(
                {
                    "image_id": image_id,
                    "result_id": row["id"],
                    "source": row["stored_path"],
                    "verdict": row["verdict"],
                    "p_defect": row["p_defect"],
                    "fingerprint": row["fingerprint"],
                    "boxes": json.dumps(row["boxes"] or []),
                    "scores": json.dumps(row["scores"] or []),
                    "labels": json.dumps(row["labels"] or []),
                }
            )
            fh.flush()
    return summary


def _copy_one(
    row: dict, image_id: str, images: Path, target_xml: Path, min_score: float
) -> str | None:
    """Copy one result's image and write its annotation; the reason when it cannot be."""
    if not row["stored_path"]:
        return f"{row['path']}: deleted after processing (--after delete)"
    source = Path(row["stored_path"])
    if not source.is_file():
        return f"{source}: no longer there"
    try:
        width, height = voc.image_size(source)
    except voc.VocError as exc:
        return str(exc)
    images.mkdir(parents=True, exist_ok=True)
    suffix = source.suffix.lower()
    if suffix in voc.IMAGE_EXTENSIONS:
        target_image = images / f"{image_id}{suffix}"
        shutil.copyfile(source, target_image)
    else:  # a name VOC readers do not look for (.pgm, no suffix): the pixels as a PNG
        target_image = images / f"{image_id}.png"
        try:
            with Image.open(source) as img:
                img.save(target_image, format="PNG")
        except (OSError, ValueError) as exc:
            target_image.unlink(missing_ok=True)
            return f"{source}: cannot convert to PNG ({exc})"
    objects = _objects(row, width, height, min_score)
    sample = voc.VocSample(image_id, target_image, width, height, objects)
    voc.write_annotation(target_xml, sample)  # last: its presence marks the image collected
    return None
