"""Image files of a VOC dataset: the header read (size, EXIF orientation, what the edge refuses:
its size limits, modes, several frames) and the decoding to RGB as the edge converts each mode.

Part of `splitdet.training.voc`, which re-exports the public names. Pillow loads when an image
is read, the edge's torch-free `preprocess` (numpy) when its limits are first looked at; no torch.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.training.voc_types import VocError

if TYPE_CHECKING:  # Pillow and numpy load when an image is read
    import numpy as np
    from PIL import Image


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


#: How `load_rgb_and_peak` names a pixel past the bits it reads 16-bit images with.
PAST_THE_BITS = re.compile(r"past the (\d+)-bit range")


def image_size(image_path: Path, ann_path: Path | None = None) -> tuple[int, int]:
    """``(width, height)`` in px from the image file's header (no pixels decoded); `VocError`
    names an unreadable file (and ``ann_path``, the annotation it was read for)."""
    return _image_header(image_path, ann_path)[0]


#: PNG chunks that may carry an orientation: eXIf, and the text chunks Pillow reads EXIF
#: ("Raw profile type exif") or XMP (tiff:Orientation) from, by their keyword.
_PNG_EXIF_CHUNK = b"eXIf"
_PNG_TEXT_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt"})
_PNG_ORIENTATION_KEYWORDS = frozenset({b"Raw profile type exif", b"XML:com.adobe.xmp"})
#: The longest keyword a PNG text chunk has (1 to 79 bytes, then a NUL).
_PNG_KEYWORD_BYTES = 80
#: The chunk walk's read buffer (bytes): a chunk header read past a long chunk reads this much,
#: not Python's 8 KB (a PNG of 8 KB IDAT chunks was read whole), while runs of short chunks are
#: still read many at a time.
_PNG_WALK_BUFFER = 512


def _png_metadata_after_pixels(image_path: Path) -> bool:
    """Whether the PNG file's chunks, walked from its signature, hold an eXIf, or a text chunk
    whose keyword is one Pillow reads an orientation from (`_PNG_ORIENTATION_KEYWORDS`), after
    its first IDAT, before IEND or the first chunk that is not one (a damaged or unwritten
    tail ends the walk, as it ends Pillow's). Chunk lengths and types are read through a
    small buffer (`_PNG_WALK_BUFFER`), and a text chunk's keyword, nothing else: a walk over a
    PNG of 8 KB IDAT chunks reads a few hundred bytes of each, not the file, and a `Software`
    or `Comment` text after the pixels does not cost a decoding of every pixel."""
    with open(image_path, "rb", buffering=_PNG_WALK_BUFFER) as file:
        if file.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
        seen_pixels = False
        while len(head := file.read(8)) == 8:
            length, kind = int.from_bytes(head[:4], "big"), head[4:]
            if kind == b"IEND" or not kind.isalpha():
                return False
            if kind == b"IDAT":
                seen_pixels = True
            elif seen_pixels and kind == _PNG_EXIF_CHUNK:
                return True
            elif seen_pixels and kind in _PNG_TEXT_CHUNKS:
                keyword = file.read(min(length, _PNG_KEYWORD_BYTES))
                if keyword.split(b"\0", 1)[0] in _PNG_ORIENTATION_KEYWORDS:
                    return True
                length -= len(keyword)
            file.seek(length + 4, io.SEEK_CUR)  # the rest of its data, its CRC
    return False


def _orientation(img: Image.Image, image_path: Path) -> int:
    """The EXIF orientation tag of an open PIL image read from ``image_path`` (1, upright,
    when it has none or it cannot be read), as the edge's `collect` reads it (the format's own
    `getexif`): from the header, and of a PNG whose header holds no EXIF, also from an eXIf
    (or EXIF/XMP text) chunk after its pixels (IDAT). Such a PNG alone has its pixels decoded
    for it (Pillow reads those chunks only then); any other image is read from its header
    alone (a PNG's chunks walked by their lengths, `_png_metadata_after_pixels`)."""
    from PIL import Image

    try:
        # Image.getexif reads the header's EXIF (JPEG APP1, PNG eXIf before the pixels, TIFF
        # tags); PNG's own override decodes every pixel first when the header holds none,
        # then reads the chunks after them: only when there are any that could hold one.
        if (
            img.format == "PNG"
            and "exif" not in img.info
            and _png_metadata_after_pixels(image_path)
        ):
            return int(img.getexif().get(EXIF_ORIENTATION, 1))
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


def _refuse_unwritten(image_path: Path, image_format: str | None) -> None:
    """`VocError` in the edge's words (`preprocess.check_written`) when the image file's tail
    is zeros before its image data ends (not all written, or cut short and padded): read whole
    only when it is a JPEG or PNG (``image_format``, as Pillow's header read named it: a TIFF,
    BMP or PGM black at its bottom is not read) whose last UNWRITTEN_TAIL_BYTES bytes are all
    zeros, else a read of those last ones, so the header read stays cheap and `train`, `data
    split` and `data check` refuse the file before any training, as the edge would."""
    from splitdet.edge.preprocess import UNWRITTEN_TAIL_BYTES, ImageError, check_written

    if image_format not in ("JPEG", "PNG"):  # (the formats `check_written` looks at)
        return
    with open(image_path, "rb") as file:
        size = file.seek(0, io.SEEK_END)
        if size < UNWRITTEN_TAIL_BYTES:
            return
        file.seek(size - UNWRITTEN_TAIL_BYTES)
        if any(file.read()):
            return
        file.seek(0)
        data = file.read()  # (within MAX_FILE_BYTES: `_refuse_past_the_edge_limits`)
    try:
        check_written(data, str(image_path))
    except ImageError as exc:
        raise VocError(str(exc)) from None


def _image_header(image_path: Path, ann_path: Path | None) -> tuple[tuple[int, int], int]:
    """``((width, height) px, EXIF orientation)`` of the image file, from one header read (no
    pixels decoded); `VocError` names an unreadable file (and ``ann_path``), or one the edge
    refuses (its size, its mode, several frames, a zero-padded tail: `_refuse_unwritten`)."""
    from PIL import Image  # header only; Pillow does not decode pixels on open

    try:
        with Image.open(image_path) as img:
            _refuse_past_the_edge_limits(img, image_path)
            _refuse_what_the_edge_refuses(img, image_path)
            _refuse_unwritten(image_path, img.format)
            return img.size, _orientation(img, image_path)
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
    body is corrupt or truncated (its header, read when the split was, looked fine; a JPEG or
    PNG cut short that Pillow fills in, as the edge refuses it), and one the edge refuses (float
    "F" and other modes it does not take, several frames).

    Each mode is converted as the edge converts it (`splitdet.edge.preprocess`): palette, CMYK,
    YCbCr and alpha images to RGB by Pillow, alpha dropped; "LA", "1" to grayscale. A 16-bit
    (or 32-bit integer) grayscale image's values are taken over 0..2**pixel_bits - 1
    (`ModelConfig.pixel_bits`, as the edge takes them) and rounded to 8 bits; VocError for a
    pixel past that.

    What training's augmentation reads (PIL's crops and resizes work on 8 bits: a 12-bit
    image's levels within half a grey level). Evaluation reads images as the edge does, every
    level kept (`evaluate_predict.edge_image`), so its figures and calibrated threshold are of
    the edge's inputs.
    """
    return load_rgb_and_peak(image_path, pixel_bits)[0]


def load_rgb_and_peak(image_path: Path, pixel_bits: int = 16) -> tuple[Image.Image, int | None]:
    """(`load_rgb`'s image, the largest pixel value of a 16-bit grayscale image, else None):
    one decoding for both.

    The file's bytes are looked at first as the edge looks at them
    (`splitdet.edge.preprocess.check_written`, `check_encoded`): a JPEG or PNG whose tail is
    zeros before its image data ends (not all written, or cut short and padded with zeros,
    which Pillow decodes without an error), a JPEG of more scans than any encoder writes
    (a decoder-stalling file) and, with `pixel_bits` other than 16, a 16-bit colour PNG (read
    at 8 bits only) are a VocError. So is, once decoded, a JPEG or PNG (16-bit ones too) whose
    compressed data ends early or is damaged, which Pillow decodes without an error, the rest
    filled in (a JPEG flat grey to its end, a PNG black below its last row written): the edge's
    own check and message (`preprocess.check_not_filled`; for nearly every image one pixel or
    row looked at). A PGM of a maxval other than 255 and 65535 is read by the edge's own
    reader (`preprocess.read_pgm`), over its maxval whatever `pixel_bits` (peak None); those
    two are read as any 8/16-bit image."""
    from PIL import Image

    from splitdet.edge.preprocess import (
        WIDE_GRAY_MODES,
        ImageError,
        check_encoded,
        check_not_filled,
        check_written,
        read_pgm,
    )
    from splitdet.shared.config import pixel_full_scale

    try:
        data = Path(image_path).read_bytes()
        check_written(data, str(image_path))  # (before Pillow: it decodes the zeros silently)
        check_encoded(data, str(image_path), pixel_bits)
        pgm = read_pgm(data, str(image_path))
        if pgm is not None:
            return _pgm_rgb(*pgm), None
        with Image.open(io.BytesIO(data)) as img:
            # before convert("RGB"), which would make a float image black, not refuse it
            _refuse_what_the_edge_refuses(img, image_path)
            img.load()
            check_not_filled(data, str(image_path), img)  # (the edge's, after its decoding)
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
    except ImageError as exc:  # the edge's checks: their message, naming the file
        raise VocError(str(exc)) from None
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError... for bad data
        raise VocError(f"{image_path}: cannot decode image: {exc}") from None


def _pgm_rgb(pixels: np.ndarray, maxval: int) -> Image.Image:
    """A PGM's pixels (`preprocess.read_pgm`) as an RGB PIL image: scaled over its maxval, as
    the edge scales them, and rounded to 8 bits as `load_rgb_and_peak` rounds 16-bit ones."""
    import numpy as np
    from PIL import Image

    gray = (pixels.astype(np.float64) * (255 / maxval) + 0.5).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")
