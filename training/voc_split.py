"""Write ``train``/``val``/``test`` split files for a VOC dataset that has none (or new ones).

Annotation tools (LabelImg, CVAT, Label Studio) export ``Annotations/`` and ``JPEGImages/``
but seldom the splits splitdet reads, and many write no annotation at all for an image with
no box, which for defect inspection is every good part. `split_dataset` divides the
annotated images at random (deterministic per seed), stratified so that each split gets its
share of defect-free images and of every class; with ``write_empty`` it first gives each image
without one an annotation with no object (a defect-free image). Last it records the run in
``ImageSets/Main/split.json`` (`voc_split_record`): the seed, shares and options, splitdet's
version, the time, and what each split holds.

Only the standard library and Pillow (through `voc`): no numpy, no torch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from splitdet.training import voc
from splitdet.training.provenance import splitdet_version
from splitdet.training.voc_check import SPLITS, annotated_ids, image_ids, unannotated_images
from splitdet.training.voc_check_folder import unfinished_synth_problem
from splitdet.training.voc_layout import (
    UnreadAnnotation,
    id_key,
    missing_folder_hint,
    nested_note,
    unread_annotations,
)
from splitdet.training.voc_split_record import make_record, read_record, write_record

log = logging.getLogger(__name__)

__all__ = ["SplitResult", "split_dataset", "stratum_of", "unannotated_samples"]

#: The stratum of a defect-free image (a defective one's is its rarest class).
DEFECT_FREE = ""


@dataclass
class SplitResult:
    """The ids written per split, and the empty annotations written for unannotated images."""

    ids: dict[str, list[str]]
    paths: dict[str, Path]
    empty_annotations: list[Path]
    added: dict[str, int]  # ids new in each split (all of them without ``add``)
    record: Path | None = None  # ImageSets/Main/split.json (`voc_split_record`)
    seed: int = 0


def unannotated_samples(root: Path, samples: Sequence[voc.VocSample]) -> list[voc.VocSample]:
    """A sample with no object for every image of ``ROOT/JPEGImages`` that neither has an
    annotation of its name nor is the image of one of ``samples`` (through its <filename>),
    sized from its header. Raises `voc.VocError` naming the first image Pillow cannot read
    (and how many more), or whose name cannot be an image id, and before that when any of
    them has an annotation splitdet does not read (`_refuse_unread_annotations`)."""
    root = Path(root)
    found, problems = [], []
    images = unannotated_images(image_ids(root), set(annotated_ids(root)), samples)
    _refuse_unread_annotations(root, images)
    for image_id, path in images:
        problem = voc.id_problem(image_id)
        if problem is not None:
            problems.append(f"{path}: {problem}; rename it")
            continue
        try:
            width, height = voc.image_size(path)
        except voc.VocError as exc:
            problems.append(str(exc))
            continue
        found.append(voc.VocSample(image_id, path, width, height, ()))
    _raise_first(problems)
    return found


def _refuse_unread_annotations(root: Path, images: Sequence[tuple[str, Path]]) -> None:
    """`voc.VocError` when any of ``images`` ((id, path) of the images without an annotation
    splitdet reads) has one it does not read (`unread_annotations`: beside the images, in a
    sub-folder of Annotations, ``ID.XML``): an empty annotation written for it would train a
    defective image as defect-free. Says how many images (one with two such annotations is
    one), with an example and the fix of each kind."""
    unread = unread_annotations(root)
    hidden = [
        (path, found) for image_id, path in images for found in unread.get(id_key(image_id), ())
    ]
    if not hidden:
        return
    kinds: dict[str, list[tuple[Path, UnreadAnnotation]]] = {}
    for path, found in hidden:
        kinds.setdefault(found.kind, []).append((path, found))
    parts = []
    for entries in kinds.values():
        image, found = entries[0]
        where = found.path.relative_to(root).as_posix()
        parts.append(f"{len(entries)} such as {image.name}'s {where}: {found.fix}")
    n_images = len({path for path, _ in hidden})
    raise voc.VocError(
        f"{root}: --write-empty refused, nothing written: {n_images} image(s) without "
        "Annotations/ID.xml have an annotation splitdet does not read, which an empty one "
        "would replace (their boxes lost, defective images trained as defect-free); "
        + "; ".join(parts)
    )


def _raise_first(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more; `splitdet data check` lists all)"
        raise voc.VocError(problems[0] + (more if len(problems) > 1 else ""))


def _require_images_folder(root: Path) -> None:
    """`voc.VocError` when ``ROOT/JPEGImages`` is missing, saying where the images seem to be
    (`missing_folder_hint`: an ``images/`` folder to rename): else every annotation would be
    refused in turn for an image not found, without the hint."""
    folder = root / "JPEGImages"
    if not folder.is_dir():
        hint = missing_folder_hint(root, "JPEGImages")
        raise voc.VocError(f"{folder}: folder not found (not a VOC dataset?){hint}")


def stratum_of(sample: voc.VocSample, class_counts: Counter) -> str:
    """The group a sample is split within: ``DEFECT_FREE``, or its rarest class overall."""
    if not sample.is_defective:
        return DEFECT_FREE
    return min((obj.name for obj in sample.objects), key=lambda n: (class_counts[n], n))


def _deal(sequence: Sequence[str], fractions: Sequence[float]) -> list[list[str]]:
    """Deal ``sequence`` out to len(fractions) splits so that every prefix of it is divided
    as near ``fractions`` as whole items allow (each item goes to the split furthest below
    its share so far; ties to the earlier split). Strata laid out one after another thus each
    get their share within one or two items, and a small stratum's remainder is carried to
    the next rather than always rounded into train."""
    dealt: list[list[str]] = [[] for _ in fractions]
    for i, item in enumerate(sequence, start=1):
        k = max(range(len(fractions)), key=lambda j: (i * fractions[j] - len(dealt[j]), -j))
        dealt[k].append(item)
    return dealt


def _give_val_a_defective_image(
    chosen: dict[str, list[str]], defective: set[str], val: float, test: float
) -> None:
    """Move a defective image from train to val when val has none and train keeps two (the
    gate is calibrated on val's defective images). Raises ValueError when train cannot spare
    one: `data check` and `train` would refuse that val split, so none is written."""
    if defective & set(chosen["val"]):
        return
    movable = [i for i in chosen["train"] if i in defective]
    if len(movable) > 1:
        chosen["train"].remove(movable[-1])
        chosen["val"].append(movable[-1])
        return
    in_test = len(defective & set(chosen["test"]))
    raise ValueError(
        f"{len(defective)} defective image(s) leave the val split without one (train keeps "
        f"{len(movable)}, test {in_test}); the gate cannot be calibrated on such a split "
        "(`data check` and `train` refuse it): annotate more defective images"
        + (f", give a smaller --test than {test}" if in_test else "")
        + ", or give --val 0 (no val split: training keeps no best.pt, and the gate threshold "
        f"is not calibrated on held-out images) instead of --val {val}"
    )


def split_dataset(
    root: Path,
    *,
    val: float = 0.2,
    test: float = 0.1,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
    write_empty: bool = False,
    add: bool = False,
) -> SplitResult:
    """Write ``ImageSets/Main/{train,val,test}.txt`` over every annotation under ``root``.

    ``val``/``test``: the share of the images that goes to each split (the rest trains), of
    each stratum too as near as whole images allow (defect-free images, and defective images
    by their rarest class); val gets a defective image whenever train would keep two. A
    split with share 0 is
    written empty only if it existed before (so stale ids never linger), else not at all.
    ``write_empty``: give every image without an annotation one with no object first.
    ``add``: keep every id the existing split files list where it is, and divide only the
    annotations in no split among them (new images collected from the line join the splits,
    and no image moves, so an earlier test split stays held out).
    ``seed``: the shuffle's; the default, 0, is fixed, so that the same annotations give the
    same split again. Last, ``ImageSets/Main/split.json`` records the run (the seed, shares
    and options, splitdet's version, the time, what each split holds:
    `voc_split_record.make_record`; with ``add``, the earlier record in its history).
    Nothing is written unless everything can be: raises `voc.VocError` for an interrupted
    `splitdet synth`'s remnant (`unfinished_synth_problem`), a missing ``JPEGImages``
    (`_require_images_folder`) or naming the first annotation or image that
    cannot be read or named in a split file, `FileExistsError` when
    split files exist and not ``overwrite``, and `ValueError` for shares out of range or
    leaving nothing to train on or no defective image for a val split (fewer than two
    defective images, without ``add``).
    """
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"val {val} and test {test} must each be in [0, 1) and sum below 1")
    root = Path(root)
    unfinished = unfinished_synth_problem(root)
    if unfinished is not None:  # (its images in no split are the run's missing files)
        raise voc.VocError(unfinished)
    _require_images_folder(root)
    split_dir = root / "ImageSets" / "Main"
    existing = [s for s in SPLITS if (split_dir / f"{s}.txt").is_file()]
    kept = {s: voc.read_split_ids(root, s) for s in existing} if add else {}
    if existing and not overwrite and not add:
        raise FileExistsError(
            f"{split_dir}: already holds {', '.join(s + '.txt' for s in existing)}"
        )
    ids = annotated_ids(root)
    samples, problems = [], []
    for image_id in ids:
        try:
            samples.append(voc.read_annotation(root, image_id, class_names))
        except voc.VocError as exc:
            problems.append(str(exc))
        problem = voc.id_problem(image_id)
        if problem is not None:
            problems.append(f"{root / 'Annotations' / image_id}.xml: {problem}; rename it")
    _raise_first(problems)
    empty = unannotated_samples(root, samples) if write_empty else []
    samples += empty
    if not samples:
        nested = nested_note(root)
        hint = "" if (root / "Annotations").is_dir() else missing_folder_hint(root, "Annotations")
        raise voc.VocError(
            f"{root / 'Annotations'}: no annotation (*.xml) to split"
            + (f"; {nested}" if nested else "")
            + hint
        )

    class_counts = Counter(obj.name for s in samples for obj in s.objects)
    listed = {image_id for ids_ in kept.values() for image_id in ids_}
    strata: dict[str, list[str]] = defaultdict(list)
    for sample in samples:
        if sample.image_id not in listed:
            strata[stratum_of(sample, class_counts)].append(sample.image_id)
    rng = random.Random(seed)
    sequence = []
    # the rarest classes first, defect-free images last: the carried remainders fall on them
    for stratum in sorted(strata, key=lambda k: (k == DEFECT_FREE, class_counts[k], k)):
        members = sorted(strata[stratum])
        rng.shuffle(members)
        sequence += members
    fractions = (1 - val - test, val, test)
    chosen = dict(zip(SPLITS, _deal(sequence, fractions), strict=True))
    defective = {s.image_id for s in samples if s.is_defective}
    if val > 0 and not kept:
        _give_val_a_defective_image(chosen, defective, val, test)
    if not kept.get("train") and not chosen["train"]:
        raise ValueError(
            f"--val {val} and --test {test} leave none of the {len(samples)} images to train on"
        )

    earlier, problem = read_record(root) if add else (None, None)
    if problem:  # (--add keeps the earlier records in the new one's history: say they're lost)
        log.warning("%s; the earlier splits are not kept in the new record's history", problem)
    paths, ids_written = {}, {}
    for split in SPLITS:
        if chosen[split] or split == "train" or split in existing:
            ids_written[split] = kept.get(split, []) + sorted(chosen[split])
    written = []
    try:
        for sample in empty:
            target = root / "Annotations" / f"{sample.image_id}.xml"
            voc.write_annotation(target, sample)
            written.append(target)
        for split, split_ids in ids_written.items():  # (--add: kept lines keep their tails)
            tails = voc.split_line_tails(root, split) if split in kept else None
            paths[split] = voc.write_split(root, split, split_ids, tails)
    except BaseException:
        for target in written:  # a failed split leaves no half-made defect-free annotations
            target.unlink(missing_ok=True)
        raise
    added = {s: len(chosen[s]) for s in paths}
    record = make_record(
        seed=seed, val=val, test=test,
        mode="add" if add else "overwrite" if existing else "new",
        class_names=class_names, write_empty=write_empty, empty_written=len(written),
        ids=ids_written, defective=defective, added=added, version=splitdet_version(),
        earlier=earlier,
    )  # fmt: skip
    return SplitResult(
        ids=ids_written,
        paths=paths,
        empty_annotations=written,
        added=added,
        record=write_record(root, record),  # (last: it describes the files written)
        seed=seed,
    )
