"""What the boxes of a PASCAL VOC dataset would teach a model, for `voc_check.check_dataset`,
`splitdet train` and its pre-run checks.

Boxes too thin to see once images are scaled to a preset's input size (`model_input`,
`input_scale_text`, `thin_box_warning`), images too elongated to scale to it at all
(`too_elongated`), boxes per class (`class_boxes`, `trained_boxes`)
and the classes left with none to train on (`untrained_class_warning`), class names that
differ only in case or Unicode normalisation (`case_twin_warnings`), names that cannot be given
in ``--classes`` (`comma_class_problems`) and the ``--classes`` to give (`classes_option`).

Only the standard library, `voc` and the edge's torch-free `preprocess`: no torch.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from splitdet.edge.preprocess import ImageError, input_scale, resized_size
from splitdet.training import voc
from splitdet.training.voc_annotations import unicode_twin, unicode_twin_text
from splitdet.training.voc_check_images import annotated_ids

__all__ = [
    "case_twin_warnings",
    "class_boxes",
    "classes_option",
    "comma_class_problems",
    "input_scale_text",
    "model_input",
    "refuse_too_elongated",
    "thin_box_warning",
    "too_elongated",
    "trained_boxes",
    "untrained_class_warning",
]

#: A box whose short side is under this many px once its image is scaled to the model's
#: input is hard to see for the detector (a 2 px scratch in a 2448x2048 image is 0.5 px at the
#: cpu preset's 612x512).
THIN_AT_INPUT_PX = 2.0
#: Share of the boxes thin at the input that `thin_box_warning` warns of: one defect in twenty
#: the model can hardly see is a share a user would want to know of.
THIN_SHARE = 0.05


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


def too_elongated(samples: Iterable[voc.VocSample], min_size: int, max_size: int) -> list[str]:
    """One line per image of ``samples`` that a model's input would shrink to under 1 px on a
    side (a 2000x1 image at the tiny preset's 128/160): its path and the edge's words for it
    (`preprocess.resized_size`, which refuses it as it reads). Training on one ended in
    torch's traceback ("Input and output sizes should be greater than 0") mid-epoch."""
    lines = []
    for sample in samples:
        try:
            resized_size(sample.height, sample.width, min_size, max_size)
        except ImageError as exc:
            lines.append(f"{sample.image_path}: {exc}")
    return lines


def refuse_too_elongated(
    samples: Iterable[voc.VocSample], min_size: int, max_size: int, where: Path, reader: str
) -> None:
    """Raise ValueError when a command would read ``samples`` at a model's input (``reader``:
    e.g. "the model's input size") and some are too elongated for it (`too_elongated`),
    each image once however many times the splits list it. The message starts with
    ``where`` (the split), names the first three and how many more, and says what to do."""
    unique = {sample.image_path: sample for sample in samples}
    lines = too_elongated(unique.values(), min_size, max_size)
    if not lines:
        return
    more = f"; and {len(lines) - 3} more" if len(lines) > 3 else ""
    raise ValueError(
        f"{where}: {len(lines)} image(s) cannot be read at {reader}: {'; '.join(lines[:3])}"
        f"{more}; take them out of the split (the edge refuses such images too)"
    )


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
    strongly (and, for a name the annotations spell in another Unicode form, says so:
    `_spelt_otherwise`); None when not known. ``partly_read``: some annotations could not be
    read, and the counts are of the others. None when every class has a box to train on.

    Leaving a class held elsewhere out of --classes makes train and eval refuse its objects
    as of an unknown class: the warning says to relabel or remove them too, and, knowing
    ``in_dataset``, names the annotations under ROOT that hold them (`_annotations_holding`,
    which reads them)."""
    missing = [name for name in class_names if not trained.get(name)]
    if not missing:
        return None
    nowhere = [] if in_dataset is None else [n for n in missing if not in_dataset.get(n)]
    elsewhere = [n for n in missing if n not in nowhere]
    parts = []
    if nowhere:
        parts.append(_nowhere_text(nowhere, in_dataset or {}, train_file.parents[2]))
    if elsewhere:
        parts.append(_elsewhere_text(elsewhere, in_dataset, train_file.parents[2]))
    read = " (counting the annotations that could be read)" if partly_read else ""
    return f"{train_file}: {'; and '.join(parts)}{read}"


def _nowhere_text(nowhere: Sequence[str], in_dataset: Mapping[str, int], root: Path) -> str:
    """`untrained_class_warning`'s words for the classes the dataset holds no box of, and
    for each the dataset's class it differs from only in its Unicode form, if any
    (`_spelt_otherwise`: typed on a Mac, it prints as the annotations' name)."""
    one = len(nowhere) == 1
    it = "it" if one else "them"
    twins = _spelt_otherwise(nowhere, in_dataset, root)
    alike = "".join(f"; but {unicode_twin_text(n, twins[n])}" for n in nowhere if n in twins)
    return (
        f"{'class' if one else 'classes'} {_quoted(nowhere)} {'is' if one else 'are'} in no "
        f"annotation of the dataset at all: the model will never learn to detect {it}; "
        f"remove {it} from --classes, or label some{alike}"
    )


def _spelt_otherwise(
    names: Sequence[str], in_dataset: Mapping[str, int], root: Path
) -> dict[str, str]:
    """``{name: the dataset's class it differs from only in its Unicode form}`` for those of
    ``names`` that have one (`voc_annotations.unicode_twin`). ``in_dataset`` may leave out
    the annotations refused for naming that class (`data check --classes` counts the
    annotations it could read with them): for a non-ASCII name it has no twin of, every
    annotation under ``root`` is read for one (`class_boxes`)."""
    twins = {n: twin for n in names if (twin := unicode_twin(n, in_dataset)) is not None}
    if any(n not in twins and not n.isascii() for n in names):
        every, _ = class_boxes(root)
        twins.update(
            {n: twin for n in names if n not in twins and (twin := unicode_twin(n, every))}
        )
    return twins


def _elsewhere_text(
    elsewhere: Sequence[str], in_dataset: Mapping[str, int] | None, root: Path
) -> str:
    """`untrained_class_warning`'s words for the classes the dataset holds boxes of outside
    the train split's trained ones: the two ways to fix it, the second (leaving them out of
    --classes) with the objects to relabel or remove, and where (with ``in_dataset``)."""
    one = len(elsewhere) == 1
    it, its = ("it", "its") if one else ("them", "their")
    held = ""
    where = "in the annotations"
    if in_dataset is not None:
        counts = ", ".join(f"{in_dataset[n]} {n!r}" for n in elsewhere)
        held = (
            f" (the dataset holds {counts} elsewhere: in val, test, in no split, or marked "
            "difficult, which training skips)"
        )
        where = _holding_text(elsewhere, _annotations_holding(root, elsewhere), root)
    return (
        f"no box of {'class' if one else 'classes'} {_quoted(elsewhere)} to train "
        f"on{held}: the model will not learn to detect {it}; list images holding {it} in "
        f"train.txt (`splitdet data split {shlex.quote(str(root))} --overwrite` gives each "
        f"split its share of every class), or leave {it} out of --classes and relabel or "
        f"remove {its} objects {where} (train and eval refuse an object of a class --classes "
        "does not name)"
    )


#: How many annotation files `_holding_text` names per class.
NAMED_FILES = 3


def _annotations_holding(root: Path, names: Sequence[str]) -> dict[str, list[str]]:
    """``{class: the names of the annotation files under ROOT/Annotations holding an object
    of it}`` (difficult ones too), for each of ``names``, in name order; annotations that
    cannot be read are skipped. Reads no image."""
    wanted = set(names)
    holding: dict[str, list[str]] = {name: [] for name in names}
    for image_id in annotated_ids(root):
        try:
            sample = voc.read_annotation(root, image_id, None, check_image=False)
        except voc.VocError:
            continue
        for name in {obj.name for obj in sample.objects} & wanted:
            holding[name].append(f"{image_id}.xml")
    return holding


def _holding_text(names: Sequence[str], holding: Mapping[str, list[str]], root: Path) -> str:
    """ "in ROOT/Annotations: img_1.xml, img_2.xml, img_3.xml and 5 more" (each of ``names``
    with its files when there are several); "in the annotations" when none was found."""
    per_class = []
    for name in names:
        files = holding.get(name) or []
        if not files:
            continue
        more = f" and {len(files) - NAMED_FILES} more" if len(files) > NAMED_FILES else ""
        shown = f"{', '.join(files[:NAMED_FILES])}{more}"
        per_class.append(shown if len(names) == 1 else f"{name!r} in {shown}")
    if not per_class:
        return "in the annotations"
    return f"in {root / 'Annotations'}: {'; '.join(per_class)}"


def _twin_key(name: str) -> str:
    """A class name as a person reads it: NFC (macOS writes names NFD, ``a`` + a combining
    diaeresis for ``ä``: printed alike, another string), any case."""
    return unicodedata.normalize("NFC", name).casefold()


def _twin_text(names: Sequence[str], classes: Mapping[str, int], where: Path) -> str:
    """The warning line of one group of class names that `_twin_key` makes one."""
    boxes = ", ".join(f"{classes[n]} box(es)" for n in names)
    trains = f"they train as {len(names)} classes; "
    if len({unicodedata.normalize("NFC", n) for n in names}) == 1:  # alike but for the bytes
        forms = " and ".join(f"{n!a} ({_form(n)})" for n in names)
        return (
            f"{where}: classes {' and '.join(repr(n) for n in names)} differ only in Unicode "
            f"normalisation, {forms} ({boxes}): they print alike but {trains}make them one: "
            f"write the name the same way in every annotation (NFC, as "
            f"{unicodedata.normalize('NFC', names[0])!a}; macOS tools may write NFD)"
        )
    how = "case" if len({n.casefold() for n in names}) == 1 else "case and Unicode normalisation"
    return (
        f"{where}: classes {' and '.join(repr(n) for n in names)} differ only in {how} "
        f"({boxes}): {trains}if they are one, give them one name in the annotations"
    )


def _form(name: str) -> str:
    """ "NFC", "NFD" or "mixed": the Unicode normalisation form ``name`` is written in."""
    for form in ("NFC", "NFD"):
        if unicodedata.is_normalized(form, name):
            return form
    return "mixed"


def case_twin_warnings(classes: Mapping[str, int], where: Path) -> list[str]:
    """One warning per group of class names that differ only in case (``Scratch`` and
    ``scratch``: usually a labelling slip, but two classes to train) or in Unicode
    normalisation (``Kratzer-ä`` NFC and NFD, from a Mac: printed alike, two classes), with
    their box counts; each names the spellings (NFD ones escaped: they print as NFC)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(classes):
        groups.setdefault(_twin_key(name), []).append(name)
    return [_twin_text(names, classes, where) for names in groups.values() if len(names) > 1]


#: A comma and the spaces around it, in a class name (`comma_class_problems`'s rename example).
_COMMA = re.compile(r"\s*,\s*")


def comma_class_problems(classes: Mapping[str, int], where: Path) -> list[str]:
    """One problem line per class name holding a comma (``scratch, deep``: labelling tools
    allow it), which ``--classes`` (comma-separated) cannot name: such a class can never be
    trained, and the ``--classes`` to suggest does not exist until it is renamed."""
    return [
        f"{where}: class {name!r} ({classes[name]} box(es)) holds a comma, which cannot be given "
        "in --classes (commas separate the names there), so it can never be trained: rename it "
        f"in the annotations, e.g. {_COMMA.sub('-', name)!r}"
        for name in sorted(classes)
        if "," in name
    ]


def classes_option(names: Iterable[str]) -> str | None:
    """The ``--classes`` value naming ``names``, shell-quoted (``'Pit mark,dent'``); None when
    one of them holds a comma (`comma_class_problems`): no value can name it, or when two differ
    only in Unicode normalisation (`case_twin_warnings`): the value would print one name twice
    and train two classes."""
    names = sorted(names)
    nfc = {unicodedata.normalize("NFC", name) for name in names}
    if any("," in name for name in names) or len(nfc) < len(names):
        return None
    return shlex.quote(",".join(names))
