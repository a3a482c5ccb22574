"""`splitdet edge collect` and defect verdicts whose annotation holds no box (a user review of
the model-upgrade loop).

Every box the cloud returned scored under --score-threshold, so 46 images the edge judged
defect were collected with empty annotations, and `data split` / `data check` took them for
defect-free training images without a word. Now collect counts them (WARNING, summary line),
marks them needs_boxes=yes in collected.csv and lists them in --json, on a first run into a
folder and into one whose listing was written before the column."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from pathlib import Path

import pytest
from PIL import Image

from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared.cli import main
from splitdet.training import voc

FINGERPRINT = "d" * 64
W, H = 96, 64


def _image(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (W, H), 90).save(path)
    return str(path)


def _arrival(n: int, path: str) -> Arrival:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Arrival(path, f"{Path(path).name}|1|{n}|{n}", digest, 1, time.time())


def _defect(store: ResultStore, n: int, path: str, boxes, scores) -> int:
    row, _, _ = store.record_pending(
        _arrival(n, path), 0.9, f"r{n}", b"features", FINGERPRINT, {}, stored_path=path
    )
    labels = [1] * len(boxes)
    assert store.complete(row, Answer(boxes, scores, labels, ["scratch"] * len(boxes)))
    return row


@pytest.fixture
def line(tmp_path):
    """(db, ids): an ok result, a defect with a box over the threshold, and three defects
    whose annotation would hold none (boxes under 0.5, no box, a box outside the image)."""
    archive, db = tmp_path / "archive", tmp_path / "edge.sqlite"
    store = ResultStore(db)
    ids = {}
    ok = _image(archive / "ok.png")
    ids["ok"], _ = store.record_ok(_arrival(1, ok), 0.05, FINGERPRINT, {}, stored_path=ok)
    box = [10.0, 10.0, 30.0, 30.0]
    ids["boxed"] = _defect(store, 2, _image(archive / "boxed.png"), [box, box], [0.9, 0.3])
    ids["low"] = _defect(store, 3, _image(archive / "low.png"), [box, box], [0.45, 0.2])
    ids["none"] = _defect(store, 4, _image(archive / "none.png"), [], [])
    outside = [[200.0, 100.0, 240.0, 120.0]]  # scored high, but clipped to nothing
    ids["outside"] = _defect(store, 5, _image(archive / "outside.png"), outside, [0.95])
    store.close()
    return db, ids


def _listing(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "collected.csv", newline="") as fh:
        return {row["result_id"]: row for row in csv.DictReader(fh)}


def test_defects_without_a_box_are_counted_warned_and_marked(line, tmp_path, capsys, caplog):
    db, ids = line
    out = tmp_path / "review"
    caplog.set_level(logging.WARNING)
    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 0
    summary = capsys.readouterr().out.splitlines()[0]
    assert summary.endswith("(of 5 matching results); 3 defect verdict(s) collected without a box")

    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    text = warning.getMessage()
    assert text.startswith("3 collected image(s) the edge judged defect have no box")
    assert "would train as defect-free images until someone draws their boxes" in text
    assert warning.fields["event"] == "collect_needs_boxes" and warning.fields["images"] == 3

    listed = _listing(out)
    marks = {name: listed[str(ids[name])]["needs_boxes"] for name in ids}
    assert marks == {"ok": "no", "boxed": "no", "low": "yes", "none": "yes", "outside": "yes"}
    for name in ("low", "none", "outside"):  # the annotations as before: empty, to be drawn
        image_id = listed[str(ids[name])]["image_id"]
        assert voc.read_annotation(out, image_id).objects == ()

    # a second run changes nothing and warns of nothing: what is there was counted already
    caplog.clear()
    assert main(["edge", "collect", "--db", str(db), "--out", str(out), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["collected"], again["already_collected"], again["needs_boxes"]) == (0, 5, [])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert _listing(out) == listed


def test_the_json_lists_them_and_the_score_threshold_decides(line, tmp_path, capsys):
    db, ids = line
    out = tmp_path / "lower"
    assert main(["edge", "collect", "--db", str(db), "--out", str(out), "--json",
                 "--score-threshold", "0.4"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    listed = _listing(out)
    assert summary["needs_boxes"] == [listed[str(ids[n])]["image_id"] for n in ("none", "outside")]


def test_a_listing_written_before_the_column_gains_it(line, tmp_path, capsys):
    """A listing without needs_boxes (nor content_hash) keeps its columns, and so dropped the
    mark of every new row: the columns are added to its header, its rows kept as they were."""
    db, ids = line
    out = tmp_path / "review"
    assert main(["edge", "collect", "--db", str(db), "--out", str(out), "--verdict", "ok"]) == 0
    listing = out / "collected.csv"
    with open(listing, newline="") as fh:
        rows = list(csv.DictReader(fh))
    old_columns = [c for c in rows[0] if c not in ("content_hash", "needs_boxes")]
    with open(listing, "w", newline="") as fh:
        writer = csv.DictWriter(fh, old_columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    old_rows = listing.read_bytes().split(b"\r\n", 1)[1]
    capsys.readouterr()

    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 0
    assert "4 image(s) collected, 1 already there" in capsys.readouterr().out
    data = listing.read_bytes()
    header, rest = data.split(b"\r\n", 1)
    assert header.decode().split(",") == [*old_columns, "content_hash", "needs_boxes"]
    assert rest.startswith(old_rows)  # byte for byte
    listed = _listing(out)
    assert listed[str(ids["ok"])]["needs_boxes"] is None  # listed before: not known
    assert [listed[str(ids[n])]["needs_boxes"] for n in ("boxed", "low", "none", "outside")] == [
        "no", "yes", "yes", "yes"
    ]  # fmt: skip
    assert listed[str(ids["low"])]["content_hash"]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".collected")) == []
