"""Mutant audit (session 10): training/voc_split.py's stratification and its val rule.

The split tests checked the files written, not which stratum an image falls in, how a share is
dealt, or that train keeps a defective image; each test names the mutants it kills.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from splitdet.training.voc_split import (
    DEFECT_FREE,
    _deal,
    _give_val_a_defective_image,
    stratum_of,
)
from splitdet.training.voc_types import VocObject, VocSample

BOX = (1.0, 1.0, 4.0, 4.0)


def test_a_defective_image_falls_in_its_rarest_class():
    """Kills: `min` made `max` in `stratum_of` (an image of a rare and a common class split
    with the common one, so the rare class's images may all land in train)."""
    counts = Counter({"scratch": 40, "crack": 3, "dent": 3})
    sample = VocSample(
        "a", Path("a.png"), 8, 8, (VocObject("scratch", BOX), VocObject("dent", BOX))
    )
    assert stratum_of(sample, counts) == "dent"
    both_rare = VocSample(
        "b", Path("b.png"), 8, 8, (VocObject("dent", BOX), VocObject("crack", BOX))
    )
    assert stratum_of(both_rare, counts) == "crack"  # ties: by name
    assert stratum_of(VocSample("c", Path("c.png"), 8, 8), counts) == DEFECT_FREE


def test_dealing_gives_every_prefix_its_shares_and_ties_go_to_the_earlier_split():
    """Kills: the tie-break made `j` (ties to the later split: a lone image of a stratum would
    go to test before train)."""
    assert _deal(["a"], (0.5, 0.5)) == [["a"], []]
    assert _deal(["a", "b"], (0.5, 0.5)) == [["a"], ["b"]]
    dealt = _deal([str(k) for k in range(10)], (0.7, 0.2, 0.1))
    assert [len(d) for d in dealt] == [7, 2, 1]
    assert dealt[0][0] == "0"


def test_val_takes_a_defective_image_only_when_train_keeps_another():
    """Kills: `len(movable) > 1` made `> 0` (train's only defective image moved to val: the
    detector would train on none)."""
    chosen = {"train": ["a", "f"], "val": ["g"], "test": []}
    with pytest.raises(ValueError, match=r"1 defective image\(s\) leave the val split"):
        _give_val_a_defective_image(chosen, {"a"}, 0.2, 0.1)
    assert chosen == {"train": ["a", "f"], "val": ["g"], "test": []}  # nothing moved
    chosen = {"train": ["a", "b", "f"], "val": ["g"], "test": []}
    _give_val_a_defective_image(chosen, {"a", "b"}, 0.2, 0.1)
    assert chosen["train"] == ["a", "f"] and chosen["val"] == ["g", "b"]
