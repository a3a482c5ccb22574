"""Review: a quality supervisor building the shift report in Excel from `splitdet edge results`.

A. A blank frame (lens cap) was exported as a plain "ok": the daemon logged a WARNING and
   counted it, but the row, `edge results` and `edge status` said nothing. The row now keeps
   its frame warnings (images.warnings, an added column), listed in every format and counted
   by `edge status`; the verdict stays the model's.
B. --since filters on `updated`, which every failed send moves: during a cloud outage the
   pending images of earlier shifts were in every later shift's export. --arrived-from and
   --arrived-until select by arrival time, half-open, each image in exactly one shift.
C. --csv had no byte order mark (Excel read UTF-8 names as Windows-1252) and unix-second times
   (shown as 1.79663E+09): --csv --excel writes a BOM and local ISO 8601 times.
D. n_boxes, the table's box count, in CSV and JSON too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_edge_daemon import BrightIsDefective

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.edge.store_schema import _SCHEMA, SCHEMA_VERSION

from support import daemon_config, run_main

BOM = b"\xef\xbb\xbf"


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def arrival(name: str, arrived: float) -> Arrival:
    """An arrival of /cam/NAME at unix s `arrived` (a file_key of its own)."""
    return Arrival(f"/cam/{name}", f"{name}|1|2|3", "ab" * 32, 1, arrived)


def results(capsys, db: Path, *options: object) -> list[dict]:
    """`edge results --json` of `db` with `options`."""
    code, out, err = run_main(capsys, "edge", "results", "--db", db, "--json", *options)
    assert code == 0, err
    return json.loads(out)


def csv_rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


@contextlib.contextmanager
def local_zone(name: str):
    """The process's local time zone `name` (TZ) inside, the earlier one after."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", name)
        time.tzset()
        try:
            yield
        finally:
            patch.undo()
            time.tzset()


# ------------------------------------------------------------------ A. frame warnings kept


def test_a_blank_frame_is_listed_and_counted_with_its_warning_its_verdict_the_models(
    tmp_path, capsys
):
    config = daemon_config(tmp_path, tmp_path)
    noise = np.random.default_rng(0).integers(0, 100, (48, 64, 3), dtype=np.uint8)
    for name, image in [("capped.png", np.zeros((48, 64, 3), np.uint8)),  # ok, blank
                        ("glare.png", np.full((48, 64, 3), 255, np.uint8)),  # flagged, blank
                        ("part.png", noise)]:  # fmt: skip
        (config.watch / name).write_bytes(png(image))
        time.sleep(0.01)
    assert EdgeDaemon(config, pipeline=BrightIsDefective()).run() == 1  # (glare: pending)
    rows = {Path(r["path"]).name: r for r in results(capsys, config.db)}
    assert {n: (r["verdict"], r["warnings"]) for n, r in rows.items()} == {
        "capped.png": ("ok", "blank_frame"),
        "glare.png": ("pending", "blank_frame"),
        "part.png": ("ok", None),
    }
    code, out, _ = run_main(capsys, "edge", "results", "--db", config.db, "--csv")
    assert code == 0
    assert {Path(r["path"]).name: r["warnings"] for r in csv_rows(out)} == {
        "capped.png": "blank_frame", "glare.png": "blank_frame", "part.png": ""}  # fmt: skip
    code, out, _ = run_main(capsys, "edge", "results", "--db", config.db)
    assert code == 0
    [capped] = [line for line in out.splitlines() if "capped.png" in line]
    [part] = [line for line in out.splitlines() if "part.png" in line]
    assert f"  [blank_frame]  {config.watch / 'capped.png'}" in capped and "[" not in part
    code, out, _ = run_main(capsys, "edge", "status", "--db", config.db, "--json")
    assert code == 0 and json.loads(out)["warnings"] == {"blank_frame": 2, "dim_wide_frame": 0}
    code, out, _ = run_main(capsys, "edge", "status", "--db", config.db)
    assert code == 0 and "warnings      blank_frame 2 (" in out and "dim_wide_frame" not in out


