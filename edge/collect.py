"""Turn what the line saw into training data: results database → VOC tree with pre-labels.

The factory's own images are what the synthetic set cannot be. `collect_results` copies the
images of chosen final results (``ok``/``defect``) into a PASCAL VOC tree, each with an
annotation holding the model's boxes as pre-labels (a reviewer corrects them in LabelImg,
CVAT or Label Studio instead of drawing from nothing), and lists in ``collected.csv`` where
each came from and what the model said (each box's class name beside its label: two exports
in one store may number classes otherwise). Running it again into the same folder adds the new
results and never touches an image already collected: a reviewed annotation is never
overwritten.

An image's VOC id is its row id and file name (`voc_image_id`), which two edges' stores
collected into one folder can share for different pictures (each has a row 1, cameras name
files alike). An id already in the folder therefore counts as collected only for the same
image: the content hash the store keeps against the one ``collected.csv`` lists for it (a
listing written before it held hashes: the copy's own bytes, else the row it came from).
A different image gets the id with a tag of its own content hash (`tagged_image_id`), the
same on every run, so collecting from each store again adds nothing.

An image ``collected.csv`` lists whose annotation is gone from the folder was removed by its
reviewer (one they could not judge, or a duplicate `splitdet data check` named): it is not
collected again, by its id nor by its content hash under another id (the same bytes processed
again), and is counted in ``removed``; ``recollect_removed`` collects such images again.

A reviewer edits ``collected.csv`` in a spreadsheet, which may save it again with a byte order
mark ("CSV UTF-8") or semicolons between columns: `read_listing`, the one reader of it (the
training tools' too), reads either, and a run adding rows to such a listing rewrites it as
collect writes it first (no row without its id, no mix of separators). One it cannot read
(another encoding, other separators, no ``image_id`` column) is refused (`ListingError`)
rather than guessed at: the images removed from the tree would come back.

The copies are what the edge saw: the edge decodes an image's pixels as Pillow gives them, a
JPEG's or PNG's as stored whatever its EXIF orientation tag says, and the cloud's boxes are in
those pixel coordinates. An image whose tag has viewers and annotation tools turn or mirror it
(2..8, which `splitdet data check` refuses for that reason) is therefore written losslessly as
a PNG of the pixels as decoded (the raw layout; Pillow turns a TIFF itself, so its PNG is as
turned, like what the edge processed), without the tag, and its annotation names that PNG;
any other image is copied byte for byte.

An image the edge judged ``defect`` whose annotation holds no box (every box the cloud
returned scored under ``min_score``, or none was returned) would train as a defect-free image
once split: `collect_results` lists it in ``needs_boxes``, marks it ``yes`` in the listing's
``needs_boxes`` column and logs a WARNING with their count, for a reviewer to draw its boxes.

Then: review, ``splitdet data split``, ``splitdet data check``, ``splitdet train``.

Only the standard library and Pillow (through `splitdet.training.voc`): no torch, no numpy.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from splitdet.edge.arrival_window import window_json
from splitdet.edge.file_identity import file_path
from splitdet.edge.ignore_marker import mark
from splitdet.edge.store_reads import result_filter, results_by_id
from splitdet.shared.atomic_file import atomic_write, stale_temporaries
from splitdet.shared.manifest import file_sha256
from splitdet.training import voc

__all__ = [
    "COLLECTABLE",
    "CollectSummary",
    "Listing",
    "ListingError",
    "collect_results",
    "read_listing",
    "tagged_image_id",
    "voc_image_id",
]

log = logging.getLogger(__name__)

#: Verdicts whose images can be collected (pending ones have no answer yet; an error row's
#: file is unreadable or was never detected).
COLLECTABLE = ("ok", "defect")

#: The listing written beside the VOC tree, one row per collected image.
LISTING = "collected.csv"
#: ``class_names`` (one per box, like ``labels``: the class each box's label meant to the
#: export that answered, which another export of the same store may number otherwise) is last:
#: added after the others, so that readers by column index keep working.
LISTING_COLUMNS = (
    "image_id", "result_id", "source", "verdict", "p_defect", "fingerprint", "boxes", "scores",
    "labels", "content_hash", "needs_boxes", "class_names", "edge",
)  # fmt: skip
#: The `needs_boxes` column's value for a defect verdict whose annotation holds no box (else
#: "no"; empty in rows listed before the column was added).
NEEDS_BOXES = "yes"
#: What to do with a listing `read_listing` cannot read (a spreadsheet's "Save as" choice).
LISTING_HINT = "save it as CSV UTF-8 (comma delimited)"
#: The column separators a listing may have: collect's commas, or the semicolons a spreadsheet
#: in a locale whose decimal mark is the comma writes.
_DELIMITERS = (",", ";")
#: Lengths of the content-hash tag `tagged_image_id` tries, shortest first.
_TAG_LENGTHS = (8, 16, 32, 64)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

#: Pillow modes a PNG holds as they are.
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B")


@dataclass
class CollectSummary:
    """What `collect_results` did, by result."""

    collected: list[str] = field(default_factory=list)  # image ids written
    already: int = 0  # collected by an earlier run (left as they are)
    # listed in collected.csv by an earlier run, their files removed from the tree since (a
    # reviewer's decision): not collected again unless asked for
    removed: int = 0
    renamed: list[str] = field(default_factory=list)  # of `collected`, ids given a hash tag
    missing: list[str] = field(default_factory=list)  # "path: why" of files not copied
    matched: int = 0  # results the selection matched
    # of `collected`, ids of defect verdicts whose annotation holds no box: they would train as
    # defect-free images until someone draws their boxes
    needs_boxes: list[str] = field(default_factory=list)
    # of `already`, ids whose image and annotation a run cut short left unlisted in
    # collected.csv: their rows written now (the files left as they are)
    relisted: list[str] = field(default_factory=list)
    # the arrival window the results were chosen in (from, until: unix s, [from, until), None
    # where open; `arrival_window`): (None, None), every arrival
    window: tuple[float | None, float | None] = (None, None)

    def to_json(self) -> dict:
        """Plain JSON types; "window" {"arrived_from", "arrived_until"}: unix s, null where
        open (`arrival_window.window_json`)."""
        return {
            "window": window_json(self.window),
            "matched": self.matched,
            "collected": len(self.collected),
            "already_collected": self.already,
            "removed": self.removed,
            "renamed": self.renamed,
            "missing": self.missing,
            "needs_boxes": self.needs_boxes,
            "relisted": self.relisted,
        }


def voc_image_id(result_id: int, path: str) -> str:
    """The VOC id of a result: its row id (unique, in arrival order) and the file's stem made
    safe for a split file (no spaces, no separators), e.g. ``00001234-cam2_0815``."""
    stem = _UNSAFE.sub("_", Path(path).stem).strip("_.")[:80]
    return f"{result_id:08d}-{stem}" if stem else f"{result_id:08d}"


def tagged_image_id(image_id: str, content_hash: str, length: int = _TAG_LENGTHS[0]) -> str:
    """``image_id`` told apart by the first ``length`` hex digits of the image's content hash,
    e.g. ``00000001-img0001-3fa2b9c1``: the id of an image whose plain id another image in
    the folder already has (the same for that image on every run)."""
    return f"{image_id}-{content_hash[:length]}"


class ListingError(ValueError):
    """A ``collected.csv`` that cannot be read as a listing (not UTF-8, no ``image_id`` column
    with commas or semicolons between columns); its message names the file and what to do."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: cannot read it ({why}): {LISTING_HINT}")
        self.path, self.why = path, why


