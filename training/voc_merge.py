"""Merge several PASCAL VOC trees into one: `splitdet data merge SRC SRC... --out DIR`.

Training on synthetic images and on the line's own (`splitdet edge collect`) needs one tree
holding both: every image, every annotation and every split-file line of the sources. Sources
are read with the readers train reads them with (`voc.read_annotation`, `voc.read_split_ids`),
so a malformed one is refused with the same message, naming its file, before anything is
written.

Ids are kept as they are. An id found in two sources (``img_000`` in both) is refused, naming
the ids; with ``prefix`` every id becomes ``FOLDER_ID``, FOLDER being its source folder's name
(``gaskets_img_000``, ``review_img_000``). A source without train, val or test split file is
refused (its images would train in no split; `splitdet data split SRC` writes them);
annotated images a source lists in no split are carried over, in no split, as they were.
Every split file of a source is merged (``ImageSets/Main/*.txt``: a custom split `eval
--split NAME` reads, VOC's ``trainval``), its ids renamed as the others'; one that a single
source has lists that source's ids alone.

A source collected from the edge (`splitdet edge collect`) has a ``collected.csv``: its rows
of the images the source holds are carried into the merged tree's own, their ids renamed as
the others' (``--prefix``), so `splitdet data check` of the merged tree keeps checking the
defect verdicts collected without a box (``needs_boxes``); `plan_merge` gives the warning
`data check` gives of each source that has them (`SourcePlan.warnings`).

Images are hard-linked into the new tree where the file system allows it (no second copy of
a large dataset; an image edited in place then changes in both trees), else copied; an image
that is a symbolic link is the file it points at.
Annotations are kept as the sources wrote them (``pose``, ``truncated``, boxes to the digit, a
labelling tool's own tags), but for ``<folder>`` and ``<filename>``, which name the merged
image. The tree is written into a temporary sibling of
the output folder and renamed to it at the end: an output folder that exists is complete, and
one that existed already is never written into (only an empty one is replaced).

Only the standard library and Pillow (through `voc`): no torch.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from splitdet.edge.collect import LISTING, LISTING_COLUMNS, ListingError, read_listing
from splitdet.shared.atomic_file import atomic_write, folder_mode
from splitdet.shared.folder_lock import missing_folders
from splitdet.training import voc
from splitdet.training.voc_annotations import read_annotation_document
from splitdet.training.voc_check import SPLITS, annotated_ids, image_files
from splitdet.training.voc_check_collected import same_bytes_groups, unboxed_collected_warning
from splitdet.training.voc_check_splits import split_file_names
from splitdet.training.voc_layout import missing_folder_hint, nested_note

__all__ = [
    "MergeError",
    "MergePlan",
    "MergeResult",
    "SourcePlan",
    "merge",
    "plan_merge",
    "split_names",
]

#: Colliding ids a message names before "and N more".
SHOWN_IDS = 5


class MergeError(ValueError):
    """Sources that cannot be merged as asked (ids in two of them, one given twice), or an
    output folder that is not empty."""


@dataclass
class SourcePlan:
    """One source read whole: what it adds to the merged tree."""

    root: Path
    prefix: str  # "" (ids kept), or "FOLDER_"
    samples: list[voc.VocSample]  # every annotation, its image located
    # per sample's id, its annotation document as merged (`merged_annotation`)
    documents: dict[str, bytes]
    other_images: list[Path]  # image files no annotation is paired with
    splits: dict[str, list[str]]  # the source's own ids per split file it has
    unlisted: int  # annotated images in no split
    # per split, what its lines hold after their id, by the source's own id (VOC's per-class
    # lists: " 1", " -1"); kept in the merged split files
    line_tails: dict[str, dict[str, str]] = field(default_factory=dict)
    # its collected.csv's rows of the images it holds (`splitdet edge collect`), ids its own,
    # and that listing's columns (none when it has no listing)
    collected: list[dict[str, str]] = field(default_factory=list)
    collected_columns: list[str] = field(default_factory=list)
    # what `splitdet data check` of the source warns of that the merge carries: defect
    # verdicts collected without a box still boxless, a listing that cannot be read
    warnings: list[str] = field(default_factory=list)

    def new_id(self, image_id: str) -> str:
        """The id of the source's `image_id` in the merged tree."""
        return self.prefix + image_id

    def ids(self) -> set[str]:
        """Every id this source brings (annotations, images, split lines), as merged."""
        own = {s.image_id for s in self.samples} | {p.stem for p in self.other_images}
        own |= {i for ids in self.splits.values() for i in ids}
        return {self.new_id(i) for i in own}


