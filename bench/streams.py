"""Test streams for the benchmark: N images at a given defect rate, drawn from a VOC split."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from splitdet.training.voc import VocSample


def make_stream(
    samples: Sequence[VocSample], defect_rate: float, n_images: int, seed: int
) -> list[VocSample]:
    """`n_images` samples of which `defective_count(defect_rate, n_images)` are defective, in
    seeded random order.

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
    n_defective = defective_count(defect_rate, n_images)
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


def defective_count(defect_rate: float, n_images: int) -> int:
    """How many of `n_images` images a stream at `defect_rate` holds defective: Python's
    round() of the product, to the nearest whole image, a half to the even count (50% of 5
    images, 2.5, is 2; 50% of 7, 3.5, is 4), of the product as a float (5% of 30 is
    1.5000000000000002 in floating point, so 2; 5% of 10 is 0.5, so 0)."""
    return round(defect_rate * n_images)


def images_needed(defect_rate: float) -> int:
    """The fewest images a stream at `defect_rate` needs to be of that rate at all: one
    defective image when the rate is above 0, one defect-free when it is below 1 (the count of
    defective images is rounded: 5% of 10 images is none)."""
    needed = 1
    if defect_rate > 0:
        n = max(1, math.floor(0.5 / defect_rate))
        while defective_count(defect_rate, n) == 0:
            n += 1
        needed = max(needed, n)
    if defect_rate < 1:
        n = max(1, math.floor(0.5 / (1.0 - defect_rate)))
        while n - defective_count(defect_rate, n) == 0:
            n += 1
        needed = max(needed, n)
    return needed


def stream_problem(
    rate_option: str, rate: float, images_option: str, images: int, enough: int | None = None
) -> str | None:
    """Why a stream of `images` images cannot be of defect rate `rate`, naming the two options
    that set them, or None when it can. ``enough``: the image count to suggest instead of
    `images_needed` (`rates_problem` gives one every other rate's checks pass at too)."""
    if images >= images_needed(rate):
        return None
    return (
        f"{rate_option} {rate:g} with {images_option} {images}: "
        f"{defective_count(rate, images)} of "
        f"{images} images defective is not that rate; use {images_option} "
        f"{enough if enough is not None else images_needed(rate)} or more"
    )


def images_separating(rates: Sequence[float], images: int) -> int:
    """The fewest images from `images` on at which a stream can be of each of `rates` (see
    `images_needed`) and no two rates give the same count of defective images. It exists:
    past 1 / (the smallest gap between two rates) any two counts differ (a rate given twice is
    counted once: no count separates it from itself)."""
    rates = sorted(set(rates))
    n = max([images, *(images_needed(r) for r in rates)])
    while len({defective_count(r, n) for r in rates}) < len(rates):
        n += 1
    return n


def rates_problem(
    rate_option: str, rates: Sequence[float], images_option: str, images: int
) -> str | None:
    """Why streams of `images` images cannot be of each of `rates` (distinct), naming the
    options that set them, or None when they can: one rate's `stream_problem`, or two rates
    that round to the same count of defective images (the same stream twice under two names,
    and a vertical step in the reduction figure), with the fewest images that separates them.
    Either way the count suggested is `images_separating`'s, which passes every check (one
    rate's `images_needed` alone may make two rates one stream: 11 images at 5% and 12%)."""
    enough = images_separating(rates, images)
    for rate in rates:
        problem = stream_problem(rate_option, rate, images_option, images, enough)
        if problem:
            return problem
    first: dict[int, float] = {}
    for rate in rates:
        count = defective_count(rate, images)
        if count not in first:
            first[count] = rate
            continue
        other = first[count]
        return (
            f"{rate_option} {other:g} and {rate:g} with {images_option} {images}: both are "
            f"{count} of {images} images defective ({count / images:.1%}), the same stream "
            f"twice; use {images_option} {enough} (the fewest from "
            f"{images} that gives every rate its own count)"
        )
    return None


def _draw(pool: list[VocSample], count: int, rng: random.Random) -> list[VocSample]:
    drawn: list[VocSample] = []
    while len(drawn) < count:
        order = pool[:]
        rng.shuffle(order)
        drawn.extend(order[: count - len(drawn)])
    return drawn
