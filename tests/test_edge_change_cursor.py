"""`splitdet edge results`: the change cursor a consumer polls by, and the output encodings
(review of the MES integration polling `edge results --after-id N --json` every second).

A. `--changed-after SEQ` lists the rows whose last change (`changed`, a store-wide sequence
   the store's triggers give every insert and every change of what is listed) is above SEQ.
   Before, the only cursor was --after-id: a dead letter that `edge requeue` sent again became
   pending, then defect, below the consumer's cursor, and its verdict never reached it (53 of
   53); each poll read every row after the oldest pending one.
B. A cursor past what the store ever numbered (--changed-after past its last change,
   --after-id past its largest id) is refused: the database was restored from a backup or
   made anew. Before, such a poll listed nothing, exit 0, for ever.
C. CSV is UTF-8 whatever the locale, the table never fails on a name the locale cannot encode.
   Before, `PYTHONIOENCODING=latin-1 edge results --csv` died with UnicodeEncodeError mid-file.

Real stores through ResultStore, the real command through `splitdet.shared.cli.main` (in a
subprocess for the locale).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitdet.edge import store_reads
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared.cli import main

FINGERPRINT = "d" * 64
#: A file name no Latin-1 locale can encode (the review's).
UNENCODABLE = "Prüfteil_ø12_日本"
RENUMBERED = "the database was replaced or restored from a backup, and its rows are numbered again"


def _arrival(n: int, name: str = "img") -> Arrival:
    return Arrival(
        f"/hot/{name}{n}.png", f"{name}{n}.png|100|{n}|{n}", f"{n:064x}", 100, time.time()
    )


def _answer() -> Answer:
    return Answer(boxes=[[1.0, 2.0, 3.0, 4.0]], scores=[0.9], labels=[1],
                  class_names=["scratch"], timings={"round_trip": 0.01})  # fmt: skip


def _results(capsys, db: Path, *options: str) -> list[dict]:
    code = main(["edge", "results", "--db", str(db), "--json", *options])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


class _Consumer:
    """The MES integration: polls `edge results --changed-after SEQ --json`, keeps the largest
    `changed` as its cursor, and the last state of each row it was given, by id."""

    def __init__(self, capsys, db: Path) -> None:
        self.capsys, self.db, self.cursor = capsys, db, 0
        self.verdicts: dict[int, str] = {}

    def poll(self) -> list[dict]:
        rows = _results(self.capsys, self.db, "--changed-after", str(self.cursor))
        for row in rows:
            assert row["changed"] > self.cursor
            self.verdicts[row["id"]] = row["verdict"]
        changes = [row["changed"] for row in rows]
        assert changes == sorted(changes) and len({row["id"] for row in rows}) == len(rows)
        self.cursor = max(changes, default=self.cursor)
        return rows


def _store_verdicts(db: Path) -> dict[int, str]:
    with contextlib.closing(ResultStore(db, readonly=True)) as store:
        return {row["id"]: row["verdict"] for row in store.results()}


# ----------------------------------------------------------------- A. the change cursor


def test_a_requeued_dead_letter_reaches_the_change_cursor_as_pending_then_final(tmp_path, capsys):
    """Before: no --changed-after (exit 2); by --after-id, the requeued dead letters' "defect"
    came below the cursor and was never listed (the consumer kept "error")."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
        refused = []
        for n in (2, 3):
            image_id, _, _ = store.record_pending(_arrival(n), 0.9, f"r{n}", b"x", FINGERPRINT, {})
            assert store.dead_letter(image_id, "dead letter: INTERNAL: a cloud bug")
            refused.append(image_id)
        store.record_ok(_arrival(4), 0.1, FINGERPRINT, {})
    consumer = _Consumer(capsys, db)
    assert [(r["id"], r["verdict"]) for r in consumer.poll()] == [
        (1, "ok"), (2, "error"), (3, "error"), (4, "ok")
    ]  # fmt: skip
    assert consumer.poll() == []  # (nothing changed: the cursor stays)

    with contextlib.closing(ResultStore(db)) as store:
        assert store.requeue_dead_letters()[0] == refused
    assert [(r["id"], r["verdict"]) for r in consumer.poll()] == [(2, "pending"), (3, "pending")]
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(5), 0.1, FINGERPRINT, {})
        assert store.complete(refused[1], _answer()) and store.complete(refused[0], _answer())
    assert [(r["id"], r["verdict"]) for r in consumer.poll()] == [
        (5, "ok"), (3, "defect"), (2, "defect")
    ]  # fmt: skip
    assert consumer.verdicts == _store_verdicts(db)
    assert consumer.poll() == []


