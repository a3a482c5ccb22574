"""Draw detections on an image and encode it (Pillow; no torch).

A file is written whole or not at all: encoded in memory, written to a temporary name in the
same folder and renamed over the target once complete, so a full disk leaves no truncated image
under the final name, and no temporary file either.

`splitdet predict --save` writes its copies with `save_annotated_copy`, which marks each as an
annotated copy (a JPEG comment, `COPY_COMMENT`) and writes only where nothing is, or over such
a copy (an earlier run's): never over a file predict did not write (`foreign_file`).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from splitdet.edge import file_moves
from splitdet.edge.preprocess import Pixels
from splitdet.shared.atomic_file import (
    WriteError,
    folder_mode,
    temporary_beside,
)
from splitdet.shared.probability_format import format_probability

BOX_COLOUR = (255, 64, 32)
#: A box's colour by its class (label k + 1: CLASS_COLOURS[k], again from the start past the
#: last): class 1 keeps `BOX_COLOUR`; the others bright and far apart in hue, each readable on
#: the black behind a label.
CLASS_COLOURS = (
    BOX_COLOUR,
    (0, 200, 255),
    (255, 230, 0),
    (60, 255, 60),
    (255, 60, 255),
    (255, 160, 0),
    (150, 120, 255),
    (230, 230, 230),
)


def class_colour(label: int | None) -> tuple[int, int, int]:
    """The RGB colour boxes of `label` (1-based, label k + 1 is class_names[k]) are drawn in:
    `CLASS_COLOURS`; `BOX_COLOUR` for None (a caller that has names only)."""
    if label is None or label < 1:
        return BOX_COLOUR
    return CLASS_COLOURS[(int(label) - 1) % len(CLASS_COLOURS)]


#: The JPEG comment in each of predict's annotated copies: how a later run tells its own copies
#: (which it may replace: a re-run shows the latest results) from any other file (never
#: replaced). In the file itself, so that it holds however the folder is copied or renamed.
COPY_COMMENT = b"splitdet predict: annotated copy"


#: A character no font has a glyph for: what a missing glyph draws as (`_has_glyph`).
_NO_GLYPH = "\uffff"
#: Space between a label and what it is moved clear of (px).
_LABEL_GAP = 2


#: Label text height (px) per image side: a 2448x2048 image's labels at 31 px stay readable
#: on a screen that shows it whole; never under Pillow's default 10 px.
_LABEL_PX_PER_SIDE = 1 / 80
_LABEL_MIN_PX = 10


@functools.cache
def _label_font(size: int = _LABEL_MIN_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font labels are drawn in, `size` px high: Pillow's default (what ``draw.text`` draws
    without one; with FreeType, Aileron, which has ASCII and some Latin-1, no ``é``). Never a
    downloaded font: characters it lacks are drawn escaped (`_label_text`). Without FreeType
    (or before Pillow 10.1) the bitmap font, 10 px whatever `size`."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _label_size(canvas: Image.Image) -> int:
    """The label text height (px) for a picture of `canvas`'s size (`_LABEL_PX_PER_SIDE`)."""
    return max(_LABEL_MIN_PX, round(max(canvas.size) * _LABEL_PX_PER_SIDE))


def _glyph_mask(char: str) -> tuple[tuple[int, int], bytes] | None:
    """(Size, pixels) of ``char`` drawn in `_label_font`; None when the font cannot draw it
    at all (the bitmap font Pillow falls back to without FreeType: Latin-1 only)."""
    try:
        mask = _label_font().getmask(char)
    except (UnicodeError, ValueError, OSError):
        return None
    return mask.size, bytes(mask)


@functools.lru_cache(maxsize=4096)
def _has_glyph(char: str) -> bool:
    """Whether `_label_font` has a glyph for ``char``: it draws otherwise than a character no
    font has (the font's "missing" box, alike for every character it lacks)."""
    if char.isascii():
        return True
    drawn = _glyph_mask(char)
    return drawn is not None and drawn != _glyph_mask(_NO_GLYPH)


def _label_text(text: str) -> str:
    """``text`` with each character `_label_font` has no glyph for written as its Python
    escape (``pit d\\xe9faut``, ``\\u65e5``): readable, where the font would draw a row of
    identical boxes."""
    return "".join(char if _has_glyph(char) else ascii(char)[1:-1] for char in text)


