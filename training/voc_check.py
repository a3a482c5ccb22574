"""Check a whole PASCAL VOC dataset at once: every problem, and what it holds.

`splitdet train` and `eval` stop at the first malformed file (`voc.VocError`); a user's own
dataset of thousands of images would then take one run per mistake. `check_dataset` reads
every annotation, every image header (and with ``decode`` every image's pixels) and the
``train``/``val``/``test`` split files, and reports all problems together, each a line
starting with the offending file, plus counts per split and warnings about what would train
badly (no defect-free images, no val split to calibrate the gate on, a split leaking into
another, boxes too thin to see once images are scaled to a preset's input size, a class with
no box in the train split to learn it from, an annotation whose <filename> names another
image of the dataset).

Only the standard library, the model config and, through `voc` (which reads images as the edge
does), Pillow and the edge's torch-free `preprocess`: no torch.
"""

from __future__ import annotations

import os
import shlex
import statistics
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from splitdet.edge.preprocess import input_scale
from splitdet.shared.config import ModelConfig, pixel_full_scale
from splitdet.training import voc
from splitdet.training.voc_layout import missing_folder_hint, nested_note, unread_files_note

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

#: The split files splitdet reads, in the order they are reported.
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: The one class the training presets name (``splitdet train`` without ``--classes``).
(DEFAULT_CLASS,) = ModelConfig().class_names

#: Boxes smaller than this (px) both ways are reported as a warning: often a stray click
#: (a thin scratch is as thin, but long).
TINY_BOX_PX = 2.0
#: A 16-bit image whose pixels all lie below (full scale + 1) / this holds values of 4 bits
#: fewer than `pixel_bits` says, or fewer still (12-bit values, unscaled, read as 16-bit ones).
NARROW_FACTOR = 16
#: Bit depths cameras give (GenICam Mono8, Mono10, Mono12, Mono14, Mono16).
CAMERA_BITS = (8, 10, 12, 14, 16)
#: A box whose short side is under this many px once its image is scaled to the model's
#: input is hard to see for the detector (a 2 px scratch in a 2448x2048 image is 0.5 px at the
#: cpu preset's 612x512).
THIN_AT_INPUT_PX = 2.0
#: Share of the boxes thin at the input that `thin_box_warning` warns of: one defect in twenty
#: the model can hardly see is a share a user would want to know of.
THIN_SHARE = 0.05
#: The preset `data check` measures input sizes with: `splitdet train`'s default.
DEFAULT_PRESET = "cpu"


@dataclass
class SplitStats:
    """What one split file lists (over the annotations that could be read)."""

    images: int = 0
    defective: int = 0
    defect_free: int = 0
    objects: Counter = field(default_factory=Counter)  # class name -> boxes
    difficult: int = 0
    unreadable: int = 0  # listed ids whose annotation or image has a problem

    def to_json(self) -> dict:
        """Plain JSON types."""
        return {
            "images": self.images,
            "unreadable": self.unreadable,
            "defective": self.defective,
            "defect_free": self.defect_free,
            "objects": dict(sorted(self.objects.items())),
            "difficult": self.difficult,
        }


