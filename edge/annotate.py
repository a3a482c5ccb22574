"""Draw detections on an image and save it (Pillow; no torch).

The file is written whole or not at all: encoded in memory, written to a temporary name in the
same folder and renamed over the target once complete (`splitdet.shared.atomic_file`), so a
full disk leaves no truncated image under the final name, and no temporary file either."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.probability_format import format_probability

BOX_COLOUR = (255, 64, 32)


def save_annotated(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    names: Sequence[str],
    path: Path,
    p_defect: float | None = None,
) -> Path:
    """Write `image` (Float32[3, H, W] in [0, 1]) with boxes (x1, y1, x2, y2 px) and
    "name score" labels drawn, as JPEG or PNG by `path`'s suffix (another of Pillow's by its
    suffix); returns `path`. Written whole or not at all (see the module docstring).

    Raises:
        OSError: it could not be written (the disk full, the folder not writable); nothing is
            left under `path` nor beside it.
        ValueError: a suffix Pillow writes no format for.
    """
    pixels = (np.clip(image.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)
    canvas = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 600))
    for box, score, name in zip(boxes, scores, names, strict=True):
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=BOX_COLOUR, width=width)
        draw.text((x1 + width, max(0.0, y1 - 12 - width)), f"{name} {score:.2f}", fill=BOX_COLOUR)
    if p_defect is not None:
        draw.text((8, 8), f"p(defect) {format_probability(p_defect)}", fill=BOX_COLOUR)
    path = Path(path)
    suffix = path.suffix.lower()
    kind = "JPEG" if suffix in (".jpg", ".jpeg") else Image.registered_extensions().get(suffix)
    if kind is None:
        raise ValueError(f"{path}: no image format is written as {suffix or 'no suffix'}")
    options = {"quality": 90} if kind == "JPEG" else {}
    # encoded in memory, then written by Python: Pillow's encoder writing to a file takes a
    # short write (the disk filling up under it) as done, and truncates the image unsaid
    encoded = io.BytesIO()
    canvas.save(encoded, format=kind, **options)
    atomic_write(path, encoded.getvalue())
    return path
