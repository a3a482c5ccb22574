"""Review: a quality supervisor merging the shift exports of several cameras.

`splitdet edge results` named no edge: each store numbers its own rows, so the ids of several
edges collide and their merged CSVs could not be told apart. Each row now keeps the name of the
edge that wrote it (images.edge, an added column: no new schema version), the `edge run --name`
in force then (default: the host name, as the daemon names itself to the cloud), listed by
--csv and --json as `edge`, after every earlier column; rows an earlier splitdet wrote have
none.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.edge.store_schema import SCHEMA_VERSION
from splitdet.shared.edge_name import default_edge_name

from support import image_rows, run_main

#: `edge results --csv`'s header before the edge column (the previous splitdet's, unchanged).
EARLIER_HEADER = [
    "id", "path", "stored_path", "content_hash", "size_bytes", "arrived", "finished", "updated",
    "verdict", "p_defect", "request_id", "fingerprint", "boxes", "scores", "labels",
    "class_names", "timings", "bytes_sent", "attempts", "error_kind", "reason", "threshold",
    "changed", "warnings", "n_boxes",
]  # fmt: skip
#: The `images` columns an earlier splitdet reads and writes (its RESULT_COLUMNS).
EARLIER_COLUMNS = [c for c in EARLIER_HEADER if c != "n_boxes"]


def put_images(watch: Path, *names: str) -> None:
    """Small PNG images NAMES in `watch`, one after the other."""
    watch.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((48, 64, 3), 40 + i, np.uint8)).save(watch / name)
        time.sleep(0.01)


def edge_run(capsys, model_dir: Path, watch: Path, db: Path, *name: str) -> None:
    """`splitdet edge run --once` in this process, offline (a closed cloud port, a threshold
    nothing reaches), with `name` (["--name", NAME] or nothing)."""
    code, _, err = run_main(
        capsys, "edge", "run", "--model", model_dir, "--watch", watch, "--db", db,
        "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--settle", "0",
        "--unreadable-grace", "0", "--threads", "1", "--threshold", "2",
        "--log-format", "text", *name,
    )  # fmt: skip
    assert code == 0, err


def listed(capsys, db: Path, *options: object) -> tuple[list[str], list[dict]]:
    """(header, rows) of `edge results --csv` with `options`."""
    code, out, err = run_main(capsys, "edge", "results", "--db", db, "--csv", *options)
    assert code == 0, err
    text = out.lstrip("\ufeff")
    return next(csv.reader(io.StringIO(text))), list(csv.DictReader(io.StringIO(text)))


def json_rows(capsys, db: Path) -> list[dict]:
    code, out, err = run_main(capsys, "edge", "results", "--db", db, "--json")
    assert code == 0, err
    return json.loads(out)


def earlier_store(db: Path) -> None:
    """A store as an earlier splitdet left it (no images.edge), holding one "ok" row."""
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(Arrival("/cam/old.png", "old.png|1|2|3", "ab" * 32, 1, 1.0), 0.1, "fp", {})
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute("ALTER TABLE images DROP COLUMN edge")
        con.commit()
    assert "edge" not in image_rows(db)[0]


def test_each_row_keeps_the_name_in_force_and_results_list_it_last(
    tiny_model_dir, tmp_path, capsys
):
    """Two runs on one store under two names: each row keeps its run's name, listed as `edge`
    by --csv (after every earlier column, in their places; --excel too) and --json; the
    table's columns stay as they were."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    put_images(watch, "a.png", "b.png")
    edge_run(capsys, tiny_model_dir, watch, db, "--name", "press-7")
    put_images(watch, "c.png")
    edge_run(capsys, tiny_model_dir, watch, db, "--name", "line3:cam@2")

    names = {"a.png": "press-7", "b.png": "press-7", "c.png": "line3:cam@2"}
    header, rows = listed(capsys, db)
    assert header == [*EARLIER_HEADER, "edge"]
    assert {Path(r["path"]).name: r["edge"] for r in rows} == names
    header, rows = listed(capsys, db, "--excel")
    assert header == [*EARLIER_HEADER, "edge"]
    # as text whatever it looks like: Excel read `-A1` as a formula, `3-7` as a date
    assert {Path(r["path"]).name: r["edge"] for r in rows} == {
        path: f'="{name}"' for path, name in names.items()
    }
    records = json_rows(capsys, db)
    assert {Path(r["path"]).name: r["edge"] for r in records} == names
    assert all(list(r) == [*EARLIER_HEADER, "edge"] for r in records)  # (--csv's order)
    code, out, _ = run_main(capsys, "edge", "results", "--db", db)
    assert code == 0 and out.split()[:7] == [
        "id", "verdict", "p_defect", "boxes", "finished", "export", "path"]  # fmt: skip
    assert "press-7" not in out


