"""PASCAL VOC detection datasets: read a split, write annotations and split files.

Layout (the standard VOC tree)::

    ROOT/Annotations/{id}.xml
    ROOT/JPEGImages/{id}.jpg          (or .jpeg/.png/.bmp/.tif/.tiff, any case)
    ROOT/ImageSets/Main/{split}.txt   (one image id per line)

Coordinates. VOC stores integer pixel indices, 1-based and inclusive: a box covering only the
top-left pixel is ``xmin=1, xmax=1``. Everything in splitdet uses 0-based *continuous*
coordinates, where pixel ``i`` covers ``[i, i + 1)``, so that box is ``[0, 0, 1, 1]``::

    x1 = xmin - 1    y1 = ymin - 1    x2 = xmax    y2 = ymax        (reading)
    xmin = floor(x1) + 1   ymin = floor(y1) + 1   xmax = ceil(x2)   ymax = ceil(y2)   (writing)

Writing rounds outwards, so the written box always contains the continuous one; integer boxes
round-trip exactly. When reading, ``xmin=0``/``ymin=0`` (written by some 0-based tools) is
accepted and clamped to 0, and so is a coordinate past the image by floating-point noise (up to
`EDGE_TOLERANCE_PX`, e.g. ``xmax=320.00000000000006`` in a 320 px wide image, from a tool that
scales its boxes), clamped to the image's edge; anything further past the image size or
degenerate (``x2 <= x1``) is an error.

A missing ``<size>`` is read like ``<size>`` 0x0, which some tools write: the size is then the
image header's. `read_annotation` is the one reader of annotations: ``data check``, ``train``
and ``eval`` all go through it.

An annotation with no ``<object>`` is a defect-free image. Every problem with the input raises
`VocError` (a `ValueError`) whose message starts with the offending file's path.

Images are read as the edge reads them (`splitdet.edge.preprocess`): the Pillow modes it takes,
converted the way it converts them; every other mode (float "F" TIFFs, Lab, HSV...) and every
multi-frame file is a `VocError`, from the header read already, so that nothing is trained or
evaluated on pixels the deployed model would never be given.

This module reads and writes split files and reads a whole split; the rest lives beside it, one
job a module, and is re-exported from here (`__all__`): the values and `VocError`
(`voc_types`), file names and image ids (`voc_names`), an annotation's XML (`voc_xml`), image
headers and decoding (`voc_image`), reading and writing one annotation (`voc_annotations`).

Only the standard library and Pillow at import time; the edge's torch-free `preprocess` (numpy)
loads when the first image is read. No torch.
"""

from __future__ import annotations

import codecs
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from splitdet.shared.atomic_file import atomic_write
from splitdet.training.voc_annotations import (
    EDGE_TOLERANCE_PX,
    annotation_xml,
    read_annotation,
    write_annotation,
)
from splitdet.training.voc_image import (
    EXIF_ORIENTATION,
    ORIENTATION_SHOWN,
    PAST_THE_BITS,
    image_size,
    load_rgb,
    load_rgb_and_peak,
)
from splitdet.training.voc_names import (
    bare_filename,
    id_problem,
    normalisation_note,
    normalisation_twin,
)
from splitdet.training.voc_types import IMAGE_EXTENSIONS, VocError, VocObject, VocSample
from splitdet.training.voc_xml import MAX_ANNOTATION_BYTES, _parse_xml, _text

#: What callers import from here, wherever it is defined.
__all__ = [
    "EDGE_TOLERANCE_PX",
    "EXIF_ORIENTATION",
    "IMAGE_EXTENSIONS",
    "MAX_ANNOTATION_BYTES",
    "ORIENTATION_SHOWN",
    "PAST_THE_BITS",
    "VocError",
    "VocObject",
    "VocSample",
    "annotation_xml",
    "bare_filename",
    "check_hint",
    "class_names_of",
    "evenly_spaced",
    "id_problem",
    "image_size",
    "load_rgb",
    "load_rgb_and_peak",
    "normalisation_note",
    "normalisation_twin",
    "read_annotation",
    "read_split",
    "read_split_ids",
    "read_split_lines",
    "write_annotation",
    "write_split",
]


def check_hint(exc: Exception, root: Path | str) -> str:
    """``exc``'s message and the command that lists every problem of the dataset at once
    (train and eval stop at the first)."""
    message = str(exc)
    if "unknown class" in message:
        return f"{message} (give every class the dataset holds with --classes A,B)"
    # (`load_rgb`'s words; the edge's reader, which eval reads images with, says the other)
    # (and the edge's words for a file whose decoder filled its missing part in)
    found_by_decoding = (
        r"cannot (decode image|be decoded)|ends early or is damaged|decoded as black"
    )
    decode = " --decode" if re.search(found_by_decoding, message) else ""
    bits = PAST_THE_BITS.search(message)
    if bits:  # only a decoding with the same bits finds the others
        decode = f" --decode --pixel-bits {bits[1]}"
    command = f"splitdet data check {shlex.quote(str(root))}{decode}"
    return f"{message} (`{command}` lists every problem at once)"


# --------------------------------------------------------------------------------------- reading


def _split_file(root: Path, split: str) -> Path:
    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"


def read_split_ids(root: Path, split: str) -> list[str]:
    """The image ids listed in ``ImageSets/Main/{split}.txt`` (first token of each line);
    `VocError` for the first line that lists none (`read_split_lines`)."""
    ids, problems, _ = read_split_lines(root, split)
    if problems:
        raise VocError(problems[0])
    return ids