def _overlaps(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Whether the boxes (x1, y1, x2, y2) ``a`` and ``b`` overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _label_top(
    draw: ImageDraw.ImageDraw,
    text: str,
    x: float,
    box_top: float,
    width: int,
    clear_of: tuple[float, ...] | None,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
) -> float:
    """Where the label ``text`` of a box whose top edge is at ``box_top`` is drawn (its y, at
    ``x``): above the box; without room there, or over ``clear_of`` (the p(defect) text's box),
    inside the box under its top edge; if that is over it too, below it."""
    height = draw.textbbox((0, 0), text, font=font)[3]
    inside = box_top + width + 1
    for top in (box_top - height - _LABEL_GAP - width, inside):
        bbox = draw.textbbox((x, top), text, font=font)
        if top >= 0 and (clear_of is None or not _overlaps(bbox, clear_of)):
            return top
    return max(inside, clear_of[3] + _LABEL_GAP) if clear_of is not None else inside


def _to_8bit(unit: np.ndarray) -> np.ndarray:
    """Float values in [0, 1] (clipped to it) as UInt8 0..255, rounded half up."""
    return (np.clip(unit, 0, 1) * 255 + 0.5).astype(np.uint8)


def _band_8bit(band: np.ndarray, full_scale: int) -> np.ndarray:
    """A `Pixels` band [H, W] (0..full_scale) as UInt8 [H, W]: the numbers `_to_8bit` makes of
    its float band (divided by full_scale in float32, as `Pixels.to_unit_float`), one float
    band at a time; an 8-bit band over 255 as it is (the same numbers: v / 255 * 255 + 0.5
    truncates to v in float32 for every v of 0..255)."""
    if full_scale == 255 and band.dtype == np.uint8:
        return band
    return _to_8bit(np.divide(band, np.float32(full_scale), dtype=np.float32))


def rgb_8bit(image: np.ndarray | Pixels) -> np.ndarray:
    """`image` (a decoded image's `Pixels`, or Float32[3, H, W] in [0, 1]) as UInt8[H, W, 3]
    RGB for drawing: each value times 255, rounded half up. A `Pixels` from its integer
    bands (no Float32[3, H, W] made), with the numbers of its float image's."""
    if not isinstance(image, Pixels):
        return _to_8bit(image.transpose(1, 2, 0))
    bands = [_band_8bit(band, image.full_scale) for band in image.bands]
    return np.stack(bands * 3 if len(bands) == 1 else bands, axis=-1)


def draw_detections(
    image: np.ndarray | Pixels,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    names: Sequence[str],
    p_defect: float | None = None,
    labels: Sequence[int] | None = None,
) -> Image.Image:
    """`image` (a decoded image's `Pixels`, or Float32[3, H, W] in [0, 1]: `rgb_8bit`) as an
    RGB picture with boxes (x1, y1, x2, y2 px), "name score" labels and, if given, p(defect)
    drawn. Each box and its label in its class's colour (`class_colour` of `labels`, 1-based,
    one per box; without them all in `BOX_COLOUR`), the label's text on black: readable on a
    bright image too. Characters of a name the label font lacks are drawn escaped
    (`_label_text`); a label is kept off the p(defect) text."""
    canvas = Image.fromarray(rgb_8bit(image), "RGB")
    draw = ImageDraw.Draw(canvas)
    font = _label_font(_label_size(canvas))
    width = max(2, round(max(canvas.size) / 600))
    p_text = None if p_defect is None else f"p(defect) {format_probability(p_defect)}"
    p_box = None if p_text is None else draw.textbbox((8, 8), p_text, font=font)
    colours = [class_colour(k) for k in labels] if labels is not None else None
    if colours is not None and len(colours) != len(names):
        raise ValueError(f"{len(colours)} labels for {len(names)} boxes")
    for k, (box, score, name) in enumerate(zip(boxes, scores, names, strict=True)):
        colour = BOX_COLOUR if colours is None else colours[k]
        x1, y1, x2, y2 = (float(v) for v in box)
        # (x2, y2) is the edge after the box's last pixel; Pillow's corners are pixels drawn
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour,
                       width=width)  # fmt: skip
        label = _label_text(f"{name} {score:.2f}")
        label_width = draw.textlength(label, font=font)
        x = max(0.0, min(x1 + width, canvas.width - label_width - 1))  # never cut at the right
        top = _label_top(draw, label, x, y1, width, p_box, font)
        draw.rectangle(draw.textbbox((x, top), label, font=font), fill=(0, 0, 0))
        draw.text((x, top), label, fill=colour, font=font)
    if p_text is not None and p_box is not None:  # over the boxes, on black: always readable
        draw.rectangle(p_box, fill=(0, 0, 0))
        draw.text((8, 8), p_text, fill=BOX_COLOUR, font=font)
    return canvas