@dataclass(frozen=True)
class Listing:
    """A ``collected.csv`` as `read_listing` read it."""

    columns: list[str]  # its header (none when the file is empty)
    rows: list[dict[str, str]]  # {column: value} of each row, in file order
    records: list[list[str]]  # the same rows as read, field by field (extra fields kept)
    delimiter: str  # "," or ";"
    bom: bool  # starts with a UTF-8 byte order mark (a spreadsheet's "CSV UTF-8")
    text: str  # the file's text, without its byte order mark
    # a damaged line that stopped the reading (an edited listing; csv's words): the rows
    # before it only
    damage: str | None = None

    @property
    def canonical(self) -> bool:
        """Whether it is written as collect writes it (commas, no byte order mark): rows can be
        appended to it as they are."""
        return self.delimiter == "," and not self.bom


def read_listing(path: Path) -> Listing:
    """Read ``collected.csv`` as collect wrote it or a spreadsheet saved it again: UTF-8 with
    or without a byte order mark, commas or semicolons between columns (the header's
    ``image_id`` tells which), any line ends. ListingError when it cannot be read as one;
    OSError when it cannot be read at all. A damaged line (an unfinished quote, a field past
    csv's limit) ends the rows read: `Listing.damage` says so."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ListingError(path, f"not UTF-8: byte {exc.start}") from None
    bom = data.startswith(codecs.BOM_UTF8)
    if not text.strip():
        return Listing([], [], [], ",", bom, text)
    delimiter, columns = _listing_header(path, text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    next(reader)
    records: list[list[str]] = []
    damage = None
    try:
        for record in reader:
            if record:  # (a blank line: no row, as csv.DictReader reads it)
                records.append(record)
    except csv.Error as exc:
        damage = str(exc)
    rows = [dict(zip(columns, record, strict=False)) for record in records]
    return Listing(columns, rows, records, delimiter, bom, text, damage)


def _listing_header(path: Path, text: str) -> tuple[str, list[str]]:
    """(delimiter, columns) of a listing's ``text``: the first of `_DELIMITERS` whose header
    holds an ``image_id`` column; ListingError when none does."""
    for delimiter in _DELIMITERS:
        try:
            header = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
        except csv.Error as exc:
            raise ListingError(path, f"its header: {exc}") from None
        if "image_id" in header:
            return delimiter, header
    raise ListingError(
        path, "no image_id column in its first line, with commas or semicolons between columns"
    )


@dataclass(frozen=True)
class _Match:
    """A result the selection matched: what choosing its VOC id needs."""

    result_id: int
    path: str
    stored_path: str
    content_hash: str
    p_defect: float | None
    fingerprint: str


#: What `_Existing.image_id` finds of a matched result: not collected yet, collected and
#: there, or collected once and removed from the tree since.
NEW, ALREADY, REMOVED = "new", "already", "removed"


class _Existing:
    """The images already collected in ``out``: which VOC ids are taken (an annotation marks
    an image collected), and by which image (``collected.csv``; the copy itself); and the
    images ``collected.csv`` lists whose annotation is gone (removed by a reviewer)."""

    def __init__(self, out: Path) -> None:
        self.images = out / "JPEGImages"
        annotations = out / "Annotations"
        self.taken: set[str] = (
            {p.stem for p in annotations.glob("*.xml")} if annotations.is_dir() else set()
        )
        self.listed: dict[str, dict[str, str]] = {}  # image id -> its latest listing row
        #: whether collected.csv was read whole (an edited one may not parse: then no image is
        #: taken as unlisted, whose row may stand in the part not read)
        self.listing_whole = True
        #: collected.csv as read (None: there is none); ListingError when it cannot be read
        #: as one (removed images would come back): refused rather than guessed
        self.listing = read_listing(out / LISTING) if (out / LISTING).is_file() else None
        if self.listing is not None:
            self.listed = {row["image_id"]: row for row in self.listing.rows if row.get("image_id")}
            self.listing_whole = self.listing.damage is None
            # (an unclosed quote swallows the rows after it without an error: every line
            # that starts with a taken id must have been read as a row)
            delimiter = self.listing.delimiter
            starts = {line.split(delimiter, 1)[0] for line in self.listing.text.splitlines()}
            if (starts & self.taken) - set(self.listed):
                self.listing_whole = False
        #: content hashes of the listed images whose annotation is gone (removed by review)
        self.removed_hashes = {
            row["content_hash"]
            for image_id, row in self.listed.items()
            if image_id not in self.taken and row.get("content_hash")
        }
        self._copy_hashes: dict[str, str | None] = {}
        #: result id -> the VOC id of its image, collected (the same bytes) but without a row
        #: in collected.csv: a run killed between the annotation and its row
        self.unlisted: dict[int, str] = {}

    def image_id(self, match: _Match) -> tuple[str, str]:
        """(VOC id, `NEW`, `ALREADY` or `REMOVED`) of a matched result: its plain id when free
        or held by the same image, else the first tagged id free or held by the same image. An
        id is held when its annotation is there, or when ``collected.csv`` lists it (its files
        removed since). `REMOVED` also for an image under a free id whose content hash a
        removed image's row lists (the same bytes, processed again)."""
        plain = voc_image_id(match.result_id, match.path)
        if plain not in self.taken and plain not in self.listed:  # the usual case: no building
            return plain, REMOVED if match.content_hash in self.removed_hashes else NEW
        candidates = [plain, *(tagged_image_id(plain, match.content_hash, n) for n in _TAG_LENGTHS)]
        for image_id in candidates:
            if image_id not in self.taken and image_id not in self.listed:
                return image_id, REMOVED if match.content_hash in self.removed_hashes else NEW
            if not self._same(image_id, match):
                continue
            if image_id not in self.taken:  # listed, its annotation gone: removed by review
                return image_id, REMOVED
            if image_id not in self.listed and self.listing_whole:
                self.unlisted[match.result_id] = image_id
            return image_id, ALREADY
        return candidates[-1], ALREADY  # its whole hash taken: that image, whatever is listed

    def _same(self, image_id: str, match: _Match) -> bool:
        """Whether the image collected as ``image_id`` is the matched result's image."""
        listed = self.listed.get(image_id, {})
        if listed.get("content_hash"):
            return listed["content_hash"] == match.content_hash
        if self._copy_hash(image_id) == match.content_hash:  # copied byte for byte
            return True
        # listed before the listing held hashes (converted to PNG): the row it came from
        return bool(listed) and (
            listed.get("result_id"), listed.get("source"), listed.get("fingerprint"),
            listed.get("p_defect"),
        ) == (
            str(match.result_id), match.stored_path, match.fingerprint,
            "" if match.p_defect is None else str(match.p_defect),
        )  # fmt: skip

    def _copy_hash(self, image_id: str) -> str | None:
        """SHA-256 of the copy collected as ``image_id`` (None: none there, or unreadable)."""
        if image_id not in self._copy_hashes:
            digest = None
            for candidate in self.images.glob(f"{glob.escape(image_id)}.*"):
                if candidate.stem == image_id and candidate.suffix.lower() in voc.IMAGE_EXTENSIONS:
                    try:
                        digest = file_sha256(candidate)
                    except OSError:
                        continue
                    break
            self._copy_hashes[image_id] = digest
        return self._copy_hashes[image_id]


