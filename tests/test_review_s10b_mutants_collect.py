"""Mutant audit, second round: `edge collect`'s pre-labels.

`collect_results`'s docstring: boxes "scoring at least ``min_score`` become objects"
(`--score-threshold`: "boxes scoring at least S become pre-labels"), "clipped to the image"
(`_objects`): a box on the threshold is kept, and one that lies wholly off the image clips to
nothing and is no object. A real store, a real image, `splitdet edge collect`; each test names
the one-line mutant it kills.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from PIL import Image

from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared.cli import main
from splitdet.training import voc

W, H = 96, 64


def _defect(db: Path, image: Path, answer: Answer) -> int:
    """A store holding one defect result of `image` with `answer`; its row id."""
    image.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (W, H), 77).save(image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    arrival = Arrival(str(image), f"{image.name}|1|1|1", digest, 1, time.time())
    store = ResultStore(db)
    try:
        row, _, _ = store.record_pending(
            arrival, 0.9, "r1", b"features", "c" * 64, {}, stored_path=str(image)
        )
        assert store.complete(row, answer)
    finally:
        store.close()
    return row


def test_pre_labels_keep_a_box_on_the_threshold_and_drop_one_off_the_image(tmp_path, capsys):
    """Kills: `score < min_score` made `score <= min_score` in `_objects` (a box scoring
    exactly --score-threshold dropped); the clip of x2 to the image's width dropped, or the
    empty-box check made `x2 < x1` (a box off the image's right edge kept as a 1 px sliver
    on it); each box named by `names[label]` for its own `names[i]` (a dent called a
    scratch); the file's stem not cut to 80 characters in `voc_image_id` (a 248-character
    name: "File name too long" for its annotation)."""
    db, out = tmp_path / "edge.sqlite", tmp_path / "review"
    answer = Answer(
        boxes=[
            [10.0, 12.0, 40.0, 20.0],  # on the threshold
            [100.0, 10.0, 120.0, 20.0],  # wholly right of the image
            [96.0, 30.0, 110.0, 40.0],  # from its right edge on
            [2.0, 2.0, 6.0, 6.0],  # under the threshold
        ],
        scores=[0.5, 0.9, 0.9, 0.49],
        labels=[2, 1, 1, 1],
        class_names=["dent", "scratch", "scratch", "scratch"],
    )
    stem = "s" * 248
    row = _defect(db, tmp_path / "archive" / f"{stem}.png", answer)
    command = ["edge", "collect", "--db", str(db), "--out", str(out), "--json"]
    assert main([*command, "--score-threshold", "0.5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["collected"] == 1 and summary["needs_boxes"] == [], summary
    sample = voc.read_annotation(out, f"{row:08d}-{stem[:80]}")
    assert [(o.name, o.box) for o in sample.objects] == [("dent", (10.0, 12.0, 40.0, 20.0))]


def test_a_relisted_defect_boxed_on_the_threshold_needs_no_boxes(tmp_path, capsys):
    """Kills: `score >= min_score` made `score > min_score` in `_relist` (an image a killed
    run copied but did not list is listed again as needing boxes, though its box scored
    --score-threshold and is in its annotation)."""
    db, out = tmp_path / "edge.sqlite", tmp_path / "review"
    answer = Answer(
        boxes=[[10.0, 12.0, 40.0, 20.0]], scores=[0.5], labels=[1], class_names=["scratch"]
    )
    row = _defect(db, tmp_path / "archive" / "shot.png", answer)
    command = ["edge", "collect", "--db", str(db), "--out", str(out), "--json"]
    assert main(command) == 0
    assert json.loads(capsys.readouterr().out)["needs_boxes"] == []
    listing = out / "collected.csv"
    header = listing.read_text(encoding="utf-8").splitlines()[0]
    listing.write_text(header + "\n", encoding="utf-8")  # the run killed before listing it

    assert main(command) == 0
    summary = json.loads(capsys.readouterr().out)
    image_id = f"{row:08d}-shot"
    assert summary["relisted"] == [image_id] and summary["needs_boxes"] == [], summary
    assert "yes" not in listing.read_text(encoding="utf-8").splitlines()[1].split(",")
