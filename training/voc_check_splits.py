"""The split files of a PASCAL VOC dataset (``ImageSets/Main/{train,val,test}.txt``), checked
for `voc_check.check_dataset`: ids without annotation, ids in two splits, what each split
holds, and the classes left with nothing to train on.

Only the standard library and `voc`: no torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from splitdet.training import voc
from splitdet.training.voc_check_boxes import trained_boxes, untrained_class_warning
from splitdet.training.voc_check_report import DatasetReport, SplitStats

__all__ = ["SPLITS"]

#: The split files splitdet reads, in the order they are reported.
SPLITS: tuple[str, ...] = ("train", "val", "test")


def _unannotated_id_note(root: Path, image_id: str, annotated: set[str]) -> str:
    """What the "lists ID, which has no annotation" problem adds: the annotation whose name
    differs only in its Unicode normalisation; or, for an id written with its image's
    extension (``a.jpg``) whose stem is annotated, the id to write instead. "" for neither."""
    twin = voc.normalisation_note(root / "Annotations", f"{image_id}.xml")
    stem, suffix = os.path.splitext(image_id)
    if not twin and suffix.lower() in voc.IMAGE_EXTENSIONS and stem in annotated:
        return f"; write the id without its extension: {stem}"
    return twin


def split_file_names(root: Path) -> set[str]:
    """The splits ``ROOT/ImageSets/Main`` holds a file of: every visible ``NAME.txt`` (train,
    val, test, a custom split `eval --split NAME` reads, VOC's ``trainval``, CVAT's
    ``default``); none without the folder. `data merge` merges each, `data check` checks each."""
    split_dir = Path(root) / "ImageSets" / "Main"
    if not split_dir.is_dir():
        return set()
    return {
        path.stem
        for path in split_dir.iterdir()
        if path.suffix == ".txt" and not path.name.startswith(".") and path.is_file()
    }


def _check_other_splits(root: Path, report: DatasetReport, annotated: set[str]) -> None:
    """The split files besides train, val and test (`split_file_names`): a line listing no
    id, an id listed twice, an id without annotation are problems, as `data merge` and
    `eval --split NAME` refuse them (merge's message sends the user here)."""
    for split in sorted(split_file_names(root) - set(SPLITS)):
        path = root / "ImageSets" / "Main" / f"{split}.txt"
        try:
            split_ids, line_problems, _ = voc.read_split_lines(root, split)
        except voc.VocError as exc:
            report.problems.append(str(exc))
            continue
        report.problems += line_problems
        report.problems += [
            f"{path}: lists {image_id!r}, which has no Annotations/{image_id}.xml"
            f"{_unannotated_id_note(root, image_id, annotated)}; if it is no split file, move "
            "it elsewhere"
            for image_id in split_ids
            if image_id not in annotated
        ]


def all_difficult_problem(val_file: Path) -> str:
    """Why a val split (``val_file``) whose every object is marked difficult cannot validate a
    training run: mAP, which picks best.pt, ignores difficult objects, so no epoch would have
    a score and the run would end without best.pt. `data check` reports it, `train` refuses it
    (the gate is still calibrated on such images: they are defective)."""
    return (
        f"{val_file}: every object of the validation images is marked difficult, which mAP "
        "ignores, so no validation pass could score an epoch and training would keep no "
        "best.pt; list images with objects not marked difficult in val, or train with "
        "--eval-every 0"
    )


def _check_splits(
    root: Path,
    report: DatasetReport,
    annotated: set[str],
    samples: dict[str, voc.VocSample],
    class_names: Sequence[str] | None,
) -> dict[str, str]:
    """Split files: ids without annotation, ids in two splits, what each split holds, classes
    (``class_names``, else the dataset's) with nothing to train on. Returns ``{id: the first
    split listing it}``."""
    listed: dict[str, str] = {}  # id -> the first split listing it
    unreadable: list[str] = []
    bad_lines = False  # a line listing no id: which image it meant is not known
    train_samples: list[voc.VocSample] = []
    for split in SPLITS:
        path = root / "ImageSets" / "Main" / f"{split}.txt"
        if not path.is_file():
            continue
        try:
            split_ids, line_problems, no_id = voc.read_split_lines(root, split)
        except voc.VocError as exc:
            report.problems.append(str(exc))  # (UTF-16 text: how to save it as UTF-8)
            unreadable.append(split)
            continue
        stats = report.splits.setdefault(split, SplitStats())
        # every bad line, and the lines around them counted as usual; a repeated id is
        # counted once, as listed: only a line naming no image is an image with a problem
        report.problems += line_problems
        stats.unreadable += no_id
        bad_lines = bad_lines or bool(no_id)
        for image_id in split_ids:
            if image_id not in annotated:
                report.problems.append(
                    f"{path}: lists {image_id!r}, which has no Annotations/{image_id}.xml"
                    f"{_unannotated_id_note(root, image_id, annotated)}"
                )
                continue
            if image_id in listed:
                report.problems.append(
                    f"{path}: lists {image_id!r}, also in {listed[image_id]}.txt (an image in two "
                    "splits makes the held-out figures optimistic)"
                )
            else:
                listed[image_id] = split
            # counted in every split listing it: train and eval read it there, and a split
            # repeating another is not empty (only the overlap is the problem)
            sample = samples.get(image_id)
            if sample is None:  # its annotation's problem is already reported
                stats.unreadable += 1
                continue
            if split == "train":
                train_samples.append(sample)
            stats.images += 1
            stats.defective += sample.is_defective
            stats.defect_free += not sample.is_defective
            stats.objects.update(obj.name for obj in sample.objects)
            stats.difficult += sum(obj.difficult for obj in sample.objects)

    _check_other_splits(root, report, annotated)
    # (a bad line may be an image's, meant to list it)
    unlisted = set() if unreadable or bad_lines else set(samples) - set(listed)
    report.unlisted = sorted(unlisted)
    split_dir = root / "ImageSets" / "Main"
    train, val, test = (report.splits.get(s) for s in SPLITS)
    if train is None and "train" not in unreadable:
        report.problems.append(
            f"{split_dir / 'train.txt'}: split file not found (`splitdet data split` writes "
            "train, val and test)"
        )
    elif train is not None and not (train.images or train.unreadable):
        report.problems.append(f"{split_dir / 'train.txt'}: lists no image to train on")
    elif train is not None and train.images and not train.defect_free:
        report.warnings.append(
            f"{split_dir / 'train.txt'}: no defect-free image; the gate learns what a good part "
            "looks like from them"
        )
    if train is not None and train.images and not train.unreadable and not train.defective:
        report.problems.append(
            f"{split_dir / 'train.txt'}: no defective image, so the detector and the gate would "
            "train without a single defect; list annotated defective images in it"
        )
    # no val.txt, or one listing no image (`data split --val 0 --overwrite` empties it), is
    # no val split: train warns and trains without one, so a warning here too
    if (val is None and "val" not in unreadable) or (
        val is not None and not (val.images or val.unreadable)
    ):
        missing = "split file not found" if val is None else "lists no image"
        report.warnings.append(
            f"{split_dir / 'val.txt'}: {missing}; training then keeps no best.pt "
            "and `eval --calibrate-split val` cannot set the gate threshold"
        )
    elif val is not None and not val.unreadable and not val.defective:
        report.problems.append(
            f"{split_dir / 'val.txt'}: no defective image, so the gate cannot be calibrated on it"
        )
    elif val is not None and not val.unreadable and val.difficult == val.objects.total():
        report.problems.append(all_difficult_problem(split_dir / "val.txt"))
    if (test is None and "test" not in unreadable) or (test is not None and not test.images):
        report.warnings.append(
            f"{split_dir / 'test.txt'}: no held-out image; `splitdet eval` reads the test split "
            "unless given --split"
        )
    if report.unlisted:
        report.warnings.append(
            f"{split_dir}: {len(report.unlisted)} annotated image(s) in no split, e.g. "
            f"{report.unlisted[0]!r}"
        )
    if train is not None and train.defective:  # (none: a problem above says so already)
        untrained = untrained_class_warning(
            class_names if class_names is not None else sorted(report.classes),
            trained_boxes(train_samples),
            report.classes,
            split_dir / "train.txt",
            partly_read=train.unreadable > 0 or len(samples) < report.annotations,
        )
        if untrained is not None:
            report.warnings.append(untrained)
    return listed