def read_split_lines(root: Path, split: str) -> tuple[list[str], list[str], int]:
    """(The image ids ``ImageSets/Main/{split}.txt`` lists, the first token of each line, each
    once, in order; a problem line, "FILE:LINE: ...", for every line whose token is no id (a
    path, ``.``, ``..``) or repeats one listed before; how many of them list no id: which
    image those meant is not known, where a repeat's is). All whole, so that ``data check``
    reports every bad line at once; `VocError` only when the file cannot be read, saying so
    and how to save it as UTF-8 for UTF-16 text (`_is_utf16`), for every command reading it."""
    path = _split_file(root, split)
    if not path.is_file():
        raise VocError(f"{path}: split file not found (no split {split!r} under {root})")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VocError(f"{path}: cannot read split file: {exc}") from exc
    if _is_utf16(data):
        raise VocError(
            f"{path}: cannot read split file: it is UTF-16 text (as PowerShell's `>` writes "
            "it), and splitdet reads split files as UTF-8: save it as UTF-8 (in PowerShell, "
            "write it with `Set-Content -Encoding utf8` or `Out-File -Encoding utf8` instead "
            "of `>`; in an editor, save it with the encoding UTF-8)"
        )
    try:
        text = data.decode("utf-8-sig")  # Windows editors may start with a BOM
    except UnicodeDecodeError as exc:
        raise VocError(f"{path}: cannot read split file: {exc}") from exc
    ids: list[str] = []
    problems: list[str] = []
    seen: set[str] = set()
    no_id = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        image_id = fields[0]
        if "/" in image_id or "\\" in image_id or image_id in (".", ".."):
            problems.append(f"{path}:{lineno}: {id_problem(image_id)}")
            no_id += 1
        elif image_id in seen:
            problems.append(f"{path}:{lineno}: image id {image_id!r} listed twice")
        else:
            seen.add(image_id)
            ids.append(image_id)
    return ids, problems, no_id


def _is_utf16(data: bytes) -> bool:
    """Whether a split file's bytes are UTF-16 text: a UTF-16 byte-order mark (PowerShell 5's
    ``>`` and ``Out-File``), or none and NUL bytes where UTF-16 puts the zero half of the ids'
    ASCII characters (every other byte of the first 512, the most of one parity). UTF-8 text
    holds no NUL byte; read as UTF-8, the first is a codec error ("can't decode byte 0xff"),
    the second ids like ``'i\\x00m\\x00g'``."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    head = data[:512]
    if b"\x00" not in head:
        return False
    even, odd = head[0::2].count(0), head[1::2].count(0)
    return max(even, odd) * 2 >= len(head) // 2 and min(even, odd) < max(even, odd)


def read_split(
    root: Path,
    split: str,
    class_names: Sequence[str] | None = None,
    *,
    check_images: bool = True,
) -> list[VocSample]:
    """Read every sample of ``split`` (e.g. ``"train"``) from the VOC tree at ``root``.

    ``class_names``: when given, an object whose class is not in it is an error (VOC datasets
    with extra classes should be listed in full). ``check_images``: compare each annotation's
    ``<size>`` with the image file's header, and refuse an image whose EXIF orientation tag has
    tools show it turned or mirrored (cheap: no pixels are decoded).
    Raises `VocError` naming the file for any malformed or inconsistent input.
    """
    root = Path(root)
    return [
        read_annotation(root, image_id, class_names, check_image=check_images)
        for image_id in read_split_ids(root, split)
    ]


def evenly_spaced(samples: list, n: int | None) -> list:
    """``n`` items spread evenly over ``samples`` (all of them when ``n`` is None or too big)."""
    if n is None or n >= len(samples):
        return samples
    step = len(samples) / n
    return [samples[int(i * step)] for i in range(n)]


def class_names_of(root: Path) -> list[str]:
    """Sorted unique object class names over every annotation under ``root/Annotations``."""
    folder = Path(root) / "Annotations"
    if not folder.is_dir():
        raise VocError(f"{folder}: annotations folder not found")
    names: set[str] = set()
    for path in sorted(folder.glob("*.xml")):
        ann = _parse_xml(path)
        for k, obj in enumerate(ann.findall("object")):
            names.add(_text(path, obj, "name", f"<object> #{k + 1}"))
    return sorted(names)


# --------------------------------------------------------------------------------------- writing


def split_line_tails(root: Path, split: str) -> dict[str, str]:
    """What the lines of ``ImageSets/Main/{split}.txt`` hold after their id, by id, for the
    lines that hold more (VOC's per-class lists, ``scratch_train.txt``: ``img_000  1``), as
    written (`write_split` puts it back). Read after `read_split_lines` found the file sound."""
    text = _split_file(root, split).read_text(encoding="utf-8-sig")
    tails = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        image_id = stripped.split()[0]
        tail = stripped[len(image_id) :]  # (" 1", "  -1": its spacing kept)
        if tail:
            tails.setdefault(image_id, tail)
    return tails


def write_split(
    root: Path, split: str, ids: Iterable[str], tails: Mapping[str, str] | None = None
) -> Path:
    """Write ``ROOT/ImageSets/Main/{split}.txt`` with one id per line, followed by its text in
    ``tails`` if any (`split_line_tails`); returns its path."""
    ids = list(ids)
    tails = tails or {}
    for image_id in ids:
        problem = id_problem(image_id)
        if problem is not None:
            raise ValueError(f"{problem}, for split {split!r}")
    path = _split_file(Path(root), split)
    atomic_write(path, "".join(f"{i}{tails.get(i, '')}\n" for i in ids).encode("utf-8"))
    return path