def test_every_write_is_numbered_once_and_a_retry_is_no_change(tmp_path):
    """The triggers number each insert and each change of a listed column by one (their own
    update of `changed` fires nothing), including a write by an earlier splitdet (plain SQL
    knowing nothing of `changed`); a failed send tried again, a rekey, or a column set to the
    value it has, are no change."""
    db = tmp_path / "edge.sqlite"

    def changed(store: ResultStore) -> dict[int, int]:
        return {row["id"]: row["changed"] for row in store.results()}

    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
        pending, _, _ = store.record_pending(_arrival(2), 0.9, "r2", b"x", FINGERPRINT, {})
        assert changed(store) == {1: 1, 2: 2}
        store.retry_later(pending, time.time() + 5, "UNAVAILABLE")  # (attempts, updated)
        store.rekey(1, "img1.png|100|1|99")
        store.set_stored_path(1, None)  # (the value it has)
        assert changed(store) == {1: 1, 2: 2}
        store.set_stored_path(1, "/archive/1_img1.png")  # (moved)
        assert changed(store) == {1: 3, 2: 2}
    with contextlib.closing(sqlite3.connect(db)) as con:  # an earlier splitdet's write
        con.execute("UPDATE images SET verdict = 'error', error_kind = 'quarantine',"
                    " reason = 'x' WHERE id = 2")  # fmt: skip
        con.commit()
    with contextlib.closing(ResultStore(db)) as store:
        assert changed(store) == {1: 3, 2: 4}
        assert store.counters() == {}  # (a sequence, not an event count)
    with contextlib.closing(ResultStore(db, readonly=True)) as store:
        value = store._db.execute("SELECT value FROM counters WHERE name = 'change_seq'")
        assert value.fetchone() == (4,)


def _as_an_earlier_splitdet_wrote_it(db: Path, rows: int) -> None:
    """A store of `rows` "ok" rows, 2 of them pruned, without `changed` (nor its index,
    triggers and counter), as a splitdet before it left the file."""
    with contextlib.closing(ResultStore(db)) as store:
        for n in range(1, rows + 3):
            store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
    with contextlib.closing(sqlite3.connect(db)) as con:
        for trigger in ("images_changed_insert", "images_changed_update"):
            con.execute(f"DROP TRIGGER IF EXISTS {trigger}")
        con.execute("DROP INDEX IF EXISTS images_changed")
        if "changed" in {row[1] for row in con.execute("PRAGMA table_info(images)")}:
            con.execute("ALTER TABLE images DROP COLUMN changed")
        con.execute("DELETE FROM counters WHERE name = 'change_seq'")
        con.execute("DELETE FROM images WHERE id IN (1, 4)")
        con.commit()


def test_a_store_of_an_earlier_splitdet_is_read_as_it_is_then_numbered_by_id(tmp_path, capsys):
    """Read only: `changed` is empty and --changed-after refused (it numbers nothing yet); the
    first writer numbers its rows by id (a consumer from 0 takes them in arrival order) and
    sets the counter to the largest, and an earlier splitdet's later writes are numbered."""
    db = tmp_path / "edge.sqlite"
    _as_an_earlier_splitdet_wrote_it(db, 5)
    text = _csv(capsys, db)
    assert text.splitlines()[0].endswith(",threshold,changed,warnings,n_boxes,edge")
    assert [row["changed"] for row in csv.DictReader(io.StringIO(text))] == [""] * 5
    assert main(["edge", "results", "--db", str(db), "--changed-after", "0"]) == 2
    assert "numbers no changes yet" in capsys.readouterr().err

    ResultStore(db).close()  # (a writer: `edge run`, prune, requeue, abandon)
    rows = _results(capsys, db, "--changed-after", "0")
    assert [(r["id"], r["changed"]) for r in rows] == [(i, i) for i in (2, 3, 5, 6, 7)]
    with contextlib.closing(sqlite3.connect(db)) as con:  # the earlier splitdet again
        con.execute("UPDATE images SET verdict = 'defect' WHERE id = 3")
        con.commit()
    assert [(r["id"], r["changed"]) for r in _results(capsys, db, "--changed-after", "7")] == [
        (3, 8)
    ]


