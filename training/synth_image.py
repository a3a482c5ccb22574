"""One synthetic gasket inspection image, rendered deterministically from a seed.

`generate_image` renders image ``index`` of a seed stream: the part and its texture
(`synth_part`), the look-alikes (`synth_lookalikes`) and, on defective images, the scratches
(`synth_scratches`), each from its own random generator spawned from
``numpy.random.SeedSequence([seed, stream, index])``, then composes them over the background,
adds signal-dependent sensor noise and a slight white-balance tint, and returns a `SynthImage`:
the uint8 RGB pixels, the scratches' tight boxes and masks, the look-alikes and the JPEG quality
to save it with. It also holds what a dataset records about its images: the class
name, the camera's size, the generator version and the seed streams, and `parse_size` for sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from splitdet.training.synth_lookalikes import add_lookalikes
from splitdet.training.synth_part import render_part
from splitdet.training.synth_scratches import StrokeMask, add_scratches

__all__ = [
    "CLASS_NAME",
    "FULL_SIZE",
    "GENERATOR_VERSION",
    "STREAM_TEST",
    "STREAM_TRAINVAL",
    "SynthImage",
    "check_size",
    "generate_image",
    "parse_size",
]

#: The one object class the generator annotates.
CLASS_NAME = "scratch"
#: The paper's camera resolution, (width, height).
FULL_SIZE: tuple[int, int] = (2448, 2048)
#: Bumped whenever the rendering changes, so a dataset records which images it holds.
GENERATOR_VERSION = 4
#: Streams of per-image seeds: train/val and the held-out test split never share an image.
STREAM_TRAINVAL = 0
STREAM_TEST = 1
_F32 = np.float32


@dataclass
class SynthImage:
    """One rendered image and its ground truth.

    ``image``: uint8 ``(H, W, 3)``. ``boxes``: float32 ``(N, 4)`` scratch boxes ``[x1, y1, x2, y2]``
    in 0-based continuous pixel coordinates (pixel ``i`` spans ``[i, i+1)``), empty for a
    defect-free image. ``masks``: one `StrokeMask` per box. ``lookalikes``: ``(kind, box)`` of each
    non-scratch distractor drawn (dust, stain, toolmark), for inspection and tests only.
    ``jpeg_quality``: the quality this image is saved with.
    """

    image: np.ndarray
    boxes: np.ndarray
    masks: list[StrokeMask]
    lookalikes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    jpeg_quality: int = 92

    @property
    def labels(self) -> list[str]:
        """The class name of each box (every box is a scratch)."""
        return [CLASS_NAME] * len(self.boxes)


def parse_size(text: str) -> tuple[int, int]:
    """``"2448x2048"`` -> ``(2448, 2048)`` (width, height); raises ValueError."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) != 2:
        raise ValueError(f"size must be WIDTHxHEIGHT, e.g. 2448x2048, got {text!r}")
    try:
        w, h = int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"size must be WIDTHxHEIGHT in integers, got {text!r}") from None
    check_size((w, h))
    return w, h


def check_size(size: tuple[int, int]) -> None:
    """Raise ValueError unless ``size`` (width, height) is 256..16384 px per side."""
    w, h = size
    if not (256 <= w <= 16384 and 256 <= h <= 16384):
        raise ValueError(f"image size must be between 256 and 16384 px per side, got {w}x{h}")


def _rngs(seed: int, stream: int, index: int) -> list[np.random.Generator]:
    """Independent generators for the part, the look-alikes, the scratches and the noise.

    Separate streams make an image's defective and defect-free renderings identical except
    for the scratch pixels (the tests rely on it)."""
    children = np.random.SeedSequence([seed, stream, index]).spawn(4)
    return [np.random.Generator(np.random.PCG64(c)) for c in children]


def generate_image(
    seed: int,
    index: int,
    size: tuple[int, int] = FULL_SIZE,
    defective: bool = True,
    *,
    stream: int = STREAM_TRAINVAL,
) -> SynthImage:
    """Render image ``index`` of ``stream`` under ``seed``; ``size`` is (width, height).

    Deterministic: the same arguments give the same pixels and boxes in any process.
    ``defective=False`` draws no scratches (``boxes`` is empty) but still draws look-alikes.
    """
    width, height = int(size[0]), int(size[1])
    check_size((width, height))
    rng, rng_looks, rng_scratch, rng_noise = _rngs(int(seed), int(stream), int(index))
    s = min(width / FULL_SIZE[0], height / FULL_SIZE[1])

    gain, refl, cov, window, part, bg = render_part(rng, (width, height), s)
    x0, y0, x1, y1 = window
    gain_level = float(gain[y0:y1, x0:x1].mean())

    lookalikes = add_lookalikes(rng_looks, part, s, refl, window)
    masks = add_scratches(rng_scratch, part, s, refl, cov, window, gain_level) if defective else []
    if defective and not masks:  # never silently mislabel: the size check makes this unreachable
        raise RuntimeError(f"could not place a scratch on image {index} at {width}x{height}")

    # Compose: metal inside the window over the dark background.
    grey = bg
    gw = gain[y0:y1, x0:x1]
    win = grey[y0:y1, x0:x1]
    win += cov * (gw * refl - win)

    # Sensor noise (signal-dependent), then a slight white-balance tint on three channels.
    noise = rng_noise.standard_normal((height, width), dtype=_F32)
    noise *= np.sqrt(_F32(rng.uniform(1.0, 2.5)) + _F32(0.02) * np.maximum(grey, 0))
    grey += noise
    tint = np.array([1.0 + rng.uniform(0.0, 0.03), 1.0, 1.0 - rng.uniform(0.0, 0.05)], _F32)
    image = np.empty((height, width, 3), dtype=np.uint8)
    for c in range(3):
        np.clip(grey * tint[c] + _F32(0.5), 0, 255, out=image[..., c], casting="unsafe")
    quality = int(rng.integers(90, 96))

    boxes = np.array([m.box for m in masks], dtype=_F32).reshape(-1, 4)
    return SynthImage(
        image=image, boxes=boxes, masks=masks, lookalikes=lookalikes, jpeg_quality=quality
    )