def encode(canvas: Image.Image, path: Path, **options: object) -> bytes:
    """`canvas` encoded in memory as `path`'s suffix names (JPEG at quality 90 for .jpg/.jpeg,
    another of Pillow's formats by its suffix), with the format's `options` (a JPEG's
    `comment`). In memory: Pillow's encoder writing to a file takes a short write (the disk
    filling up under it) as done, and truncates the image unsaid.

    Raises:
        ValueError: a suffix Pillow writes no format for.
    """
    suffix = path.suffix.lower()
    kind = "JPEG" if suffix in (".jpg", ".jpeg") else Image.registered_extensions().get(suffix)
    if kind is None:
        raise ValueError(f"{path}: no image format is written as {suffix or 'no suffix'}")
    if kind == "JPEG":
        options = {"quality": 90, **options}
    encoded = io.BytesIO()
    canvas.save(encoded, format=kind, **options)
    return encoded.getvalue()


def annotated_bytes(
    image: np.ndarray | Pixels,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    names: Sequence[str],
    path: Path,
    p_defect: float | None = None,
    labels: Sequence[int] | None = None,
) -> bytes:
    """`image` (`Pixels`, or Float32[3, H, W] in [0, 1]) with boxes (x1, y1, x2, y2 px) and
    "name score" labels drawn (in their class's colour with `labels`: `draw_detections`),
    encoded in memory as `path`'s suffix names (`encode`: JPEG or
    PNG, another of Pillow's by its suffix), for the caller to write whole (the edge daemon's
    --save-annotated: `file_moves.write_in_folder`).

    Raises:
        ValueError: a suffix Pillow writes no format for.
    """
    return encode(draw_detections(image, boxes, scores, names, p_defect, labels), Path(path))


def save_annotated_copy(
    image: np.ndarray | Pixels,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    names: Sequence[str],
    path: Path,
    p_defect: float | None = None,
    labels: Sequence[int] | None = None,
) -> Path:
    """The annotated image (`annotated_bytes`) for predict's copies: a JPEG marked with
    `COPY_COMMENT`, written whole under `path` only as a new file (created exclusively: a file
    made there meanwhile is never replaced) or over an earlier annotated copy; returns
    `path`.

    Raises:
        WriteError: something else is at `path` (`foreign_file` says what): left as it is.
        OSError: it could not be written; nothing is left beside `path`.
    """
    path = Path(path)
    canvas = draw_detections(image, boxes, scores, names, p_defect, labels)
    tmp = _temporary_beside(path, encode(canvas, path, comment=COPY_COMMENT))
    try:
        try:  # a new name: made at once and whole, only if free
            file_moves.move_no_clobber(tmp, path)
        except FileExistsError:
            _replace_copy(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def foreign_file(path: Path) -> str | None:
    """What is at `path` if it is not one of predict's annotated copies, which a run must not
    replace ("a symbolic link", "a folder", "a FIFO, device or socket", "a file that cannot be
    read (...)", "a file that is not an annotated copy from predict"); None when nothing is
    there, or an annotated copy (`COPY_COMMENT`) is. A link is never followed: what it points
    at is not predict's to replace."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"a file that cannot be examined ({exc.strerror})"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if not stat.S_ISREG(mode):
        return "a FIFO, device or socket"
    try:  # no following a link, no waiting on a FIFO put there since the lstat
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"a file that cannot be read ({exc.strerror})"
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            return "a FIFO, device or socket"
        if _jpeg_comment(file) != COPY_COMMENT:
            return "a file that is not an annotated copy from predict"
    return None


def _jpeg_comment(file: BinaryIO) -> bytes | None:
    """The comment of the JPEG `file` (its header only is read); None for none, or for a file
    that is not a JPEG Pillow opens."""
    try:
        with Image.open(file, formats=["JPEG"]) as found:
            return found.info.get("comment")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _temporary_beside(path: Path, data: bytes) -> Path:
    """A new temporary file in `path`'s folder holding `data` (`atomic_file.temporary_beside`),
    with the mode an ordinary ``open()`` gives (not ``mkstemp``'s ``0o600``: other users'
    viewers read the copies)."""
    tmp = temporary_beside(path)
    try:
        tmp.write_bytes(data)
        os.chmod(tmp, folder_mode() & 0o666)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _replace_copy(tmp: Path, path: Path) -> None:
    """Rename `tmp` over `path` if `path` holds an annotated copy (an earlier run's); else
    WriteError naming what is there, which is left as it is."""
    found = foreign_file(path)
    if found is not None:
        raise WriteError(path, found, errno.EEXIST, f"it exists and is {found}; left as it is")
    os.replace(tmp, path)
