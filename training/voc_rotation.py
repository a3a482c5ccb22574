"""Rotated boxes in a VOC annotation: CVAT's "Pascal VOC 1.1" export writes a rotated
rectangle as its *unrotated* <bndbox> and the angle (degrees, about the box's centre) in
``<object><attributes><attribute><name>rotation</name><value>45.0</value></attribute>
</attributes>``. The readers take the axis-aligned box around the rotated rectangle
(`rotated_box`), clipped to the image, and `rotated_box_warnings` says, per annotation, how many
boxes were read so (larger than the part they mark), as the reader counted them.

Part of `splitdet.training.voc`'s annotation reading; standard library only.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

from splitdet.training.voc_types import VocError, VocSample

__all__ = ["ROTATION_ATTRIBUTE", "rotated_box", "rotated_box_warnings", "rotation_degrees"]

#: The <attribute> <name> (any case) CVAT writes a rectangle's rotation under.
ROTATION_ATTRIBUTE = "rotation"
#: Past the image by at most this much (px), a rotated box's corner is floating-point noise
#: (cos 90° is 6e-17, not 0): clipped without being counted as clipped.
NOISE_PX = 1e-6


def rotation_degrees(path: Path, obj: ET.Element, where: str) -> float | None:
    """The rotation of ``obj`` (an <object>) in degrees, from its <attributes>; None when it
    has none, or one of a multiple of 180° (the same axis-aligned box). `VocError` naming the
    file for a value that is not a finite number."""
    for attribute in obj.iterfind("attributes/attribute"):
        if (attribute.findtext("name") or "").strip().lower() != ROTATION_ATTRIBUTE:
            continue
        raw = (attribute.findtext("value") or "").strip()
        try:
            degrees = float(raw)
        except ValueError:
            degrees = math.nan
        if not math.isfinite(degrees):
            raise VocError(
                f"{path}: {where} has a rotation attribute that is not a number: {raw!r}"
            )
        return None if degrees % 180 == 0 else degrees
    return None


def rotated_box(
    box: tuple[float, float, float, float], degrees: float, width: int, height: int
) -> tuple[tuple[float, float, float, float], bool]:
    """(The axis-aligned box (x1, y1, x2, y2, 0-based continuous) around the VOC ``box``
    (xmin, ymin, xmax, ymax as written, 1-based: x1 = xmin - 1) rotated by ``degrees`` about
    its centre, clipped to a ``width`` x ``height`` image; whether the clipping cut more than
    floating-point noise off it). Half-extents |w cos| + |h sin| and |w sin| + |h cos|: the
    same for either sense of rotation."""
    x1, y1, x2, y2 = box[0] - 1.0, box[1] - 1.0, box[2], box[3]
    theta = math.radians(degrees)
    cos, sin = abs(math.cos(theta)), abs(math.sin(theta))
    w, h = x2 - x1, y2 - y1
    half_w, half_h = (w * cos + h * sin) / 2, (w * sin + h * cos) / 2
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    around = (cx - half_w, cy - half_h, cx + half_w, cy + half_h)
    clipped = (
        max(around[0], 0.0),
        max(around[1], 0.0),
        min(around[2], float(width)),
        min(around[3], float(height)),
    )
    cut = max(abs(a - b) for a, b in zip(around, clipped, strict=True))
    return clipped, cut > NOISE_PX


def rotated_box_warnings(root: Path, samples: Mapping[str, VocSample]) -> list[str]:
    """One warning per annotation of ``samples`` (id: the sample read from
    ``ROOT/Annotations/ID.xml``) holding rotated boxes (its ``rotated`` count, as the reader
    found them): how many, read as the axis-aligned box around each, and how many of those were
    clipped to the image. For `splitdet data check`."""
    warnings = []
    for image_id, sample in sorted(samples.items()):
        rotated, clipped = sample.rotated
        if rotated:
            path = Path(root) / "Annotations" / f"{image_id}.xml"
            cut = f"; {clipped} of them clipped to the {sample.width}x{sample.height} image"
            warnings.append(
                f"{path}: {rotated} rotated box(es) (CVAT's rotation attribute), each read as "
                "the axis-aligned box around it, larger than what it marks"
                + (cut if clipped else "")
                + ": draw them unrotated for tight boxes"
            )
    return warnings
