"""Test streams for the benchmark: N images at a given defect rate, drawn from a VOC split."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from splitdet.training.voc import VocSample


def make_stream(
    samples: Sequence[VocSample], defect_rate: float, n_images: int, seed: int
) -> list[VocSample]:
    """`n_images` samples of which round(defect_rate * n) are defective, in seeded random order.

    Each kind is drawn without replacement while the split has enough, then the split is cycled
    again in a new shuffled order (so a 100-image stream at 5% from a split of 40 defect-free
    images repeats some of them; the report states the unique counts).
    """
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect rate must be in [0, 1], got {defect_rate}")
    if n_images <= 0:
        raise ValueError(f"a stream needs at least one image, got {n_images}")
    rng = random.Random(f"{seed}:{defect_rate}:{n_images}")
    defective = [s for s in samples if s.is_defective]
    free = [s for s in samples if not s.is_defective]
    n_defective = round(defect_rate * n_images)
    for pool, count, kind in (
        (defective, n_defective, "defective"),
        (free, n_images - n_defective, "defect-free"),
    ):
        if count and not pool:
            raise ValueError(
                f"the split has no {kind} images, but {n_images} images at defect rate "
                f"{defect_rate:g} need {count}"
            )
    picks = _draw(defective, n_defective, rng) + _draw(free, n_images - n_defective, rng)
    rng.shuffle(picks)
    return picks


def images_needed(defect_rate: float) -> int:
    """The fewest images a stream at `defect_rate` needs to be of that rate at all: one
    defective image when the rate is above 0, one defect-free when it is below 1 (the count of
    defective images is rounded: 5% of 10 images is none)."""
    needed = 1
    if defect_rate > 0:
        n = max(1, math.floor(0.5 / defect_rate))
        while round(defect_rate * n) == 0:
            n += 1
        needed = max(needed, n)
    if defect_rate < 1:
        n = max(1, math.floor(0.5 / (1.0 - defect_rate)))
        while n - round(defect_rate * n) == 0:
            n += 1
        needed = max(needed, n)
    return needed


def stream_problem(rate_option: str, rate: float, images_option: str, images: int) -> str | None:
    """Why a stream of `images` images cannot be of defect rate `rate`, naming the two options
    that set them, or None when it can."""
    if images >= images_needed(rate):
        return None
    return (
        f"{rate_option} {rate:g} with {images_option} {images}: {round(rate * images)} of "
        f"{images} images defective is not that rate; use {images_option} "
        f"{images_needed(rate)} or more"
    )


def _draw(pool: list[VocSample], count: int, rng: random.Random) -> list[VocSample]:
    drawn: list[VocSample] = []
    while len(drawn) < count:
        order = pool[:]
        rng.shuffle(order)
        drawn.extend(order[: count - len(drawn)])
    return drawn
