"""Damaged edge stores (backup/disaster-recovery review): real SQLite files damaged with real
bytes, as a restore or a disk leaves them.

- A backup restored by `cp backup edge.sqlite` beside the -wal a kill -9 left, and a page in
  the middle overwritten with random bytes, are refused by the writers at open (`PRAGMA
  quick_check`, before anything is written), with one line saying what to do: no image is
  processed into them.
- `edge status` and `edge results` on such a file end in the same line (exit 2), not a
  traceback from the first read that meets the damaged page.
- A -wal of another database beside a sound store makes it look like that other file: the
  refusal says so and what to do (not "give another --db" alone, which would process --watch
  again), and never checkpoints the other database's pages into the store.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_file import StoreError
from splitdet.shared.cli import main

from support import edge_error_line, edge_run_once_offline

pytestmark = pytest.mark.timeout(180)

FINGERPRINT = "f" * 64
#: What every refusal of a damaged store tells to do (edge/store_file.py damaged_store).
RESTORE = "restore it from a backup (stop the daemon, remove "


def _arrival(n: int) -> Arrival:
    return Arrival(f"/hot/img{n}.png", f"img{n}.png|100|{n}|{n}", f"{n:064x}", 100, time.time())


def _add(store: ResultStore, first: int, stop: int) -> None:
    """Final "ok" results for images first..stop-1, one commit each (as the daemon writes)."""
    for n in range(first, stop):
        store.record_ok(_arrival(n), 0.1, FINGERPRINT, {"gate": 0.01}, threshold=0.5)


def _store(path: Path, rows: int) -> Path:
    """A store of `rows` results, closed (its WAL checkpointed into the file and removed)."""
    store = ResultStore(path)
    _add(store, 0, rows)
    store.close()
    assert not Path(f"{path}-wal").exists()
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rows_of_the_file_alone(path: Path, tmp_path: Path) -> int:
    """The results the main file holds by itself (a copy read without any -wal beside it)."""
    alone = tmp_path / "alone" / path.name
    alone.parent.mkdir(exist_ok=True)
    shutil.copyfile(path, alone)
    with contextlib.closing(sqlite3.connect(alone)) as db:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        return db.execute("SELECT COUNT(*) FROM images").fetchone()[0]


_error_line = edge_error_line
_run_once = edge_run_once_offline


def _hot_folder(tmp_path: Path) -> Path:
    watch = tmp_path / "hot"
    watch.mkdir(exist_ok=True)
    Image.fromarray(np.full((64, 80, 3), 99, np.uint8)).save(watch / "new.png")
    return watch


# ------------------------------------------------------------- a backup beside a stale -wal


def _restored_beside_a_stale_wal(tmp_path: Path) -> tuple[Path, bytes]:
    """A store restored by `cp backup edge.sqlite` next to the -wal and -shm its daemon left
    when killed (-9) after the backup: the -wal's frames, read over the older file, make a
    corrupt database. Returns the path and the backup's bytes."""
    db = _store(tmp_path / "edge.sqlite", 100)
    backup = db.read_bytes()
    store = ResultStore(db)
    _add(store, 100, 1000)  # (checkpoints meanwhile: the file moves on past the backup)
    # what a kill -9 now leaves beside the file (synchronous=FULL: every commit is on disk)
    wal, shm = Path(f"{db}-wal").read_bytes(), Path(f"{db}-shm").read_bytes()
    store.close()
    db.write_bytes(backup)  # the restore, by copying
    Path(f"{db}-wal").write_bytes(wal)
    Path(f"{db}-shm").write_bytes(shm)
    return db, backup


def test_a_backup_restored_beside_a_stale_wal_is_refused_by_the_writers(tmp_path, capsys):
    db, backup = _restored_beside_a_stale_wal(tmp_path)
    with pytest.raises(StoreError, match=r"edge\.sqlite is damaged \(quick_check: ") as refused:
        ResultStore(db)
    message = str(refused.value)
    assert f"remove {db}-wal and {db}-shm, then put the backup in place" in message
    assert "or start on a new --db (every image still in --watch is then processed again)" in (
        message
    )
    assert "\n" not in message
    assert db.read_bytes() == backup  # refused before anything was written (or checkpointed)
    for command, extra in (("prune", ["--older-than", "1d"]), ("requeue", [])):
        assert main(["edge", command, "--db", str(db), *extra]) == 2
        _error_line(capsys, f"--db {db} is damaged (quick_check: ", RESTORE)
    assert db.read_bytes() == backup
    # the cure the message gives: without the stale -wal and -shm, the backup is sound
    Path(f"{db}-wal").unlink()
    Path(f"{db}-shm").unlink()
    ResultStore(db).close()


