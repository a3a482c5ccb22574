"""A probability as text that never reads as 0 or 1 when it is not (torch-free).

    format_probability(0.374829)  -> "0.375"
    format_probability(0.99997)   -> "0.99997"   (not "1.000": a gate threshold there is real)
    format_probability(0.0000312) -> "0.00003"

Gates trained on well separated data put p(defect) and their calibrated thresholds within
1e-4 of 1: at a fixed 3 decimals an "ok" image at 0.99991 under a threshold of 0.99997 printed
as 1.000 beside 1.000.
"""

from __future__ import annotations

import math

#: decimals at most: beyond this a float32 probability has no more digits to show
MAX_DECIMALS = 8


def format_probability(p: float, decimals: int = 3) -> str:
    """`p` with `decimals` decimals, or as many more (up to `MAX_DECIMALS`) as it takes for a
    value strictly between 0 and 1 to show how far it lies from either end."""
    if not math.isfinite(p) or p <= 0.0 or p >= 1.0:
        return f"{p:.{decimals}f}"
    places = decimals
    while places < MAX_DECIMALS and min(p, 1.0 - p) < 10.0 ** (-places):
        places += 1
    return f"{p:.{places}f}"
