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

Only the standard library and Pillow at import time; the edge's torch-free `preprocess` (numpy)
loads when the first image is read. No torch.
"""

from __future__ import annotations

import functools
import glob
import math
import os
import re
import shlex
import stat
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from xml.parsers import expat

from splitdet.shared.atomic_file import atomic_write

if TYPE_CHECKING:  # Pillow loads when an image is read
    from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_ANNOTATION_BYTES",
    "VocError",
    "VocObject",
    "VocSample",
    "annotation_xml",
    "check_hint",
    "class_names_of",
    "id_problem",
    "image_size",
    "normalisation_note",
    "normalisation_twin",
    "read_annotation",
    "read_split",
    "write_annotation",
    "write_split",
]

#: Image file extensions looked for in ``JPEGImages/``, in this order (each also upper-case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

#: Annotation files larger than this are refused (a VOC annotation is a few KB).
MAX_ANNOTATION_BYTES = 4 * 1024 * 1024

#: How far (px) a box coordinate may lie past the image and still be read, clamped to its edge.
#: Tools that scale boxes write floating-point noise (``320.00000000000006`` for 320; double
#: rounding at 10000 px is ~2e-12 px), and clamping by 0.01 px moves a box by 1/100 of a pixel,
#: which nothing downstream can see; a coordinate one pixel past the image (an off-by-one of a
#: 0-based tool, a <size> that is not the image's) is a real mistake and stays refused. An
#: absolute tolerance, not a relative one: the noise a scaling leaves is far below it at any
#: image size the edge takes.
EDGE_TOLERANCE_PX = 0.01

#: The EXIF orientation tag.
EXIF_ORIENTATION = 0x0112
#: How viewers and annotation tools show an image whose EXIF orientation tag holds each value
#: but 1 (upright; other values are invalid and shown as stored, like a missing tag).
ORIENTATION_SHOWN = {
    2: "mirrored left to right",
    3: "turned by 180 degrees",
    4: "mirrored top to bottom",
    5: "mirrored and turned by 90 degrees",
    6: "turned by 90 degrees clockwise",
    7: "mirrored and turned by 90 degrees",
    8: "turned by 90 degrees counter-clockwise",
}


def check_hint(exc: Exception, root: Path | str) -> str:
    """``exc``'s message and the command that lists every problem of the dataset at once
    (train and eval stop at the first)."""
    message = str(exc)
    if "unknown class" in message:
        return f"{message} (give every class the dataset holds with --classes A,B)"
    decode = " --decode" if "cannot decode image" in message else ""
    bits = PAST_THE_BITS.search(message)
    if bits:  # only a decoding with the same bits finds the others
        decode = f" --decode --pixel-bits {bits[1]}"
    command = f"splitdet data check {shlex.quote(str(root))}{decode}"
    return f"{message} (`{command}` lists every problem at once)"


@functools.lru_cache(maxsize=8)
def _stems_by_nfc(folder: str, mtime_ns: int) -> dict[str, tuple[str, ...]]:
    """``{NFC form of a stem: the names of that stem}`` of the files in ``folder`` whose stem
    is not ASCII, as listed when its mtime was ``mtime_ns`` (a new mtime lists it again)."""
    index: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        stem = Path(name).stem
        if not stem.isascii():
            index.setdefault(unicodedata.normalize("NFC", stem), []).append(name)
    return {key: tuple(names) for key, names in index.items()}


def normalisation_twin(
    folder: Path, name: str, suffixes: Collection[str] | None = None
) -> Path | None:
    """The file in ``folder`` whose name equals ``name`` once both are NFC-normalised but is
    not ``name`` itself: a dataset copied from a Mac, whose file system writes names NFD
    (``e`` + a combining accent), while annotations and split files name them NFC (one ``é``).
    With ``suffixes`` (lower-case), ``name`` is a stem and a file of that stem with one of the
    suffixes in any case matches. None when there is none (always for an ASCII name). The
    folder is listed once while it stays unchanged, not once per name looked for."""
    if name.isascii():  # an ASCII name has no other normalisation form
        return None
    try:
        index = _stems_by_nfc(str(folder), os.stat(folder).st_mtime_ns)
    except OSError:
        return None
    stem = name if suffixes is not None else Path(name).stem
    wanted = unicodedata.normalize("NFC", name)
    for own in index.get(unicodedata.normalize("NFC", stem), ()):
        path = Path(folder) / own
        if suffixes is not None:
            matches = path.stem != name and path.suffix.lower() in suffixes
        else:
            matches = own != name and unicodedata.normalize("NFC", own) == wanted
        if matches and path.is_file():  # (listed within the mtime's resolution: may be gone)
            return path
    return None


def _form(name: str) -> str:
    """The Unicode normalisation form ``name`` is in: "NFC", "NFD" or "mixed"."""
    for form in ("NFC", "NFD"):
        if unicodedata.is_normalized(form, name):
            return form
    return "mixed"


def normalisation_note(
    folder: Path,
    name: str,
    suffixes: Collection[str] | None = None,
    looked_for_by: Path | None = None,
) -> str:
    """What a "not found" message about ``name`` in ``folder`` appends when a file whose
    name differs from it only in its Unicode normalisation exists (`normalisation_twin`):
    "; FILE exists, whose name differs only in ...: rename ... to its NFC form"; "" when none
    does. ``looked_for_by``: the file whose name ``name`` comes from (the annotation looking
    for its image, the image looking for its annotation), the one to rename when the file
    found is in NFC and it is not."""
    twin = normalisation_twin(folder, name, suffixes)
    if twin is None:
        return ""
    differs = (
        f"; {twin} exists, whose name differs only in its Unicode normalisation "
        f"({_form(twin.name)} there, {_form(name)} here; macOS writes names NFD)"
    )
    if _form(twin.name) != "NFC":
        return f"{differs}: rename it to its NFC form"
    if looked_for_by is not None and _form(looked_for_by.name) != "NFC":
        return f"{differs}: rename {looked_for_by} to its NFC form"
    return f"{differs}: write the name here in NFC, as the file's is"


#: How `load_rgb_and_peak` names a pixel past the bits it reads 16-bit images with.
PAST_THE_BITS = re.compile(r"past the (\d+)-bit range")


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot stand in a split file (None when it can): a split file holds
    one id per line, the first token, ``#`` starting a comment, no path separators."""
    if not image_id or image_id in (".", ".."):
        return f"invalid image id {image_id!r}"
    if any(c.isspace() for c in image_id):
        return f"image id {image_id!r} holds white space"
    if "/" in image_id or "\\" in image_id:
        return f"image id {image_id!r} holds a path separator"
    if image_id.startswith("#"):
        return f"image id {image_id!r} starts with '#', which a split file reads as a comment"
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return f"image id {image_id!r} is not valid UTF-8 (rename the file)"
    return None