def test_edge_run_takes_no_image_into_a_backup_restored_beside_a_stale_wal(
    tiny_model_dir, tmp_path, capsys
):
    db, backup = _restored_beside_a_stale_wal(tmp_path)
    watch = _hot_folder(tmp_path)
    assert _run_once(db, watch, tiny_model_dir) == 2
    _error_line(capsys, f"--db {db} is damaged (quick_check: ", RESTORE)
    assert (watch / "new.png").is_file()
    assert db.read_bytes() == backup


# --------------------------------------------------------- a page overwritten with random bytes


def _middle_leaf(path: Path, table: str) -> tuple[int, int]:
    """(page number, page size) of a leaf in the middle of `table`'s b-tree, found by
    following the middle child pointer of each interior page from its root."""
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (table,))
        page = page.fetchone()[0]
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
    data = path.read_bytes()
    while True:
        start = (page - 1) * page_size
        header = start + (100 if page == 1 else 0)
        if data[header] == 0x0D:  # a table leaf
            return page, page_size
        assert data[header] == 0x05, data[header]  # a table interior page
        cells = int.from_bytes(data[header + 3 : header + 5], "big")
        pointer = header + 12 + 2 * (cells // 2)
        cell = start + int.from_bytes(data[pointer : pointer + 2], "big")
        page = int.from_bytes(data[cell : cell + 4], "big")


def _page_overwritten(tmp_path: Path) -> Path:
    """A store of 600 results with a leaf page of its results table, in the middle of the
    file, overwritten with random bytes (as a failing disk or a stray write leaves it), its
    writer killed (its -wal left beside it, holding a later result: what makes a writer check
    the whole file at open)."""
    live = tmp_path / "live" / "edge.sqlite"
    live.parent.mkdir()
    store = ResultStore(_store(live, 600))
    _add(store, 600, 601)  # (into the -wal: a leaf at the end, not the one overwritten)
    db = tmp_path / "edge.sqlite"
    shutil.copyfile(live, db)  # the files as a kill -9 leaves them
    shutil.copyfile(f"{live}-wal", f"{db}-wal")
    store.close()
    page, page_size = _middle_leaf(db, "images")
    assert 2 < page < db.stat().st_size // page_size - 2  # (neither end of the file)
    with open(db, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(random.Random(page).randbytes(page_size))
    return db


def test_a_page_of_random_bytes_is_refused_by_the_writers(tmp_path, capsys):
    db = _page_overwritten(tmp_path)
    before = _sha256(db)
    with pytest.raises(StoreError, match=r"edge\.sqlite is damaged \(quick_check: "):
        ResultStore(db)
    assert main(["edge", "prune", "--db", str(db), "--older-than", "1d"]) == 2
    _error_line(capsys, f"--db {db} is damaged (quick_check: ", RESTORE)
    assert _sha256(db) == before


def test_edge_run_takes_no_image_into_a_store_with_a_page_of_random_bytes(
    tiny_model_dir, tmp_path, capsys
):
    db = _page_overwritten(tmp_path)
    before = _sha256(db)
    watch = _hot_folder(tmp_path)
    assert _run_once(db, watch, tiny_model_dir) == 2
    _error_line(capsys, f"--db {db} is damaged (quick_check: ", RESTORE)
    assert (watch / "new.png").is_file()
    assert _sha256(db) == before


@pytest.mark.parametrize(
    "extra", [["status"], ["status", "--json"], ["results", "--csv"], ["results", "--json"]]
)
def test_reading_a_damaged_page_ends_in_one_line_with_what_to_do(extra, tmp_path, capsys):
    """Read-only commands do not quick_check at open: the damage shows at the first read of
    the page, and says what to do there."""
    db = _page_overwritten(tmp_path)
    before = _sha256(db)
    assert main(["edge", extra[0], "--db", str(db), *extra[1:]]) == 2
    line = _error_line(capsys, f"--db {db} is damaged (", RESTORE, "start on a new --db")
    assert "quick_check" not in line
    assert _sha256(db) == before


# ------------------------------------------------------------- another database's -wal beside


def _beside_another_databases_wal(tmp_path: Path) -> Path:
    """A sound store of 40 results with the -wal (uncheckpointed frames) of another WAL
    database beside it, as a restore by copying or a copied folder leaves one."""
    db = _store(tmp_path / "edge.sqlite", 40)
    other = tmp_path / "other.sqlite"
    with contextlib.closing(sqlite3.connect(other, isolation_level=None)) as con:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA wal_autocheckpoint=0")
        con.execute("CREATE TABLE t (x)")
        for _ in range(20):
            con.execute("INSERT INTO t VALUES (randomblob(3000))")
        shutil.copyfile(f"{other}-wal", f"{db}-wal")  # (while it is open: frames in it)
    return db


@pytest.mark.parametrize("command", ["status", "results", "prune", "requeue", "run", "store"])
def test_another_databases_wal_beside_a_store_is_named_and_never_checkpointed_into_it(
    command, request, tmp_path, capsys
):
    db = _beside_another_databases_wal(tmp_path)
    before = _sha256(db)
    wal = Path(f"{db}-wal").read_bytes()
    said = (
        f"{db}: not a splitdet edge store (it holds tables t); give another --db; {db}-wal "
        "lies beside it: a -wal left from another database (e.g. after a restore by copying) "
        "makes it look like another file: stop every program using it, move "
        f"{db}-wal and {db}-shm aside and try again"
    )
    if command == "store":  # in-process, as `edge prune` and `edge requeue` open it
        with pytest.raises(StoreError) as refused:
            ResultStore(db)
        line = f"--db {refused.value}"
    else:
        if command == "run":
            code = _run_once(db, _hot_folder(tmp_path), request.getfixturevalue("tiny_model_dir"))
        else:
            extra = ["--older-than", "1d"] if command == "prune" else []
            code = main(["edge", command, "--db", str(db), *extra])
        assert code == 2
        line = _error_line(capsys)
    # first: the other database's pages were not checkpointed into the store
    assert _sha256(db) == before
    assert Path(f"{db}-wal").read_bytes() == wal
    assert _rows_of_the_file_alone(db, tmp_path) == 40
    assert line.endswith(f"--db {said}")
    # the cure the message gives
    Path(f"{db}-wal").unlink()
    Path(f"{db}-shm").unlink(missing_ok=True)
    with contextlib.closing(ResultStore(db)) as store:
        assert sum(store.verdict_counts().values()) == 40


# ---------------------------------------------- damage a command meets as it reads or writes


def _index_root_overwritten(tmp_path: Path) -> Path:
    """A store closed cleanly (no -wal: no check of the whole file at open) whose index of
    file keys, which every arrival looks up, has its root page overwritten."""
    db = _store(tmp_path / "edge.sqlite", 600)
    with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
        page = con.execute(
            "SELECT rootpage FROM sqlite_master WHERE type = 'index' AND tbl_name = 'images'"
            " AND sql IS NULL"  # (the UNIQUE constraint's own index)
        ).fetchone()[0]
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
    with open(db, "r+b") as f:
        f.seek((page - 1) * page_size)
        f.write(random.Random(page).randbytes(page_size))
    return db


def test_edge_run_meeting_a_damaged_page_as_it_runs_says_what_to_do(
    tiny_model_dir, tmp_path, capsys
):
    """Before: `--db FILE: database disk image is malformed`, no word of what to do."""
    db = _index_root_overwritten(tmp_path)
    watch = _hot_folder(tmp_path)
    assert _run_once(db, watch, tiny_model_dir) == 2
    _error_line(capsys, f"--db {db} is damaged (", RESTORE)


@pytest.mark.parametrize("command", ["collect", "prune"])
def test_collect_and_prune_meeting_a_damaged_page_say_what_to_do(command, tmp_path, capsys):
    """Before: a traceback (`sqlite3.DatabaseError: database disk image is malformed`)."""
    db = _page_overwritten(tmp_path)
    Path(f"{db}-wal").unlink()  # (no -wal: read-only commands do not check at open)
    extra = (["--out", str(tmp_path / "review")] if command == "collect"
             else ["--older-than", "1m", "--dry-run"])  # fmt: skip
    assert main(["edge", command, "--db", str(db), *extra]) == 2
    _error_line(capsys, f"--db {db} is damaged (", RESTORE)