def test_a_store_without_the_warnings_column_is_read_as_it_is_and_upgraded_by_a_writer(
    tmp_path, capsys
):
    """A store an earlier splitdet wrote (no images.warnings) is read as it is (NULL, counts
    0, file unchanged); a writer adds the column (no new schema version: an earlier splitdet
    still opens it) and keeps the warnings of the rows it writes, the earlier ones NULL."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.executescript(_SCHEMA)
        if "warnings" in {row[1] for row in con.execute("PRAGMA table_info(images)")}:
            con.execute("ALTER TABLE images DROP COLUMN warnings")  # (as an earlier one made it)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        con.execute(
            "INSERT INTO images (file_key, path, content_hash, size_bytes, arrived, finished,"
            " updated, verdict, p_defect, fingerprint) VALUES ('old.png|1|2|3', '/cam/old.png',"
            " 'abc', 1, 1.0, 1.0, 1.0, 'ok', 0.1, 'fp')"
        )
        con.commit()
    before = db.read_bytes()
    [old] = results(capsys, db)
    assert old["warnings"] is None and old["n_boxes"] is None
    code, out, _ = run_main(capsys, "edge", "status", "--db", db, "--json")
    assert code == 0 and json.loads(out)["warnings"] == {"blank_frame": 0, "dim_wide_frame": 0}
    assert db.read_bytes() == before
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(arrival("capped.png", 2.0), 0.1, "fp", {}, warnings=["blank_frame"])
        store.record_ok(arrival("part.png", 3.0), 0.1, "fp", {})
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        rows = con.execute("SELECT path, warnings, changed FROM images ORDER BY id").fetchall()
    assert rows == [("/cam/old.png", None, 1), ("/cam/capped.png", "blank_frame", 2),
                    ("/cam/part.png", None, 3)]  # fmt: skip


# ------------------------------------------------------------------ B. shifts by arrival


def test_a_shift_export_holds_the_images_that_arrived_in_it_each_in_exactly_one(tmp_path, capsys):
    """Three shifts [T-8h, T), [T, T+8h), [T+8h, ...): an image arriving at T is in the second
    only, and a pending image of the first shift, retried by the sender during the second
    (its `updated` moved), stays in the first; --since lists it anew, as its help says."""
    t = float(int(time.time()) - 9 * 3600)  # (the shift boundaries, in the past: whole s)
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(arrival("early.png", t - 3600), 0.1, "fp", {})
        image_id, _, _ = store.record_pending(
            arrival("flagged.png", t - 60), 0.9, "r1", b"x", "fp", {}
        )
        store.record_ok(arrival("boundary.png", t), 0.1, "fp", {})
        store.record_ok(arrival("late.png", t + 8 * 3600 + 1), 0.1, "fp", {})
        store.retry_later(image_id, time.time() + 60, "cloud unreachable")  # `updated` moves

    def shift(*options: object) -> list[str]:
        return [Path(r["path"]).name for r in results(capsys, db, *options)]

    first = shift("--arrived-from", t - 8 * 3600, "--arrived-until", t)
    # (an ISO time with an offset, parsed as --since parses it)
    start = datetime.fromtimestamp(t, timezone(timedelta(hours=2))).isoformat()
    second = shift("--arrived-from", start, "--arrived-until", t + 8 * 3600)
    third = shift("--arrived-from", t + 8 * 3600)
    assert first == ["early.png", "flagged.png"]
    assert second == ["boundary.png"]
    assert third == ["late.png"]
    assert sorted(first + second + third) == sorted(shift())
    assert "flagged.png" in shift("--since", t)  # --since: rows whose `updated` moved


def test_arrival_bounds_are_refused_as_since_is_naming_their_option(tmp_path, capsys, store_db):
    with local_zone("Europe/Berlin"):  # 2024-10-27 02:30 is passed twice there
        code, _, err = run_main(capsys, "edge", "results", "--db", store_db,
                                "--arrived-until", "2024-10-27T02:30")  # fmt: skip
    assert code == 2 and "--arrived-until '2024-10-27T02:30'" in err and "occurs twice" in err
    code, _, err = run_main(capsys, "edge", "results", "--db", store_db,
                            "--arrived-from", "yesterday")  # fmt: skip
    assert code == 2 and "--arrived-from 'yesterday': expected 30s" in err
    code, _, err = run_main(capsys, "edge", "results", "--db", store_db,
                            "--arrived-from", "1000", "--arrived-until", "1000")  # fmt: skip
    assert code == 2 and "is not after --arrived-from" in err


def test_the_help_says_what_since_filters_and_shows_a_shift_by_arrival(capsys):
    code, out, _ = run_main(capsys, "edge", "results", "--help")
    text = " ".join(out.split())
    assert code == 0
    assert "--since 2024-05-01T08:00 --csv > day.csv" not in text
    assert "--arrived-from 2024-05-01T06:00 \\ --arrived-until 2024-05-01T14:00" in text
    assert "a failed send tried again included" in text


# ------------------------------------------------------------------ C. CSV for Excel


def test_csv_for_excel_has_a_bom_and_local_iso_times_plain_csv_unchanged(tmp_path, capsysbinary):
    db = tmp_path / "edge.sqlite"
    arrived = datetime(2026, 12, 7, 14, 3, 11, 62000, timezone(timedelta(hours=1))).timestamp()
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(arrival("Prüfteil_öl.png", arrived), 0.1, "fp", {})

    def csv_out(*options: str) -> bytes:
        from splitdet.shared.cli import main

        capsysbinary.readouterr()
        assert main(["edge", "results", "--db", str(db), "--csv", *options]) == 0
        return capsysbinary.readouterr().out

    with local_zone("Europe/Berlin"):
        plain, excel = csv_out(), csv_out("--excel")
    assert not plain.startswith(BOM) and excel.startswith(BOM)
    [row] = csv_rows(plain.decode("utf-8"))
    [shown] = csv_rows(excel[len(BOM) :].decode("utf-8"))
    assert list(shown) == list(row)  # the same columns and header
    assert float(row["arrived"]) == pytest.approx(arrived)  # plain: unix seconds, as before
    assert shown["arrived"] == "2026-12-07T14:03:11.062+01:00"
    for name in ("finished", "updated"):
        assert datetime.fromisoformat(shown[name]).timestamp() == pytest.approx(
            float(row[name]), abs=1e-3
        )
    assert shown["path"] == row["path"] == "/cam/Prüfteil_öl.png"


def test_excel_appended_to_a_file_gets_no_second_bom(tmp_path):
    """`>> shifts.csv` twice put a second byte order mark mid-file, before the second header."""
    import subprocess
    import sys

    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(arrival("a.png", time.time() - 3600), 0.1, "fp", {})
    out = tmp_path / "shifts.csv"
    for _ in range(2):
        with out.open("ab") as appended:
            done = subprocess.run(
                [sys.executable, "-m", "splitdet.shared.cli", "edge", "results", "--db", str(db),
                 "--csv", "--excel"],
                stdout=appended, stderr=subprocess.PIPE, text=True, timeout=60,
            )  # fmt: skip
        assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    assert data.startswith(BOM) and data.count(BOM) == 1
    assert data.decode("utf-8").count("id,path,") == 2


def test_a_shift_that_ended_a_moment_ago_is_warned_of(tmp_path, capsys):
    """A row is written once its image is judged: an export right at the shift's end misses
    images still being judged; an --arrived-until within the last minute says so."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(arrival("a.png", time.time() - 7200), 0.1, "fp", {})
    for until, warned in (("10s", True), ("2h", False), (time.time() + 600, True)):
        code, _, err = run_main(capsys, "edge", "results", "--db", db, "--arrived-until", until)
        assert code == 0, err
        assert ("images that arrived before it and are still being judged" in err) is warned, err


def test_excel_without_csv_is_refused_plainly(capsys, store_db):
    for fmt in ([], ["--json"]):
        code, out, err = run_main(capsys, "edge", "results", "--db", store_db, "--excel", *fmt)
        assert code == 2 and out == "" and "--excel is a form of --csv" in err


# ------------------------------------------------------------------ D. n_boxes


def test_csv_and_json_count_the_boxes_listed_as_the_table_does(tmp_path, capsys):
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(arrival("ok.png", 1.0), 0.1, "fp", {})
        image_id, _, _ = store.record_pending(arrival("nick.png", 2.0), 0.9, "r", b"x", "fp", {})
        answer = Answer([[0, 0, 1, 1], [2, 2, 3, 3]], [0.9, 0.2], [1, 1], ["nick", "nick"])
        store.complete(image_id, answer)
    assert [r["n_boxes"] for r in results(capsys, db)] == [None, 2]
    assert [r["n_boxes"] for r in results(capsys, db, "--score-threshold", "0.5")] == [None, 1]
    code, out, _ = run_main(capsys, "edge", "results", "--db", db, "--csv")
    assert code == 0 and [r["n_boxes"] for r in csv_rows(out)] == ["", "2"]
