"""`splitdet edge collect` into a folder a reviewer removed images from (a review of the weekly
collect → relabel → merge → retrain loop).

edge/README.md tells a reviewer to remove an image they cannot judge (its image and
annotation), and `data check`'s duplicate warning to remove all but one copy of an image. The
next weekly `edge collect` into the same folder brought every such image back, with the
model's pre-labels, as a new image: "already collected" was read from the annotations present
only. Now an image collected.csv lists is not collected again when its files are gone, by its
id or by its content hash (the same bytes processed again), and is counted as ``removed``;
``recollect_removed`` brings such images back."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import sqlite3
import time
from pathlib import Path

from PIL import Image

from splitdet.edge.collect import collect_results, voc_image_id
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared.cli import main

FINGERPRINT = "e" * 64
W, H = 64, 48


def _image(path: Path, gray: int) -> str:
    """A W x H grayscale PNG of one value at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (W, H), gray).save(path)
    return str(path)


def _arrival(n: int, path: str) -> Arrival:
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return Arrival(path, f"{Path(path).name}|1|{n}|{n}", digest, 1, time.time())


def _defect(store: ResultStore, n: int, path: str) -> int:
    """A defect result with one box for the image at `path`; its row id."""
    row, _, _ = store.record_pending(
        _arrival(n, path), 0.9, f"r{n}", b"features", FINGERPRINT, {}, stored_path=path
    )
    answer = Answer([[5.0, 5.0, 20.0, 20.0]], [0.9], [1], ["scratch"])
    assert store.complete(row, answer)
    return row


def _collect(db: Path, out: Path, capsys, *options: str) -> dict:
    assert main(["edge", "collect", "--db", str(db), "--out", str(out), "--json", *options]) == 0
    return json.loads(capsys.readouterr().out)


def _remove(out: Path, image_id: str) -> None:
    """What the reviewer does: the image and its annotation removed from the tree."""
    for path in (out / "JPEGImages").glob(f"{image_id}.*"):
        path.unlink()
    (out / "Annotations" / f"{image_id}.xml").unlink()


def _listed_ids(out: Path) -> list[str]:
    with open(out / "collected.csv", newline="") as fh:
        return [row["image_id"] for row in csv.DictReader(fh)]


def _line(tmp_path: Path) -> tuple[Path, Path, list[int]]:
    """(db, archive, row ids): three defect results of three different images."""
    archive, db = tmp_path / "archive", tmp_path / "edge.sqlite"
    store = ResultStore(db)
    rows = [_defect(store, n, _image(archive / f"part{n}.png", 40 * n)) for n in (1, 2, 3)]
    store.close()
    return db, archive, rows


def _reviewed(tmp_path: Path, capsys, n: int) -> tuple[Path, Path, Path, list[int], str]:
    """`_line`'s three images collected into tmp_path/review, then part`n` removed by its
    reviewer: (db, archive, review folder, row ids, the removed image's id)."""
    db, archive, rows = _line(tmp_path)
    out = tmp_path / "review"
    _collect(db, out, capsys)
    removed = voc_image_id(rows[n - 1], f"part{n}.png")
    _remove(out, removed)
    return db, archive, out, rows, removed


def test_an_image_removed_by_review_is_not_collected_again(tmp_path, capsys, caplog):
    db, _, rows = _line(tmp_path)
    out = tmp_path / "review"
    assert _collect(db, out, capsys)["collected"] == 3
    removed = voc_image_id(rows[1], "part2.png")
    _remove(out, removed)

    caplog.set_level(logging.INFO, logger="splitdet.edge.collect")
    again = _collect(db, out, capsys)
    # before: collected 1 (the removed image back, with the model's pre-labels), no "removed"
    assert (again["collected"], again["already_collected"], again.get("removed")) == (0, 2, 1)
    assert not list((out / "JPEGImages").glob(f"{removed}.*"))
    assert not (out / "Annotations" / f"{removed}.xml").exists()
    assert _listed_ids(out).count(removed) == 1
    assert "--recollect-removed collects them again" in caplog.text

    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 0
    assert "0 image(s) collected, 2 already there" in capsys.readouterr().out


