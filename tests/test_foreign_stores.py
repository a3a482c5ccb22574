"""SQLite files that are not splitdet's (security review): every edge command (`run`, `status`,
`results`, `collect`, `requeue`, `prune`) and the cloud's `--answers-db` refuse a database that is
neither empty nor a store of their own kind, with one line naming the file and what it holds
(exit status 2, no traceback), before writing anything to it. Stores are marked by
`PRAGMA application_id`; stores written before the mark (application_id 0) still open and work,
the read-only commands leaving them unmarked."""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.cloud.idempotency import APPLICATION_ID as ANSWERS_ID
from splitdet.cloud.idempotency import IdempotencyStore, NotAnswersDatabase, StoredAnswer
from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_file import StoreError, open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.edge.store_schema import (
    _DEAD_LETTERS,
    _SCHEMA,
    _TABLES,
    _THRESHOLD,
    ANSWERS_APPLICATION_ID,
    APPLICATION_ID,
    SCHEMA_VERSION,
)
from splitdet.shared.cli import main

from support import edge_run_once_offline

pytestmark = pytest.mark.timeout(120)  # a check that regressed would run the daemon forever

#: GeoPackage's application_id ("GPKG"): another program's mark.
GPKG = 0x47504B47

EDGE_COMMANDS = ("run", "status", "results", "collect", "requeue", "prune")


