"""The values a VOC dataset is read into (`VocSample`, `VocObject`), the image extensions looked
for, and `VocError`, which every problem with the input raises.

Part of `splitdet.training.voc`, which re-exports these names and whose docstring ("the module
docstring" below) holds the layout and the coordinate conventions; standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: Image file extensions looked for in ``JPEGImages/``, in this order (each also upper-case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


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
    ``data check`` compares with the image the annotation is paired with; ``rotated``: how
    many of its boxes were CVAT rotated rectangles, read as the box around each, and how many
    of those were clipped to the image (`voc_rotation.rotated_box_warnings` says so); neither
    is part of the sample's identity."""

    image_id: str
    image_path: Path
    width: int
    height: int
    objects: tuple[VocObject, ...] = ()
    filename: str | None = field(default=None, compare=False, repr=False)
    rotated: tuple[int, int] = field(default=(0, 0), compare=False, repr=False)

    @property
    def is_defective(self) -> bool:
        """True when the image has at least one annotated object."""
        return len(self.objects) > 0