def test_the_same_bytes_processed_again_stay_removed(tmp_path, capsys):
    """A re-fed frame (the same bytes, a later row: another VOC id) of a removed image, and
    the copy `data check` named as a duplicate and the reviewer removed: neither comes back."""
    db, archive, rows = _line(tmp_path)
    store = ResultStore(db)
    twin = archive / "twin.png"
    twin.write_bytes((archive / "part1.png").read_bytes())  # collected twice: a duplicate
    duplicate = _defect(store, 4, str(twin))
    store.close()
    out = tmp_path / "review"
    assert _collect(db, out, capsys)["collected"] == 4
    _remove(out, voc_image_id(duplicate, "twin.png"))  # data check: "keep one of each"
    _remove(out, voc_image_id(rows[2], "part3.png"))  # cannot judge it

    store = ResultStore(db)
    refed = archive / "refed.png"
    refed.write_bytes((archive / "part3.png").read_bytes())
    _defect(store, 5, str(refed))  # the removed image's bytes, processed again later
    store.close()
    again = _collect(db, out, capsys)
    assert (again["collected"], again["already_collected"], again.get("removed")) == (0, 2, 3)
    assert sorted(p.stem for p in (out / "Annotations").glob("*.xml")) == sorted(
        [voc_image_id(rows[0], "part1.png"), voc_image_id(rows[1], "part2.png")]
    )


def test_recollect_removed_brings_them_back_under_their_ids(tmp_path, capsys):
    db, _, out, _, removed = _reviewed(tmp_path, capsys, 1)
    connection = sqlite3.connect(db)
    try:
        summary = collect_results(connection, out, recollect_removed=True)
    finally:
        connection.close()
    assert (summary.collected, summary.already, summary.removed) == ([removed], 2, 0)
    assert (out / "Annotations" / f"{removed}.xml").is_file()
    assert (out / "JPEGImages" / f"{removed}.png").is_file()
    assert _collect(db, out, capsys)["removed"] == 0  # there again: already collected


def test_another_image_with_a_removed_images_id_is_tagged(tmp_path, capsys):
    """Two cameras' row 1 img0001.png, different pictures: the first one's removed by review.
    The second is collected under a tagged id (the removed one's row keeps its id) and the
    first stays removed."""
    out = tmp_path / "review"
    dbs, hashes = [], []
    for name, gray in (("a", 30), ("b", 220)):
        image = _image(tmp_path / name / "img0001.png", gray)
        db = tmp_path / name / "edge.sqlite"
        store = ResultStore(db)
        assert _defect(store, 1, image) == 1
        store.close()
        dbs.append(db)
        hashes.append(hashlib.sha256(Path(image).read_bytes()).hexdigest())
    assert _collect(dbs[0], out, capsys)["collected"] == 1
    _remove(out, "00000001-img0001")
    second = _collect(dbs[1], out, capsys)
    tagged = f"00000001-img0001-{hashes[1][:8]}"
    assert (second["collected"], second["renamed"], second.get("removed")) == (1, [tagged], 0)
    first_again = _collect(dbs[0], out, capsys)
    assert (first_again["collected"], first_again.get("removed")) == (0, 1)
    assert [p.stem for p in (out / "Annotations").glob("*.xml")] == [tagged]


def test_cli_recollect_removed(tmp_path, capsys):
    db, _, out, _, removed = _reviewed(tmp_path, capsys, 1)
    assert main(["edge", "collect", "--db", str(db), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 listed in collected.csv but removed from" in text, text
    again = _collect(db, out, capsys, "--recollect-removed")
    assert (again["collected"], again["removed"]) == (1, 0)
    assert (out / "Annotations" / f"{removed}.xml").is_file()
