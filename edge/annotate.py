"""Draw detections on an image and save it (Pillow; no torch)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
    "name score" labels drawn, as JPEG or PNG by `path`'s suffix; returns `path`."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=90) if path.suffix.lower() in (".jpg", ".jpeg") else canvas.save(path)
    return path