@dataclass
class DatasetReport:
    """Everything `check_dataset` found.

    ``problems``: lines that make training or evaluation fail, each starting with a path.
    ``warnings``: what would not fail but is likely a mistake.
    ``box_px``: width and height percentiles (min, median, max) of every box, in pixels.
    """

    root: Path
    annotations: int = 0
    images: int = 0
    classes: Counter = field(default_factory=Counter)
    splits: dict[str, SplitStats] = field(default_factory=dict)
    unlisted: list[str] = field(default_factory=list)  # read fine, in no split
    image_sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    box_px: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing would stop `splitdet train` or `eval` on this dataset."""
        return not self.problems

    def to_json(self) -> dict:
        """Plain JSON types (for ``splitdet data check --json``)."""
        return {
            "root": str(self.root),
            "ok": self.ok,
            "annotations": self.annotations,
            "images": self.images,
            "classes": dict(sorted(self.classes.items())),
            "splits": {name: stats.to_json() for name, stats in self.splits.items()},
            "unlisted": self.unlisted,
            "image_sizes": {f"{w}x{h}": n for (w, h), n in self.image_sizes.most_common()},
            "box_px": self.box_px,
            "problems": self.problems,
            "warnings": self.warnings,
        }


def _stem_files(
    folder: Path, suffixes: Sequence[str], any_case: bool = True
) -> dict[str, list[Path]]:
    """``{stem: paths}`` of the regular files in ``folder`` whose suffix is in ``suffixes`` (in
    any case, unless not ``any_case``), in name order; hidden files skipped."""
    if not folder.is_dir():
        return {}
    wanted = {s.lower() for s in suffixes} if any_case else set(suffixes)
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower() if any_case else path.suffix
        if suffix in wanted and not path.name.startswith(".") and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


def _first_of_each(files: dict[str, list[Path]]) -> dict[str, Path]:
    """``{stem: its first path}`` of a `_stem_files` listing."""
    return {stem: paths[0] for stem, paths in files.items()}


def annotated_ids(root: Path) -> list[str]:
    """Sorted ids of ``ROOT/Annotations/*.xml`` (the readers look for ``ID.xml`` exactly)."""
    return sorted(_stem_files(Path(root) / "Annotations", (".xml",), any_case=False))


def image_ids(root: Path) -> dict[str, Path]:
    """``{id: image path}`` for every image file in ``ROOT/JPEGImages`` (the first in name
    order of an id with several)."""
    return _first_of_each(image_files(root))


def image_files(root: Path) -> dict[str, list[Path]]:
    """``{id: its image files}`` in ``ROOT/JPEGImages`` (``a.jpg`` and ``a.png``: two)."""
    return _stem_files(Path(root) / "JPEGImages", voc.IMAGE_EXTENSIONS)


def _read_one(
    root: Path,
    image_id: str,
    class_names: Sequence[str] | None,
    decode: bool,
    pixel_bits: int,
) -> tuple[voc.VocSample | str, int | None]:
    """(The sample, or the problem line naming the file; with `decode`, the peak value of a
    16-bit image, else None)."""
    try:
        sample = voc.read_annotation(root, image_id, class_names, check_image=True)
        if decode:
            image, peak = voc.load_rgb_and_peak(sample.image_path, pixel_bits)
            image.close()
            return sample, peak
        return sample, None
    except voc.VocError as exc:
        return str(exc), None


def _narrow_sixteen_bit(report: DatasetReport, peaks: dict[Path, int], pixel_bits: int) -> None:
    """Warn of 16-bit images whose values stop 4 bits or more below `pixel_bits` (a Mono10 or
    Mono12 camera saving its values unscaled, read as 16-bit ones): scaled by 2**pixel_bits - 1
    as the edge scales them they are dark, and training's 8 bits leave them a few grey levels."""
    full_scale = pixel_full_scale(pixel_bits)
    narrow = {p: peak for p, peak in peaks.items() if peak < (full_scale + 1) // NARROW_FACTOR}
    if not narrow:
        return
    path, peak = max(narrow.items(), key=lambda item: item[1])
    bits = next(b for b in CAMERA_BITS if peak < 1 << b)
    report.warnings.append(
        f"{path}: one of {len(narrow)} 16-bit images whose pixels stop at {peak} of "
        f"{full_scale} (a {bits}-bit camera's values saved unscaled?): with --pixel-bits "
        f"{pixel_bits}{' (the default)' if pixel_bits == 16 else ''} splitdet scales them by "
        f"{full_scale}, on the edge as in training, so the "
        f"model sees dark images, and training's 8 bits keep {peak * 255 // full_scale + 1} grey "
        f"levels of them; give the bits the camera uses (data check and train --pixel-bits "
        f"{bits}: the export carries it to the edge), or have the camera write its values "
        "scaled to the full range"
    )


def model_input(width: int, height: int, min_size: int, max_size: int) -> tuple[int, int, float]:
    """``(width, height, scale)`` of a ``width`` x ``height`` image at a model's input: scaled
    by `preprocess.input_scale`, sizes truncated, as torchvision's transform and the edge's
    `preprocess.resized_size` scale it (without its refusal of too elongated images)."""
    scale = input_scale(height, width, min_size, max_size)
    return int(width * scale), int(height * scale), scale


def input_scale_text(
    sizes: Iterable[tuple[int, int]], min_size: int, max_size: int, most: int = 3
) -> str:
    """How images of ``sizes`` ((width, height), one per image) are read at a model's input,
    the most common sizes first: "2448x2048 are read at 612x512 (x0.25)", "; "-separated,
    then how many other sizes there are."""
    counts = Counter(sizes)
    parts = []
    for (width, height), n in counts.most_common(most):
        in_w, in_h, scale = model_input(width, height, min_size, max_size)
        images = f" ({n} images)" if len(counts) > 1 else ""
        parts.append(f"{width}x{height}{images} are read at {in_w}x{in_h} (x{scale:.3g})")
    if len(counts) > most:
        parts.append(f"and {len(counts) - most} other sizes")
    return "; ".join(parts)


def _thin_at_input(samples: Iterable[voc.VocSample], min_size: int, max_size: int) -> int:
    """How many boxes of images the model's input shrinks have a short side under
    `THIN_AT_INPUT_PX` px there."""
    thin = 0
    for sample in samples:
        scale = model_input(sample.width, sample.height, min_size, max_size)[2]
        if scale >= 1.0:  # not shrunk: the input size is not what makes them thin
            continue
        for obj in sample.objects:
            x1, y1, x2, y2 = obj.box
            thin += min(x2 - x1, y2 - y1) * scale < THIN_AT_INPUT_PX
    return thin


def thin_box_warning(samples: Sequence[voc.VocSample], preset: str, where: Path) -> str | None:
    """A warning line (starting with ``where``) when `THIN_SHARE` or more of the boxes of
    ``samples`` are under `THIN_AT_INPUT_PX` px on their short side once their images are
    scaled to the input of the training preset named ``preset``; it names how many, the
    preset's input size, and what the other presets leave of them. None when few are."""
    from splitdet.training.presets import PRESETS

    model = PRESETS[preset].model
    boxes = sum(len(s.objects) for s in samples)
    thin = _thin_at_input(samples, model.min_size, model.max_size)
    if not boxes or thin < THIN_SHARE * boxes:
        return None
    scaled = input_scale_text(((s.width, s.height) for s in samples), model.min_size,
                              model.max_size, most=1)  # fmt: skip
    others = []
    for name, other in sorted(PRESETS.items(), key=lambda item: item[1].model.min_size):
        if name in (preset, "tiny") or other.model.min_size <= model.min_size:
            continue
        left = _thin_at_input(samples, other.model.min_size, other.model.max_size)
        others.append(
            f"--preset {name} (min_size {other.model.min_size}, max_size "
            f"{other.model.max_size}): {left}"
        )
    instead = f"; presets with a larger input leave fewer, {', '.join(others)}" if others else ""
    return (
        f"{where}: {thin} of {boxes} boxes are under {THIN_AT_INPUT_PX:g} px on their short "
        f"side at the {preset} preset's input size (min_size {model.min_size}, max_size "
        f"{model.max_size}: {scaled}), too thin for the detector to see well{instead}; or cut "
        "the images into tiles the input size does not shrink"
    )


def trained_boxes(samples: Iterable[voc.VocSample]) -> Counter:
    """Boxes per class that training learns from in ``samples``: all but the difficult ones
    (`dataset.VocDetection` drops those when it trains)."""
    return Counter(obj.name for s in samples for obj in s.objects if not obj.difficult)


def class_boxes(root: Path) -> tuple[Counter, bool]:
    """(Boxes per class in every annotation of the VOC dataset at ``root``, difficult ones
    too; whether some annotation could not be read, and is not counted.) Reads no image."""
    boxes: Counter = Counter()
    partly_read = False
    for image_id in annotated_ids(root):
        try:
            sample = voc.read_annotation(root, image_id, None, check_image=False)
        except voc.VocError:
            partly_read = True
            continue
        boxes.update(obj.name for obj in sample.objects)
    return boxes, partly_read


def _quoted(names: Sequence[str]) -> str:
    """``'a'``, ``'a' and 'b'``, ``'a', 'b' and 'c'``."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def untrained_class_warning(
    class_names: Sequence[str],
    trained: Mapping[str, int],
    in_dataset: Mapping[str, int] | None,
    train_file: Path,
    *,
    partly_read: bool = False,
) -> str | None:
    """A warning line, starting with ``train_file`` (``ROOT/ImageSets/Main/train.txt``),
    naming each of ``class_names`` that ``trained`` (`trained_boxes` of the train split) has
    no box of: the model will not learn to detect it. ``in_dataset``: boxes per class in all
    the dataset's annotations (difficult ones too), which tells a class the dataset holds
    elsewhere (val, test, no split, only difficult boxes) from one it holds none of, said more
    strongly; None when not known. ``partly_read``: some annotations could not be read, and
    the counts are of the others. None when every class has a box to train on."""
    missing = [name for name in class_names if not trained.get(name)]
    if not missing:
        return None
    nowhere = [] if in_dataset is None else [n for n in missing if not in_dataset.get(n)]
    elsewhere = [n for n in missing if n not in nowhere]
    parts = []
    if nowhere:
        one = len(nowhere) == 1
        it = "it" if one else "them"
        parts.append(
            f"{'class' if one else 'classes'} {_quoted(nowhere)} {'is' if one else 'are'} in no "
            f"annotation of the dataset at all: the model will never learn to detect {it}; "
            f"remove {it} from --classes, or label some"
        )
    if elsewhere:
        one = len(elsewhere) == 1
        it = "it" if one else "them"
        held = ""
        if in_dataset is not None:
            counts = ", ".join(f"{in_dataset[n]} {n!r}" for n in elsewhere)
            held = (
                f" (the dataset holds {counts} elsewhere: in val, test, in no split, or marked "
                "difficult, which training skips)"
            )
        root = shlex.quote(str(train_file.parents[2]))
        parts.append(
            f"no box of {'class' if one else 'classes'} {_quoted(elsewhere)} to train "
            f"on{held}: the model will not learn to detect {it}; list images holding {it} in "
            f"train.txt (`splitdet data split {root} --overwrite` gives each split its share of "
            f"every class), or leave {it} out of --classes"
        )
    read = " (counting the annotations that could be read)" if partly_read else ""
    return f"{train_file}: {'; and '.join(parts)}{read}"


def case_twin_warnings(classes: Mapping[str, int], where: Path) -> list[str]:
    """One warning per group of class names that differ only in case (``Scratch`` and
    ``scratch``: usually a labelling slip, but two classes to train), with their box counts."""
    groups: dict[str, list[str]] = {}
    for name in sorted(classes):
        groups.setdefault(name.casefold(), []).append(name)
    return [
        f"{where}: classes {' and '.join(repr(n) for n in names)} differ only in case "
        f"({', '.join(f'{classes[n]} box(es)' for n in names)}): they train as "
        f"{len(names)} classes; if they are one, give them one name in the annotations"
        for names in groups.values()
        if len(names) > 1
    ]


def _percentiles(values: list[float]) -> list[float]:
    return [round(min(values), 1), round(statistics.median(values), 1), round(max(values), 1)]


def check_dataset(
    root: Path,
    class_names: Sequence[str] | None = None,
    *,
    decode: bool = False,
    pixel_bits: int = 16,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    preset: str = DEFAULT_PRESET,
) -> DatasetReport:
    """Read all of the VOC dataset at ``root`` and report every problem at once.

    ``class_names``: when given, an object of another class is a problem (as for
    ``train --classes``). ``decode``: decode every image's pixels too (finds truncated or
    corrupt image bodies that a header read misses; about 50 ms per 2448x2048 JPEG, spread
    over ``workers`` threads). ``progress``: called with the number of annotations read
    since the last call. ``pixel_bits``: the bits 16-bit images' values use (`train
    --pixel-bits`); with ``decode``, a pixel past them is a problem. ``preset``: the training
    preset whose input size boxes are measured at (`thin_box_warning`; default: train's).
    """
    root = Path(root)
    report = DatasetReport(root=root)
    for folder in ("Annotations", "JPEGImages"):
        if not (root / folder).is_dir():
            hint = missing_folder_hint(root, folder)
            report.problems.append(f"{root / folder}: folder not found (not a VOC dataset?){hint}")
    if report.problems:
        return report

    ids = annotated_ids(root)
    files = image_files(root)
    report.annotations, report.images = len(ids), len(files)  # (ids with an image file)
    nested = nested_note(root)
    if nested is not None:  # (a problem when the top level holds nothing to read)
        (report.problems if not ids or not files else report.warnings).append(nested)
    unread = unread_files_note(root)
    if unread is not None:
        report.warnings.append(unread)
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
    thin = thin_box_warning(list(samples.values()), preset, root / "Annotations")
    if thin is not None:
        report.warnings.append(thin)

    _check_splits(root, report, annotated, samples, class_names)
    if len(report.image_sizes) > 1:
        report.warnings.append(
            f"{root / 'JPEGImages'}: {len(report.image_sizes)} different image sizes; the edge "
            "resizes each as the model was trained, but one camera usually gives one size"
        )
    report.warnings += case_twin_warnings(report.classes, root / "Annotations")
    if class_names is None and report.classes and set(report.classes) != {DEFAULT_CLASS}:
        names = shlex.quote(",".join(sorted(report.classes)))
        report.warnings.append(
            f"{root / 'Annotations'}: classes {names}; the presets train {DEFAULT_CLASS!r} "
            f"alone, so train with --classes {names} (check with --classes the same way)"
        )
    return report


def unannotated_images(
    images: dict[str, Path], annotated: set[str], samples: Iterable[voc.VocSample]
) -> list[tuple[str, Path]]:
    """(id, path) of the ``images`` (`image_ids`) that have no annotation of their name
    (``annotated``: `annotated_ids`) and are not the image of one of ``samples`` through its
    <filename>, by id."""
    used = {sample.image_path.resolve() for sample in samples}
    return [
        (image_id, path)
        for image_id, path in sorted(images.items())
        if image_id not in annotated and path.resolve() not in used
    ]


def _check_images(
    report: DatasetReport,
    files: dict[str, list[Path]],
    annotated: set[str],
    samples: dict[str, voc.VocSample],
) -> None:
    """Images no annotation points at, images two annotations point at, and ids with two
    images (only one of them is used); ``files``: `image_files`."""
    images = _first_of_each(files)
    for image_id, path in unannotated_images(images, annotated, samples.values()):
        twin = voc.normalisation_note(
            report.root / "Annotations", f"{image_id}.xml", looked_for_by=path
        )
        advice = twin or (
            "; a defect-free image needs one with no <object> (`splitdet data split "
            "--write-empty` writes them; add --add when split files exist)"
        )
        report.problems.append(f"{path}: no annotation (Annotations/{image_id}.xml){advice}")
    users: dict[Path, list[str]] = {}
    for image_id, sample in samples.items():
        users.setdefault(sample.image_path.resolve(), []).append(image_id)
    for path, ids in sorted(users.items()):
        if len(ids) > 1:
            report.problems.append(
                f"{path}: the image of {len(ids)} annotations ({', '.join(sorted(ids))}); keep one"
            )
    for image_id, paths in sorted(files.items()):
        used = samples[image_id].image_path if image_id in samples else None
        if used is not None and len(paths) > 1:
            unused = [p.name for p in paths if p.resolve() != used.resolve()]
            report.warnings.append(
                f"{used}: one of {len(paths)} images of id {image_id}; {', '.join(unused)} "
                "never used (an annotation's <filename> chooses among them): remove or rename it"
            )


def _unannotated_id_note(root: Path, image_id: str, annotated: set[str]) -> str:
    """What the "lists ID, which has no annotation" problem adds: the annotation whose name
    differs only in its Unicode normalisation; or, for an id written with its image's
    extension (``a.jpg``) whose stem is annotated, the id to write instead. "" for neither."""
    twin = voc.normalisation_note(root / "Annotations", f"{image_id}.xml")
    stem, suffix = os.path.splitext(image_id)
    if not twin and suffix.lower() in voc.IMAGE_EXTENSIONS and stem in annotated:
        return f"; write the id without its extension: {stem}"
    return twin


def _id_key(name: str) -> str:
    """An id as `_check_filenames` compares them: NFC, any case (tools writing <filename>
    on Windows or macOS may change either)."""
    return unicodedata.normalize("NFC", name).casefold()


def _check_filenames(
    report: DatasetReport, files: dict[str, list[Path]], samples: dict[str, voc.VocSample]
) -> None:
    """Warnings for annotations whose <filename> names another image than the one they are
    paired with (`voc.read_annotation`: their own id's). One naming the image of another id of
    the dataset is the sign of an annotation copied from that image's, boxes and all: one
    warning each. One naming no image of the dataset (a camera's or a tool's own name, often
    harmless): one line for them all. ``files``: `image_files`."""
    ids = {_id_key(image_id): image_id for image_id in files}
    foreign: list[tuple[voc.VocSample, str]] = []  # (sample, the bare name it gives)
    for image_id, sample in sorted(samples.items()):
        named = voc.bare_filename(sample.filename)
        if named is None:
            continue
        own = (_id_key(image_id), _id_key(sample.image_path.stem))
        stem = _id_key(os.path.splitext(named)[0])
        if stem in own or _id_key(named) in own:  # (an id with a dot, written without suffix)
            continue  # its own image, maybe of another extension or case
        annotation = report.root / "Annotations" / f"{image_id}.xml"
        other = ids.get(stem) or ids.get(_id_key(named))
        if other is None:
            foreign.append((sample, named))
            continue
        report.warnings.append(
            f"{annotation}: <filename> names {named}, the image of id {other}, but splitdet "
            f"pairs this annotation with its own image {sample.image_path.name}: copied from "
            f"{other}'s annotation, boxes and all? Check its boxes on {sample.image_path.name}, "
            "then write that name in <filename>"
        )
    if foreign:
        sample, named = foreign[0]
        report.warnings.append(
            f"{report.root / 'Annotations'}: {len(foreign)} annotation(s) name a <filename> "
            f"other than their own image, e.g. {sample.image_id}.xml names {named!r} "
            f"(its image: {sample.image_path.name}); splitdet pairs each annotation with its "
            "own id's image"
        )


def _check_splits(
    root: Path,
    report: DatasetReport,
    annotated: set[str],
    samples: dict[str, voc.VocSample],
    class_names: Sequence[str] | None,
) -> None:
    """Split files: ids without annotation, ids in two splits, what each split holds, classes
    (``class_names``, else the dataset's) with nothing to train on."""
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
            report.problems.append(str(exc))
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
    if val is None and "val" not in unreadable:
        report.warnings.append(
            f"{split_dir / 'val.txt'}: split file not found; training then keeps no best.pt "
            "and `eval --calibrate-split val` cannot set the gate threshold"
        )
    elif val is not None and not val.unreadable and not val.defective:
        report.problems.append(
            f"{split_dir / 'val.txt'}: no defective image, so the gate cannot be calibrated on it"
        )
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
