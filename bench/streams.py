"""Test streams for the benchmark: N images at a given defect rate, drawn from a VOC split."""

from __future__ import annotations

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
    picks = _draw(defective, n_defective, rng, "defective") + _draw(
        free, n_images - n_defective, rng, "defect-free"
    )
    rng.shuffle(picks)
    return picks


def _draw(pool: list[VocSample], count: int, rng: random.Random, kind: str) -> list[VocSample]:
    if count and not pool:
        raise ValueError(f"the split has no {kind} images, but the stream needs {count}")
    drawn: list[VocSample] = []
    while len(drawn) < count:
        order = pool[:]
        rng.shuffle(order)
        drawn.extend(order[: count - len(drawn)])
    return drawn