def test_an_unnamed_edge_keeps_the_host_name_it_sends_the_cloud_and_logs(
    tiny_model_dir, tmp_path, capsys, caplog, monkeypatch
):
    """Without --name the row keeps the name the daemon uses for itself: the host name made a
    usable edge name, as its `started` event logs it and its calls send it."""
    monkeypatch.setattr("socket.gethostname", lambda: "Prüf stand#3.local")
    caplog.set_level(logging.INFO, logger="splitdet.edge")
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    put_images(watch, "a.png")
    edge_run(capsys, tiny_model_dir, watch, db)
    assert default_edge_name() == "Pr-f-stand-3.local"
    [started] = [fields for r in caplog.records
                 if (fields := getattr(r, "fields", {})).get("event") == "started"]  # fmt: skip
    assert started["edge_name"] == "Pr-f-stand-3.local"
    assert [r["edge"] for r in image_rows(db)] == ["Pr-f-stand-3.local"]
    assert [r["edge"] for r in json_rows(capsys, db)] == ["Pr-f-stand-3.local"]


def test_a_store_of_an_earlier_splitdet_is_read_as_it_is_and_stays_its_own(
    tiny_model_dir, tmp_path, capsys
):
    """A store an earlier splitdet wrote (no images.edge) is listed read only, its rows' edge
    empty/null, the file unchanged; a daemon adds the column without a new schema version
    (the earlier splitdet's writes and reads, by its own column names, still work on it), its
    own rows named, the earlier one not."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    earlier_store(db)
    before = db.read_bytes()
    header, rows = listed(capsys, db)
    assert header == [*EARLIER_HEADER, "edge"] and [r["edge"] for r in rows] == [""]
    assert [r["edge"] for r in json_rows(capsys, db)] == [None]
    assert db.read_bytes() == before

    put_images(watch, "new.png")
    edge_run(capsys, tiny_model_dir, watch, db, "--name", "cam-2")
    assert [(Path(r["path"]).name, r["edge"]) for r in image_rows(db)] == [
        ("old.png", None), ("new.png", "cam-2")]  # fmt: skip
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        # the earlier splitdet's write (it names its columns) and read (its RESULT_COLUMNS)
        con.execute(
            "INSERT INTO images (file_key, path, content_hash, size_bytes, arrived, updated,"
            " verdict, fingerprint) VALUES ('late.png|1|2|3', '/cam/late.png', 'abc', 1, 2.0,"
            " 2.0, 'ok', 'fp')"
        )
        con.commit()
        read = con.execute(f"SELECT {', '.join(EARLIER_COLUMNS)} FROM images").fetchall()
    assert len(read) == 3 and all(len(r) == len(EARLIER_COLUMNS) for r in read)
    assert [r["edge"] for r in json_rows(capsys, db)] == [None, "cam-2", None]


def test_the_name_stays_the_writers_through_the_answer_and_a_requeue(tmp_path, capsys):
    """The name is the writing edge's, set with the row: the cloud's answer, a dead letter, its
    requeue and the answer after it, made by other stores (another name, none), keep it."""
    db = tmp_path / "edge.sqlite"
    arrival = Arrival("/cam/f.png", "f.png|1|2|3", "ab" * 32, 1, time.time())
    with contextlib.closing(ResultStore(db, edge_name="cam-a")) as store:
        image_id, _, verdict = store.record_pending(arrival, 0.9, "r1", b"x", "f" * 64, {})
        assert verdict == "pending"
    with contextlib.closing(ResultStore(db, edge_name="cam-b")) as store:
        assert store.dead_letter(image_id, "refused")
    with contextlib.closing(ResultStore(db)) as store:
        assert store.requeue_dead_letters() == ([image_id], [], [])
        assert store.complete(image_id, Answer([[1, 2, 3, 4]], [0.9], [1], ["scratch"]))
    [row] = json_rows(capsys, db)
    assert (row["verdict"], row["edge"]) == ("defect", "cam-a")


@pytest.mark.parametrize("name", ["", "two words", "x" * 65])
def test_a_store_refuses_what_is_no_edge_name_before_touching_the_file(tmp_path, name):
    db = tmp_path / "edge.sqlite"
    with pytest.raises(ValueError, match="edge name"):
        ResultStore(db, edge_name=name)
    assert not db.exists()


def test_edge_collect_lists_the_edge_of_each_image_last(tiny_model_dir, tmp_path, capsys):
    """`edge collect` gathers images for annotation, often from several edges into one
    dataset; its collected.csv kept the result id (which collides across stores) and not the
    edge: now its last column."""
    from splitdet.edge.collect import LISTING_COLUMNS

    watch, db, out = tmp_path / "hot", tmp_path / "edge.sqlite", tmp_path / "review"
    put_images(watch, "a.png")
    edge_run(capsys, tiny_model_dir, watch, db, "--name", "press-7")
    code, _, err = run_main(capsys, "edge", "collect", "--db", db, "--out", out)
    assert code == 0, err
    text = (out / "collected.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0].split(",") == list(LISTING_COLUMNS)
    assert LISTING_COLUMNS[-1] == "edge"
    assert [row["edge"] for row in csv.DictReader(io.StringIO(text))] == ["press-7"]
