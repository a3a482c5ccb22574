"""A p(defect) or gate threshold near 0 or 1 keeps the digits that tell it from 0 or 1."""

from __future__ import annotations

import math

import pytest

from splitdet.shared.probability_format import format_probability


@pytest.mark.parametrize(
    ("p", "text"),
    [
        (0.374829, "0.375"),
        (0.5, "0.500"),
        (0.999, "0.999"),
        (0.9995, "0.9995"),
        (0.99997, "0.99997"),
        (0.999911, "0.99991"),
        (0.0000312, "0.00003"),
        (0.0, "0.000"),
        (1.0, "1.000"),
    ],
)
def test_format_probability(p, text):
    assert format_probability(p) == text


def test_a_probability_short_of_one_never_reads_as_one():
    for exponent in range(1, 9):
        for mantissa in (1.0, 4.9, 5.0, 9.9):
            p = 1.0 - mantissa * 10.0**-exponent
            if 0 < p < 1:
                assert float(format_probability(p)) < 1.0, p
                assert float(format_probability(1.0 - p)) > 0.0, 1.0 - p
    assert format_probability(math.nan) == "nan"