def _foreign(path: Path, user_version: int = 1, application_id: int = 0) -> Path:
    """Another program's database (a CRM's), in its own (rollback) journal mode."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        db.execute("INSERT INTO customers (name) VALUES ('ACME')")
        db.execute(f"PRAGMA user_version = {user_version}")
        db.execute(f"PRAGMA application_id = {application_id}")
        db.commit()
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _header(path: Path) -> tuple[int, int, list[str]]:
    """(application_id, user_version, tables) of a database, read only."""
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        return (
            db.execute("PRAGMA application_id").fetchone()[0],
            db.execute("PRAGMA user_version").fetchone()[0],
            sorted(r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")),
        )


def _error_line(capsys, command: str, *needles: str) -> str:
    """The one error line of `splitdet COMMAND`, checked for each needle (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if f"splitdet {command}: error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def _edge(command: str, db: Path, tmp_path: Path, model_dir: Path | None) -> int:
    """`splitdet edge COMMAND --db DB` with what COMMAND needs besides (run: a hot folder
    holding one image, --once, a closed cloud port, a threshold nothing reaches)."""
    extra = {
        "status": [],
        "results": [],
        "collect": ["--out", str(tmp_path / "review")],
        "requeue": [],
        "prune": ["--older-than", "1d"],
    }
    if command != "run":
        return main(["edge", command, "--db", str(db), *extra[command]])
    watch = tmp_path / "hot"
    watch.mkdir(exist_ok=True)
    Image.fromarray(np.full((64, 80, 3), 99, np.uint8)).save(watch / "a.png")
    return edge_run_once_offline(db, watch, model_dir)


@pytest.fixture
def model_dir(request) -> Path | None:
    """The tiny export for `edge run` (built once per session), None for the other commands."""
    command = request.node.callspec.params["command"]
    return request.getfixturevalue("tiny_model_dir") if command == "run" else None


# ------------------------------------------------------------------------------ the edge


@pytest.mark.parametrize("command", EDGE_COMMANDS)
@pytest.mark.parametrize(
    ("user_version", "application_id", "said"),
    [
        (1, 0, "it holds tables customers; user_version 1"),
        (0, GPKG, "application_id 0x47504b47, another program's"),
        (2, ANSWERS_APPLICATION_ID, "it is a splitdet cloud answers database"),
    ],
    ids=["user_version-1", "foreign-application-id", "answers-db"],
)
def test_edge_refuses_a_foreign_database_and_leaves_it_as_it_was(
    command, user_version, application_id, said, model_dir, tmp_path, capsys
):
    db = _foreign(tmp_path / "crm_v1.sqlite", user_version, application_id)
    before = _sha256(db)
    assert _edge(command, db, tmp_path, model_dir) == 2
    line = _error_line(capsys, "edge", f"--db {db}: not a splitdet edge store (", said,
                       "give another --db")  # fmt: skip
    assert "no such table" not in line
    assert _sha256(db) == before
    assert _header(db) == (application_id, user_version, ["customers"])
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-journal").exists()
    if command == "run":  # nothing was taken from the hot folder, nothing made beside it
        assert (tmp_path / "hot" / "a.png").is_file()
        assert sorted(p.name for p in db.parent.glob(f"{db.name}*")) == [db.name]
    if command == "collect":
        assert not (tmp_path / "review").exists()


@pytest.mark.parametrize("command", EDGE_COMMANDS)
def test_edge_names_a_cloud_answers_database_given_as_db(command, model_dir, tmp_path, capsys):
    """The typo the other way round: the cloud's answers file given to the edge."""
    answers = tmp_path / "answers.sqlite"
    IdempotencyStore(answers).close()
    before = _sha256(answers)
    assert _edge(command, answers, tmp_path, model_dir) == 2
    _error_line(capsys, "edge", "not a splitdet edge store", "splitdet cloud answers database",
                "it holds tables answers")  # fmt: skip
    assert _sha256(answers) == before


def test_the_store_refuses_before_any_write(tmp_path):
    """In-process: StoreError for ResultStore and open_readonly alike, the file untouched (no
    WAL journal mode set, no dead_letters table created by a migration from "version 1")."""
    db = _foreign(tmp_path / "crm.sqlite")
    before = _sha256(db)
    for opener in (ResultStore, open_readonly):
        with pytest.raises(StoreError, match=r"not a splitdet edge store \(it holds tables cust"):
            opener(db)
    assert _sha256(db) == before
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"


def test_our_tables_with_a_foreign_mark_are_refused(tmp_path):
    """Our table names are not enough: another application_id is refused too."""
    marked = tmp_path / "marked.sqlite"
    ResultStore(marked).close()
    with contextlib.closing(sqlite3.connect(marked)) as con:
        con.execute(f"PRAGMA application_id = {GPKG}")
        con.commit()
    before = _sha256(marked)
    for opener in (ResultStore, open_readonly):
        with pytest.raises(StoreError, match="application_id 0x47504b47"):
            opener(marked)
    assert _sha256(marked) == before


def test_an_earlier_store_with_an_operators_view_is_ours(tmp_path):
    """A store of an earlier version (no application_id) to which an operator added a view
    of their own: all our tables are there, so it is ours (a review: refused as "not a
    splitdet edge store" after the upgrade, while the same store marked since was taken)."""
    path = tmp_path / "edge.sqlite"
    ResultStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute("PRAGMA application_id = 0")  # as an earlier version left it
        con.execute("CREATE VIEW defects_per_day AS SELECT COUNT(*) FROM images")
        con.commit()
    open_readonly(path).close()
    ResultStore(path).close()


def test_new_and_empty_databases_become_marked_stores(tmp_path):
    new = tmp_path / "sub" / "new.sqlite"
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with contextlib.closing(sqlite3.connect(tmp_path / "pristine.sqlite")) as con:
        con.execute("PRAGMA user_version = 0")  # a database with a header but nothing in it
    pristine = tmp_path / "pristine.sqlite"
    for path in (new, empty, pristine):
        ResultStore(path).close()
        assert _header(path) == (APPLICATION_ID, SCHEMA_VERSION,
                                 sorted(_TABLES[SCHEMA_VERSION] | {"sqlite_sequence"}))  # fmt: skip
    assert _TABLES[SCHEMA_VERSION] == {"images", "outbox", "counters", "dead_letters"}


def test_status_of_an_empty_database_says_so(tmp_path, capsys):
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    assert main(["edge", "status", "--db", str(empty)]) == 2
    _error_line(capsys, "edge", "not a splitdet edge store yet (an empty database")
    assert empty.stat().st_size == 0


def _old_store(path: Path, version: int) -> Path:
    """A store as splitdet wrote it before application_id was set: its schema of `version`
    (1: without dead_letters), user_version, application_id 0, and one "ok" row."""
    schema = _SCHEMA.replace(_THRESHOLD, "")  # each version's schema, as it was written
    schema = schema if version == 2 else schema.replace(_DEAD_LETTERS, "")
    with contextlib.closing(sqlite3.connect(path)) as con:
        con.executescript(schema)
        con.execute(f"PRAGMA user_version = {version}")
        con.execute("PRAGMA journal_mode=WAL")
        now = time.time()  # (recent: `edge prune --older-than 1d` keeps it)
        con.execute(
            "INSERT INTO images (file_key, path, stored_path, content_hash, size_bytes, arrived,"
            " finished, updated, verdict, p_defect, fingerprint) VALUES ('old.png|1|2|3',"
            " '/cam/old.png', NULL, 'abc', 1, ?, ?, ?, 'ok', 0.1, 'fp')",
            (now, now, now),
        )
        con.commit()
    assert _header(path)[:2] == (0, version)
    return path


@pytest.mark.parametrize("version", [1, 2])
def test_a_store_of_an_earlier_version_is_read_as_it_is(version, tmp_path, capsys):
    """status, results and collect read an unmarked store without marking it."""
    db = _old_store(tmp_path / "edge.sqlite", version)
    before = _sha256(db)
    assert main(["edge", "status", "--db", str(db), "--json"]) == 0
    assert '"ok": 1' in capsys.readouterr().out
    assert main(["edge", "results", "--db", str(db), "--csv"]) == 0
    assert "/cam/old.png" in capsys.readouterr().out
    assert main(["edge", "collect", "--db", str(db), "--out", str(tmp_path / "r")]) == 0
    # dry runs, and an abandon with nothing of its --fingerprint, read it as it is too (review:
    # they marked it and added a column, and a schema bump then locked the earlier splitdet out)
    for dry in (["prune", "--older-than", "1d", "--dry-run"], ["requeue", "--dry-run"],
                ["abandon", "--fingerprint", "f" * 16, "--dry-run"]):  # fmt: skip
        assert main(["edge", dry[0], "--db", str(db), *dry[1:]]) in (0, 2)
    capsys.readouterr()
    assert main(["edge", "abandon", "--db", str(db), "--fingerprint", "e" * 16]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "nothing to abandon" in captured.out, captured
    assert _sha256(db) == before
    assert _header(db)[:2] == (0, version)


def test_an_abandon_dry_run_on_a_store_without_dead_letters_reads_it_as_it_is(tmp_path, capsys):
    """A schema-1 store (no dead_letters table) with a request waiting: `edge abandon
    --dry-run`, the step to try first, ended in a traceback (no such table: dead_letters)."""
    db = _old_store(tmp_path / "edge.sqlite", 1)
    with contextlib.closing(sqlite3.connect(db)) as con:
        now = time.time()
        con.execute(
            "INSERT INTO images (file_key, path, stored_path, content_hash, size_bytes, arrived,"
            " updated, verdict, p_defect, fingerprint) VALUES ('new.png|1|2|3', '/cam/new.png',"
            " NULL, 'def', 1, ?, ?, 'pending', 0.9, ?)",
            (now, now, "e" * 64),
        )
        con.execute(
            "INSERT INTO outbox (image_id, request_id, payload, size_bytes, created, next_try)"
            " VALUES (2, 'r2', x'00', 1, ?, ?)",
            (now, now),
        )
        con.commit()
    before = _sha256(db)
    code = main(["edge", "abandon", "--db", str(db), "--fingerprint", "e" * 16, "--dry-run"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "would make 1 request(s)" in captured.out and "Traceback" not in captured.err
    assert _sha256(db) == before


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("command", ["prune", "requeue"])
def test_a_store_of_an_earlier_version_is_opened_migrated_and_marked(
    command, version, tmp_path, capsys, caplog
):
    db = _old_store(tmp_path / "edge.sqlite", version)
    assert _edge(command, db, tmp_path, None) == 0
    assert "Traceback" not in capsys.readouterr().err
    # a schema change is one way: said (it was silent), so that a copy is kept to go back
    migrated = [
        r for r in caplog.records if getattr(r, "fields", {}).get("event") == "store_migrated"
    ]
    assert len(migrated) == (1 if version < SCHEMA_VERSION else 0), caplog.text
    if migrated:
        assert "an earlier splitdet (of schema 1) cannot open it" in migrated[0].getMessage()
    assert _header(db) == (APPLICATION_ID, SCHEMA_VERSION,
                           sorted(_TABLES[SCHEMA_VERSION] | {"sqlite_sequence"}))  # fmt: skip
    store = ResultStore(db)  # marked now, and it works
    try:
        assert store.verdict_counts()["ok"] == 1
        arrival = Arrival("/cam/new.png", "new.png|1|2|4", "def", 1, time.time())
        store.record_ok(arrival, 0.2, "fp", {}, threshold=0.5)
        assert [(r["path"], r["threshold"]) for r in store.results()] == [
            ("/cam/old.png", None), ("/cam/new.png", 0.5)
        ]  # fmt: skip
    finally:
        store.close()
    # the added column left the schema version as it was: the earlier splitdet, which checks
    # the version and its tables and names its columns, still reads and writes the store
    assert SCHEMA_VERSION == 2
    with contextlib.closing(sqlite3.connect(db)) as con:
        con.execute(
            "INSERT INTO images (file_key, path, content_hash, size_bytes, arrived, updated,"
            " verdict, fingerprint) VALUES ('x.png|1|2|5', '/cam/x.png', 'a', 1, 0, 0, 'ok', 'fp')"
        )
        con.commit()


def test_edge_run_on_a_store_of_an_earlier_version(tiny_model_dir, tmp_path, capsys):
    db = _old_store(tmp_path / "edge.sqlite", 1)
    assert _edge("run", db, tmp_path, tiny_model_dir) == 0
    assert "error:" not in capsys.readouterr().err
    assert _header(db)[:2] == (APPLICATION_ID, SCHEMA_VERSION)
    readonly = open_readonly(db)
    try:
        assert store_status(readonly)["verdicts"]["ok"] == 2  # the old row and a.png
    finally:
        readonly.close()


def test_a_store_and_its_readers_created_at_once_never_misjudge_each_other(tmp_path):
    """The daemon creating a new store while `edge status` reads it: the reader sees the file
    missing, empty, or whole (one transaction makes it, and one snapshot reads it), never
    "not a splitdet edge store"."""
    for attempt in range(30):
        db = tmp_path / f"new{attempt}.sqlite"
        seen: list[str] = []
        stop = threading.Event()

        def read(db: Path = db, seen: list[str] = seen, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                try:
                    open_readonly(db).close()
                    return
                except StoreError as exc:
                    seen.append(str(exc))

        readers = [threading.Thread(target=read) for _ in range(2)]
        for reader in readers:
            reader.start()
        try:
            ResultStore(db).close()
        finally:
            for reader in readers:
                reader.join(10)
            stop.set()
        assert not any(reader.is_alive() for reader in readers)
        allowed = ("no such results database", "an empty database")
        for message in seen:
            assert any(fine in message for fine in allowed), message


# ------------------------------------------------------------------------------ the cloud


@pytest.mark.parametrize(
    ("user_version", "application_id", "said"),
    [
        (1, 0, "it holds tables customers; user_version 1"),
        (0, GPKG, "application_id 0x47504b47, another program's"),
        (0, 0, "it holds tables customers"),
        (2, APPLICATION_ID, "it is a splitdet edge store"),
    ],
    ids=["user_version-1", "foreign-application-id", "unmarked", "edge-store"],
)
def test_cloud_refuses_a_foreign_answers_db_and_leaves_it_as_it_was(
    user_version, application_id, said, tiny_model_dir, tmp_path, capsys
):
    db = _foreign(tmp_path / "crm.sqlite", user_version, application_id)
    before = _sha256(db)
    code = main(
        ["cloud", "--model", str(tiny_model_dir), "--listen", "127.0.0.1:0",
         "--answers-db", str(db)]
    )  # fmt: skip
    assert code == 2
    _error_line(capsys, "cloud", f"--answers-db {db}: not a splitdet cloud answers database (",
                said, "give another --answers-db")  # fmt: skip
    assert _sha256(db) == before
    assert _header(db) == (application_id, user_version, ["customers"])
    assert not Path(f"{db}-wal").exists()


def test_cloud_names_an_edge_store_given_as_answers_db(tiny_model_dir, tmp_path, capsys):
    edge = tmp_path / "edge.sqlite"
    ResultStore(edge).close()
    before = _sha256(edge)
    code = main(
        ["cloud", "--model", str(tiny_model_dir), "--listen", "127.0.0.1:0",
         "--answers-db", str(edge)]
    )  # fmt: skip
    assert code == 2
    _error_line(capsys, "cloud", "not a splitdet cloud answers database",
                "it is a splitdet edge store", "images")  # fmt: skip
    assert _sha256(edge) == before


def test_the_answers_store_refuses_before_any_write(tmp_path):
    db = _foreign(tmp_path / "crm.sqlite")
    before = _sha256(db)
    with pytest.raises(NotAnswersDatabase, match="not a splitdet cloud answers database"):
        IdempotencyStore(db)
    assert issubclass(NotAnswersDatabase, sqlite3.DatabaseError)  # what `splitdet cloud` names
    assert _sha256(db) == before
    assert _header(db) == (0, 1, ["customers"])  # no answers, no sqlite_sequence


def test_the_answers_store_marks_new_files_and_reads_an_earlier_versions(tmp_path):
    """A new file is marked at once; a file an earlier version wrote (application_id 0, its
    one answers table) keeps its answers and is marked when opened."""
    new = tmp_path / "new.sqlite"
    IdempotencyStore(new).close()
    assert _header(new) == (ANSWERS_ID, 0, ["answers", "sqlite_sequence"])
    old = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(old)) as con:  # as an earlier version left it
        con.execute("PRAGMA journal_mode=WAL")
        con.execute(
            "CREATE TABLE answers (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT"
            " NULL UNIQUE, fingerprint TEXT NOT NULL, digest TEXT NOT NULL, payload BLOB NOT"
            " NULL, created REAL NOT NULL)"
        )
        con.execute(
            "INSERT INTO answers (request_id, fingerprint, digest, payload, created)"
            " VALUES ('r1', 'fp', 'd1', x'0102', 1.0)"
        )
        con.commit()
    assert _header(old)[0] == 0
    store = IdempotencyStore(old)
    try:
        assert store.get("r1") == StoredAnswer("fp", "d1", b"\x01\x02")
        store.put("r2", StoredAnswer("fp", "d2", b"\x03"))
        assert len(store) == 2
    finally:
        store.close()
    assert _header(old)[0] == ANSWERS_ID
    IdempotencyStore(old).close()  # and opens again, marked


def test_the_two_marks_are_distinct_and_agree():
    """The edge names the answers database by the cloud's id (a copy: the edge does not import
    the cloud); both fit SQLite's signed 32-bit application_id."""
    assert ANSWERS_APPLICATION_ID == ANSWERS_ID != APPLICATION_ID
    assert 0 < APPLICATION_ID < 2**31 and 0 < ANSWERS_ID < 2**31
    assert APPLICATION_ID.to_bytes(4, "big") == b"SPDE"
    assert ANSWERS_ID.to_bytes(4, "big") == b"SPCA"