def _matching(
    db: sqlite3.Connection,
    since: float | None,
    verdict: str | None,
    p_range: tuple[float, float] | None,
    arrived: tuple[float | None, float | None] = (None, None),
) -> Iterator[_Match]:
    """Every final ok/defect result the filters match whose image was kept (not deleted under
    --after delete) and arrived within `arrived` (`result_filter`), in id order, streamed (an
    edge database can hold tens of millions of rows)."""
    clauses, params = result_filter(since, verdict, arrived=arrived)
    clauses.append("stored_path IS NOT NULL")  # deleted after processing: nothing to copy
    clauses.append(f"verdict IN ({', '.join('?' * len(COLLECTABLE))})")
    params += list(COLLECTABLE)
    if p_range is not None:
        clauses.append("p_defect BETWEEN ? AND ?")
        params += list(p_range)
    columns = "id, path, stored_path, content_hash, p_defect, fingerprint"
    for row in db.execute(
        f"SELECT {columns} FROM images WHERE {' AND '.join(clauses)} ORDER BY id", params
    ):
        yield _Match(*row)


def _on_disk(stored: str) -> str:
    """The file a stored path names: as written, or (a name that is not UTF-8, stored
    escaped) unescaped."""
    return stored if os.path.isfile(stored) else file_path(stored)


