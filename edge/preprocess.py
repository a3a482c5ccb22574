"""Image reading and preprocessing for the edge, in numpy + Pillow (no torch).

Reproduces torchvision's `GeneralizedRCNNTransform` in eval mode for one image:
normalise ((x - mean) / std on [0, 1] pixels), resize bilinearly (align_corners=False) by
`min(min_size / short side, max_size / long side)` with the output size truncated as torch
truncates it, then zero-pad bottom/right to multiples of 32.

Accepted inputs (Pillow modes), each to three equal or RGB channels in [0, 1]:
- 8-bit RGB and grayscale ("RGB", "L");
- converted by Pillow as training's `voc.load_rgb` converts them: palette ("P", "PA"), CMYK,
  YCbCr and alpha images ("RGBA", "RGBa", "RGBX") to RGB; "LA" and 1-bit ("1") to
  grayscale; alpha is dropped, not composited;
- 16-bit grayscale of either byte order ("I;16", "I;16B", "I;16L", "I;16N"), and 32-bit
  integer ("I", e.g. a 16-bit PGM or signed TIFF), scaled by 2**pixel_bits - 1: 65535 by
  default; 4095 for a model trained with `--pixel-bits 12` on a camera that saves its 12-bit
  values unscaled (the manifest's `pixel_bits`). A pixel past that value, or below 0, is refused:
  the model was not made for those images.
- PGMs ("P5", "P2") of a maxval other than 255 and 65535, read here (`read_pgm`), not by
  Pillow, over their own maxval whatever pixel_bits (those two as any 8/16-bit image).
A 16-bit colour PNG (RGB, gray + alpha, RGBA: Pillow reads its top 8 bits) is refused when
pixel_bits is not 16, and a JPEG of more than MAX_JPEG_SCANS scans always (`check_encoded`).
Anything else (float "F" TIFFs, Lab, multi-frame, 32-bit values past 65535...) is refused with
an `ImageError` naming the file and the mode; a file Pillow cannot decode (corrupt, truncated,
whatever Pillow raises), or one too large for the memory available, is an `ImageError` too,
never a traceback: the daemon quarantines it and goes on. So is a JPEG or PNG whose compressed
data ends early, which Pillow decodes without an error, the rest filled in: a JPEG flat grey to
its end, a PNG black below its last row written (`check_not_filled`, which training's reader
runs too).

`frame_warning` tells of an image that is judged all the same but whose pixels say the camera
may not see the part: a blank frame, a 16-bit one of 12-bit values.

Decoding keeps the decoder's integer pixels (`decode_pixels`: a `Pixels`, 1 or 3 bands of 1, 2
or 4 bytes a pixel), and `prepare` converts to float only the pixels its resize reads, a band at
a time (a downscale by 4 reads about a quarter of them; a grayscale band once for all three
channels): the same float32 numbers, bit for bit, as converting the whole image first, which
`decode_image` still does (Float32[3, H, W] in [0, 1], 12 bytes a pixel) for callers that want
the float image. Memory: `prepare` of a `Pixels` needs its integer bands plus about two float
channels of the pixels its resize reads (of a float image, that image plus as much).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
import threading
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, UnidentifiedImageError

from splitdet.edge.store_schema import BLANK_FRAME, DIM_WIDE_FRAME
from splitdet.shared.config import pixel_full_scale
from splitdet.shared.regular_file import file_kind
from splitdet.shared.spec import MAX_ORIGINAL_SIDE, padded_size

log = logging.getLogger(__name__)

#: Largest image accepted, in pixels (a decompression bomb is refused before decoding).
MAX_PIXELS = 64_000_000
#: Bytes read at a time from an image file that grows while it is read (`read_image_file`).
READ_CHUNK_BYTES = 1 << 20
#: Largest file accepted, in bytes.
MAX_FILE_BYTES = 256 * 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: A JPEG or PNG ending in at least this many zero bytes, its segments or chunks not reaching
#: its end (end-of-image marker, IEND chunk) before them, is not all written: its writer sized
#: the file first (Windows copies to a share do), then stalled. Pillow decodes such a file
#: without a word, the missing part as grey or black. (A JPEG's compressed scan data holds no
#: end-of-image marker: a 0xFF byte in it is followed by 0x00 or a restart marker.)
UNWRITTEN_TAIL_BYTES = 1024
#: What a JPEG decoder gives every channel of the blocks it has no data for (all coefficients
#: zero: YCbCr 128, 128, 128 is RGB 128, 128, 128). A JPEG whose scan data ends early (cut, and
#: an end marker appended; or damaged) decodes without an error, from there on flat grey:
#: refused (`_jpeg_grey_from`, `_jpeg_ran_short`).
JPEG_FILL_VALUE = 128
#: The block side of the grid whose last block (bottom-right, 1..8 px a side when the image's
#: are not multiples of 8) of a decoded JPEG is looked at for that grey (of a 16 px MCU, its
#: chroma blended with its neighbours', the last 8). A scan that ends within the last block
#: leaves it partly grey: not refused.
JPEG_FILL_ROWS = 8
#: Most start-of-scan segments a JPEG may hold. Encoders write one for a baseline JPEG, about 10
#: for a progressive colour one, a few dozen at most; a decoder's time grows with the scans times
#: the pixels, so a small crafted file of thousands of scans stalls it for minutes.
MAX_JPEG_SCANS = 100


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


#: Pillow modes taken as RGB after Pillow's own conversion (as training's `load_rgb` does).
TO_RGB_MODES = ("P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
#: Pillow modes taken as grayscale after Pillow's own conversion (alpha dropped, 1-bit to 0/255).
TO_GRAY_MODES = ("LA", "1")  # (not "La": Pillow cannot convert it)
#: 16-bit grayscale in either byte order, and 32-bit integers (accepted within the model's
#: 0..2**pixel_bits - 1).
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _channel(pixels: np.ndarray, full_scale: float, out: np.ndarray) -> None:
    """out[...] = pixels / full_scale in float32, without a float copy of `pixels`: the same
    float32 numbers as `pixels.astype(np.float32) / full_scale`."""
    np.divide(pixels, np.float32(full_scale), out=out, dtype=np.float32)


@dataclass(frozen=True, eq=False)
class Pixels:
    """A decoded image's integer pixels as its decoder gave them, not yet converted to float:
    what `decode_pixels` returns and `prepare` takes, converting only the pixels its resize
    reads (`to_unit_float` converts them all: `decode_image`'s Float32[3, H, W] in [0, 1]).

    Attributes:
        bands: one band (grayscale: all three channels) or three (red, green, blue), each an
            integer array [H, W], all of one shape: UInt8, UInt16 (either byte order) or Int32
            (Pillow's "I" mode). Every value lies within 0..full_scale: checked here (a min and
            a max per band), but for the decoder's own (`in_range`). Kept as read-only views.
        full_scale: the value of full brightness (1.0), which each value is divided by: 255 for
            8-bit images, 2**pixel_bits - 1 for 16/32-bit grayscale, a PGM's own maxval; a
            whole number.
        in_range: the bands are known to lie within 0..full_scale (`decode_pixels` checked
            them as it decoded): not looked at again. Leave it False for pixels of one's own
            (a camera SDK's buffer): `prepare` reads them unchecked, and a 12-bit value
            MSB-aligned in 16 bits, or a negative one, would be judged as garbage.
    """

    bands: tuple[np.ndarray, ...]
    full_scale: int
    in_range: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        """ValueError for bands that are not 1 or 3 non-empty integer arrays [H, W] of one
        shape, a full scale that is not a whole number of at least 1, or (unless `in_range`) a
        value outside 0..full_scale."""
        bands = tuple(self.bands)
        if len(bands) not in (1, 3):
            raise ValueError(f"expected 1 or 3 bands, got {len(bands)}")
        shape = np.shape(bands[0])
        for band in bands:
            if not isinstance(band, np.ndarray) or band.dtype.kind not in "ui":
                raise ValueError(f"expected integer numpy bands, got {type(band).__name__}")
            if band.ndim != 2 or band.shape != shape or band.size == 0:
                raise ValueError(f"expected non-empty bands [H, W] of one shape, got {band.shape}")
        scale = self.full_scale
        whole = isinstance(scale, (int, np.integer)) or (
            isinstance(scale, (float, np.floating)) and float(scale).is_integer()
        )
        if isinstance(scale, bool) or not whole or scale < 1:
            raise ValueError(f"expected a whole full scale of at least 1, got {scale!r}")
        scale = int(scale)
        if not self.in_range:
            for band in bands:
                if band.dtype.kind == "u" and np.iinfo(band.dtype).max <= scale:
                    continue  # (UInt8 over 255: no value can lie outside)
                low, high = int(band.min()), int(band.max())
                if low < 0 or high > scale:
                    raise ValueError(
                        f"expected pixels within 0..{scale} (the full scale given), got "
                        f"{low}..{high}: scale them, or give their own full scale"
                    )
        views = []
        for band in bands:
            view = band.view()
            view.flags.writeable = False  # (the view's flag: the caller's array keeps its own)
            views.append(view)
        object.__setattr__(self, "bands", tuple(views))
        object.__setattr__(self, "full_scale", int(self.full_scale))

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the image, px."""
        height, width = self.bands[0].shape
        return int(height), int(width)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(3, H, W): the shape of the float image it stands for (`to_unit_float`)."""
        return (3, *self.hw)

    def to_unit_float(self) -> np.ndarray:
        """The image as Float32[3, H, W] in [0, 1]: each value divided by `full_scale` in
        float32 (a grayscale band copied to all three channels), as `decode_image` returns."""
        array = np.empty(self.shape, dtype=np.float32)
        for c, band in enumerate(self.bands):
            _channel(band, float(self.full_scale), array[c])
        if len(self.bands) == 1:
            array[1] = array[0]
            array[2] = array[0]
        return array


#: `frame_warning`'s kinds (BLANK_FRAME, DIM_WIDE_FRAME, FRAME_WARNINGS): defined with the
#: store's values (edge/store_schema.py), which keeps them in images.warnings.
#: A frame whose pixels all lie within this share of full scale (1%: 0..2 of 255) is blank.
BLANK_FRAME_SPREAD = 0.01
#: `frame_warning` looks at every this many-th row and column (1/16 of the pixels).
FRAME_SAMPLE_STEP = 4


@dataclass(frozen=True)
class FrameWarning:
    """An image that can be judged, but whose pixels say the camera may not be seeing the part
    (`frame_warning`).

    Attributes:
        kind: BLANK_FRAME or DIM_WIDE_FRAME.
        message: what it is, naming the image, its likely causes, and that it was judged.
        low, high: its darkest and brightest pixel looked at; full_scale: `Pixels.full_scale`.
    """

    kind: str
    message: str
    low: int
    high: int
    full_scale: int


def frame_warning(pixels: Pixels, source: str) -> FrameWarning | None:
    """What is amiss with a decoded frame that is judged all the same (the verdict is the
    model's), from the darkest and brightest of every FRAME_SAMPLE_STEP-th row and column of
    its bands; None for nearly every image:

    - BLANK_FRAME: they all lie within BLANK_FRAME_SPREAD of full scale of one another: black
      (a lens cap, the lamp off), white (saturated) or flat; a model was not made for such a
      frame, and calls it ok, or not, without a word;
    - DIM_WIDE_FRAME: a 16-bit (or 2**N - 1 scaled, N >= 12) grayscale frame whose brightest
      pixel is below 1/16 of full scale: at most 4 bits fewer used than it holds (a camera set
      to Mono12 whose values are saved unscaled reads nearly black to a 16-bit model).

    Cheap: a strided min and max of each band (a 2448 x 2048 RGB frame: well under 1 ms); a
    feature narrower than the step between the pixels looked at may not be seen."""
    step, full = FRAME_SAMPLE_STEP, pixels.full_scale
    spread = BLANK_FRAME_SPREAD * full
    low, high = full, 0
    for band in pixels.bands:
        sample = np.ascontiguousarray(band[::step, ::step])  # (a copy: faster to reduce)
        low, high = min(low, int(sample.min())), max(high, int(sample.max()))
        if high - low > spread and len(pixels.bands) > 1:
            return None  # (not blank: the other bands need no look; a colour frame is no wide one)
    if high - low <= spread:
        if high <= spread:
            what = "black: a lens cap, the lamp off, no exposure?"
        elif low >= full - spread:
            what = "white: saturated, the lamp too bright or the exposure too long?"
        else:
            what = "one flat level: a test pattern, a frame lost on the way?"
        return FrameWarning(
            BLANK_FRAME,
            f"{source}: a blank frame: every pixel looked at lies within {low}..{high} of "
            f"0..{full} ({what}); judged all the same, the verdict is the model's",
            low, high, full,
        )  # fmt: skip
    bits = full.bit_length()
    band = pixels.bands[0]
    if (
        len(pixels.bands) == 1
        and band.dtype.itemsize >= 2
        and full + 1 == 1 << bits
        and bits >= 12
        and high < (full + 1) >> 4
    ):
        return FrameWarning(
            DIM_WIDE_FRAME,
            f"{source}: a grayscale frame read over 0..{full} ({bits} bits) whose brightest "
            f"pixel looked at is {high}: at most {max(high.bit_length(), 1)} of those {bits} "
            f"bits used, nearly black to the model. A camera set to {bits - 4}-bit values "
            f"(Mono{bits - 4}) saved unscaled? Set it back, or train and export with "
            f"--pixel-bits {bits - 4} for such images; judged all the same, the verdict is the "
            "model's",
            low, high, full,
        )  # fmt: skip
    return None


def _to_pixels(image: Image.Image, source: str, pixel_bits: int) -> Pixels:
    """A decoded Pillow image's integer pixels (`Pixels`); ImageError for a mode refused, or
    for a 16/32-bit grayscale pixel outside 0..2**pixel_bits - 1."""
    mode = image.mode
    if mode in TO_RGB_MODES:
        image, mode = image.convert("RGB"), "RGB"
    elif mode in TO_GRAY_MODES:
        image, mode = image.convert("L"), "L"
    if mode == "RGB":  # a band at a time, each contiguous
        return Pixels(tuple(np.asarray(image.getchannel(c)) for c in range(3)), 255, True)
    if mode == "L":
        return Pixels((np.asarray(image),), 255, True)
    if mode in WIDE_GRAY_MODES:
        pixels = np.asarray(image)
        _check_wide_range(pixels, source, pixel_bits)
        return Pixels((pixels,), pixel_full_scale(pixel_bits), True)
    raise ImageError(
        f"{source}: unsupported image mode {mode!r}; expected grayscale (8/16-bit, 1-bit, "
        "with alpha), RGB (with alpha), palette, CMYK or YCbCr"
    )


def _check_wide_range(pixels: np.ndarray, source: str, pixel_bits: int) -> None:
    """ImageError when a wide grayscale image has a pixel outside 0..2**pixel_bits - 1."""
    full_scale = pixel_full_scale(pixel_bits)
    low, high = int(pixels.min(initial=0)), int(pixels.max(initial=0))
    if low >= 0 and high <= full_scale:
        return
    if low < 0 or high > 65535:
        raise ImageError(
            f"{source}: 32-bit integer pixels outside 0..65535 are not supported ({low}..{high})"
        )
    raise ImageError(
        f"{source}: a pixel is {high}, past the {pixel_bits}-bit range (0..{full_scale}) this "
        f"model takes 16-bit images in (trained with --pixel-bits {pixel_bits}); is the camera "
        "set to another bit depth than the training images had?"
    )


def _too_large(source: str, size: tuple[int, int] | None) -> ImageError:
    """The error for an image whose decoding ran out of memory (`size`: (W, H) when known)."""
    shown = f"{size[0]} x {size[1]} px" if size is not None else "size unknown"
    return ImageError(f"{source}: too large to decode in the memory available: {shown}")


def _check_size(source: str, width: int, height: int) -> None:
    """ImageError when a (width, height) px image is past MAX_PIXELS or MAX_ORIGINAL_SIDE."""
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{source}: {width}x{height} pixels exceeds the {MAX_PIXELS} pixel limit "
            "(decompression bomb?)"
        )
    if max(width, height) > MAX_ORIGINAL_SIDE:
        raise ImageError(
            f"{source}: {width}x{height} px has a side over {MAX_ORIGINAL_SIDE} px, more "
            "than the cloud takes"
        )


def _open(data: bytes, source: str) -> Image.Image:
    """The decoded Pillow image (pixels loaded), within the size limits (`_check_size`, before
    the pixels are decoded: Pillow's DecompressionBombWarning is for images past them)."""
    image = Image.open(io.BytesIO(data))
    _check_size(source, *image.size)
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        if image.format == "MPO":
            raise ImageError(
                f"{source}: a JPEG holding {frames} images (MPO, e.g. a stereo or preview "
                "image): only single-image files are supported"
            )
        raise ImageError(f"{source}: multi-frame images are not supported ({frames} frames)")
    try:
        image.load()
    except MemoryError:  # Pillow's own allocation of the pixels
        raise _too_large(source, image.size) from None
    return image


#: A PGM's magic numbers: binary ("P5") and plain, ASCII ("P2").
_PGM_MAGICS = (b"P5", b"P2")
#: Whitespace and comments ("#" to the end of the line) between a PGM header's fields.
_PNM_GAP = re.compile(rb"(?:[ \t\r\n\v\f]|#[^\r\n]*)*")
#: A PGM header's number (width, height, maxval); more digits than 10 are no size or maxval.
_PNM_NUMBER = re.compile(rb"[0-9]{1,10}(?![0-9])")
#: The bytes a plain PGM's pixels are written with (numbers and whitespace).
_PLAIN_PGM_BYTES = b"0123456789 \t\r\n\v\f"


#: PGM maxvals Pillow reads exactly, as an 8-bit or a 16-bit image: such a PGM is read as any
#: other 8/16-bit image (a 16-bit one over 2**pixel_bits - 1, as exports of `--pixel-bits 12`
#: were trained on it), not by `read_pgm`.
PILLOW_PGM_MAXVALS = (255, 65535)


def _corrupt(source: str, exc: Exception) -> ImageError:
    """The error of an image its decoder failed on with `exc` (Pillow's plugins raise more than
    OSError for bad data: TypeError, KeyError, IndexError, struct.error...)."""
    return ImageError(
        f"{source}: corrupt or truncated image, cannot be decoded ({type(exc).__name__}: {exc})"
    )


def read_pgm(data: bytes, source: str) -> tuple[np.ndarray, int] | None:
    """(pixels as UInt8 or UInt16[H, W], maxval) of a binary ("P5") or plain ("P2") PGM whose
    maxval is not one of PILLOW_PGM_MAXVALS; None for another format or such a maxval.
    ImageError naming `source` for a malformed header, a maxval outside 1..65535, a size past
    MAX_PIXELS or MAX_ORIGINAL_SIDE, pixels cut short, or a pixel past the maxval.

    Read here, not by Pillow: such a PGM states its own maximum and is read over it, whatever
    `pixel_bits` (Pillow rescales those maxvals to 8 or 16 bits, rounding, silently clips
    pixels past it, and does it a pixel at a time in Python). Binary pixels are one byte each
    below maxval 256, else two, most significant first (the Netpbm format)."""
    magic = data[:2]
    if magic not in _PGM_MAGICS:
        return None
    fields: list[int] = []
    pos = 2
    for name in ("width", "height", "maxval"):
        gap = _PNM_GAP.match(data, pos)
        assert gap is not None  # (the pattern matches the empty string)
        number = _PNM_NUMBER.match(data, gap.end())
        if gap.end() == pos or number is None:
            raise ImageError(
                f"{source}: a PGM ({magic.decode()}) whose header is malformed: no {name} where "
                "one must be, cannot be decoded"
            )
        fields.append(int(number[0]))
        pos = number.end()
    width, height, maxval = fields
    if width < 1 or height < 1:
        raise ImageError(f"{source}: a PGM of {width}x{height} px: no pixels")
    if not 1 <= maxval <= 65535:
        raise ImageError(f"{source}: a PGM whose maxval is {maxval}, outside 1..65535")
    if maxval in PILLOW_PGM_MAXVALS:
        return None  # (Pillow's 8- or 16-bit image, read as any other: `pixel_bits` applies)
    _check_size(source, width, height)
    if pos >= len(data) or data[pos] not in b" \t\r\n\v\f":
        raise ImageError(f"{source}: a PGM whose header does not end in whitespace after maxval")
    body = memoryview(data)[pos + 1 :]
    count = width * height
    if magic == b"P5":
        dtype = np.dtype(np.uint8) if maxval < 256 else np.dtype(">u2")
        if len(body) < count * dtype.itemsize:
            raise ImageError(
                f"{source}: a PGM cut short: its {width}x{height} pixels need "
                f"{count * dtype.itemsize} bytes, it holds {len(body)}"
            )
        pixels = np.frombuffer(body, dtype=dtype, count=count).astype(dtype.newbyteorder("="))
    else:
        pixels = _plain_pgm_pixels(bytes(body), count, source)
    pixels = pixels.reshape(height, width)
    high = int(pixels.max())
    if high > maxval:
        raise ImageError(f"{source}: a PGM with a pixel of {high}, past its own maxval {maxval}")
    return pixels, maxval


def _plain_pgm_pixels(text: bytes, count: int, source: str) -> np.ndarray:
    """The first `count` pixels of a plain PGM's raster (numbers parted by whitespace, comments
    dropped), as UInt16 (ImageError past 65535, for other bytes, or for fewer numbers)."""
    if b"#" in text:
        text = re.sub(rb"#[^\r\n]*", b" ", text)
    if text.translate(None, _PLAIN_PGM_BYTES):
        raise ImageError(f"{source}: a plain PGM (P2) whose pixels are not all numbers")
    numbers = np.fromstring(text, dtype=np.float64, sep=" ")  # exact to 2**53; past: refused
    if numbers.size < count:
        raise ImageError(f"{source}: a PGM cut short: {numbers.size} of its {count} pixels written")
    numbers = numbers[:count]
    high = float(numbers.max())
    if high > 65535:
        raise ImageError(f"{source}: a PGM with a pixel of {high:.0f}, past 65535")
    return numbers.astype(np.uint16)


#: PNG colour types Pillow reads at 8 bits when their samples are 16-bit: RGB, gray + alpha
#: ("LA": Pillow 13 opens it as RGBA from the top bytes, no mode holds its 16-bit gray band),
#: RGBA.
_PNG_WIDE_COLOUR = {2: "RGB", 4: "grayscale + alpha", 6: "RGBA"}


def check_encoded(data: bytes, source: str, pixel_bits: int = 16) -> None:
    """ImageError naming `source` for encoded image bytes that are not to be decoded, from
    their structure alone (no pixels decoded; the edge's `decode_image` and training's
    `voc.load_rgb` both check):

    - a JPEG of more than MAX_JPEG_SCANS scans (start-of-scan segments, counted by walking
      its segments): a crafted file of thousands stalls the decoder for minutes;
    - with `pixel_bits` other than 16, a 16-bit colour PNG (RGB, gray + alpha, RGBA), which
      Pillow reads at 8 bits (the top byte of each value): values of fewer bits saved unscaled
      would come out near-black, and values past 2**pixel_bits - 1 would not be refused as
      they are in a 16-bit grayscale image. (With 16 it is the same picture at 8 bits.)"""
    if data.startswith(b"\xff\xd8"):
        scans = _jpeg_walk(data, resync=True)[1]  # (past stray bytes, as the decoder goes on)
        if scans > MAX_JPEG_SCANS:
            raise ImageError(
                f"{source}: a progressive JPEG of {scans} scans, more than the "
                f"{MAX_JPEG_SCANS} any camera or encoder writes (a decoder-stalling file?)"
            )
    elif (
        pixel_bits != 16
        and data.startswith(_PNG_SIGNATURE)
        and data[12:16] == b"IHDR"
        and len(data) >= 26
        and data[24] == 16
        and data[25] in _PNG_WIDE_COLOUR
    ):
        raise ImageError(
            f"{source}: a 16-bit {_PNG_WIDE_COLOUR[data[25]]} PNG (colour type {data[25]}), "
            "which can only be read at 8 bits (the top 8 of each 16-bit value), not as the "
            f"{pixel_bits}-bit values --pixel-bits {pixel_bits} takes 16-bit images as "
            f"({pixel_bits}-bit values saved unscaled would come out near-black); save it as "
            "16-bit grayscale, as the training images were"
        )


#: PNG's signature, and its last chunk's type.
_PNG_SIGNATURE, _PNG_END = b"\x89PNG\r\n\x1a\n", b"IEND"


def _unwritten_tail(data: bytes) -> tuple[str, int]:
    """(format, bytes of zeros) for a JPEG or PNG that ends in zeros before its end was
    written; ("", 0) for none, fewer than UNWRITTEN_TAIL_BYTES zeros, an end reached before
    them (the zeros are padding, after a trailer or not), or another format."""
    if data.startswith(b"\xff\xd8"):
        kind, ends = "JPEG", _jpeg_ends
    elif data.startswith(_PNG_SIGNATURE):
        kind, ends = "PNG", _png_ends
    else:
        return "", 0
    tail = len(data) - len(data.rstrip(b"\0"))
    return ("", 0) if tail < UNWRITTEN_TAIL_BYTES or ends(data) else (kind, tail)


def check_written(data: bytes, source: str) -> None:
    """ImageError naming `source` for a JPEG or PNG whose last UNWRITTEN_TAIL_BYTES or more
    bytes are zeros, its image data not ended before them (`_unwritten_tail`): a file its
    writer sized first and had not filled yet, or one cut short and padded with zeros, which
    Pillow would decode without a word, the missing part as grey, black or noise. From the
    bytes alone (no pixels decoded); `decode_pixels` and training's reader (its header read,
    `voc.load_rgb_and_peak`) both check, with this one message."""
    kind, unwritten = _unwritten_tail(data)
    if unwritten:
        raise ImageError(
            f"{source}: a {kind} whose last {unwritten} of {len(data)} bytes are zeros, its image "
            "data not ended before them: not all written yet (its writer sized the file first) "
            "or cut short"
        )


def _png_ends(data: bytes) -> bool:
    """Whether walking a PNG's chunks from its signature reaches its IEND chunk within `data`
    (zeros read as a chunk have the type 0000, which no chunk has)."""
    end, pos = len(data), len(_PNG_SIGNATURE)
    while pos + 8 <= end:
        kind = data[pos + 4 : pos + 8]
        if kind == _PNG_END:
            return True
        if not kind.isalpha():
            return False  # zeros, or not written yet
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")  # length, type, data, CRC
    return False


#: Markers without a length field: TEM, RST0-7, SOI.
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})


#: Fill bytes before a marker.
_JPEG_FILL = re.compile(rb"\xff+")
#: The next marker past stray bytes: 0xFF (fill bytes too) before a byte that is no 0x00.
_NEXT_MARKER = re.compile(rb"\xff+[^\x00\xff]")
#: Where a JPEG's entropy-coded scan data ends: a 0xFF not followed by 0x00 (a stuffed 0xFF) or a
#: restart marker (RST0-7).
_SCAN_DATA_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def _jpeg_walk(
    data: bytes, resync: bool = False, segments: list[tuple[int, int, int, int]] | None = None
) -> tuple[bool, int]:
    """(whether walking a JPEG's own segments from its start reaches its end-of-image marker,
    the start-of-scan segments met on the way): an EXIF thumbnail's markers, inside its
    segment, and whatever follows the image (an MPO's other images) do not count. Scan data
    runs to the next marker: a 0xFF in it is followed by 0x00 or a restart marker. No pixel
    decoded; the scan data is skipped by a regular expression, not a byte at a time.
    `resync`: past a byte where a marker must be, go on from the next marker, as the decoder
    does (a stray byte then hides no scan from `check_encoded`); else the walk ends there.
    `segments`: each segment with a length met is appended as (marker, where its content
    starts, where it ends, where its entropy-coded data ends: a scan's, at the marker after it;
    another segment's, where it ends)."""
    end, pos, scans = len(data), 2, 0
    while pos < end:
        if data[pos] != 0xFF:
            found = _NEXT_MARKER.search(data, pos) if resync else None
            if found is None:
                return False, scans  # no marker where one must be: zeros, or not written yet
            pos = found.start()
        fill = _JPEG_FILL.match(data, pos)
        assert fill is not None  # (data[pos] is 0xFF)
        pos = fill.end()
        if pos >= end:
            return False, scans
        marker = data[pos]
        pos += 1
        if marker == 0xD9:
            return True, scans
        if marker in _STANDALONE_MARKERS:
            continue
        if pos + 2 > end:
            return False, scans
        start, pos = pos + 2, pos + int.from_bytes(data[pos : pos + 2], "big")
        content_end = pos
        if marker == 0xDA:  # start of scan: skip its entropy-coded data
            scans += 1
            found = _SCAN_DATA_END.search(data, pos)
            if found is None:
                return False, scans
            pos = found.start()
        if segments is not None:
            segments.append((marker, start, content_end, pos))
    return False, scans


def _jpeg_ends(data: bytes) -> bool:
    """Whether walking a JPEG's own segments from its start reaches its end-of-image marker
    (`_jpeg_walk`)."""
    return _jpeg_walk(data)[0]


def _jpeg_grey_from(image: Image.Image, pixels: Pixels | None) -> tuple[int, int] | None:
    """About where a decoded 8-bit RGB or grayscale JPEG turns flat JPEG_FILL_VALUE grey in
    every channel to its end, when its bottom-right JPEG_FILL_ROWS x JPEG_FILL_ROWS pixels are:
    (the first row of those at its bottom whose last pixel is, the column from which that row
    is; (0, 0): all of it); None when they are not (looked at up to the first other value: its
    last pixel, for nearly every image), and for other formats and modes. (A decoder fills
    blocks, left to right in rows of them: the grey starts in a block row, at some column, and
    takes every row below whole.) `pixels`: the image's (`_to_pixels`); None: taken from
    `image` (a copy of each band) only when its last pixel is that grey."""
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return None
    if pixels is None:
        corner = image.getpixel((image.width - 1, image.height - 1))
        if corner != (JPEG_FILL_VALUE,) * 3 and corner != JPEG_FILL_VALUE:
            return None  # (nearly every image: one pixel read)
        pixels = _to_pixels(image, "", 8)  # (RGB, L: no range to check, `source` unused)
    height, width = pixels.hw
    # the last block, on the block grid: 1..8 px of a side that is not a multiple of 8 (its
    # last 8 px would straddle two blocks, the grey in only the last)
    rows = height - (height - 1) // JPEG_FILL_ROWS * JPEG_FILL_ROWS
    cols = width - (width - 1) // JPEG_FILL_ROWS * JPEG_FILL_ROWS
    for band in pixels.bands:
        if band[-1, -1] != JPEG_FILL_VALUE or not (band[-rows:, -cols:] == JPEG_FILL_VALUE).all():
            return None
    edge = np.ones(height, dtype=bool)  # rows whose last pixel is that grey in every band
    for band in pixels.bands:
        edge &= band[:, -1] == JPEG_FILL_VALUE
    other = np.flatnonzero(~edge)
    row = 0 if other.size == 0 else int(other[-1]) + 1
    columns = np.zeros(width, dtype=bool)  # that row's pixels of another value
    for band in pixels.bands:
        columns |= band[row] != JPEG_FILL_VALUE
    other = np.flatnonzero(columns)
    return row, 0 if other.size == 0 else int(other[-1]) + 1


#: Bytes `_jpeg_ran_short` puts after each scan's entropy-coded data: fixed, pseudo-random, no
#: 0xFF (no marker, nothing to unstuff). Decoded as coefficients, they are no flat grey.
_JPEG_PROBE_PAD = bytes(np.random.default_rng(0x5D).integers(0, 0xFF, 4096, dtype=np.uint8))


#: Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic).
_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                          *range(0xCD, 0xD0)})  # fmt: skip
#: A restart marker (RST0-7) in scan data.
_RESTART_MARKER = re.compile(rb"\xff[\xd0-\xd7]")


