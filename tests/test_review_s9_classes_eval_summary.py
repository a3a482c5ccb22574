"""`splitdet eval` of a model of several classes printed only the mean over them: a rare class
(a handful of `pit` boxes) scoring nothing was hidden in it, and its AP was in the JSON only.
The summary now has a line of each class's AP with its number of objects (n/a for a class the
split holds none of); a one-class model's summary is as before."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main

from conftest import make_tiny_model


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("scratch", "Deep Dent", "pit"),
         ["'Deep Dent' n/a / n/a (0 objects)", "'pit' n/a / n/a (0 objects)", "'scratch' "]),
        (("scratch",), []),
    ],
)  # fmt: skip
def test_the_summary_gives_each_class_its_ap(
    names, expected, tiny_voc, tmp_path: Path, capsys, one_torch_thread
):
    checkpoint = tmp_path / "best.pt"
    save_checkpoint(checkpoint, make_tiny_model(0, class_names=names))
    status = main(["eval", "--data", str(tiny_voc), "--checkpoint", str(checkpoint),
                   "--no-progress", "--no-store", "--json", str(tmp_path / "e.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    lines = [line for line in out.splitlines() if line.startswith("  per class AP@.5 / AP: ")]
    assert len(lines) == (1 if expected else 0), out
    for piece in expected:
        assert piece in lines[0], lines[0]
    if expected:  # (tiny_voc: 4 scratches in its 3 defective images)
        assert re.search(r"'scratch' \d\.\d{3} / \d\.\d{3} \(4 objects\)", lines[0]), lines[0]


def test_an_export_evaluated_says_which_class_the_split_has_no_object_of(
    tiny_voc, tmp_path: Path, capsys, caplog, one_torch_thread
):
    """`eval --checkpoint` warned of a class the split holds no object of (its AP n/a); `eval
    --model` of the same model's export said nothing."""
    from splitdet.training.export import export_model

    model_dir = tmp_path / "model"
    export_model(make_tiny_model(0, class_names=("scratch", "pit")), model_dir,
                 gate_threshold=0.5, default_codec="int8")  # fmt: skip
    status = main(["eval", "--data", str(tiny_voc), "--model", str(model_dir), "--no-progress",
                   "--json", str(tmp_path / "e.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    assert "class 'pit' has no object in split 'test' of" in caplog.text
    assert "'scratch' has no object" not in caplog.text
    assert "'pit' n/a / n/a (0 objects)" in out