def _select(
    db: sqlite3.Connection,
    existing: _Existing,
    limit: int | None,
    recollect_removed: bool = False,
    **filters: Any,
) -> tuple[dict[int, str], int, int, int, list[str]]:
    """(VOC id by result id to collect, results matched, of them already collected, of them
    removed from ``out`` by review and left out, files found gone): at most ``limit`` of the
    matched results not yet collected (see `_Existing.image_id`; the removed ones too with
    ``recollect_removed``), spread evenly over them. A pick whose file is gone passes to the
    next result whose file is there (else files removed since would take every place on
    every run). Two streamed passes; memory grows with ``limit`` and the images already in
    ``out``, not with the database."""
    left_out = (ALREADY,) if recollect_removed else (ALREADY, REMOVED)
    matched, counts = 0, {ALREADY: 0, REMOVED: 0}
    for match in _matching(db, **filters):
        matched += 1
        state = existing.image_id(match)[1]
        if state in left_out:
            counts[state] += 1
    already, removed = counts[ALREADY], counts[REMOVED]
    remaining = matched - already - removed
    wanted = remaining if limit is None else min(limit, remaining)
    picks = {int(k * remaining / wanted) for k in range(wanted)} if wanted else set()
    chosen: dict[int, str] = {}
    gone: list[str] = []
    owed, position = 0, 0
    for match in _matching(db, **filters):
        image_id, state = existing.image_id(match)
        if state in left_out:
            continue
        owed += position in picks
        position += 1
        if not owed:
            continue
        if os.path.isfile(_on_disk(match.stored_path)):
            chosen[match.result_id] = image_id
            owed -= 1
        else:
            gone.append(f"{match.stored_path}: no longer there")
    return chosen, matched, already, removed, gone


