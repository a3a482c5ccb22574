"""Strict JSON for splitdet's machine-readable outputs (stdlib only).

Python's json.dumps writes NaN and infinity as the bare tokens ``NaN``, ``Infinity`` and
``-Infinity``, which no JSON standard allows: jq, JavaScript's JSON.parse, Go's
encoding/json and most JSON libraries refuse the whole document. `strict_dumps` writes a float
JSON cannot hold as ``null`` instead (the value is not a number anyone can use), and never
such a token:

    strict_dumps({"threshold": float("inf"), "p": 0.5})   # '{"threshold": null, "p": 0.5}'

`strict_dumps` takes json.dumps' options (``indent``, ``default``...), so every writer calls it
alone. An infinite --threshold is refused where it is read (`edge.cloud_args.threshold_problem`).
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_none(data: Any) -> Any:
    """`data` (what json.dumps takes: dicts, lists, tuples, scalars) with every float that is
    NaN or infinite replaced by None, at any depth; the rest as it is (tuples become lists, as
    JSON writes them anyway)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_none(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_or_none(v) for v in data]
    return data


def strict_dumps(data: Any, **options: Any) -> str:
    """json.dumps of `data` (`options` as json.dumps takes them) with NaN and infinity written
    as ``null`` (`finite_or_none`): text any JSON parser reads."""
    return json.dumps(finite_or_none(data), allow_nan=False, **options)