@dataclass(frozen=True)
class _JpegScan:
    """A scan of a JPEG: where its entropy-coded data lies, and its restart markers' due."""

    start: int  # its entropy-coded data: data[start:end]
    end: int
    restarts: int  # restart markers it must hold (0: no restart interval)


def _ceil_div(a: int, b: int) -> int:
    """a / b rounded up, for a >= 0, b > 0."""
    return -(-a // b)


def _jpeg_scans(data: bytes) -> list[_JpegScan] | None:
    """The scans of a JPEG, with the restart markers each must hold: one after every restart
    interval (DRI) of MCUs but the last, the MCUs counted from the frame's size and sampling
    factors; None when its segments do not walk to its end-of-image marker, or its frame or
    scan headers do not read."""
    segments: list[tuple[int, int, int, int]] = []
    if not _jpeg_walk(data, segments=segments)[0]:
        # stray bytes between segments (padding some writers leave), which the decoder skips
        segments = []
        if not _jpeg_walk(data, resync=True, segments=segments)[0]:
            return None
    scans, interval, size, factors = [], 0, (0, 0), {}
    try:
        for marker, start, content_end, data_end in segments:
            if marker in _SOF_MARKERS:
                size = (int.from_bytes(data[start + 3 : start + 5], "big"),
                        int.from_bytes(data[start + 1 : start + 3], "big"))  # fmt: skip
                factors = {
                    data[at]: (data[at + 1] >> 4, data[at + 1] & 15)
                    for at in range(start + 6, start + 6 + 3 * data[start + 5], 3)
                }
            elif marker == 0xDD:  # define restart interval
                interval = int.from_bytes(data[start : start + 2], "big")
            elif marker == 0xDA:
                ids = [data[start + 1 + 2 * k] for k in range(data[start])]
                h_max = max(h for h, _ in factors.values())
                v_max = max(v for _, v in factors.values())
                width, height = size
                if len(ids) == 1:  # one component: its own blocks, each an MCU
                    h, v = factors[ids[0]]
                    across = _ceil_div(_ceil_div(width * h, h_max), 8)
                    down = _ceil_div(_ceil_div(height * v, v_max), 8)
                else:
                    across, down = _ceil_div(width, 8 * h_max), _ceil_div(height, 8 * v_max)
                due = _ceil_div(across * down, interval) - 1 if interval else 0
                scans.append(_JpegScan(content_end, data_end, max(due, 0)))
    except (IndexError, KeyError, ValueError, ZeroDivisionError):  # (a header cut short...)
        return None
    return scans if scans and size[0] and size[1] else None


def _jpeg_ran_short(data: bytes, image: Image.Image) -> bool:
    """Whether a JPEG's decoder ran out of scan data before its last block, given its decoded
    `image` (which ends in flat grey: `_jpeg_grey_from`):

    - a scan with a restart interval that holds fewer restart markers than its MCUs need, or
      not in their order (RST0, RST1... RST7, RST0...): data lost, the decoder skips on to the
      next marker it finds and fills what lies between with grey;
    - decoded again with bytes (`_JPEG_PROBE_PAD`) put after each scan's data, other pixels: a
      decoder that has all its blocks' data stops before them (the same pixels: a genuine grey
      band), one that ran short decodes them into its blocks instead of the grey.

    True too when that cannot be told (its segments not walked to their end, the probe not
    decoded): the grey is what a damaged file decodes to, and no camera's image has a band of
    exactly that grey (its noise)."""
    scans = _jpeg_scans(data)
    if scans is None:
        return True
    for scan in scans:
        if scan.restarts:
            found = _RESTART_MARKER.findall(data, scan.start, scan.end)
            # (one more after the last interval, as some hardware encoders write, is harmless)
            if len(found) < scan.restarts or any(
                marker[1] != 0xD0 + k % 8 for k, marker in enumerate(found[: scan.restarts])
            ):
                return True
    parts, start = [], 0
    for scan in scans:
        parts += [data[start : scan.end], _JPEG_PROBE_PAD]
        start = scan.end
    parts.append(data[start:])
    try:
        with _DecoderWarnings("", log_them=False):
            probe = Image.open(io.BytesIO(b"".join(parts)))
            probe.load()
        if probe.mode != image.mode or probe.size != image.size:
            return True
        return ImageChops.difference(image, probe).getbbox() is not None
    except MemoryError:
        raise
    except Exception:  # (whatever Pillow raises for it: not told apart)
        return True


#: PNG colour types -> samples a pixel (gray, RGB, palette, gray + alpha, RGBA).
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: The Adam7 passes of an interlaced PNG: (first row, first column, row step, column step).
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
          (1, 0, 2, 1))  # fmt: skip
