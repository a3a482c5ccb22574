"""`eval --baseline` of the same classes in another order: one run trained with
``--classes scratch,dent,pit`` (the README's order), the next with ``dent,pit,scratch`` (the
sorted list `data check` suggests) were refused as "models of the same classes" they are. They
are now compared by class name: the baseline's labels renumbered to the candidate's order."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.training import voc
from splitdet.training.evaluate import predict
from splitdet.training.initial_weights import _remap_class_rows

from conftest import make_tiny_model
from support import make_tiny_voc

OURS = ("scratch", "dent", "pit")
SORTED = ("dent", "pit", "scratch")


@pytest.fixture(scope="module")
def three_class_voc(tmp_path_factory) -> Path:
    """4 images in train = val = test, each annotated with the top box of each class
    `candidate()` finds there: it scores a high mAP of several classes, and a baseline
    whose labels were read in the wrong order would not."""
    root = make_tiny_voc(tmp_path_factory.mktemp("order_voc"), n_defective=4, n_free=0, seed=1)
    samples = voc.read_split(root, "test", ("scratch",))
    for sample, found in zip(samples, predict(candidate(), samples, progress=False), strict=True):
        best = {}  # the top box of each class found (detections come by decreasing score)
        for box, label in zip(found.boxes.tolist(), found.labels.tolist(), strict=True):
            best.setdefault(OURS[label - 1], tuple(box))
        objects = [voc.VocObject(name, box) for name, box in best.items()]
        voc.write_annotation(root / "Annotations" / f"{sample.image_id}.xml",
                             replace(sample, objects=tuple(objects)))  # fmt: skip
    labelled = {o.name for s in voc.read_split(root, "test", OURS) for o in s.objects}
    assert len(labelled) >= 2, labelled  # (else the order would not matter)
    return root


def candidate():
    """The candidate model: random tiny weights of classes `OURS`."""
    return make_tiny_model(2, class_names=OURS)


def test_a_baseline_of_the_same_classes_in_another_order_is_compared_by_name(
    three_class_voc, tmp_path, capsys, caplog, one_torch_thread
):
    caplog.set_level(logging.INFO, "splitdet")
    model = candidate()
    # the same weights, their class rows moved to the sorted order: the same detector
    permuted = make_tiny_model(2, class_names=SORTED)
    state, _ = _remap_class_rows(model.state_dict(), OURS, permuted)
    permuted.load_state_dict(state)
    save_checkpoint(tmp_path / "v2.pt", model)
    save_checkpoint(tmp_path / "v1.pt", permuted)
    out = tmp_path / "cmp.json"
    status = main(["eval", "--data", str(three_class_voc), "--checkpoint", str(tmp_path / "v2.pt"),
                   "--baseline", str(tmp_path / "v1.pt"), "--bootstrap", "20", "--no-progress",
                   "--json", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 0, err
    assert "compared by class name" in caplog.text
    result = json.loads(out.read_text())
    assert result["per_class"] == result["baseline"]["per_class"]
    for key in ("map", "map50"):
        figure = result["comparison"]["figures"][key]
        assert figure["difference"] == 0.0, key
        assert figure["interval"] == [0.0, 0.0], (key, figure)  # every resample alike


def test_a_baseline_of_other_classes_is_still_refused(three_class_voc, tmp_path, capsys):
    save_checkpoint(tmp_path / "v2.pt", make_tiny_model(2, class_names=OURS))
    save_checkpoint(tmp_path / "v1.pt", make_tiny_model(2, class_names=("scratch", "dent")))
    status = main(["eval", "--data", str(three_class_voc), "--checkpoint", str(tmp_path / "v2.pt"),
                   "--baseline", str(tmp_path / "v1.pt"), "--no-progress",
                   "--json", str(tmp_path / "x.json")])  # fmt: skip
    assert status == 2
    assert "a comparison needs models of the same classes" in capsys.readouterr().err


def test_the_comparison_gives_each_class_its_ap(three_class_voc, tmp_path, capsys):
    """Did v2 get better at the rare class? The comparison's mAP averages it away: its
    "per_class" and the table give each class's AP@.5 of both models."""
    save_checkpoint(tmp_path / "v2.pt", candidate())
    save_checkpoint(tmp_path / "v1.pt", make_tiny_model(5, class_names=OURS))
    out = tmp_path / "cmp.json"
    status = main(["eval", "--data", str(three_class_voc), "--checkpoint", str(tmp_path / "v2.pt"),
                   "--baseline", str(tmp_path / "v1.pt"), "--bootstrap", "0", "--no-progress",
                   "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert status == 0
    result = json.loads(out.read_text())
    per_class = result["comparison"]["per_class"]
    assert list(per_class) == list(OURS)
    for name in OURS:
        ours, theirs = result["per_class"][name], result["baseline"]["per_class"][name]
        figure = per_class[name]
        assert (figure["candidate"], figure["baseline"]) == (ours["ap50"], theirs["ap50"])
        assert figure["objects"] == ours["objects"]
        if ours["ap50"] is None:
            assert figure["difference"] is None
        else:
            assert figure["difference"] == pytest.approx(ours["ap50"] - theirs["ap50"])
    assert per_class["scratch"]["candidate"] == 1.0  # (the annotations are its own top boxes)
    rows = [line for line in printed.splitlines() if line.startswith("  AP@.5 ")]
    assert [row.split()[1] for row in rows] == list(OURS), printed
    assert rows[2].split()[2:5] == ["n/a", "n/a", "n/a"]  # no pit in the split