class VocError(ValueError):
    """A malformed or inconsistent VOC dataset; the message names the offending file."""


@dataclass(frozen=True)
class VocObject:
    """One annotated object.

    ``box`` is ``(x1, y1, x2, y2)`` in 0-based continuous pixel coordinates (see the module
    docstring for the conversion from VOC's 1-based inclusive ``xmin..xmax``).
    """

    name: str
    box: tuple[float, float, float, float]
    difficult: bool = False


@dataclass(frozen=True)
class VocSample:
    """One image of a split and its objects (none: a defect-free image).

    ``filename``: the annotation's ``<filename>`` as written (None without one), which
    ``data check`` compares with the image the annotation is paired with; no part of the
    sample's identity."""

    image_id: str
    image_path: Path
    width: int
    height: int
    objects: tuple[VocObject, ...] = ()
    filename: str | None = field(default=None, compare=False, repr=False)

    @property
    def is_defective(self) -> bool:
        """True when the image has at least one annotated object."""
        return len(self.objects) > 0


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
    reports every bad line at once; `VocError` only when the file cannot be read."""
    path = _split_file(root, split)
    if not path.is_file():
        raise VocError(f"{path}: split file not found (no split {split!r} under {root})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # Windows editors may start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
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


class _Doctype(Exception):
    """A document type declaration met while parsing an annotation."""


def _refuse_doctype(data: bytes) -> None:
    """Raise `_Doctype` when ``data`` declares a document type with content (an internal
    subset, where entities are declared, or an external DTD), in whatever encoding it is
    written; ET.ParseError when it is malformed XML. A bare ``<!DOCTYPE annotation>`` passes.

    ElementTree never fetches external entities, and expat bounds entity amplification; VOC
    annotations have no DTD at all, so one is refused outright, before ElementTree reads it.
    """

    def doctype(
        _name: str, system_id: str | None, _public_id: str | None, has_internal_subset: int
    ) -> None:
        if system_id or has_internal_subset:  # a bare <!DOCTYPE annotation> declares nothing
            raise _Doctype

    def entity(*_args: object) -> None:
        raise _Doctype

    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = entity
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise ET.ParseError(str(exc)) from None


def _parse_xml(path: Path) -> ET.Element:
    try:
        info = path.stat()
    except FileNotFoundError:
        twin = normalisation_note(path.parent, path.name)
        raise VocError(f"{path}: annotation file not found{twin}") from None
    except OSError as exc:
        raise VocError(f"{path}: cannot read annotation: {exc}") from exc
    if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read for ever
        raise VocError(f"{path}: cannot read annotation: not a regular file")
    size = info.st_size
    if size > MAX_ANNOTATION_BYTES:
        raise VocError(
            f"{path}: annotation is {size} bytes, larger than the {MAX_ANNOTATION_BYTES} "
            "allowed for a VOC annotation"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:  # a directory of that name, no permission
        raise VocError(f"{path}: cannot read annotation: {exc.strerror or exc}") from None
    try:
        _refuse_doctype(data)
        root = ET.fromstring(data)
    except _Doctype:
        raise VocError(
            f"{path}: a document type (DTD) or entity declaration is not allowed in a VOC "
            "annotation"
        ) from None
    except (ET.ParseError, LookupError, ValueError) as exc:  # LookupError: unknown encoding
        raise VocError(f"{path}: malformed XML: {exc}") from exc
    if root.tag != "annotation":
        raise VocError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    return root


def _text(path: Path, elem: ET.Element, tag: str, where: str) -> str:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise VocError(f"{path}: missing <{tag}> in {where}")
    return child.text.strip()


def _number(path: Path, elem: ET.Element, tag: str, where: str) -> float:
    raw = _text(path, elem, tag, where)
    try:
        value = float(raw)
    except ValueError:
        raise VocError(f"{path}: <{tag}> in {where} is not a number: {raw!r}") from None
    if not math.isfinite(value):
        raise VocError(f"{path}: <{tag}> in {where} is not finite: {raw!r}")
    return value


def _flag(path: Path, elem: ET.Element, tag: str, where: str) -> bool:
    child = elem.find(tag)
    if child is None or child.text is None or not child.text.strip():
        return False
    raw = child.text.strip().lower()
    if raw in ("0", "false", "no"):
        return False
    if raw in ("1", "true", "yes"):
        return True
    raise VocError(f"{path}: <{tag}> in {where} must be 0 or 1, got {raw!r}")


def _find_image(root: Path, image_id: str, filename: str | None) -> Path | None:
    """The image of annotation `image_id`: the one its <filename> names when that is a bare
    name of this id (``ID.png`` beside an ``ID.jpg``: the annotation says which), else
    ``JPEGImages/ID.EXT`` for the first extension found, else <filename>'s bare name in
    JPEGImages (`bare_filename`)."""
    folder = Path(root) / "JPEGImages"
    if filename and Path(filename).name == filename and Path(filename).stem == image_id:
        named = folder / filename
        if named.suffix.lower() in IMAGE_EXTENSIONS and named.is_file():
            return named
    for ext in IMAGE_EXTENSIONS:
        for candidate in (folder / f"{image_id}{ext}", folder / f"{image_id}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    # any other case of the extension (.Jpg), looked for only when the usual names are missing
    for candidate in sorted(folder.glob(f"{glob.escape(image_id)}.*")):
        if candidate.suffix.lower() in IMAGE_EXTENSIONS and candidate.is_file():
            return candidate
    base = bare_filename(filename)
    if base:  # its bare name, in JPEGImages: never a path elsewhere (tools write "images/x.jpg")
        candidate = folder / base
        if candidate.is_file():
            return candidate
    return None


def bare_filename(filename: str | None) -> str | None:
    """An annotation's <filename> without the folders some tools write before it (``images/``,
    ``C:\\shots\\``); None for none."""
    if not filename:
        return None
    return re.split(r"[\\/]", filename)[-1] or None


def image_size(image_path: Path, ann_path: Path | None = None) -> tuple[int, int]:
    """``(width, height)`` in px from the image file's header (no pixels decoded); `VocError`
    names an unreadable file (and ``ann_path``, the annotation it was read for)."""
    return _image_header(image_path, ann_path)[0]


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag of an open PIL image (1, upright, when it has none or it cannot
    be read), from the header alone."""
    from PIL import Image

    try:
        # Image.getexif reads the header's EXIF (JPEG APP1, PNG eXIf before the pixels, TIFF
        # tags); PNG's own override decodes every pixel first when the header holds none.
        return int(Image.Image.getexif(img).get(EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block: viewers show such an image as stored
        return 1


def _refuse_past_the_edge_limits(img: Image.Image, image_path: Path) -> None:
    """`VocError` naming ``image_path`` when the open PIL image is past the edge's size limits
    (MAX_FILE_BYTES, MAX_PIXELS, MAX_ORIGINAL_SIDE, the edge's own constants). Checked once,
    when the split is read (`_image_header`), not at every decoding of an epoch."""
    from splitdet.edge.preprocess import MAX_FILE_BYTES, MAX_PIXELS, too_large_text
    from splitdet.shared.spec import MAX_ORIGINAL_SIDE

    size = Path(image_path).stat().st_size
    if size > MAX_FILE_BYTES:
        raise VocError(f"{too_large_text(image_path, size)}: the edge would refuse it")
    width, height = img.size
    if width * height > MAX_PIXELS or max(width, height) > MAX_ORIGINAL_SIDE:
        raise VocError(
            f"{image_path}: {width}x{height} px is more than the edge takes ({MAX_PIXELS} "
            f"pixels, {MAX_ORIGINAL_SIDE} px on a side); cut it into tiles, or shrink it"
        )


def _refuse_what_the_edge_refuses(img: Image.Image, image_path: Path) -> None:
    """`VocError` naming ``image_path`` when the edge (`splitdet.edge.preprocess`) would refuse
    the open PIL image: a mode it does not take (float "F", Lab, HSV...) or several frames.

    From the header alone (a TIFF's frame count reads its directories, no pixels). The mode
    lists are the edge's own, so the two stay one rule."""
    from splitdet.edge.preprocess import TO_GRAY_MODES, TO_RGB_MODES, WIDE_GRAY_MODES

    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        raise VocError(
            f"{image_path}: a multi-frame image ({frames} frames, mode {img.mode!r}), which the "
            "edge refuses too; save the frame to train on as an image of its own"
        )
    if img.mode not in ("RGB", "L", *TO_RGB_MODES, *TO_GRAY_MODES, *WIDE_GRAY_MODES):
        raise VocError(
            f"{image_path}: unsupported image mode {img.mode!r}, which the edge refuses too; "
            "expected grayscale (8/16-bit, 1-bit, with alpha), RGB (with alpha), palette, CMYK "
            "or YCbCr: save it as 8- or 16-bit grayscale or RGB"
        )


def _image_header(image_path: Path, ann_path: Path | None) -> tuple[tuple[int, int], int]:
    """``((width, height) px, EXIF orientation)`` of the image file, from one header read (no
    pixels decoded); `VocError` names an unreadable file (and ``ann_path``), or one the edge
    refuses (its size, its mode, several frames)."""
    from PIL import Image  # header only; Pillow does not decode pixels on open

    try:
        with Image.open(image_path) as img:
            _refuse_past_the_edge_limits(img, image_path)
            _refuse_what_the_edge_refuses(img, image_path)
            return img.size, _orientation(img)
    except VocError:
        raise
    except Exception as exc:  # Pillow raises many types for unreadable files
        what = f" (for {ann_path.name})" if ann_path is not None else ""
        raise VocError(f"{image_path}: cannot read image{what}: {exc}") from exc


def _orientation_problem(image_path: Path, orientation: int) -> str:
    """Why an image with EXIF ``orientation`` (2..8) cannot be trained on, and what to do."""
    return (
        f"its EXIF orientation tag ({orientation}) has viewers and annotation tools (CVAT, "
        f"Label Studio) show it {ORIENTATION_SHOWN[orientation]}, but splitdet reads the pixels "
        "as stored, like the edge, so boxes drawn on the turned view lie on other pixels; bake "
        "the turn into the pixels (PIL.ImageOps.exif_transpose, `exiftran -ai`) if the boxes "
        "were drawn on the turned view, or clear the tag (`exiftool -Orientation=1 -n "
        f"{image_path.name}`) to annotate the pixels as stored; then re-check the boxes and "
        "<size>"
    )


def load_rgb(image_path: Path, pixel_bits: int = 16) -> Image.Image:
    """The image file decoded to an RGB PIL image (pixels read); VocError names a file whose
    body is corrupt or truncated (its header, read when the split was, looked fine), and one the
    edge refuses (float "F" and other modes it does not take, several frames).

    Each mode is converted as the edge converts it (`splitdet.edge.preprocess`): palette, CMYK,
    YCbCr and alpha images to RGB by Pillow, alpha dropped; "LA", "1" to grayscale. A 16-bit
    (or 32-bit integer) grayscale image's values are taken over 0..2**pixel_bits - 1
    (`ModelConfig.pixel_bits`, as the edge takes them) and rounded to 8 bits; VocError for a
    pixel past that.
    """
    return load_rgb_and_peak(image_path, pixel_bits)[0]


def load_rgb_and_peak(image_path: Path, pixel_bits: int = 16) -> tuple[Image.Image, int | None]:
    """(`load_rgb`'s image, the largest pixel value of a 16-bit grayscale image, else None):
    one decoding for both."""
    from PIL import Image

    from splitdet.edge.preprocess import WIDE_GRAY_MODES
    from splitdet.shared.config import pixel_full_scale

    try:
        with Image.open(image_path) as img:
            # before convert("RGB"), which would make a float image black, not refuse it
            _refuse_what_the_edge_refuses(img, image_path)
            if img.mode in WIDE_GRAY_MODES:  # convert("RGB") would clip them at 255
                wide = img.convert("I")
                low, high = wide.getextrema()
                full_scale = pixel_full_scale(pixel_bits)
                if low < 0 or high > 65535:
                    raise VocError(f"{image_path}: pixels outside 0..65535 are not supported")
                if high > full_scale:
                    raise VocError(
                        f"{image_path}: a pixel is {high}, past the {pixel_bits}-bit range "
                        f"(0..{full_scale}) of --pixel-bits {pixel_bits} (the run's, or the "
                        "checkpoint's); an image of another bit depth than the others, or "
                        "the wrong --pixel-bits for the camera's values (16: all of 0..65535)"
                    )
                # scaled as the edge scales them (to [0, 1] over 0..full_scale), to 8 bits
                rgb = wide.point(lambda v: v * 255 / full_scale + 0.5).convert("L").convert("RGB")
                return rgb, int(high)
            return img.convert("RGB"), None
    except VocError:
        raise
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError... for bad data
        raise VocError(f"{image_path}: cannot decode image: {exc}") from None


def read_annotation(
    root: Path,
    image_id: str,
    class_names: Sequence[str] | None = None,
    *,
    check_image: bool = True,
) -> VocSample:
    """Read ``Annotations/{image_id}.xml`` and locate its image; see `read_split`."""
    root = Path(root)
    path = root / "Annotations" / f"{image_id}.xml"
    ann = _parse_xml(path)

    filename = (ann.findtext("filename") or "").strip() or None
    image_path = _find_image(root, image_id, filename)
    if image_path is None:
        folder = root / "JPEGImages"
        twin = normalisation_note(folder, image_id, IMAGE_EXTENSIONS, looked_for_by=path)
        if not twin and filename and Path(filename).name == filename:
            twin = normalisation_note(folder, filename)  # the <filename> it would fall back to
        raise VocError(
            f"{path}: image file not found: no {folder / image_id}"
            f"{{{','.join(IMAGE_EXTENSIONS)}}}{twin}"
        )

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
    for k, obj in enumerate(ann.findall("object")):
        where = f"<object> #{k + 1}"
        name = _text(path, obj, "name", where)
        if known is not None and name not in known:
            raise VocError(
                f"{path}: {where} has unknown class {name!r} (expected one of "
                f"{', '.join(sorted(known))})"
            )
        difficult = _flag(path, obj, "difficult", where)
        bnd = obj.find("bndbox")
        if bnd is None:
            raise VocError(f"{path}: missing <bndbox> in {where}")
        xmin = _number(path, bnd, "xmin", where)
        ymin = _number(path, bnd, "ymin", where)
        xmax = _number(path, bnd, "xmax", where)
        ymax = _number(path, bnd, "ymax", where)
        box = (
            f"box xmin={_coordinate(xmin)} ymin={_coordinate(ymin)} xmax={_coordinate(xmax)} "
            f"ymax={_coordinate(ymax)}"
        )
        past = _past_the_image(xmin, ymin, xmax, ymax, width, height)
        if past:
            raise VocError(
                f"{path}: {where} {box} lies outside the {width}x{height} image ({past}, by "
                f"more than the {EDGE_TOLERANCE_PX} px read as rounding noise); correct the box "
                "in the annotation tool, or the <size> if it is not the image's"
            )
        # within the tolerance: clamped to the image (and xmin=0 of 0-based tools to 0)
        x1, y1 = max(xmin - 1.0, 0.0), max(ymin - 1.0, 0.0)
        x2, y2 = min(xmax, float(width)), min(ymax, float(height))
        if x2 <= x1 or y2 <= y1:
            raise VocError(f"{path}: {where} {box} is empty (max < min)")
        objects.append(VocObject(name=name, box=(x1, y1, x2, y2), difficult=difficult))
    return VocSample(
        image_id=image_id,
        image_path=image_path,
        width=width,
        height=height,
        objects=tuple(objects),
        filename=filename,
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


def _voc_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (float(v) for v in box)
    xmin = min(max(math.floor(x1) + 1, 1), max(width, 1))
    ymin = min(max(math.floor(y1) + 1, 1), max(height, 1))
    xmax = min(max(math.ceil(x2), xmin), width)
    ymax = min(max(math.ceil(y2), ymin), height)
    return xmin, ymin, xmax, ymax


def annotation_xml(sample: VocSample, *, folder: str = "JPEGImages", depth: int = 3) -> bytes:
    """The standard VOC annotation document for ``sample``, as UTF-8 bytes."""

    def sub(parent: ET.Element, tag: str, text: object | None = None) -> ET.Element:
        elem = ET.SubElement(parent, tag)
        if text is not None:
            elem.text = str(text)
        return elem

    ann = ET.Element("annotation")
    sub(ann, "folder", folder)
    sub(ann, "filename", sample.image_path.name)
    source = sub(ann, "source")
    sub(source, "database", "splitdet")
    size = sub(ann, "size")
    sub(size, "width", int(sample.width))
    sub(size, "height", int(sample.height))
    sub(size, "depth", int(depth))
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


def write_annotation(
    path: Path, sample: VocSample, *, folder: str = "JPEGImages", depth: int = 3
) -> None:
    """Write ``sample`` as a VOC annotation at ``path`` (atomically; parents are created)."""
    atomic_write(Path(path), annotation_xml(sample, folder=folder, depth=depth))


def write_split(root: Path, split: str, ids: Iterable[str]) -> Path:
    """Write ``ROOT/ImageSets/Main/{split}.txt`` with one id per line; returns its path."""
    ids = list(ids)
    for image_id in ids:
        problem = id_problem(image_id)
        if problem is not None:
            raise ValueError(f"{problem}, for split {split!r}")
    path = _split_file(Path(root), split)
    atomic_write(path, "".join(f"{i}\n" for i in ids).encode("utf-8"))
    return path
