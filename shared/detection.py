"""Domain types both halves speak (torch-free): an image's sizes and one detected box."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageMeta:
    """Sizes of the image the features came from.

    Attributes:
        original_hw: (h, w) of the image as read, px.
        resized_hw: (h, w) after the model's resize, before padding to /32, px.
        source: where the image came from (e.g. its file name), for logs only.
    """

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    source: str = ""


@dataclass(frozen=True)
class Detection:
    """One box: (x1, y1, x2, y2) in original-image px, its score, 1-based label and class name."""

    box: tuple[float, float, float, float]
    score: float
    label: int
    class_name: str
