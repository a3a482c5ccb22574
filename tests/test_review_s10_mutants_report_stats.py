"""Mutant audit (session 10): bench/report.py's interval, its rounding and `summarise`'s units.

`interval` and `ci_decimals` were reached only through whole reports whose assertions held
for a 90% interval as for a 95% one, and whose intervals never had a half-width starting with
1 or wider than a unit. Each test names the one-line mutants it kills.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from splitdet.bench.report import CONFIDENCE, LINKS, _mean_with_ci, ci_decimals, interval, summarise
from splitdet.bench.systems import Outcome
from splitdet.training.voc_types import VocObject, VocSample


def test_the_interval_is_the_central_95_percent():
    """Kills: `tail = 100 * (1 - confidence)` (the half not taken: a 90% interval labelled
    95%)."""
    values = np.arange(1001, dtype=np.float64)  # percentile p is p * 10
    assert CONFIDENCE == 0.95
    assert interval(values) == [pytest.approx(25.0), pytest.approx(975.0)]
    assert interval(values, confidence=0.5) == [pytest.approx(250.0), pytest.approx(750.0)]


def test_decimals_follow_the_half_width_as_documented():
    """The docstring's own examples: a half-width of 0.012 s gives 3 decimals, of 0.05 s 2, of
    0.3 s 1; never finer than `finest`, nor coarser than whole units. Kills: `leading_one`
    made False (0.012 would give 2), and the `max(0, ...)` dropped (a half-width of 30 s gives
    -1 decimals, which no format takes)."""
    assert ci_decimals([1.0, 1.024]) == 3
    assert ci_decimals([1.0, 1.1]) == 2
    assert ci_decimals([1.0, 1.6]) == 1
    assert ci_decimals([1.0, 1.0 + 2 * 0.00012]) == 3  # finest: the millisecond
    assert ci_decimals([0.0, 2.4]) == 1  # a leading 1 (1.2): its second digit
    assert ci_decimals([10.0, 70.0]) == 0  # whole units at most
    assert ci_decimals(None) == 3 and ci_decimals([2.0, 2.0]) == 3
    assert _mean_with_ci(40.0, [10.0, 70.0]) == "40 (95% CI 10 to 70)"
    assert _mean_with_ci(2.46, [2.40, 2.51]) == "2.46 (95% CI 2.40 to 2.51)"


def test_a_summary_converts_bytes_to_bits_for_the_link_and_counts_defective_images_for_recall():
    """Four images, one defective, 1 MB sent for each of two: the transfer at a link of b bit/s
    is bytes x 8 / b, and gate recall is over the defective images alone. Kills: the transfer
    computed without the x 8 (bytes taken for bits), gate recall over every image, and the
    p95 read at another percentile (`np.percentile(totals, 90)`)."""
    box = (1.0, 1.0, 5.0, 5.0)
    stream = [
        VocSample(
            f"img{k}", Path(f"img{k}.png"), 8, 8, (VocObject("crack", box),) if k == 0 else ()
        )
        for k in range(4)
    ]
    outcomes = [
        Outcome(0.3, 0.1, 0.1, 1_000_000, True, 0.9),
        Outcome(0.1, 0.1, 0.1, 1_000_000, True, 0.8),
        Outcome(0.15, 0.1, 0.0, 0, False, 0.1),
        Outcome(0.05, 0.1, 0.0, 0, False, 0.2),
    ]
    monolithic = summarise([Outcome(0.4, 0.4, 0.0, 0, True, None)] * 4, stream, ["crack"], None)
    summary = summarise(outcomes, stream, ["crack"], monolithic)
    assert summary["bytes_per_image"] == 500_000
    for link, bits_per_s in LINKS.items():
        transfer = 500_000 * 8 / bits_per_s
        assert summary[f"transfer_{link}_s_computed"] == pytest.approx(transfer)
        assert summary[f"mean_with_{link}_s"] == pytest.approx(0.15 + transfer)
        assert summary[f"reduction_with_{link}"] == pytest.approx(1 - (0.15 + transfer) / 0.4)
    assert summary["transfer_100mbit_s_computed"] == pytest.approx(0.04)
    assert summary["gate_recall"] == 1.0  # the defective image was flagged (2 of 4 were)
    assert summary["flagged_fraction"] == 0.5 and summary["reduction"] == pytest.approx(0.625)
    # the percentiles of the totals 0.05, 0.1, 0.15, 0.3 s (numpy's linear interpolation)
    assert summary["p50_s"] == pytest.approx(0.125) and summary["p95_s"] == pytest.approx(0.2775)
