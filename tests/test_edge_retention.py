"""Retention of the edge's results: `ResultStore.prune`, `splitdet edge prune` and the daemon's
--keep-results. Old final rows go; pending rows, dead letters (unless asked:
test_prune_dead_letters_review5.py), and rows whose file still lies in the hot folder (--after
keep), stay. Real SQLite files, a real daemon for the last test."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from pathlib import Path

import pytest

from splitdet.edge.file_identity import file_key
from splitdet.edge.store import Arrival, ResultStore
from splitdet.shared.cli import main

from support import age_rows, image_ids

FINGERPRINT = "f" * 64
DAY = 86400.0


def _arrival(n: int, path: str) -> Arrival:
    """Arrival n of `path`; its file_key that of the file there, when there is one (a row is
    kept for the very file it recorded)."""
    key = file_key(Path(path), os.stat(path)) if os.path.exists(path) else f"img{n}|100|{n}|{n}"
    return Arrival(path, key, f"{n:064x}", 100, time.time())


@pytest.fixture
def history(tmp_path):
    """(db, {kind: image id}): a store holding one row of each kind, the old ones 40 days old."""
    db, hot = tmp_path / "edge.sqlite", tmp_path / "hot"
    hot.mkdir()
    kept_file = hot / "kept.png"
    kept_file.write_bytes(b"still here")
    store = ResultStore(db)
    rows = {}
    rows["old_ok"], _ = store.record_ok(_arrival(1, "/hot/1.png"), 0.1, FINGERPRINT, {})
    rows["old_kept_in_place"], _ = store.record_ok(
        _arrival(2, str(kept_file)), 0.1, FINGERPRINT, {}, stored_path=str(kept_file)
    )
    rows["old_moved_away"], _ = store.record_ok(
        _arrival(3, "/hot/3.png"), 0.1, FINGERPRINT, {}, stored_path=str(tmp_path / "gone.png")
    )
    unmoved = hot / "unmoved.png"  # --after archive, but its move failed (or a crash cut it)
    unmoved.write_bytes(b"still where it arrived")
    rows["old_move_failed"], _ = store.record_ok(
        _arrival(7, str(unmoved)), 0.1, FINGERPRINT, {}, stored_path=str(tmp_path / "archive.png")
    )
    rows["old_dead"], _, _ = store.record_pending(
        _arrival(4, "/hot/4.png"), 0.9, "r4", b"x" * 10, FINGERPRINT, {}
    )
    store.dead_letter(rows["old_dead"], "dead letter: INTERNAL: bug")
    rows["pending"], _, _ = store.record_pending(
        _arrival(5, "/hot/5.png"), 0.9, "r5", b"y" * 10, FINGERPRINT, {}
    )
    rows["recent_ok"], _ = store.record_ok(_arrival(6, "/hot/6.png"), 0.1, FINGERPRINT, {})
    store.close()
    age_rows(db, [v for k, v in rows.items() if k.startswith("old")], days=40)
    return db, rows


def test_prune_deletes_old_final_rows_only(history):
    db, rows = history
    store = ResultStore(db)
    try:
        assert store.prune(time.time() - 30 * DAY, dry_run=True).deleted == 2
        assert image_ids(db) == set(rows.values())  # a dry run deletes nothing
        pruned = store.prune(time.time() - 30 * DAY, batch=2)  # batches of 2: several commits
        # through the last old result (dead letters have a pass of their own, first)
        assert pruned.deleted == 2 and pruned.through_id == rows["old_move_failed"]
        assert pruned.kept_dead_letters == 1  # (a dead letter: `edge requeue` decides it)
        assert image_ids(db) == {rows["old_kept_in_place"], rows["old_move_failed"],
                                 rows["old_dead"], rows["pending"], rows["recent_ok"]}  # fmt: skip
        assert store.dead_letter_stats().depth == 1  # its kept request stays with it
        assert store.outbox_stats().depth == 1  # the pending request is untouched
        assert store.counters()["pruned"] == 2
        assert store.prune(time.time() - 30 * DAY).deleted == 0
    finally:
        store.close()


def test_prune_resumes_after_the_rows_it_looked_at_and_stops_between_batches(history):
    db, rows = history
    store = ResultStore(db)
    try:
        before = time.time() - 30 * DAY
        first = store.prune(before, batch=1, should_stop=lambda: True)  # one batch, then stop
        assert (first.deleted, first.through_id) == (1, rows["old_ok"])
        rest = store.prune(before, start_after=first.through_id)
        assert rest.deleted == 1 and rows["old_ok"] not in image_ids(db)
        assert store.prune(before, start_after=rest.through_id).deleted == 0
    finally:
        store.close()


def test_the_prune_command(history, capsys):
    db, _ = history
    assert main(["edge", "prune", "--db", str(db), "--older-than", "30d", "--dry-run"]) == 0
    assert "would delete 2 result(s)" in capsys.readouterr().out
    assert main(["edge", "prune", "--db", str(db), "--older-than", "50d"]) == 0
    assert "deleted 0 result(s)" in capsys.readouterr().out
    assert main(["edge", "prune", "--db", str(db), "--older-than", "30d"]) == 0
    assert "deleted 2 result(s)" in capsys.readouterr().out
    assert len(image_ids(db)) == 5  # the dead letter kept


@pytest.mark.parametrize("age", ["30", "-1d", "nand", "1w", "infd", "1e308d"])
def test_an_age_that_is_not_one_is_refused(tmp_path, capsys, age):
    db = tmp_path / "edge.sqlite"
    ResultStore(db).close()
    with pytest.raises(SystemExit) as exits:
        main(["edge", "prune", "--db", str(db), "--older-than", age])
    assert exits.value.code == 2
    assert "--older-than" in capsys.readouterr().err


def test_prune_never_creates_a_database(tmp_path, capsys):
    missing = tmp_path / "typo.sqlite"
    assert main(["edge", "prune", "--db", str(missing), "--older-than", "1d"]) == 2
    assert "no such results database" in capsys.readouterr().err
    assert not missing.exists()


def test_the_daemon_prunes_with_keep_results(history, tiny_model_dir, tmp_path, caplog):
    from splitdet.edge.daemon import EdgeDaemon
    from splitdet.edge.daemon_config import DaemonConfig

    db, rows = history
    watch = tmp_path / "empty"
    watch.mkdir()
    caplog.set_level(logging.INFO, logger="splitdet.edge")
    config = DaemonConfig(model_dir=tiny_model_dir, watch=watch, cloud="127.0.0.1:9", db=db,
                          once=True, drain_timeout_s=0.0, keep_results_s=30 * DAY)  # fmt: skip
    EdgeDaemon(config).run()  # (the pending row's fake request becomes a fresh dead letter)
    assert image_ids(db) == {rows["old_kept_in_place"], rows["old_move_failed"], rows["old_dead"],
                             rows["pending"], rows["recent_ok"]}  # fmt: skip
    assert any(r.msg == "pruned" and r.fields["results"] == 2 for r in caplog.records)


def _bulk_rows(db, n: int, first_kept: int, kept_dir: Path, days: float) -> None:
    """n final rows finished `days` ago, in one transaction; the first `first_kept` of them
    with their file still where it arrived, in `kept_dir` (kept by a prune)."""
    finished = time.time() - days * DAY
    keys = {}
    for i in range(first_kept):
        kept = kept_dir / f"{i}.png"
        kept.write_bytes(b"still here")
        keys[i] = (file_key(kept, kept.stat()), str(kept))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.executemany(
            "INSERT INTO images (file_key, path, stored_path, content_hash, size_bytes, arrived,"
            " finished, updated, verdict, p_defect, fingerprint) VALUES"
            " (?, ?, ?, ?, 1, ?, ?, ?, 'ok', 0.1, ?)",
            [(*keys.get(i, (f"bulk{i}|1|1|1", f"/gone/{i}.png")),
              None, f"{i:064x}", finished, finished, finished, FINGERPRINT)
             for i in range(n)],
        )  # fmt: skip
        conn.commit()


def test_a_batch_run_prunes_to_the_end(tiny_model_dir, tmp_path):
    """`edge run --once --keep-results`: the whole prune, not one batch of it, even past a
    batch of rows it must keep (before, each run stopped after the first 2000 rows)."""
    from splitdet.edge.daemon import EdgeDaemon
    from splitdet.edge.daemon_config import DaemonConfig

    db, watch = tmp_path / "edge.sqlite", tmp_path / "empty"
    watch.mkdir()
    kept = tmp_path / "kept"
    kept.mkdir()
    ResultStore(db).close()
    _bulk_rows(db, 4500, first_kept=2100, kept_dir=kept, days=40)
    config = DaemonConfig(model_dir=tiny_model_dir, watch=watch, cloud="127.0.0.1:9", db=db,
                          once=True, drain_timeout_s=0.0, keep_results_s=30 * DAY)  # fmt: skip
    assert EdgeDaemon(config).run() == 0
    assert len(image_ids(db)) == 2100


def test_the_resume_mark_never_passes_a_row_that_could_not_go_yet(tiny_model_dir, tmp_path):
    """A defect still pending (the cloud was down) below rows that were pruned: once it is
    final and old, the daemon's next prune takes it (before, the mark had passed it for good)."""
    from splitdet.edge.daemon import EdgeDaemon
    from splitdet.edge.daemon_config import DaemonConfig
    from splitdet.edge.store import Answer

    db, watch = tmp_path / "edge.sqlite", tmp_path / "empty"
    watch.mkdir()
    store = ResultStore(db)
    arrival = _arrival(1, "/hot/1.png")
    waiting, _, _ = store.record_pending(arrival, 0.9, "r1", b"x", FINGERPRINT, {})
    old, _ = store.record_ok(_arrival(2, "/hot/2.png"), 0.1, FINGERPRINT, {})
    store.close()
    age_rows(db, [old], days=40)
    daemon = EdgeDaemon(DaemonConfig(model_dir=tiny_model_dir, watch=watch, cloud="127.0.0.1:9",
                                      db=db, keep_results_s=30 * DAY))  # fmt: skip
    try:
        daemon._prune(time.time() - 30 * DAY)
        assert image_ids(db) == {waiting}
        daemon.store.complete(waiting, Answer([], [], [], [], {}))
        age_rows(db, [waiting], days=40)
        daemon._prune(time.time() - 30 * DAY)  # the same daemon, its mark in place
        assert image_ids(db) == set()
    finally:
        daemon.store.close()