@dataclass
class MergePlan:
    """Every source read, no id in two of them: what `merge` writes."""

    sources: list[SourcePlan]
    classes: Counter = field(default_factory=Counter)  # boxes per class, all sources

    @property
    def files(self) -> int:
        """The files `merge` writes: images and annotations."""
        return sum(2 * len(s.samples) + len(s.other_images) for s in self.sources)

    @property
    def warnings(self) -> list[str]:
        """Every source's `SourcePlan.warnings`, in the sources' order."""
        return [warning for source in self.sources for warning in source.warnings]


@dataclass
class MergeResult:
    """What `merge` wrote."""

    out: Path
    splits: dict[str, int]  # merged split: ids listed
    linked: int  # images hard-linked
    copied: int  # images copied (no hard link across file systems, or not allowed)
    collected: int = 0  # rows of the merged collected.csv (none written when 0)


def check_out(out: Path, sources: Sequence[Path] = ()) -> None:
    """MergeError unless ``out`` does not exist or is an empty folder, neither the current
    folder nor inside one of ``sources``: a merge never writes into, or over, a dataset."""
    out = Path(out)
    where = out.resolve()
    for root in sources:
        if where.is_relative_to(Path(root).resolve()):
            raise MergeError(
                f"--out {out}: inside the source {root}, which it would change (its images in "
                "a sub-folder); give a folder outside every source"
            )
    if where == Path.cwd().resolve():
        raise MergeError(f"--out {out}: the current folder; give a new folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise MergeError(f"--out {out}: exists and is not a folder; give a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise MergeError(
            f"--out {out}: exists and is not empty; a merge writes a new dataset, never into "
            "one: give a new folder"
        )


def _source_prefixes(roots: Sequence[Path], prefix: bool) -> list[str]:
    """The id prefix of each source ("" without ``prefix``); MergeError for a source given
    twice, two sources of one folder name, or a folder name that cannot start an id."""
    resolved: dict[Path, Path] = {}
    for root in roots:
        key = root.resolve()
        if key in resolved:
            raise MergeError(f"{root}: given twice (as {resolved[key]} and {root})")
        resolved[key] = root
    if not prefix:
        return [""] * len(roots)
    names = [root.resolve().name for root in roots]
    for root, name in zip(roots, names, strict=True):
        problem = voc.id_problem(f"{name}_x")
        if problem is not None or not name:
            raise MergeError(
                f"--prefix: {root}: its folder name {name!r} cannot start an image id "
                f"({problem or 'no name'}); rename the folder"
            )
        others = [str(r) for r, n in zip(roots, names, strict=True) if n == name and r != root]
        if others:
            raise MergeError(
                f"--prefix: {root} and {others[0]} have the same folder name {name!r}, which "
                "would prefix both alike; rename one of the folders"
            )
    return [f"{name}_" for name in names]


def read_source(
    root: Path, prefix: str = "", progress: Callable[[int], None] | None = None
) -> SourcePlan:
    """Read the VOC tree at ``root`` whole: every annotation (`read_annotation_document`, its image
    header checked), every split file, the images no annotation is paired with. `voc.VocError`
    naming the file for the first problem, a source without any split file, or a split line
    naming an id without annotation."""
    root = Path(root)
    for folder in ("Annotations", "JPEGImages"):
        if not (root / folder).is_dir():
            hint = missing_folder_hint(root, folder)
            raise voc.VocError(f"{root / folder}: folder not found (not a VOC dataset?){hint}")
    ids = annotated_ids(root)
    if not ids:
        nested = nested_note(root)
        raise voc.VocError(
            f"{root / 'Annotations'}: no annotation (*.xml) to merge"
            + (f"; {nested}" if nested else "")
        )
    split_dir = root / "ImageSets" / "Main"
    present = split_names(root)
    if not set(present) & set(SPLITS):
        raise voc.VocError(
            f"{split_dir}: no split file (train.txt, val.txt, test.txt): its images would be "
            f"in no split of the merged dataset; `splitdet data split {root}` writes them"
        )
    splits = {s: voc.read_split_ids(root, s) for s in present}
    annotated = set(ids)
    for split, split_ids in splits.items():
        for image_id in split_ids:
            if image_id not in annotated:
                other = "" if split in SPLITS else "; if it is no split file, move it elsewhere"
                raise voc.VocError(
                    f"{split_dir / (split + '.txt')}: lists {image_id!r}, which has no "
                    f"Annotations/{image_id}.xml{other}"
                )
    samples, documents = [], {}
    for image_id in ids:
        problem = voc.id_problem(prefix + image_id)
        if problem is not None:
            raise voc.VocError(f"{root / 'Annotations' / image_id}.xml: {problem}; rename it")
        sample, document = read_annotation_document(root, image_id)
        samples.append(sample)
        documents[image_id] = merged_annotation(
            document, prefix + image_id + sample.image_path.suffix
        )
        if progress is not None:
            progress(1)
    claimed = {s.image_path for s in samples}
    other_images = []
    for image_id, paths in image_files(root).items():
        for path in paths:
            if path in claimed:
                continue
            problem = voc.id_problem(prefix + image_id)
            if problem is not None:
                raise voc.VocError(f"{path}: {problem}; rename it")
            other_images.append(path)
    listed = {i for split_ids in splits.values() for i in split_ids}
    held = annotated | {p.stem for p in other_images}
    collected, columns, unreadable = _collected_rows(root, held)
    # (an unreadable listing: `unboxed` would say so too, in fewer words)
    unboxed = unboxed_collected_warning(root, {s.image_id: s for s in samples})
    return SourcePlan(
        root=root,
        prefix=prefix,
        samples=samples,
        documents=documents,
        other_images=other_images,
        splits=splits,
        unlisted=len(annotated - listed),
        line_tails={s: voc.split_line_tails(root, s) for s in present},
        collected=collected,
        collected_columns=columns,
        warnings=[unreadable] if unreadable else [unboxed] if unboxed else [],
    )


def _collected_rows(
    root: Path, held: set[str]
) -> tuple[list[dict[str, str]], list[str], str | None]:
    """(rows, columns, problem) of ``ROOT/collected.csv`` (`splitdet edge collect`'s listing):
    the rows of the images in ``held`` (a row of an image removed from the source since could
    name another source's image of that id); nothing when there is no listing. One that cannot
    be read is not carried: ``problem`` says so."""
    listing = Path(root) / LISTING
    if not listing.is_file():
        return [], [], None
    try:
        read = read_listing(listing)
    except ListingError as exc:  # (a spreadsheet's other encoding or separators)
        return [], [], f"{exc} and merge again: {_NOT_CARRIED}"
    except OSError as exc:
        return [], [], _unreadable(listing, exc)
    if read.damage is not None:
        return [], [], _unreadable(listing, read.damage)
    return [row for row in read.rows if row.get("image_id") in held], read.columns, None


#: What a source's listing that cannot be read costs the merge (`_collected_rows`).
_NOT_CARRIED = (
    "the merged dataset's collected.csv lacks its rows, and `data check` of it cannot check "
    "its images collected without a box"
)


def _unreadable(listing: Path, why: object) -> str:
    """The warning of a source's ``listing`` that cannot be read (``why``: what stopped it)."""
    return f"{listing}: cannot read it ({why}): {_NOT_CARRIED}; repair the listing and merge again"


def split_names(root: Path) -> list[str]:
    """The splits ``ROOT/ImageSets/Main`` holds a file of: every visible ``NAME.txt`` (a
    custom split `eval --split NAME` reads, VOC's ``trainval``), train, val and test first.
    Each is merged: a split file left out would lose its lines without a word."""
    return _merged_order(split_file_names(root))


def merged_annotation(root: ET.Element, image_name: str) -> bytes:
    """The annotation document ``root`` (read and checked by `read_annotation_document`) as
    the merged tree holds it: ``<folder>`` JPEGImages and ``<filename>`` ``image_name``, the
    merged image; every other element as the source wrote it (``pose``, ``truncated``, boxes
    to the digit, a tool's own tags). UTF-8 bytes; ``root`` is changed."""
    for index, (tag, text) in enumerate((("folder", "JPEGImages"), ("filename", image_name))):
        element = root.find(tag)
        if element is None:
            element = ET.Element(tag)
            element.tail = root[0].tail if len(root) else None
            root.insert(index, element)
        element.text = text
    return ET.tostring(root, encoding="utf-8") + b"\n"


def plan_merge(
    roots: Sequence[Path], *, prefix: bool = False, progress: Callable[[int], None] | None = None
) -> MergePlan:
    """Read every source (`read_source`; ``progress`` is called once per annotation read) and
    check that no id is in two of them. MergeError naming the colliding ids (and what
    ``prefix`` would make of them) or `_source_prefixes`'s; `voc.VocError` naming the file of
    a source's first problem."""
    roots = [Path(r) for r in roots]
    if len(roots) < 2:
        raise MergeError("give two sources or more (a merge of one is a copy)")
    prefixes = _source_prefixes(roots, prefix)
    sources = [read_source(r, p, progress) for r, p in zip(roots, prefixes, strict=True)]
    owners: dict[str, list[Path]] = {}
    for source in sources:
        for image_id in source.ids():
            owners.setdefault(image_id, []).append(source.root)
    _refuse_shared_files(sources)
    twice = sorted(i for i, where in owners.items() if len(where) > 1)
    if twice:
        shown = ", ".join(
            f"{i!r} ({' and '.join(str(r) for r in owners[i])})" for i in twice[:SHOWN_IDS]
        )
        more = f", and {len(twice) - SHOWN_IDS} more" if len(twice) > SHOWN_IDS else ""
        fix = (
            "rename the files of one source (and its split lines)"
            if prefix
            else "give --prefix to prefix every id by its source folder's name "
            f"({', '.join(f'{r.resolve().name}_{twice[0]}' for r in owners[twice[0]])}), or "
            "rename the files of one source (and its split lines)"
        )
        raise MergeError(
            f"{len(twice)} image id(s) in more than one source: {shown}{more}; nothing was "
            f"written: {fix}"
        )
    classes = Counter(obj.name for s in sources for sample in s.samples for obj in sample.objects)
    return MergePlan(sources=sources, classes=classes)


def _refuse_shared_files(sources: Sequence[SourcePlan]) -> None:
    """MergeError when two sources hold the same image: one file (a hard link: a source merged
    earlier from another), or the same bytes (a merge onto another file system copies, and so
    does ``cp -r``). Merged, each such image would be in the tree twice, under two ids, trained
    on twice or counted twice in a test split. Only files of one size are hashed."""
    root_of: dict[Path, Path] = {}  # every image, in the sources' order: its source
    files: dict[tuple[int, int], tuple[Path, Path]] = {}
    for source in sources:
        for path in [s.image_path for s in source.samples] + source.other_images:
            stat = path.stat()
            first = files.setdefault((stat.st_dev, stat.st_ino), (source.root, path))
            if first[0] != source.root:
                _same_image(path, source.root, first, "one file, linked")
            root_of[path] = source.root
    for first, *others in same_bytes_groups(root_of, strict=True):
        for path in others:
            if root_of[path] != root_of[first]:
                _same_image(path, root_of[path], (root_of[first], first), "the same bytes")


def _same_image(path: Path, root: Path, first: tuple[Path, Path], how: str) -> None:
    """MergeError: `path` of source `root` is the image `first` (its source, its path)."""
    raise MergeError(
        f"{path} and {first[1]} are the same image ({how}): {root} holds images of "
        f"{first[0]} (merged or copied from it earlier?), which would be in the merged dataset "
        "twice; leave out the source they came from, or the one that holds them"
    )


def _link_or_copy(source: Path, target: Path) -> bool:
    """Hard-link the file ``source`` is as ``target``, else (another file system, links not
    allowed) copy it; True when linked. A symbolic link is followed to its file, whose own
    link is made: one of the link itself would be a symbolic link in the merged tree, broken
    there when relative (``../../store/a.jpg``) and changed by whatever it points at later."""
    image = source.resolve(strict=True)
    try:
        os.link(image, target)
        return True
    except FileExistsError:
        raise
    except OSError:
        shutil.copy2(image, target)
        return False


def _merged_order(splits: Iterable[str]) -> list[str]:
    """Split names in the order they are read, written and counted: train, val, test, then
    the others by name, whatever order the sources list theirs in."""
    names = set(splits)
    return [s for s in SPLITS if s in names] + sorted(names - set(SPLITS))


def merge(
    plan: MergePlan, out: Path, *, progress: Callable[[int], None] | None = None
) -> MergeResult:
    """Write the tree ``plan`` describes at ``out`` (`check_out`: new, or an empty folder),
    whole or not at all: into a temporary sibling renamed to ``out`` at the end, removed on
    any failure. ``progress`` is called once per file written. MergeError when ``out`` is no
    longer empty at the end; OSError when a file cannot be written."""
    out = Path(out)
    check_out(out, [s.root for s in plan.sources])
    made = missing_folders(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    linked = copied = 0
    split_ids: dict[str, list[str]] = {}
    split_tails: dict[str, dict[str, str]] = {}  # per split: what lines hold after their id
    try:
        os.chmod(work, folder_mode())  # (mkdtemp's 0o700 would keep other users out)
        (work / "JPEGImages").mkdir()
        (work / "Annotations").mkdir()
        for source in plan.sources:
            for sample in source.samples:
                new_id = source.new_id(sample.image_id)
                image = work / "JPEGImages" / (new_id + sample.image_path.suffix)
                if _link_or_copy(sample.image_path, image):
                    linked += 1
                else:
                    copied += 1
                atomic_write(
                    work / "Annotations" / f"{new_id}.xml", source.documents[sample.image_id]
                )
                if progress is not None:
                    progress(2)
            for path in source.other_images:
                if _link_or_copy(path, work / "JPEGImages" / (source.prefix + path.name)):
                    linked += 1
                else:
                    copied += 1
                if progress is not None:
                    progress(1)
            for split, ids in source.splits.items():
                split_ids.setdefault(split, []).extend(source.new_id(i) for i in ids)
                split_tails.setdefault(split, {}).update(
                    (source.new_id(i), tail) for i, tail in source.line_tails.get(split, {}).items()
                )
        for split in _merged_order(split_ids):
            voc.write_split(work, split, split_ids[split], split_tails[split])
        collected = _write_collected(work, plan.sources)
        try:
            os.rename(work, out)  # (replaces an empty folder; never a non-empty one)
        except OSError as exc:
            if out.is_dir() and any(out.iterdir()):
                raise MergeError(
                    f"--out {out}: was written to while merging; nothing merged was left there"
                ) from None
            raise OSError(f"--out {out}: cannot rename {work} to it ({exc.strerror})") from exc
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for folder in made:  # deepest first; one holding anything else stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return MergeResult(
        out=out,
        splits={s: len(split_ids[s]) for s in _merged_order(split_ids)},
        linked=linked,
        copied=copied,
        collected=collected,
    )


def _write_collected(work: Path, sources: Sequence[SourcePlan]) -> int:
    """Write the merged ``collected.csv`` into ``work``: every source's rows (`SourcePlan.
    collected`) with their ids as merged, under `LISTING_COLUMNS` and then any other column a
    source's listing has (empty in the rows of a listing without it); the rows written, and
    nothing written when no source has any."""
    rows = [
        {**row, "image_id": source.new_id(row["image_id"])}
        for source in sources
        for row in source.collected
    ]
    if not rows:
        return 0
    extra = [c for s in sources for c in s.collected_columns if c not in LISTING_COLUMNS]
    columns = [*LISTING_COLUMNS, *dict.fromkeys(extra)]
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(work / LISTING, text.getvalue().encode("utf-8"))
    return len(rows)