def test_a_poll_reads_through_the_index_in_batches_each_row_once(tmp_path, monkeypatch):
    """A poll costs the rows changed since, not every row after an old pending one (the
    index on `changed`, whatever the filter); batches keep that order; a row changed while
    listed is left to the next poll, above every row listed."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        pending, _, _ = store.record_pending(_arrival(0), 0.9, "r0", b"x", FINGERPRINT, {})
        for n in range(1, 8):
            store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
        assert store.complete(pending, _answer())  # (id 1, now changed 9)
        monkeypatch.setattr(store_reads, "RESULTS_BATCH", 3)
        statements: list[str] = []
        store._db.set_trace_callback(statements.append)
        listed = store_reads.iter_results(store._db, changed_after=2, verdict=None)
        first = next(listed)
        store.set_stored_path(7, "/archive/7.png")  # (meanwhile, not yet listed: changed 10)
        rows = [first, *listed]
        store._db.set_trace_callback(None)
        assert [(r["id"], r["changed"]) for r in rows] == [
            (3, 3), (4, 4), (5, 5), (6, 6), (8, 8), (1, 9)
        ]  # fmt: skip
        later = store_reads.iter_results(store._db, changed_after=9)
        assert [(r["id"], r["changed"], r["stored_path"]) for r in later] == [
            (7, 10, "/archive/7.png")
        ]
        reads = [s for s in statements if s.startswith("SELECT") and "ORDER BY changed" in s]
        assert len(reads) == 3
        for sql in reads:
            plan = " ".join(row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {sql}"))
            assert "USING INDEX images_changed" in plan, plan
        defects = store_reads.iter_results(store._db, changed_after=0, verdict="defect")
        assert [r["id"] for r in defects] == [1]


# ------------------------------------------------------------------ B. a restored database


def test_a_cursor_past_a_restored_or_new_store_is_refused_in_one_line(tmp_path, capsys):
    """Before: --after-id past a restored backup's rows listed nothing, exit 0, for ever."""
    db, backup = tmp_path / "edge.sqlite", tmp_path / "backup.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        for n in (1, 2, 3):
            store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
        with contextlib.closing(sqlite3.connect(backup)) as copy:
            store._db.backup(copy)  # (`sqlite3 FILE ".backup BACKUP"`)
        for n in (4, 5, 6):
            store.record_ok(_arrival(n), 0.1, FINGERPRINT, {})
    assert [r["id"] for r in _results(capsys, db, "--after-id", "3")] == [4, 5, 6]
    assert [r["id"] for r in _results(capsys, db, "--after-id", "6")] == []  # (not past)
    db.write_bytes(backup.read_bytes())  # restored (the daemon stopped: no -wal)
    for name in ("edge.sqlite-wal", "edge.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(7, "new"), 0.1, FINGERPRINT, {})  # (id 4 again)

    assert main(["edge", "results", "--db", str(db), "--json", "--after-id", "6"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert f"--after-id 6 is past the last id this store gave, 4: {RENUMBERED}" in captured.err
    assert "read it again from 0 (and de-duplicate by content_hash)" in captured.err
    assert main(["edge", "results", "--db", str(db), "--changed-after", "6", "--csv"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert (
        "--changed-after 6 is past this store's last change 4: the database was replaced or "
        "restored from a backup, and its rows are numbered again; read it again from 0 (and "
        "de-duplicate by content_hash)"
    ) in captured.err
    assert [r["path"] for r in _results(capsys, db, "--changed-after", "3")] == ["/hot/new7.png"]

    db.unlink()  # made anew: numbered from 1 again
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(_arrival(8), 0.1, FINGERPRINT, {})
    for option in ("--changed-after", "--after-id"):
        assert main(["edge", "results", "--db", str(db), option, "2"]) == 2
        assert RENUMBERED in capsys.readouterr().err
        assert len(_results(capsys, db, option, "0")) == 1


def test_the_cursors_exclude_each_other_and_the_help_names_the_consumers_one(capsys):
    with pytest.raises(SystemExit) as done:
        main(["edge", "results", "--db", "x", "--after-id", "1", "--changed-after", "1"])
    assert done.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["edge", "results", "--help"])
    text = capsys.readouterr().out
    assert "--changed-after SEQ lists" in text and "misses the final verdict of a" in text


# ------------------------------------------------------------------------ C. the encoding


def _csv(capsys, db: Path) -> str:
    assert main(["edge", "results", "--db", str(db), "--csv"]) == 0
    return capsys.readouterr().out


def _run_latin1(*argv: str) -> subprocess.CompletedProcess:
    """`splitdet ARGV` in a Latin-1 locale (as under cron with LANG=de_DE.ISO-8859-1)."""
    env = {**os.environ, "PYTHONIOENCODING": "latin-1", "LC_ALL": "C"}
    code = "import sys; from splitdet.shared.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, timeout=120
    )


def test_csv_is_utf8_and_the_table_escapes_in_a_latin1_locale(tmp_path):
    """Before: the CSV stopped after the rows before the first such name, with a traceback
    (UnicodeEncodeError, exit 1); the table too."""
    db = tmp_path / "edge.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        for n in range(1, 13):
            store.record_ok(_arrival(n, UNENCODABLE if n > 6 else "plain"), 0.1, FINGERPRINT, {})

    done = _run_latin1("edge", "results", "--db", str(db), "--csv")
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode("utf-8"), newline="")))
    assert [row["path"] for row in rows[6:]] == [f"/hot/{UNENCODABLE}{n}.png" for n in range(7, 13)]
    assert [row["changed"] for row in rows] == [str(n) for n in range(1, 13)]

    table = _run_latin1("edge", "results", "--db", str(db))
    assert table.returncode == 0 and b"Traceback" not in table.stderr, table.stderr
    lines = table.stdout.decode("latin-1").splitlines()
    assert len(lines) == 13 and lines[-1].endswith("/hot/Prüfteil_ø12_\\u65e5\\u672c12.png")

    listed = _run_latin1("edge", "results", "--db", str(db), "--json")
    assert listed.returncode == 0 and listed.stdout.isascii()
    assert json.loads(listed.stdout)[-1]["path"] == f"/hot/{UNENCODABLE}12.png"