def _watched_folder_problem(out: Path, rows: list[dict]) -> str | None:
    """Why ``out`` must not be used: it lies where these results' images arrived, so a
    daemon watching that folder would take every collected image for a new one."""
    target = out.resolve()
    for folder in {Path(row["path"]).resolve().parent for row in rows}:
        if target == folder or folder in target.parents:
            return (
                f"--out {out} lies in {folder}, where the results' images arrived: the edge "
                "daemon watching it would take every collected image for a new one; choose "
                "a folder outside it"
            )
    return None


def _objects(row: dict, width: int, height: int, min_score: float) -> tuple[voc.VocObject, ...]:
    """The row's boxes scoring at least ``min_score``, clipped to the image, as VOC objects,
    each named by its own class name (the row holds one per box), else ``class<label>``."""
    names = row["class_names"] or []
    boxes, scores, labels = row["boxes"] or [], row["scores"] or [], row["labels"] or []
    objects = []
    for i, (box, score, label) in enumerate(zip(boxes, scores, labels, strict=False)):
        if score < min_score:
            continue
        x1, y1 = max(0.0, float(box[0])), max(0.0, float(box[1]))
        x2, y2 = min(float(width), float(box[2])), min(float(height), float(box[3]))
        if x2 <= x1 or y2 <= y1:
            continue
        name = names[i] if i < len(names) and names[i] else f"class{label}"
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
    recollect_removed: bool = False,
    arrived: tuple[float | None, float | None] = (None, None),
) -> CollectSummary:
    """Copy the chosen results' images and pre-labels into the VOC tree at ``out``.

    ``db``: an open store connection (read only is enough). Results are final ``ok``/``defect``
    rows, optionally changed ``since`` (unix s), of one ``verdict``, with p(defect) within
    ``p_range`` (inclusive), whose image arrived within ``arrived`` (from, until: unix s,
    [from, until), either open when None: a shift; kept in the summary's ``window``), the
    filters together; ``limit`` spreads that many evenly over those not collected yet (a row
    ``collected.csv`` lacks is written again only for a result they match). Boxes scoring at
    least ``min_score`` become objects (original-image px). Results whose image was deleted
    after processing (``--after delete``) are not matched; an image whose file is gone since
    (moved away), changed (its hash differs) or unreadable is listed in ``missing``, not an
    error, and gives its place to the next. ValueError when ``out`` lies where the results'
    images arrived (the daemon would take the copies for new images).

    A ``defect`` result whose annotation holds no box (none scored ``min_score``) is listed
    in ``needs_boxes``, marked in ``collected.csv``, and their count logged as a WARNING: as
    it is, it would train as a defect-free image.

    An image whose VOC id another image in ``out`` has (another store's result with the
    same row id and file name) is collected as `tagged_image_id` and listed in
    ``renamed``; one already there (the same content hash) is counted in ``already``.

    An image ``collected.csv`` lists whose annotation is gone (a reviewer removed it), or one
    with the content hash of such an image, is not collected again but counted in
    ``removed``; with ``recollect_removed`` it is collected again (under the id it had).
    """
    out = Path(out)
    images, annotations = out / "JPEGImages", out / "Annotations"
    summary = CollectSummary(window=arrived)
    existing = _Existing(out)
    chosen, summary.matched, summary.already, summary.removed, summary.missing = _select(
        db, existing, limit, recollect_removed, since=since, verdict=verdict, p_range=p_range,
        arrived=arrived,
    )  # fmt: skip
    if summary.removed:
        log.info(
            f"{summary.removed} image(s) {out / LISTING} lists were removed from {out} since "
            "they were collected (a reviewer's decision) and are not collected again; "
            "--recollect-removed collects them again",
            extra={"fields": {"event": "collect_removed_left", "images": summary.removed,
                              "out": str(out)}},
        )  # fmt: skip
    rows = results_by_id(db, list(chosen))
    problem = _watched_folder_problem(out, rows)
    if problem is not None:
        raise ValueError(problem)
    _remove_stale_temporaries(annotations)
    unlisted = results_by_id(db, list(existing.unlisted))
    if not rows and not unlisted:
        if out.is_dir():  # an output made before collect marked its folders
            mark(out)
        return summary
    out.mkdir(parents=True, exist_ok=True)
    mark(out)  # a daemon watching a folder above with --recursive skips it
    listing = out / LISTING
    columns = _listing_columns(listing, existing.listing)
    if columns and _lacks_columns(columns, [*rows, *unlisted]):
        columns = _add_columns(listing, columns)  # (written before them: they would be lost)
    # (no columns: none there, or an empty one, whose byte order mark must not lead the header)
    with open(listing, "a" if columns else "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, columns or LISTING_COLUMNS, extrasaction="ignore")
        if not columns:
            writer.writeheader()
        for row in unlisted:
            _relist(writer, row, existing.unlisted[row["id"]], min_score, summary)
        fh.flush()
        for row in rows:
            image_id = chosen[row["id"]]
            target_xml = annotations / f"{image_id}.xml"
            copied = _copy_one(row, image_id, images, target_xml, min_score)
            if isinstance(copied, str):
                summary.missing.append(copied)
                continue
            summary.collected.append(image_id)
            if image_id != voc_image_id(row["id"], row["path"]):
                summary.renamed.append(image_id)
            needs_boxes = row["verdict"] == "defect" and not copied
            if needs_boxes:
                summary.needs_boxes.append(image_id)
            writer.writerow(_listing_row(row, image_id, needs_boxes))
            fh.flush()
    if summary.needs_boxes:
        log.warning(
            f"{len(summary.needs_boxes)} collected image(s) the edge judged defect have no box "
            f"in their annotation (none in the image scored --score-threshold {min_score:g}): "
            "they would train as defect-free images until someone draws their boxes "
            f"(needs_boxes = {NEEDS_BOXES} in {listing})",
            extra={"fields": {"event": "collect_needs_boxes", "images": len(summary.needs_boxes),
                              "out": str(out)}},
        )  # fmt: skip
    return summary


def _listing_row(row: dict, image_id: str, needs_boxes: bool) -> dict:
    """The ``collected.csv`` row of one result (`results_by_id`'s row) collected as
    ``image_id``."""
    return {
        "image_id": image_id,
        "result_id": row["id"],
        "source": row["stored_path"],
        "verdict": row["verdict"],
        "p_defect": row["p_defect"],
        "fingerprint": row["fingerprint"],
        "boxes": json.dumps(row["boxes"] or []),
        "scores": json.dumps(row["scores"] or []),
        "labels": json.dumps(row["labels"] or []),
        "content_hash": row["content_hash"],
        "needs_boxes": NEEDS_BOXES if needs_boxes else "no",
        # UTF-8 as the file is (``pit défaut``, not a \\u escape a spreadsheet shows as such)
        "class_names": json.dumps(row["class_names"] or [], ensure_ascii=False),
        # the edge that judged it (images.edge; empty: written by an earlier splitdet): the
        # result ids of several edges' stores collide
        "edge": row["edge"] or "",
    }


def _relist(
    writer: csv.DictWriter, row: dict, image_id: str, min_score: float, summary: CollectSummary
) -> None:
    """Write the missing ``collected.csv`` row of an image collected whole as ``image_id``
    (its copy and annotation there, the same bytes) by a run killed before it listed it:
    without the row a defect's needs_boxes mark, its p(defect) and its boxes were lost for
    good, as every later run counted the image as already collected. Its files are left as
    they are (its annotation may have been reviewed since)."""
    boxed = sum(score >= min_score for score in row["scores"] or [])
    needs_boxes = row["verdict"] == "defect" and not boxed
    writer.writerow(_listing_row(row, image_id, needs_boxes))
    summary.relisted.append(image_id)
    if needs_boxes:
        summary.needs_boxes.append(image_id)


#: Seconds after which a temporary annotation file is taken as left by a run killed while it
#: wrote it, not one another collect into the same folder writes now.
STALE_TEMPORARY_S = 60.0


def _remove_stale_temporaries(annotations: Path) -> None:
    """Remove the temporary annotation files a killed run left in `annotations` (whatever
    their image: one not chosen again keeps none; annotations are the only files written
    there through `atomic_file.replacing`), older than STALE_TEMPORARY_S."""
    now = time.time()
    for temporary in stale_temporaries(annotations, None):
        with contextlib.suppress(OSError):
            if now - temporary.stat().st_mtime > STALE_TEMPORARY_S:
                temporary.unlink()


def _listing_columns(path: Path, listing: Listing | None) -> list[str] | None:
    """The columns of the existing ``collected.csv`` at ``path`` (`_Existing.listing`; one
    written before a column was added keeps its own: new rows are written under them, unless
    `_add_columns` adds them), None when there is none or it is empty. One a spreadsheet saved
    again with a byte order mark or semicolons is rewritten as collect writes it first
    (`_rewrite_listing`): a row appended to it would have no id, or other separators."""
    if listing is None or not listing.columns:
        return None
    if not listing.canonical:
        _rewrite_listing(path, listing)
    return listing.columns


def _rewrite_listing(path: Path, listing: Listing) -> None:
    """Write ``listing`` (read from ``path``) back as collect writes it: UTF-8 without a byte
    order mark, commas between columns, every field as read; the file replaced whole.
    ListingError when a damaged line stopped its reading (the rows after it would be lost)."""
    if listing.damage is not None:
        raise ListingError(path, f"a damaged line: {listing.damage}; rows cannot be added to it")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(listing.columns)
    writer.writerows(listing.records)
    atomic_write(path, text.getvalue().encode("utf-8"), parents=False)
    log.info(
        f"{path} rewritten with commas and without a byte order mark (a spreadsheet saved it "
        "again) before rows are added to it",
        extra={"fields": {"event": "collect_listing_rewritten", "path": str(path)}},
    )


def _lacks_columns(columns: list[str], rows: list[dict]) -> bool:
    """Whether an existing ``collected.csv`` of ``columns`` lacks a column the ``rows`` to list
    in it need: ``class_names`` (what each box's label means: two exports may number classes
    otherwise) for any row, ``needs_boxes`` once one is a ``defect`` verdict (its mark)."""
    if not rows:
        return False
    defect = any(row["verdict"] == "defect" for row in rows)
    return "class_names" not in columns or (defect and "needs_boxes" not in columns)


def _add_columns(listing: Path, columns: list[str]) -> list[str]:
    """Add the `LISTING_COLUMNS` an existing ``collected.csv`` lacks to its header (its rows
    are kept byte for byte: the new columns empty in them), the file replaced whole; returns
    its columns now."""
    added = [c for c in LISTING_COLUMNS if c not in columns]
    data = listing.read_bytes()
    end = data.find(b"\n") + 1 or len(data)
    newline = "\r\n" if data[:end].endswith(b"\r\n") or not data[:end].endswith(b"\n") else "\n"
    header = io.StringIO()
    csv.writer(header, lineterminator=newline).writerow([*columns, *added])
    atomic_write(listing, header.getvalue().encode("utf-8") + data[end:], parents=False)
    return [*columns, *added]


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an open image (1, as stored, when it has none or it cannot
    be read: viewers show such an image as stored). The format's own reader: JPEG and TIFF
    from the header; a PNG's eXIf chunk also when it follows the pixels (read for it)."""
    try:
        return int(img.getexif().get(voc.EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block
        return 1


def _png_ready(img: Image.Image) -> Image.Image:
    """The decoded image in a mode PNG holds, its pixel values as the edge reads them: as
    they are when PNG can hold them, 16/32-bit grayscale as 16-bit, CMYK, YCbCr and the
    like turned into RGB (grayscale with premultiplied alpha into grayscale) as the edge
    turns them (the edge's own mode lists). ValueError for a mode the edge does not take (no
    ok/defect result has one)."""
    from splitdet.edge.preprocess import TO_GRAY_MODES, TO_RGB_MODES, WIDE_GRAY_MODES  # numpy

    if img.mode in _PNG_MODES:
        return img
    if img.mode in WIDE_GRAY_MODES:  # 16/32-bit (I;16L straight to I;16 would cut at 255)
        return img.convert("I").convert("I;16")
    if img.mode in TO_RGB_MODES:
        return img.convert("RGB")
    if img.mode in TO_GRAY_MODES:
        return img.convert("L")
    raise ValueError(f"mode {img.mode} cannot be written as PNG")


def _write_png(img: Image.Image, target: Path, source: Path) -> str | None:
    """Write the decoded pixels of `img` (read from `source`) to `target` as a PNG without
    metadata (no EXIF: no orientation tag); the reason when it cannot be."""
    try:
        _png_ready(img).save(target, "PNG")
    except Exception as exc:  # OSError (a full disk too), ValueError, what Pillow raises
        target.unlink(missing_ok=True)
        return f"{source}: cannot convert to PNG ({exc})"
    return None


def _copy_one(
    row: dict, image_id: str, images: Path, target_xml: Path, min_score: float
) -> str | int:
    """Copy one result's image (as the edge saw it, see the module docstring) and write its
    annotation; how many boxes the annotation holds, or the reason when it cannot be."""
    source = Path(_on_disk(row["stored_path"]))
    if not source.is_file():
        return f"{source}: no longer there"
    try:
        data = source.read_bytes()
    except OSError as exc:
        return f"{source}: cannot read ({exc.strerror or exc})"
    if hashlib.sha256(data).hexdigest() != row["content_hash"]:  # --after keep, name reused
        return f"{source}: a different image now than the one processed (its content changed)"
    try:  # the bytes hashed, not the file again: what is written is what the edge processed
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for unreadable files
        return f"{source}: cannot read image: {exc}"
    with img:
        width, height = img.size  # the raw layout, as the edge read it and the boxes are
        turned = _orientation(img) in voc.ORIENTATION_SHOWN
        images.mkdir(parents=True, exist_ok=True)
        suffix = source.suffix.lower()
        if suffix in voc.IMAGE_EXTENSIONS and not turned:
            target_image = images / f"{image_id}{suffix}"
            target_image.write_bytes(data)
        else:  # turned by its tag, or a name VOC readers do not look for (.pgm, none)
            target_image = images / f"{image_id}.png"
            problem = _write_png(img, target_image, source)
            if problem is not None:
                return problem
    objects = _objects(row, width, height, min_score)
    sample = voc.VocSample(image_id, target_image, width, height, objects)
    voc.write_annotation(target_xml, sample)  # last: its presence marks the image collected
    return len(objects)