def _pending(store: ResultStore, n: int, size: int) -> list[int]:
    """n pending rows, each with an outbox request of `size` random bytes."""
    ids = []
    for i in range(n):
        arrival = Arrival(f"/hot/{i}.png", f"{i}.png|1|{i}|{i}", f"{i:064x}", 1, time.time())
        image_id, _, _ = store.record_pending(
            arrival, 0.9, f"r{i}", os.urandom(size), FINGERPRINT, {}
        )
        ids.append(image_id)
    return ids


def _file_status(db: Path, capsys) -> dict:
    """`edge status --json`'s "file" entry, and its text line."""
    assert main(["edge", "status", "--db", str(db)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("file ")]
    assert main(["edge", "status", "--db", str(db), "--json"]) == 0
    return {**json.loads(capsys.readouterr().out)["file"], "line": line}


def test_a_drained_outbox_gives_its_pages_back_to_the_file_system(tmp_path, capsys):
    """The soak review: a 34 s outage left an edge's database at 2.8x its size for good (an
    outage of hours: up to --outbox-max-mb). A new store reclaims the freed pages; one made
    before splitdet set incremental auto-vacuum keeps its size (SQLite reuses the pages)."""
    from splitdet.edge.store import Answer

    store = ResultStore(tmp_path / "edge.sqlite")
    old = tmp_path / "old.sqlite"
    with contextlib.closing(sqlite3.connect(old)) as conn:  # as an earlier splitdet made it
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE x (y)")
        conn.execute("DROP TABLE x")  # (a header: auto_vacuum fixed at NONE, no tables)
    old_store = ResultStore(old)
    try:
        for s in (store, old_store):
            for image_id in _pending(s, 40, 250_000):
                s.complete(image_id, Answer([], [], [], [], {}))
        grown = store.path.stat().st_size + Path(f"{store.path}-wal").stat().st_size
        before = _file_status(store.path, capsys)  # what an operator sees of the size
        assert before["gives_back"] and before["free_bytes"] >= 9_000_000, before
        assert "MB of it free pages, reused for new results (given back" in before["line"]
        old_file = _file_status(old, capsys)
        assert not old_file["gives_back"] and "edge/README.md says how" in old_file["line"]
        assert store.reclaim(above_bytes=20 << 20) == 0  # ~10 MB free: under the bound
        steps = iter([False, True])  # a daemon stopping: one step given back, the rest kept
        first = store.reclaim(should_stop=lambda: next(steps))
        assert 0 < first < 9_000_000 and store.pragma("freelist_count") > 0
        freed = first + store.reclaim()
        assert freed >= 9_000_000
        assert store.pragma("freelist_count") == 0
        assert _file_status(store.path, capsys)["free_bytes"] == 0
        assert store.path.stat().st_size < grown - 9_000_000
        assert [r["verdict"] for r in store.results()] == ["defect"] * 40  # rows kept
        assert old_store.reclaim() == 0 and old_store.pragma("freelist_count") > 0
    finally:
        store.close()
        old_store.close()


def test_the_prune_command_says_what_it_gave_back(tmp_path, capsys):
    from splitdet.edge.store import Answer

    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    try:
        ids = _pending(store, 20, 250_000)
        for image_id in ids:
            store.complete(image_id, Answer([], [], [], [], {}))
    finally:
        store.close()
    age_rows(db, ids, 40)
    assert main(["edge", "prune", "--db", str(db), "--older-than", "30d"]) == 0
    out = capsys.readouterr().out
    assert "deleted 20 result(s);" in out and "MB given back to the file system" in out
