"""Image reading and preprocessing for the edge, in numpy + Pillow (no torch).

Reproduces torchvision's `GeneralizedRCNNTransform` in eval mode for one image:
normalise ((x - mean) / std on [0, 1] pixels), resize bilinearly (align_corners=False) by
`min(min_size / short side, max_size / long side)` with the output size truncated as torch
truncates it, then zero-pad bottom/right to multiples of 32.

Accepted inputs: 8-bit grayscale, 8-bit RGB (palette images are expanded to RGB), 16-bit
grayscale PNG/TIFF. Anything else (CMYK, alpha, float TIFF, multi-frame...) is refused with an
`ImageError` naming the file and the mode, never a traceback.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from splitdet.shared.spec import padded_size

#: Largest image accepted, in pixels (a decompression bomb is refused before decoding).
MAX_PIXELS = 64_000_000
#: Largest file accepted, in bytes.
MAX_FILE_BYTES = 256 * 1024 * 1024
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the problem."""


def _to_unit_float(image: Image.Image, source: str) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image, mode = image.convert("RGB"), "RGB"
    if mode == "RGB":
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0
    elif mode == "L":
        gray = np.asarray(image, dtype=np.float32) / 255.0
        array = np.broadcast_to(gray, (3, *gray.shape))
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
        gray = np.asarray(image).astype(np.float32)
        if gray.min(initial=0) < 0 or gray.max(initial=0) > 65535:
            raise ImageError(f"{source}: 32-bit integer pixels outside 0..65535 are not supported")
        gray /= 65535.0
        array = np.broadcast_to(gray, (3, *gray.shape))
    else:
        raise ImageError(
            f"{source}: unsupported image mode {mode!r}; expected 8-bit grayscale, 8-bit RGB or "
            "16-bit grayscale"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


def decode_image(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to Float32[3, H, W] in [0, 1]."""
    if not data:
        raise ImageError(f"{source}: empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{source}: {len(data)} bytes is larger than {MAX_FILE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageError(
                    f"{source}: {width}x{height} pixels exceeds the {MAX_PIXELS} pixel limit "
                    "(decompression bomb?)"
                )
            if getattr(image, "n_frames", 1) > 1:
                raise ImageError(f"{source}: multi-frame images are not supported")
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{source}: not an image file (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{source}: refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{source}: corrupt or truncated image ({exc})") from None
    return _to_unit_float(image, source)


def load_image(path: Path) -> np.ndarray:
    """Read an image file to Float32[3, H, W] in [0, 1]; ImageError names the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ImageError(f"{path}: {size} bytes is larger than {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return decode_image(data, str(path))


def resized_size(height: int, width: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(h, w) after torchvision's eval-mode resize of an (height, width) image.

    Raises ImageError when a side would shrink below 1 px (an image far more elongated than
    `max_size` / `min_size` allows, e.g. 1x2000 for a 512/640 model): nothing could read it.
    """
    scale = min(min_size / min(height, width), max_size / max(height, width))
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


def resize_bilinear(image: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Float32[C, H, W] -> Float32[C, h, w], as torch's bilinear interpolate (no antialias,
    align_corners=False); matches it to float32 rounding. Width first, then height."""
    _, height, width = image.shape
    y0, y1, wy0, wy1 = _bilinear_axis(height, out_hw[0])
    x0, x1, wx0, wx1 = _bilinear_axis(width, out_hw[1])
    across = image[:, :, x0] * wx0 + image[:, :, x1] * wx1
    return across[:, y0, :] * wy0[None, :, None] + across[:, y1, :] * wy1[None, :, None]


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
    image: np.ndarray,
    min_size: int,
    max_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> Prepared:
    """Normalise, resize and pad a Float32[3, H, W] image in [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image of shape [3, H, W], got {image.shape}")
    original_hw = (int(image.shape[1]), int(image.shape[2]))
    mean_a = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_a = np.asarray(std, dtype=np.float32)[:, None, None]
    normalised = (image - mean_a) / std_a
    resized_hw = resized_size(*original_hw, min_size, max_size)
    resized = resize_bilinear(normalised, resized_hw)
    padded_hw = padded_size(*resized_hw)
    batch = np.zeros((1, 3, *padded_hw), dtype=np.float32)
    batch[0, :, : resized_hw[0], : resized_hw[1]] = resized
    return Prepared(batch=batch, resized_hw=resized_hw, original_hw=original_hw)


def list_images(paths: list[Path], recursive: bool = False) -> list[Path]:
    """Expand folders into their image files (by suffix, sorted; with `recursive`, those of
    every subfolder too, hidden ones skipped); files are kept as given."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            found.append(path)
            continue
        pattern = "**/*" if recursive else "*"
        found.extend(
            sorted(
                p
                for p in path.glob(pattern)
                if p.suffix.lower() in IMAGE_SUFFIXES
                and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        )
    return found
