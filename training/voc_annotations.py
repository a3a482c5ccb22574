"""Reading one VOC annotation into a `VocSample` (its image located, its ``<size>`` checked
against the image header, its boxes converted to 0-based continuous coordinates) and writing a
`VocSample` as an annotation; see `splitdet.training.voc` for the coordinate conventions.

Part of `splitdet.training.voc`, which re-exports the public names; no torch.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.regular_file import file_kind
from splitdet.training.voc_image import ORIENTATION_SHOWN, _image_header, _orientation_problem
from splitdet.training.voc_names import _form, bare_filename, normalisation_note
from splitdet.training.voc_rotation import rotated_box, rotation_degrees
from splitdet.training.voc_types import IMAGE_EXTENSIONS, VocError, VocObject, VocSample
from splitdet.training.voc_xml import _box, _flag, _number, _parse_xml, _text

# --------------------------------------------------------------------------------------- reading


#: How far (px) a box coordinate may lie past the image and still be read, clamped to its edge.
#: Tools that scale boxes write floating-point noise (``320.00000000000006`` for 320; double
#: rounding at 10000 px is ~2e-12 px), and clamping by 0.01 px moves a box by 1/100 of a pixel,
#: which nothing downstream can see; a coordinate one pixel past the image (an off-by-one of a
#: 0-based tool, a <size> that is not the image's) is a real mistake and stays refused. An
#: absolute tolerance, not a relative one: the noise a scaling leaves is far below it at any
#: image size the edge takes.
EDGE_TOLERANCE_PX = 0.01
#: Extensions of files that are JPEGs under another name (Windows saves some as ``.jfif``).
JPEG_ALIASES = (".jfif", ".jpe")


def _image_candidates(root: Path, image_id: str, filename: str | None) -> Iterator[Path]:
    """The paths the image of annotation `image_id` may have, in the order they are tried:
    the one its <filename> names when that is a bare name of this id (``ID.png`` beside an
    ``ID.jpg``: the annotation says which), ``JPEGImages/ID.EXT`` for each extension, any
    other case of the extension (``.Jpg``; listed only when the usual names are missing), then
    <filename>'s bare name in JPEGImages (`bare_filename`) when its extension is one of
    `IMAGE_EXTENSIONS` (the ones the edge's hot folder, `data check` and `data split` take: a
    ``.webp`` Pillow decodes is refused, `_unread_format`). Not all of them exist."""
    folder = Path(root) / "JPEGImages"
    if filename and Path(filename).name == filename and Path(filename).stem == image_id:
        named = folder / filename
        if named.suffix.lower() in IMAGE_EXTENSIONS:
            yield named
    for ext in IMAGE_EXTENSIONS:
        yield folder / f"{image_id}{ext}"
        yield folder / f"{image_id}{ext.upper()}"
    for candidate in sorted(folder.glob(f"{glob.escape(image_id)}.*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS:
            yield candidate
    base = bare_filename(filename)
    # its bare name, in JPEGImages: never a path elsewhere (tools write "images/x.jpg")
    if base and Path(base).suffix.lower() in IMAGE_EXTENSIONS:
        yield folder / base


def _find_image(root: Path, image_id: str, filename: str | None) -> Path | None:
    """The image of annotation `image_id`: the first of `_image_candidates` that is a regular
    file (a symbolic link to one counts), else None."""
    return next((p for p in _image_candidates(root, image_id, filename) if p.is_file()), None)


def _not_a_file(root: Path, image_id: str, filename: str | None) -> tuple[Path, str] | None:
    """(The first of `_image_candidates` that exists but is no regular file, what it is: "a
    FIFO", "a folder", "a broken symbolic link"...), for the message of an image not found:
    ``x.jpg`` is there, listed, and "no x.jpg" would send the user looking for a missing
    file. None when there is none (the image is missing)."""
    for path in _image_candidates(root, image_id, filename):
        if not os.path.lexists(path):
            continue
        try:
            mode = path.stat().st_mode
        except OSError:  # a link to nothing, or a loop of links
            return path, "a broken symbolic link"
        return path, file_kind(mode)
    return None


def read_annotation(
    root: Path,
    image_id: str,
    class_names: Sequence[str] | None = None,
    *,
    check_image: bool = True,
) -> VocSample:
    """Read ``Annotations/{image_id}.xml`` and locate its image; see `read_split`."""
    return read_annotation_document(root, image_id, class_names, check_image=check_image)[0]


def read_annotation_document(
    root: Path,
    image_id: str,
    class_names: Sequence[str] | None = None,
    *,
    check_image: bool = True,
) -> tuple[VocSample, ET.Element]:
    """`read_annotation`, and the XML document it read (its root element, as written)."""
    root = Path(root)
    path = root / "Annotations" / f"{image_id}.xml"
    ann = _parse_xml(path)

    filename = (ann.findtext("filename") or "").strip() or None
    image_path = _find_image(root, image_id, filename)
    if image_path is None:
        raise _image_not_found(root, path, image_id, filename)

    size = ann.find("size")
    if size is None:  # read like <size> 0x0: the size is the image header's
        width_f = height_f = 0.0
    else:
        width_f = _number(path, size, "width", "<size>")
        height_f = _number(path, size, "height", "<size>")
    if width_f != int(width_f) or height_f != int(height_f) or width_f < 0 or height_f < 0:
        raise VocError(f"{path}: <size> must hold non-negative integers, got {width_f}x{height_f}")
    width, height = int(width_f), int(height_f)
    unsized = width == 0 or height == 0  # some tools write 0: the size is the image header's
    if unsized or check_image:
        actual, orientation = _image_header(image_path, path)
        # an annotation without boxes places nothing on the pixels: a turned view's size is
        # no mistake there (what `data split --write-empty` writes for such an image)
        boxless_turned = orientation in ORIENTATION_SHOWN and ann.find("object") is None
        mismatch = not unsized and actual != (width, height)
        if boxless_turned and (width, height) == actual[::-1]:
            mismatch = False
        said = f"<size> says {width}x{height} but " if mismatch else ""
        if orientation in ORIENTATION_SHOWN and not boxless_turned:  # a tool showed other
            # pixels than training reads, under the boxes
            raise VocError(
                f"{path}: {said}{image_path.name} is {actual[0]}x{actual[1]} px: "
                f"{_orientation_problem(image_path, orientation)}"
            )
        if mismatch:
            raise VocError(f"{path}: {said}{image_path.name} is {actual[0]}x{actual[1]}")
        width, height = actual

    known = None if class_names is None else set(class_names)
    objects: list[VocObject] = []
    rotated = clipped = 0
    for k, obj in enumerate(ann.findall("object")):
        where = f"<object> #{k + 1}"
        name = _text(path, obj, "name", where)
        if known is not None and name not in known:
            twin = unicode_twin(name, known)
            alike = "" if twin is None else f": {unicode_twin_text(twin, name)}"
            raise VocError(
                f"{path}: {where} has unknown class {name!r} (expected one of "
                f"{', '.join(sorted(known))}){alike}"
            )
        difficult = _flag(path, obj, "difficult", where)
        xmin, ymin, xmax, ymax = _box(path, obj, where)
        box = (
            f"box xmin={_coordinate(xmin)} ymin={_coordinate(ymin)} xmax={_coordinate(xmax)} "
            f"ymax={_coordinate(ymax)}"
        )
        degrees = rotation_degrees(path, obj, where)
        if degrees is not None:  # CVAT's rotated rectangle: its unrotated box and the angle
            if xmax <= xmin - 1.0 or ymax <= ymin - 1.0:  # (|w cos| would make it a box)
                raise VocError(_empty_box(path, where, box))
            # the box around it, clipped to the image (the rotated corners a tool lets past
            # its edge are no mistake of the annotator's); `rotated_box_warnings` says so
            (x1, y1, x2, y2), cut = rotated_box((xmin, ymin, xmax, ymax), degrees, width, height)
            if x2 <= x1 or y2 <= y1:
                raise VocError(
                    f"{path}: {where} {box} rotated by {degrees:g}° lies outside the "
                    f"{width}x{height} image"
                )
            rotated, clipped = rotated + 1, clipped + cut
        else:
            past = _past_the_image(xmin, ymin, xmax, ymax, width, height)
            if past:
                raise VocError(
                    f"{path}: {where} {box} lies outside the {width}x{height} image ({past}, "
                    f"by more than the {EDGE_TOLERANCE_PX} px read as rounding noise); correct "
                    "the box in the annotation tool, or the <size> if it is not the image's"
                )
            # within the tolerance: clamped to the image (and xmin=0 of 0-based tools to 0)
            x1, y1 = max(xmin - 1.0, 0.0), max(ymin - 1.0, 0.0)
            x2, y2 = min(xmax, float(width)), min(ymax, float(height))
        if x2 <= x1 or y2 <= y1:
            raise VocError(_empty_box(path, where, box))
        objects.append(VocObject(name=name, box=(x1, y1, x2, y2), difficult=difficult))
    sample = VocSample(
        image_id=image_id,
        image_path=image_path,
        width=width,
        height=height,
        objects=tuple(objects),
        filename=filename,
        rotated=(rotated, clipped),
    )
    return sample, ann


def _image_not_found(root: Path, path: Path, image_id: str, filename: str | None) -> VocError:
    """The error of annotation ``path`` (of ``image_id``, <filename> ``filename``) whose image
    `_find_image` did not find: what lies where it looked (no regular file, a file of an
    extension splitdet does not read), else what was looked for and a file whose name differs
    only in its Unicode form or in case."""
    special = _not_a_file(root, image_id, filename)
    if special is not None:
        return VocError(
            f"{path}: image file {special[0]}: not a regular file ({special[1]}); put the "
            "image itself there"
        )
    folder = root / "JPEGImages"
    unread = _unread_format(folder, image_id, filename)
    if unread is not None:
        return VocError(f"{path}: {unread}")
    twin = normalisation_note(folder, image_id, IMAGE_EXTENSIONS, looked_for_by=path)
    if not twin and filename and Path(filename).name == filename:
        twin = normalisation_note(folder, filename)  # the <filename> it would fall back to
    if not twin:
        twin = _case_note(folder, image_id, bare_filename(filename))
    return VocError(
        f"{path}: image file not found: no {folder / image_id}"
        f"{{{','.join(IMAGE_EXTENSIONS)}}}{twin}"
    )


def _unread_format(folder: Path, image_id: str, filename: str | None) -> str | None:
    """What to say of an image in ``folder``, named by the <filename> ``filename`` or of the
    stem ``image_id``, of an extension that is not one of `IMAGE_EXTENSIONS` (``x.webp``,
    ``x.jfif``), and what to do; None when there is none. Pillow decodes such files, but the
    edge's hot folder takes none by default, and `data check`, `data split --write-empty` and
    `edge collect` know images by those extensions only: one list of extensions for all."""
    same_stem = [n for n in _stem_in_any_case(folder, image_id) if Path(n).stem == image_id]
    for base in (bare_filename(filename), *same_stem):
        suffix = Path(base or "").suffix.lower()
        if not base or suffix in (*IMAGE_EXTENSIONS, ".xml") or not (folder / base).is_file():
            continue
        if suffix in JPEG_ALIASES:
            fix = f"it is a JPEG: rename it {Path(base).stem}.jpg (and the name in <filename>)"
        else:
            fix = "convert it to .png (lossless) or .jpg (and the name in <filename>)"
        kind = f"a {suffix} file" if suffix else "a file without an extension"
        return (
            f"its image {folder / base} is {kind}: splitdet trains on "
            f"{', '.join(IMAGE_EXTENSIONS)} files only (those the edge's hot folder takes by "
            f"default); {fix}"
        )
    return None


@functools.lru_cache(maxsize=8)
def _names_by_case(folder: str, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    """``{casefolded stem: the names of that stem}`` of the files in ``folder``, as listed when
    its mtime was ``mtime_ns`` (a new mtime lists it again): a dataset whose every name differs
    in case is listed once, not once per annotation."""
    index: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        index.setdefault(Path(name).stem.casefold(), []).append(name)
    return {key: tuple(names) for key, names in index.items()}


def _stem_in_any_case(folder: Path, stem: str) -> tuple[str, ...]:
    """The names of the files in ``folder`` whose stem is ``stem`` in any case
    (`_names_by_case`); none when it cannot be listed."""
    try:
        index = _names_by_case(str(folder), os.stat(folder).st_mtime_ns)
    except OSError:
        return ()
    return index.get(stem.casefold(), ())


def _case_note(folder: Path, image_id: str, base: str | None) -> str:
    """What an "image file not found" message appends when ``folder`` has an image of
    ``image_id`` (an image extension), or a file named ``base`` (the <filename>'s bare name),
    whose name differs from it in case alone: "; JPEGImages has NAME, which differs only in
    case: rename one"; "" when it has none."""
    wanted = [(image_id, None), *([(Path(base).stem, base)] if base else [])]
    for stem, full in wanted:
        for name in _stem_in_any_case(folder, stem):
            if full is None:
                matches = Path(name).stem != stem and Path(name).suffix.lower() in IMAGE_EXTENSIONS
            else:
                matches = name != full and name.casefold() == full.casefold()
            if matches and (folder / name).is_file():
                return (
                    f"; {folder.name} has {name}, which differs only in case: rename one (a "
                    "Linux file system tells them apart, Windows and macOS do not)"
                )
    return ""


def unicode_twin(name: str, names: Iterable[str]) -> str | None:
    """The one of ``names`` that is ``name`` once both are NFC-normalised, but not ``name``
    itself: the same class name typed in another Unicode form (a Mac writes ``e`` + a combining
    accent for ``é``), which prints alike. None when there is none (always for ASCII)."""
    if name.isascii():
        return None
    wanted = unicodedata.normalize("NFC", name)
    return next(
        (n for n in sorted(names) if n != name and unicodedata.normalize("NFC", n) == wanted),
        None,
    )


def unicode_twin_text(typed: str, spelt: str) -> str:
    """What to say of ``typed`` (a name given in --classes, or a model's class) that differs
    from the annotations' class ``spelt`` only in its Unicode form: both escaped (printed, they
    look alike), their forms, and to type it as the annotations spell it. Names differing so
    are two classes: never normalised silently."""
    return (
        f"{typed!a} differs from the class {spelt!a} only in its Unicode form ({_form(typed)} "
        f"against {_form(spelt)}): type it as the annotations spell it"
    )


def _empty_box(path: Path, where: str, box: str) -> str:
    """The problem of a box whose max lies before its min (swapped corners, as a script
    writing x, y, w, h or the corners in another order leaves), and the fix."""
    return (
        f"{path}: {where} {box} is empty (max < min): xmax must be at least xmin and ymax at "
        "least ymin; correct the box in the annotation tool (or the script that wrote it: "
        "corners swapped, or a width and height written as xmax and ymax?)"
    )


def _coordinate(value: float) -> str:
    """A coordinate as an error message shows it: integers plainly (``320``), anything else
    with every digit it holds (``320.00000000000006``, not ``:g``'s ``320``), so that the
    message shows why it was refused."""
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


def _past_the_image(
    xmin: float, ymin: float, xmax: float, ymax: float, width: int, height: int
) -> str:
    """Which of a VOC box's coordinates lie past a ``width`` x ``height`` image by more than
    `EDGE_TOLERANCE_PX` (e.g. "xmax 321 > width 320"), joined by ", "; "" when none does."""
    tol = EDGE_TOLERANCE_PX
    past = []
    if xmin < -tol:
        past.append(f"xmin {_coordinate(xmin)} < 0")
    if ymin < -tol:
        past.append(f"ymin {_coordinate(ymin)} < 0")
    if xmax > width + tol:
        past.append(f"xmax {_coordinate(xmax)} > width {width}")
    if ymax > height + tol:
        past.append(f"ymax {_coordinate(ymax)} > height {height}")
    return ", ".join(past)


# --------------------------------------------------------------------------------------- writing


def _voc_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    xmin = min(max(math.floor(x1) + 1, 1), max(width, 1))
    ymin = min(max(math.floor(y1) + 1, 1), max(height, 1))
    xmax = min(max(math.ceil(x2), xmin), width)
    ymax = min(max(math.ceil(y2), ymin), height)
    return xmin, ymin, xmax, ymax


def annotation_xml(sample: VocSample) -> bytes:
    """The standard VOC annotation document for ``sample``, as UTF-8 bytes."""

    def sub(parent: ET.Element, tag: str, text: object | None = None) -> ET.Element:
        elem = ET.SubElement(parent, tag)
        if text is not None:
            elem.text = str(text)
        return elem

    ann = ET.Element("annotation")
    sub(ann, "folder", "JPEGImages")
    sub(ann, "filename", sample.image_path.name)
    source = sub(ann, "source")
    sub(source, "database", "splitdet")
    size = sub(ann, "size")
    sub(size, "width", int(sample.width))
    sub(size, "height", int(sample.height))
    sub(size, "depth", 3)
    sub(ann, "segmented", 0)
    for obj in sample.objects:
        o = sub(ann, "object")
        sub(o, "name", obj.name)
        sub(o, "pose", "Unspecified")
        sub(o, "truncated", 0)
        sub(o, "difficult", int(bool(obj.difficult)))
        xmin, ymin, xmax, ymax = _voc_box(obj.box, sample.width, sample.height)
        bnd = sub(o, "bndbox")
        sub(bnd, "xmin", xmin)
        sub(bnd, "ymin", ymin)
        sub(bnd, "xmax", xmax)
        sub(bnd, "ymax", ymax)
    ET.indent(ann, space="  ")
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def write_annotation(path: Path, sample: VocSample) -> None:
    """Write ``sample`` as a VOC annotation at ``path`` (atomically; parents are created)."""
    atomic_write(Path(path), annotation_xml(sample))