#: Bytes inflated at a time when a PNG's compressed pixel data is measured (`_png_short`).
_INFLATE_CHUNK = 1 << 20


def _png_short(data: bytes, image: Image.Image) -> tuple[int, int, int] | None:
    """(bytes its zlib stream holds, bytes its pixels need, whole rows those hold: of a
    non-interlaced PNG, else -1) for a decoded PNG whose compressed pixel data ends before its
    last row, which Pillow decodes without an error, the rows missing black (zero bytes);
    None when it holds them all, and when its last row is not all zero bytes (nearly every
    image: one row's bytes compared), or its chunks cannot be read here (Pillow read them).
    Only a PNG with a black last row has its pixel data inflated again, counted and dropped a
    chunk at a time: about half its decoding time again (`_INFLATE_CHUNK` of memory)."""
    if image.format != "PNG":
        return None
    width, height = image.size
    last = image.crop((0, height - 1, width, height)).tobytes()
    if last.count(0) != len(last):
        return None
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    depth, colour, interlace = data[24], data[25], data[28]
    bits = depth * _PNG_SAMPLES.get(colour, 0)
    if not bits:
        return None
    passes = _ADAM7 if interlace == 1 else ((0, 0, 1, 1),)
    need = 0
    for row0, col0, row_step, col_step in passes:
        rows = (height - row0 + row_step - 1) // row_step if height > row0 else 0
        cols = (width - col0 + col_step - 1) // col_step if width > col0 else 0
        if rows and cols:
            need += rows * (1 + (cols * bits + 7) // 8)  # (a filter byte before each row)
    inflater, held, pos = zlib.decompressobj(), 0, len(_PNG_SIGNATURE)
    try:
        while pos + 8 <= len(data) and held < need and not inflater.eof:
            size = int.from_bytes(data[pos : pos + 4], "big")
            kind = data[pos + 4 : pos + 8]
            if kind == _PNG_END:
                break
            if kind == b"IDAT":
                chunk = memoryview(data)[pos + 8 : pos + 8 + size]
                while chunk and held < need and not inflater.eof:
                    held += len(inflater.decompress(chunk, _INFLATE_CHUNK))
                    chunk = inflater.unconsumed_tail
            pos += 12 + size
    except zlib.error:
        return None  # (Pillow decoded it: not ours to judge)
    if held >= need:
        return None
    rows = held // (1 + (width * bits + 7) // 8) if interlace != 1 else -1
    return held, need, rows


def check_not_filled(
    data: bytes, source: str, image: Image.Image, pixels: Pixels | None = None
) -> None:
    """ImageError (naming `source`) for a JPEG or PNG whose decoder filled a missing part
    without an error: a JPEG flat grey from some row to its end (`_jpeg_grey_from`) because its
    decoder ran out of scan data (`_jpeg_ran_short`), a PNG whose compressed pixel data ends
    before its last row (`_png_short`, black below).

    `image`: `data` decoded by Pillow (loaded, in the mode Pillow decoded it to); `pixels`: its
    `Pixels`, which `decode_pixels` has. Without them (training's `voc.load_rgb_and_peak`, which
    decodes with Pillow itself) a JPEG's are taken from `image` only when its last pixel is the
    decoder's grey: for nearly every image the check reads one pixel of a JPEG, one row of a
    PNG, as the edge's does."""
    width, height = image.size
    grey_from = _jpeg_grey_from(image, pixels)
    if grey_from is not None and _jpeg_ran_short(data, image):
        row, column = grey_from
        where = f"row {row} of {height}" + (f" (column {column} of {width})" if column else "")
        raise ImageError(
            f"{source}: a JPEG decoded as flat grey ({JPEG_FILL_VALUE} in every channel) from "
            f"about {where} on: its compressed data ends early or is damaged (premature end of "
            "the JPEG scan, the rest filled by the decoder)"
        )
    short = _png_short(data, image)
    if short is not None:
        held, need, rows = short
        where = f"after {rows} of its {height} rows" if rows >= 0 else "early"
        raise ImageError(
            f"{source}: a PNG whose compressed pixel data ends {where} ({held} of the {need} "
            "bytes its pixels need): the rest decoded as black; damaged, or cut short when "
            "written"
        )


def decode_image(data: bytes, source: str = "<bytes>", pixel_bits: int = 16) -> np.ndarray:
    """Decode encoded image bytes to Float32[3, H, W] in [0, 1]: `decode_pixels`, whose checks
    and errors it has, then `Pixels.to_unit_float` (ImageError naming `source` when that does
    not fit in memory). The edge's own paths keep the `Pixels` (`prepare` converts only what it
    reads); this is for callers that want the whole float image."""
    pixels = decode_pixels(data, source, pixel_bits)
    try:
        return pixels.to_unit_float()
    except MemoryError:  # numpy's _ArrayMemoryError too
        raise _too_large(source, (pixels.hw[1], pixels.hw[0])) from None


def decode_pixels(data: bytes, source: str = "<bytes>", pixel_bits: int = 16) -> Pixels:
    """Decode encoded image bytes to their integer pixels (`Pixels`, 0..full_scale: what
    `prepare` takes; `decode_image` gives the same as Float32[3, H, W] in [0, 1]); ImageError
    (naming `source`) for anything that cannot be, whatever Pillow raised, for a JPEG or PNG
    not all written yet (`check_written`), for one whose compressed data ends early,
    filled in by the decoder (`check_not_filled`), and for what `check_encoded` refuses (a JPEG
    of too many scans; a 16-bit colour PNG when `pixel_bits` is not 16). `pixel_bits`: the
    bits 16-bit grayscale values use (the model's `ModelConfig.pixel_bits`); a PGM is read over
    its own maxval (`read_pgm`), whatever `pixel_bits`.

    Warnings raised while decoding (Pillow's "Tag data larger than file", "Possibly corrupt
    EXIF data"...) do not go to stderr as they are, unnamed: each distinct one is logged once,
    at INFO, as "SOURCE: decoder warning: MESSAGE" (logger `splitdet.edge.preprocess`, a JSON
    line under the edge's JSON logging). INFO, as the decoder went on past what it warns of:
    an image that still decodes is used as it is, and one that does not is refused by the
    ImageError, which its caller reports as a warning of its own (the quarantine). Pillow's
    DecompressionBombWarning is an error, refused as past the pixel limit. The application's
    own warnings, raised meanwhile by its other threads, are its own: filtered by its filters
    and shown by its `warnings.showwarning` (`_DecoderWarnings`)."""
    if not data:
        raise ImageError(f"{source}: empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(too_large_text(source, len(data)))
    check_written(data, source)
    check_encoded(data, source, pixel_bits)
    try:  # (no Pillow: outside the decoder's warning window)
        pgm = read_pgm(data, source)
        if pgm is not None:
            return Pixels((pgm[0],), pgm[1], True)
    except ImageError:
        raise
    except MemoryError:
        raise _too_large(source, None) from None
    except Exception as exc:
        raise _corrupt(source, exc) from None
    with _DecoderWarnings(source):
        image, pixels = _decode(data, source, pixel_bits)
    try:  # (outside the decode's window, whose lock is the process's; a probe decode that
        # `_jpeg_ran_short` needs takes it again for its own decode)
        check_not_filled(data, source, image, pixels)
    except MemoryError:  # (the rare image looked at whole)
        raise _too_large(source, image.size) from None
    return pixels


#: Held while a `_DecoderWarnings` has the process's warning filters and display swapped
#: (they are the process's, and catch_warnings is not thread-safe: two threads decoding at
#: once, the hot folder's and the sender's --save-annotated, left them swapped for good).
_WARNINGS_LOCK = threading.Lock()
#: The module names of the image decoder's warnings, shown always while it decodes (each
#: file's own are logged, not one per process).
_DECODER_MODULES = r"PIL(\.|$)"


class _DecoderWarnings:
    """While inside, the warnings of Pillow's decoding in this thread are taken and logged as
    the file's (`_log_warnings`; Pillow's deprecation warnings, of the code, not of the file,
    left out); any other warning shown meanwhile (the application's other threads', this
    thread's other deprecations) is handed, on the way out, to the application's own
    `warnings.showwarning`, unchanged. No warning is made an error: Pillow's
    DecompressionBombWarning comes from images past MAX_PIXELS, which `_check_size` refuses
    right after Pillow reads their size (an error filter, the process's, raised in the
    application's own threads' Pillow calls too).

    Python 3.11's warning filters and display are the process's: the window is held under
    `_WARNINGS_LOCK`, and covers Pillow's work alone. Only the decoder's own modules' filter
    is changed ("always"): another thread's warnings are filtered by the application's
    filters as ever (one it made an error is raised in that thread); only their display is
    taken, then given back. (They are shown, not warned again: `warnings.warn_explicit`
    would check the filters a second time and drop a "default" one as already seen.)"""

    def __init__(self, source: str, log_them: bool = True) -> None:
        self.source = source
        self.log_them = log_them  # (False: the decoder's own dropped, the application's shown)
        self.shown: list[tuple[int, warnings.WarningMessage]] = []  # (thread ident, warning)
        self._catcher = warnings.catch_warnings()

    def __enter__(self) -> _DecoderWarnings:
        _WARNINGS_LOCK.acquire()
        try:
            self._catcher.__enter__()
            warnings.filterwarnings("always", module=_DECODER_MODULES)
            warnings.showwarning = self._show
        except BaseException:
            _WARNINGS_LOCK.release()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._catcher.__exit__(*exc_info)
        finally:
            _WARNINGS_LOCK.release()
        own = threading.get_ident()
        if self.log_them:
            _log_warnings(
                [w for t, w in self.shown if t == own and not _of_the_code(w)], self.source
            )
        for thread, w in self.shown:
            if thread != own or (_of_the_code(w) and not _of_the_decoder(w)):
                # the application's: shown as it shows them (the decoder's deprecations, shown
                # here only by its "always", are left out)
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)

    def _show(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: object = None,
        line: str | None = None,
    ) -> None:
        """`warnings.showwarning` while inside: note the warning and the thread it came from."""
        shown = warnings.WarningMessage(message, category, filename, lineno, file, line)
        self.shown.append((threading.get_ident(), shown))


def _of_the_code(warning: warnings.WarningMessage) -> bool:
    """Whether `warning` is a deprecation warning: of the code, not of the file decoded."""
    return issubclass(warning.category, (DeprecationWarning, PendingDeprecationWarning))


#: Where Pillow's modules are: a warning whose file is there is the decoder's.
_PIL_FOLDER = os.path.dirname(Image.__file__) + os.sep


def _of_the_decoder(warning: warnings.WarningMessage) -> bool:
    """Whether `warning` was raised in Pillow's own code."""
    return str(warning.filename).startswith(_PIL_FOLDER)


def _log_warnings(caught: list[warnings.WarningMessage], source: str) -> None:
    """Log each distinct warning of `caught` once, at INFO, naming `source` (`decode_pixels`)."""
    seen: set[str] = set()
    for warning in caught:
        message = " ".join(str(warning.message).split())
        if message not in seen:
            seen.add(message)
            log.info("%s: decoder warning: %s", source, message)


#: A known format's leading bytes: (signature, its name, Pillow's format id).
_SIGNATURES = (
    (_PNG_SIGNATURE, "PNG", "PNG"),
    (b"\xff\xd8", "JPEG", "JPEG"),
    (b"II*\x00", "TIFF", "TIFF"),
    (b"MM\x00*", "TIFF", "TIFF"),
    (b"GIF87a", "GIF", "GIF"),
    (b"GIF89a", "GIF", "GIF"),
    (b"BM", "BMP", "BMP"),
    (b"P2", "PGM", "PPM"),
    (b"P5", "PGM", "PPM"),
    (b"P3", "PPM", "PPM"),
    (b"P6", "PPM", "PPM"),
)


def _known_format(data: bytes) -> tuple[str, str] | None:
    """(name, Pillow's format id) of the format `data`'s leading bytes say it is; None for
    unknown bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP", "WEBP"
    return next(((name, fid) for sig, name, fid in _SIGNATURES if data.startswith(sig)), None)


def _unidentified(data: bytes, source: str) -> ImageError:
    """The error for bytes Pillow cannot identify: a damaged file of a known format, named by
    its leading bytes with the reason its Pillow plugin gives, or not an image file."""
    known = _known_format(data)
    if known is None:
        return ImageError(f"{source}: not an image file (unrecognised format)")
    name, format_id = known
    reason = "cannot identify image file"
    Image.init()
    factory = Image.OPEN.get(format_id, (None, None))[0]
    if factory is not None:
        try:
            factory(io.BytesIO(data), None).close()  # (its header alone: no pixels)
        except Exception as exc:
            # (Pillow's plugins give SyntaxError; a KeyError... of a damaged header is turned
            # into one with the KeyError's text alone ("10825"): named by its cause)
            cause = exc.__cause__ if type(exc) is SyntaxError and exc.__cause__ else exc
            reason = (
                str(cause) if type(cause) is SyntaxError else f"{type(cause).__name__}: {cause}"
            )
    return ImageError(
        f"{source}: a {name} file whose content is damaged or cut short, cannot be decoded "
        f"(Pillow: {reason})"
    )


def _decode(data: bytes, source: str, pixel_bits: int) -> tuple[Image.Image, Pixels]:
    """`decode_pixels`'s decoding by Pillow, within its warning filters (`_DecoderWarnings`):
    (the decoded Pillow image, its pixels)."""
    try:
        image = _open(data, source)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise _unidentified(data, source) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # (Pillow's own limits, past ours, refuse it as it opens: said as ours is)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found[1])} pixels" if found else "its pixel count"
        raise ImageError(
            f"{source}: {size} exceeds the {MAX_PIXELS} pixel limit (decompression bomb?)"
        ) from None
    except MemoryError:
        raise _too_large(source, None) from None
    except Exception as exc:
        # Pillow's plugins raise more than OSError for bad data (TypeError "Missing
        # dimensions" from a corrupt TIFF directory, KeyError, IndexError, struct.error...):
        # a bad file must be quarantined, not crash the daemon on every restart.
        raise _corrupt(source, exc) from None
    try:
        pixels = _to_pixels(image, source, pixel_bits)
    except ImageError:
        raise
    except MemoryError:  # numpy's _ArrayMemoryError too
        raise _too_large(source, image.size) from None
    except Exception as exc:  # Pillow's convert() failing on this file's data
        raise ImageError(
            f"{source}: cannot convert its {image.mode!r} pixels ({type(exc).__name__}: {exc})"
        ) from None
    return image, pixels


def file_size_text(size: int) -> str:
    """A byte count for a message: "3.0 GiB", "300.5 MiB", "12 bytes"."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size} bytes"


def too_large_text(source: str | Path, size: int) -> str:
    """The one message for an image file over `MAX_FILE_BYTES` (`size` in bytes), whoever
    finds it: "PATH is 3.0 GiB, over the 256 MiB limit" (in bytes where the rounded size would
    read as the limit itself)."""
    limit = f"{MAX_FILE_BYTES // 2**20} MiB"
    shown = file_size_text(size)
    if shown.split()[0] in (limit.split()[0], f"{MAX_FILE_BYTES / 2**20:.1f}"):
        shown, limit = f"{size} bytes", f"{limit} ({MAX_FILE_BYTES} bytes)"
    return f"{source} is {shown}, over the {limit} limit"


def _too_big(path: Path, size: int) -> ImageError:
    return ImageError(too_large_text(path, size))


def read_regular_file(path: Path) -> bytes:
    """The bytes of `path` when it is a regular file of at most `MAX_FILE_BYTES`: ImageError
    naming it when it is not (a FIFO, a device, a folder) or is too large, the OSError itself
    (FileNotFoundError, PermissionError, ...) when it cannot be looked at, opened or read, so
    that a caller can tell those apart (the hot folder waits for permissions, `read_image_file`
    says "cannot read").

    It is looked at (`os.stat`) before it is opened: a FIFO is never opened (opening one for
    reading waits for a writer), a device such as /dev/zero never read (it never ends), a
    1 GiB file never loaded. The file is opened without blocking and looked at again (`fstat`)
    in case it was replaced in between, and at most `MAX_FILE_BYTES` + 1 bytes are read (one
    that grows meanwhile)."""
    path = Path(path)
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ImageError(f"{path}: not a regular file ({file_kind(info.st_mode)}); not read")
    if info.st_size > MAX_FILE_BYTES:
        raise _too_big(path, info.st_size)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with open(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):  # replaced since the stat
            raise ImageError(f"{path}: not a regular file ({file_kind(info.st_mode)}); not read")
        if info.st_size > MAX_FILE_BYTES:  # (replaced by a larger one since)
            raise _too_big(path, info.st_size)
        # its size now, + 1 to see it grow (read(MAX_FILE_BYTES + 1) would allocate
        # 256 MiB for every image); a growing file is read on in chunks to the limit + 1
        chunks = [file.read(info.st_size + 1)]
        total = len(chunks[0])
        while total > info.st_size and total <= MAX_FILE_BYTES:
            chunk = file.read(min(READ_CHUNK_BYTES, MAX_FILE_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:  # it grew after the stat
        raise _too_big(path, len(data))
    return data


def read_image_file(path: Path) -> bytes:
    """The bytes of the image file `path`, read only when it is a regular file of at most
    `MAX_FILE_BYTES` (`read_regular_file`: never blocking on a FIFO, never reading past the
    limit); ImageError naming it otherwise (missing, unreadable, a FIFO or device, too
    large)."""
    try:
        return read_regular_file(path)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None


def load_image(path: Path, pixel_bits: int = 16) -> np.ndarray:
    """Read an image file (`read_image_file`) to Float32[3, H, W] in [0, 1]; ImageError names
    the file. `pixel_bits`: as `decode_image`'s."""
    return decode_image(read_image_file(path), str(path), pixel_bits)


def load_pixels(path: Path, pixel_bits: int = 16) -> Pixels:
    """Read an image file (`read_image_file`) to its integer pixels (`decode_pixels`);
    ImageError names the file. `pixel_bits`: as `decode_image`'s."""
    return decode_pixels(read_image_file(path), str(path), pixel_bits)


def input_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """The factor torchvision's eval-mode resize scales an (height, width) image by:
    ``min(min_size / short side, max_size / long side)``."""
    return min(min_size / min(height, width), max_size / max(height, width))


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after torchvision's eval-mode resize of an (height, width) image: scaled by
    `input_scale`, sizes truncated.

    Raises ImageError when a side would shrink below 1 px (an image far more elongated than
    `max_size` / `min_size` allows, e.g. 1x2000 for a 512/640 model): nothing could read it.
    """
    scale = input_scale(height, width, min_size, max_size)
    out = int(height * scale), int(width * scale)
    if min(out) < 1:
        raise ImageError(
            f"{width}x{height} px is too elongated for the model's input size "
            f"(min {min_size}, max {max_size} px): it would resize to {out[1]}x{out[0]}"
        )
    return out


def _bilinear_axis(
    in_size: int, out_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, computed as torch's CPU kernel computes them
    (align_corners=False): a float32 scale in/out, the source position in double rounded to
    float32, clamped at 0. Returns (low, high, weight_low, weight_high)."""
    scale = np.float32(np.float32(in_size) / np.float32(out_size))
    source = np.maximum(np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5, 0)
    source = source.astype(np.float32)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    weight_high = np.clip(source - low.astype(np.float32), 0, 1).astype(np.float32)
    return low, high, np.float32(1) - weight_high, weight_high


_Index = np.ndarray | slice


def _gather_axis(
    in_size: int, out_size: int
) -> tuple[_Index | None, _Index, _Index, np.ndarray, np.ndarray]:
    """`_bilinear_axis` over only the source indices it reads: (those indices, sorted, or None
    when it reads every one; low and high as positions among them; weight_low, weight_high).
    Indices that step evenly are slices (`_as_slice`)."""
    low, high, weight_low, weight_high = _bilinear_axis(in_size, out_size)
    used = np.unique(np.concatenate([low, high]))
    if used.size == in_size:
        return None, _as_slice(low), _as_slice(high), weight_low, weight_high
    low, high = np.searchsorted(used, low), np.searchsorted(used, high)
    return _as_slice(used), _as_slice(low), _as_slice(high), weight_low, weight_high


def _pick(array: np.ndarray, index: _Index, axis: int) -> np.ndarray:
    """`array`'s elements at `index` along `axis` (0 or 1): a view for a slice, else
    `np.take`'s copy (faster than fancy indexing)."""
    if isinstance(index, slice):
        return array[index] if axis == 0 else array[:, index]
    return array.take(index, axis=axis)


def _as_slice(indices: np.ndarray) -> np.ndarray | slice:
    """`indices` as the slice that picks the same elements when they step evenly (a view
    instead of a gathered copy: a downscale by a whole factor), else as they are."""
    steps = np.diff(indices)
    if indices.size == 0 or (steps.size and (steps[0] <= 0 or (steps != steps[0]).any())):
        return indices
    step = int(steps[0]) if steps.size else 1
    return slice(int(indices[0]), int(indices[-1]) + 1, step)


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Float32[C, H, W] -> Float32[C, h, w], as torch's bilinear interpolate (no antialias,
    align_corners=False); matches it to float32 rounding. Width first, then height."""
    _, height, width = image.shape
    y0, y1, wy0, wy1 = _bilinear_axis(height, out_hw[0])
    x0, x1, wx0, wx1 = _bilinear_axis(width, out_hw[1])
    across = image[:, :, x0] * wx0 + image[:, :, x1] * wx1
    return across[:, y0, :] * wy0[None, :, None] + across[:, y1, :] * wy1[None, :, None]


#: How far past [0, 1] an image's values may lie (float rounding of a caller's scaling).
UNIT_RANGE_SLACK = 1e-3
#: What `prepare` takes, as its errors say.
_UNIT_IMAGE = "Float32[3, H, W] in [0, 1]"


def check_unit_image(image: np.ndarray) -> None:
    """ValueError, saying what is expected, unless `image` is a floating-point numpy array
    [3, H, W] of finite values within [0, 1] (give or take `UNIT_RANGE_SLACK`): 8-bit pixels
    not divided by 255, or a NaN band from a camera's SDK, gave a verdict without a word (a
    NaN p_defect, never flagged: "defect-free"). Two reductions (min, max), no copy: NaN and
    infinities show in them."""
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"expected a numpy array {_UNIT_IMAGE}, got {type(image).__module__}."
            f"{type(image).__qualname__}; read image files with load_image or decode_image"
        )
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        scale = f" (divide by {np.iinfo(image.dtype).max})" if image.dtype.kind in "ui" else ""
        raise ValueError(f"expected {_UNIT_IMAGE}, got {image.dtype} values{scale}")
    if image.size == 0:
        raise ValueError(f"expected {_UNIT_IMAGE}, got an empty image of shape {image.shape}")
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int(image.size - np.count_nonzero(np.isfinite(image)))
        raise ValueError(
            f"expected {_UNIT_IMAGE}, got {bad} non-finite value(s) (NaN or infinity) of "
            f"{image.size}: a damaged frame"
        )
    if low < -UNIT_RANGE_SLACK or high > 1 + UNIT_RANGE_SLACK:
        raise ValueError(f"expected {_UNIT_IMAGE}, got values in [{low:g}, {high:g}]")


@dataclass(frozen=True)
class Prepared:
    """One image ready for the gate.

    Attributes:
        batch: Float32[1, 3, Hp, Wp], normalised, padded with zeros to multiples of 32.
        resized_hw: (h, w) after resize, before padding, px.
        original_hw: (h, w) of the image as read, px.
    """

    batch: np.ndarray
    resized_hw: tuple[int, int]
    original_hw: tuple[int, int]


def prepare(
    image: np.ndarray | Pixels,
    min_size: int,
    max_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> Prepared:
    """Normalise, resize and pad an image: a Float32[3, H, W] in [0, 1] (any floating dtype),
    or a decoded image's integer pixels (`Pixels`, `decode_pixels`).

    One channel at a time: a large image then needs two float channels beside itself, not
    two more whole images; every operation is per pixel and channel, so the numbers are those
    of normalising all three at once. Of a `Pixels`, only the integer pixels the resize reads
    are converted to float (a grayscale band once, for all three channels), by the same
    float32 division as `Pixels.to_unit_float`: the batch is bit for bit that of its float
    image. ValueError for an array that is not a floating-point [3, H, W] of finite values in
    [0, 1] (`check_unit_image`; a `Pixels`, its decoder's, is not scanned again); ImageError
    when it is too elongated, or when even that does not fit in memory."""
    if isinstance(image, Pixels):
        original_hw = image.hw
    else:
        check_unit_image(image)
        original_hw = (int(image.shape[1]), int(image.shape[2]))
    resized_hw = resized_size(*original_hw, min_size, max_size)
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    padded_hw = padded_size(*resized_hw)
    batch = np.zeros((1, 3, *padded_hw), dtype=np.float32)
    rows, y0, y1, wy0, wy1 = _gather_axis(original_hw[0], resized_hw[0])
    cols, x0, x1, wx0, wx1 = _gather_axis(original_hw[1], resized_hw[1])
    wy0, wy1 = wy0[:, None], wy1[:, None]
    try:
        unit = None  # a Pixels' band: gathered, in [0, 1]
        for c in range(3):
            # Only the pixels the bilinear kernel reads are normalised (a downscale by 4 reads
            # a quarter of them): per pixel the same float32 operations as normalising the
            # whole channel, so the same numbers (`resize_bilinear`'s, width first).
            if isinstance(image, Pixels):
                if c < len(image.bands):  # (a grayscale band: gathered and divided once)
                    band = _gathered(image.bands[c], rows, cols)
                    unit = np.divide(band, np.float32(image.full_scale), dtype=np.float32)
                    del band
                assert unit is not None
                if c + 1 < 3 and len(image.bands) == 1:  # kept for the next channels
                    normalised = unit - mean_a[c]
                else:  # (no other channel reads it: ours to change)
                    normalised, unit = np.subtract(unit, mean_a[c], out=unit), None
            else:
                source = _gathered(image[c], rows, cols)
                if source.base is None and source.dtype == np.float32:  # (a copy: ours)
                    normalised = np.subtract(source, mean_a[c], out=source)
                else:
                    normalised = source - mean_a[c]  # float32 (the whole-image code's dtype)
                del source
            np.divide(normalised, std_a[c], out=normalised)
            across = _pick(normalised, x0, 1) * wx0 + _pick(normalised, x1, 1) * wx1
            del normalised
            batch[0, c, : resized_hw[0], : resized_hw[1]] = (
                _pick(across, y0, 0) * wy0 + _pick(across, y1, 0) * wy1
            )
            del across  # before the next channel's
    except MemoryError:
        raise ImageError(
            f"{original_hw[1]} x {original_hw[0]} px is too large to preprocess in the memory "
            "available"
        ) from None
    return Prepared(batch=batch, resized_hw=resized_hw, original_hw=original_hw)


def _gathered(channel: np.ndarray, rows: _Index | None, cols: _Index | None) -> np.ndarray:
    """`channel`'s [H, W] elements at `rows` and `cols` (`_gather_axis`'s; None: all), rows
    first (whole rows copied, then the columns of fewer rows): a view where both are slices
    or None."""
    if rows is not None:
        channel = _pick(channel, rows, 0)
    if cols is not None:
        channel = _pick(channel, cols, 1)
    return channel
