"""Check a whole PASCAL VOC dataset at once: every problem, and what it holds.

`splitdet train` and `eval` stop at the first malformed file (`voc.VocError`); a user's own
dataset of thousands of images would then take one run per mistake. `check_dataset` reads
every annotation, every image header (and with ``decode`` every image's pixels) and the
``train``/``val``/``test`` split files, and reports all problems together, each a line
starting with the offending file, plus counts per split and warnings about what would train
badly (no defect-free images, no val split to calibrate the gate on, a split leaking into
another, boxes too thin to see once images are scaled to a preset's input size, a class with
no box in the train split to learn it from, an annotation whose <filename> names another
image of the dataset, the same image under two ids, images `splitdet edge collect` marked as
needing boxes that still have none).

This module holds `check_dataset` and re-exports the rest (`__all__`), which lives beside it,
one job a module: the report (`voc_check_report`), the annotation and image files
(`voc_check_images`), the split files (`voc_check_splits`), and what the boxes would teach
(`voc_check_boxes`: thin boxes, classes without a box to train on), what collecting the
edge's images leaves (`voc_check_collected`), and what a folder that is no dataset to read is
(`voc_check_folder`: an interrupted `splitdet synth`, the parent folder of datasets).

Only the standard library, the model config and, through `voc` (which reads images as the edge
does), Pillow and the edge's torch-free `preprocess`: no torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from splitdet.shared.config import ModelConfig
from splitdet.training import voc
from splitdet.training.voc_check_boxes import (
    case_twin_warnings,
    class_boxes,
    classes_option,
    comma_class_problems,
    input_scale_text,
    model_input,
    thin_box_warning,
    too_elongated,
    trained_boxes,
    untrained_class_warning,
)
from splitdet.training.voc_check_collected import same_image_warning, unboxed_collected_warning
from splitdet.training.voc_check_folder import datasets_below_hint, unfinished_synth_problem
from splitdet.training.voc_check_images import (
    _check_filenames,
    _check_images,
    _narrow_sixteen_bit,
    _read_one,
    annotated_ids,
    image_files,
    image_ids,
    unannotated_images,
)
from splitdet.training.voc_check_report import DatasetReport, SplitStats
from splitdet.training.voc_check_splits import SPLITS, _check_splits
from splitdet.training.voc_layout import (
    beside_images_note,
    missing_folder_hint,
    nested_note,
    unread_files_note,
)
from splitdet.training.voc_rotation import rotated_box_warnings
from splitdet.training.voc_split_record import read_record, record_mismatch

__all__ = [
    "SPLITS",
    "DatasetReport",
    "SplitStats",
    "annotated_ids",
    "check_dataset",
    "class_boxes",
    "image_ids",
    "input_scale_text",
    "model_input",
    "thin_box_warning",
    "trained_boxes",
    "unannotated_images",
    "untrained_class_warning",
]

#: The one class the training presets name (``splitdet train`` without ``--classes``).
(DEFAULT_CLASS,) = ModelConfig().class_names

#: Boxes smaller than this (px) both ways are reported as a warning: often a stray click
#: (a thin scratch is as thin, but long).
TINY_BOX_PX = 2.0
#: The preset `data check` measures input sizes with: `splitdet train`'s default.
DEFAULT_PRESET = "cpu"


def _percentiles(values: list[float]) -> list[float]:
    return [round(min(values), 1), round(statistics.median(values), 1), round(max(values), 1)]


def _missing_folder_problems(root: Path) -> list[str]:
    """The problem lines of a missing ``Annotations`` or ``JPEGImages`` folder, each with
    where its files seem to be (`missing_folder_hint`); one line naming the sub-folders that
    are VOC datasets when both are missing and ``root`` is their parent."""
    missing = [f for f in ("Annotations", "JPEGImages") if not (root / f).is_dir()]
    below = datasets_below_hint(root, "check") if len(missing) == 2 else ""
    if below:
        return [f"{root}: no Annotations/ or JPEGImages/ folder (not a VOC dataset){below}"]
    return [
        f"{root / folder}: folder not found (not a VOC dataset?){missing_folder_hint(root, folder)}"
        for folder in missing
    ]


def _check_record(root: Path, report: DatasetReport) -> None:
    """Keep the record `splitdet data split` left (``ImageSets/Main/split.json``) in the
    report, with a warning when the split files no longer list what it says was written, or
    when it cannot be read; nothing without one (split files of other making)."""
    record, problem = read_record(root)
    if problem is not None:
        report.warnings.append(problem)
    if record is None:
        return
    report.split_record = record
    listed = {}
    for split in SPLITS:
        if (root / "ImageSets" / "Main" / f"{split}.txt").is_file():
            try:
                listed[split] = voc.read_split_ids(root, split)
            except voc.VocError:  # (a problem `_check_splits` reports)
                return
    mismatch = record_mismatch(root, record, listed)
    if mismatch is not None:
        report.warnings.append(mismatch)


def check_dataset(
    root: Path,
    class_names: Sequence[str] | None = None,
    *,
    decode: bool = False,
    pixel_bits: int = 16,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> DatasetReport:
    """Read all of the VOC dataset at ``root`` and report every problem at once.

    ``class_names``: when given, an object of another class is a problem (as for
    ``train --classes``). ``decode``: decode every image's pixels too (finds truncated or
    corrupt image bodies that a header read misses; about 50 ms per 2448x2048 JPEG, spread
    over ``workers`` threads). ``progress``: called with the number of annotations read
    since the last call. ``pixel_bits``: the bits 16-bit images' values use (`train
    --pixel-bits`); with ``decode``, a pixel past them is a problem. Boxes are measured at
    the input size of DEFAULT_PRESET (`thin_box_warning`).
    """
    root = Path(root)
    report = DatasetReport(root=root)
    ids = annotated_ids(root)
    files = image_files(root)
    # (ids with an image file); counted before a missing folder stops the check, so that the
    # summary says what the other folder holds, not "0 annotations"
    report.annotations, report.images = len(ids), len(files)
    unfinished = unfinished_synth_problem(root)
    if unfinished is not None:  # (its missing files are the run's, not a layout to fix)
        report.problems.append(unfinished)
        return report
    report.problems += _missing_folder_problems(root)
    if report.problems:
        return report

    nested = nested_note(root)
    if nested is not None:  # (a problem when the top level holds nothing to read)
        (report.problems if not ids or not files else report.warnings).append(nested)
    for note in (beside_images_note(root), unread_files_note(root)):
        if note is not None:
            report.warnings.append(note)
    annotated = set(ids)
    for path in sorted((root / "Annotations").iterdir()):
        if path.suffix.lower() != ".xml" or path.name.startswith("."):
            continue
        if not path.is_file():  # a folder, a FIFO (reading it would block), a broken link
            report.problems.append(f"{path}: cannot read annotation: not a regular file")
        elif path.suffix != ".xml":
            report.problems.append(f"{path}: name it {path.stem}.xml (the readers look for ID.xml)")
    for image_id in ids:
        problem = voc.id_problem(image_id)
        if problem is not None:
            report.problems.append(
                f"{root / 'Annotations' / image_id}.xml: {problem}; rename it and its image"
            )

    samples: dict[str, voc.VocSample] = {}
    peaks: dict[Path, int] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda i: _read_one(root, i, class_names, decode, pixel_bits), ids)
        for image_id, (result, peak) in zip(ids, results, strict=True):
            if isinstance(result, str):
                report.problems.append(result)
            else:
                samples[image_id] = result
                if peak is not None:
                    peaks[result.image_path] = peak
            if progress is not None:
                progress(1)

    _check_images(report, files, annotated, samples)
    _check_filenames(report, files, samples)
    report.warnings += rotated_box_warnings(root, samples)
    _narrow_sixteen_bit(report, peaks, pixel_bits)
    # (an image refused for a pixel past the bits is 16-bit too: the fix is other bits)
    refused_for_bits = any(voc.PAST_THE_BITS.search(line) for line in report.problems)
    if decode and pixel_bits != 16 and samples and not peaks and not refused_for_bits:
        report.warnings.append(
            f"{root / 'JPEGImages'}: --pixel-bits {pixel_bits} given, but no image is 16-bit "
            "grayscale: the setting changes nothing for 8-bit images (train without it)"
        )
    widths: list[float] = []
    heights: list[float] = []
    for sample in samples.values():
        report.image_sizes[(sample.width, sample.height)] += 1
        for obj in sample.objects:
            report.classes[obj.name] += 1
            x1, y1, x2, y2 = obj.box
            widths.append(x2 - x1)
            heights.append(y2 - y1)
            if max(x2 - x1, y2 - y1) < TINY_BOX_PX:
                report.warnings.append(
                    f"{root / 'Annotations' / (sample.image_id + '.xml')}: a {obj.name!r} box "
                    f"of {x2 - x1:g}x{y2 - y1:g} px (a stray click?)"
                )
    if widths:
        report.box_px = {"width": _percentiles(widths), "height": _percentiles(heights)}
    thin = thin_box_warning(list(samples.values()), DEFAULT_PRESET, root / "Annotations")
    if thin is not None:
        report.warnings.append(thin)
    report.problems += _too_elongated_problems(samples.values(), DEFAULT_PRESET)

    listed = _check_splits(root, report, annotated, samples, class_names)
    _check_record(root, report)
    owners = {sample.image_path.resolve(): image_id for image_id, sample in samples.items()}
    for warning in (
        same_image_warning(files, owners, listed),
        unboxed_collected_warning(root, samples),
    ):
        if warning is not None:
            report.warnings.append(warning)
    if len(report.image_sizes) > 1:
        report.warnings.append(
            f"{root / 'JPEGImages'}: {len(report.image_sizes)} different image sizes; the edge "
            "resizes each as the model was trained, but one camera usually gives one size"
        )
    report.warnings += case_twin_warnings(report.classes, root / "Annotations")
    report.problems += comma_class_problems(report.classes, root / "Annotations")
    names = classes_option(report.classes)  # (None for a name with a comma: no option names it)
    # (no class at all: nothing to name; the split checks say the images train no defect)
    if class_names is None and report.classes and names and set(report.classes) != {DEFAULT_CLASS}:
        report.warnings.append(
            f"{root / 'Annotations'}: classes {names}; the presets train {DEFAULT_CLASS!r} "
            f"alone, so train with --classes {names} (check with --classes the same way)"
        )
    return report


def _too_elongated_problems(samples: Iterable[voc.VocSample], preset: str) -> list[str]:
    """A problem per image that the `preset`'s input would shrink to under 1 px on a side
    (`too_elongated`): `splitdet train` refuses it, and so does the edge."""
    from splitdet.training.presets import PRESETS

    model = PRESETS[preset].model
    return [
        f"{line}, at the {preset} preset's input; train and the edge refuse it"
        for line in too_elongated(samples, model.min_size, model.max_size)
    ]
