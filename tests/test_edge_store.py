"""The edge's results store and outbox (SQLite) in-process: schema, atomicity, the cap policies,
dead letters, reopening, the `splitdet edge results` reader, and the sender's backoff. Fast: no
model, no network, no subprocess but one torch-free import check.
"""

from __future__ import annotations

import csv
import io
import json
import random
import sqlite3
import threading
import time

import pytest

from splitdet.edge.sender import Backoff
from splitdet.edge.store import Answer, Arrival, OutboxCap, OutboxFull, ResultStore
from splitdet.edge.store_file import StoreError
from splitdet.edge.store_schema import SCHEMA_VERSION
from splitdet.shared.cli import main

from support import run_without_torch

FINGERPRINT = "f" * 64


def arrival(n: int, name: str | None = None) -> Arrival:
    name = name or f"img{n}.png"
    return Arrival(f"/hot/{name}", f"{name}|100|{n}|{n}", f"{n:064x}", 100, time.time())


def answer(k: int = 2) -> Answer:
    return Answer(
        boxes=[[1.0, 2.0, 3.0 + i, 4.0 + i] for i in range(k)],
        scores=[0.9 - 0.1 * i for i in range(k)],
        labels=[1] * k,
        class_names=["scratch"] * k,
        timings={"round_trip": 0.01},
    )


@pytest.fixture
def store(tmp_path):
    s = ResultStore(tmp_path / "edge.sqlite", OutboxCap(max_items=3, max_bytes=1000))
    yield s
    s.close()


def test_schema_version_wal_and_full_sync(store, tmp_path):
    assert store.schema_version() == SCHEMA_VERSION
    assert store.pragma("journal_mode") == "wal"
    assert store.pragma("synchronous") == 2  # FULL


def test_the_wal_file_shrinks_back_after_a_large_request(tmp_path):
    """SQLite's WAL keeps the size of its largest transaction unless told otherwise: a paper-size
    request (tens of MB) left as much beside the database for good, and 4 MB of writes between
    checkpoints filled a nearly full disk (a soak test's daemon died there, 40% of its disk
    free). Now the WAL is cut back to WAL_KEEP_BYTES after each checkpoint."""
    path = tmp_path / "edge.sqlite"
    s = ResultStore(path, OutboxCap(max_items=100, max_bytes=10**9))
    try:
        wal = path.with_name(path.name + "-wal")
        for n in range(3):
            image_id, _, _ = s.record_pending(
                arrival(n), 0.9, f"req-{n}", random.randbytes(12 << 20), FINGERPRINT, {}
            )
            assert s.complete(image_id, answer(1))
        peak = 0
        for n in range(3, 60):  # small requests, as a line's, answered as they come
            image_id, _, _ = s.record_pending(
                arrival(n), 0.9, f"req-{n}", random.randbytes(90_000), FINGERPRINT, {}
            )
            assert s.complete(image_id, answer(1))
            peak = max(peak, wal.stat().st_size)
        assert peak < 2 << 20, peak  # not 12 MB kept, nor 4 MB grown between checkpoints
    finally:
        s.close()


def test_refuses_newer_schema_and_foreign_sqlite(tmp_path):
    path = tmp_path / "newer.sqlite"
    ResultStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        ResultStore(path)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a splitdet edge store"):
        ResultStore(other)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError):
        ResultStore(tmp_path / "junk.sqlite")


def test_pending_and_outbox_commit_together_and_answer_deletes(store):
    image_id, stored, verdict = store.record_pending(
        arrival(1), 0.9, "req-1", b"x" * 100, FINGERPRINT, {"gate": 0.01}, "/archive/1.png"
    )
    assert (verdict, stored) == ("pending", "/archive/1.png")
    assert store.outbox_stats().depth == 1
    [row] = store.results()
    assert row["verdict"] == "pending" and row["request_id"] == "req-1"
    assert row["finished"] is None and row["bytes_sent"] == 100

    item = store.next_due()
    assert (item.image_id, item.request_id, item.payload) == (image_id, "req-1", b"x" * 100)
    assert store.complete(image_id, answer(2))
    [row] = store.results()
    assert row["verdict"] == "defect" and row["finished"] is not None
    assert row["boxes"] == [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 5.0]]
    assert row["class_names"] == ["scratch", "scratch"]
    assert row["timings"] == {"gate": 0.01, "round_trip": 0.01}
    assert store.outbox_stats().depth == 0 and store.next_due() is None
    # A second answer for the same item (a late duplicate) changes nothing.
    assert not store.complete(image_id, answer(5))
    assert len(store.results()[0]["boxes"]) == 2


def test_a_failure_inside_the_transaction_leaves_nothing(store, monkeypatch):
    # The outbox insert fails after the result insert: neither may remain.
    with pytest.raises(sqlite3.IntegrityError):
        store.record_pending(arrival(1), 0.9, None, b"x", FINGERPRINT, {})  # request_id NOT NULL
    assert store.results() == [] and store.outbox_stats().depth == 0


def test_stored_path_from_the_new_row_id(store):
    image_id, stored = store.record_ok(
        arrival(7), 0.1, FINGERPRINT, {}, lambda i: f"/archive/{i:08d}_img7.png"
    )
    assert stored == f"/archive/{image_id:08d}_img7.png"
    known = store.known(arrival(7).file_key)
    assert known.stored_path == stored and known.verdict == "ok"
    assert store.known("nope|1|2|3") is None


def test_same_arrival_cannot_be_recorded_twice(store):
    store.record_ok(arrival(1), 0.1, FINGERPRINT, {})
    with pytest.raises(sqlite3.IntegrityError):
        store.record_ok(arrival(1), 0.1, FINGERPRINT, {})
    # Same name and bytes, another arrival (new mtime/inode): a second, separate result.
    again = Arrival("/hot/img1.png", "img1.png|100|99|99", arrival(1).content_hash, 100, 0.0)
    store.record_ok(again, 0.1, FINGERPRINT, {})
    assert [r["content_hash"] for r in store.results()] == [arrival(1).content_hash] * 2


def test_dead_letter_is_final_with_reason_and_counted(store):
    image_id, _, _ = store.record_pending(arrival(1), 0.9, "req-1", b"x", FINGERPRINT, {})
    assert store.dead_letter(image_id, "dead letter: INVALID_ARGUMENT: bad tensor")
    [row] = store.results()
    assert row["verdict"] == "error" and row["error_kind"] == "dead_letter"
    assert "INVALID_ARGUMENT" in row["reason"] and row["finished"] is not None
    assert store.outbox_stats().depth == 0
    assert store.counters() == {"dead_letters": 1}
    assert not store.dead_letter(image_id, "again")  # not pending any more
    assert not store.complete(image_id, answer())


def test_retry_later_reschedules_and_counts_attempts(store):
    a, _, _ = store.record_pending(arrival(1), 0.9, "req-1", b"x", FINGERPRINT, {})
    b, _, _ = store.record_pending(arrival(2), 0.9, "req-2", b"y", FINGERPRINT, {})
    now = time.time()
    store.retry_later(a, now + 60, "UNAVAILABLE: down")
    assert store.next_due(now).image_id == b  # the failed one goes behind
    store.retry_later(b, now + 30, "UNAVAILABLE: down")
    assert store.next_due(now) is None
    assert store.next_try_at() == pytest.approx(now + 30)
    assert store.next_due(now + 61).image_id == b
    assert {r["id"]: r["attempts"] for r in store.results()} == {a: 1, b: 1}


def test_outbox_full_wait_policy_writes_nothing(store):
    for n in range(3):
        store.record_pending(arrival(n), 0.9, f"req-{n}", b"x" * 10, FINGERPRINT, {})
    assert not store.outbox_has_room()
    with pytest.raises(OutboxFull):
        store.record_pending(arrival(3), 0.9, "req-3", b"x" * 10, FINGERPRINT, {})
    assert len(store.results()) == 3
    # Bytes count too.
    item = store.next_due()
    store.complete(item.image_id, answer())
    with pytest.raises(OutboxFull):
        store.record_pending(arrival(4), 0.9, "req-4", b"x" * 990, FINGERPRINT, {})


def test_outbox_full_reject_policy_records_a_counted_error(tmp_path):
    store = ResultStore(tmp_path / "e.sqlite", OutboxCap(max_items=1, policy="reject"))
    store.record_pending(arrival(1), 0.9, "req-1", b"x", FINGERPRINT, {})
    _, _, verdict = store.record_pending(arrival(2), 0.95, "req-2", b"x", FINGERPRINT, {})
    assert verdict == "error"
    rows = store.results()
    assert [r["verdict"] for r in rows] == ["pending", "error"]
    assert rows[1]["error_kind"] == "outbox_full" and "outbox full" in rows[1]["reason"]
    assert rows[1]["p_defect"] == pytest.approx(0.95)
    assert store.outbox_stats().depth == 1
    assert store.counters() == {"outbox_full_rejected": 1}
    store.close()


def test_pending_work_survives_reopening(tmp_path):
    path = tmp_path / "edge.sqlite"
    store = ResultStore(path)
    image_id, _, _ = store.record_pending(arrival(1), 0.9, "req-1", b"payload", FINGERPRINT, {})
    store.close()
    reopened = ResultStore(path)
    item = reopened.next_due()
    assert (item.image_id, item.payload) == (image_id, b"payload")
    assert reopened.verdict_counts()["pending"] == 1
    reopened.close()


def test_concurrent_writers_share_one_store(store, tmp_path):
    """The daemon loop and the sender thread write at once: every row lands."""
    big = ResultStore(tmp_path / "big.sqlite", OutboxCap(max_items=1000))
    errors = []

    def write(offset):
        try:
            for n in range(offset, offset + 50):
                image_id, _, _ = big.record_pending(arrival(n), 0.9, f"r{n}", b"x", FINGERPRINT, {})
                big.complete(image_id, answer(1))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k * 100,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert big.verdict_counts()["defect"] == 150 and big.outbox_stats().depth == 0
    big.close()


def test_results_are_read_in_batches_not_all_at_once(tmp_path, monkeypatch):
    """A soak review found `edge results` loading every row before printing any: 1.7 GB for a
    store of 150k rows. Rows are now read RESULTS_BATCH at a time (here 3): all of them, in id
    order, filters kept, and a row written while the first batch is out is read too (all at
    once, the read ended before it was written)."""
    import sqlite3

    from splitdet.edge import store_reads

    monkeypatch.setattr(store_reads, "RESULTS_BATCH", 3)
    path = tmp_path / "edge.sqlite"
    store = ResultStore(path)
    for n in range(1, 8):
        store.record_ok(arrival(n), 0.1, FINGERPRINT, {})
    store.record_error(arrival(8), "quarantine", "/hot/img8.png: empty file", FINGERPRINT)
    db = sqlite3.connect(path)
    try:
        rows = store_reads.iter_results(db)
        first = next(rows)
        store.record_ok(arrival(9), 0.1, FINGERPRINT, {})
        ids = [first["id"], *(row["id"] for row in rows)]
        ok = [row["id"] for row in store_reads.iter_results(db, verdict="ok")]
    finally:
        db.close()
        store.close()
    assert ids == list(range(1, 10))
    assert ok == [1, 2, 3, 4, 5, 6, 7, 9]


def test_results_command_json_csv_since_and_verdict(tmp_path, capsys):
    path = tmp_path / "edge.sqlite"
    store = ResultStore(path)
    store.record_ok(arrival(1), 0.1, FINGERPRINT, {"gate": 0.02})
    image_id, _, _ = store.record_pending(arrival(2), 0.9, "req-2", b"x", FINGERPRINT, {})
    store.complete(image_id, answer(1))
    store.record_error(arrival(3), "quarantine", "/hot/img3.png: empty file", FINGERPRINT)
    store.close()

    assert main(["edge", "results", "--db", str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["verdict"] for r in rows] == ["ok", "defect", "error"]
    assert rows[1]["boxes"] == [[1.0, 2.0, 3.0, 4.0]] and rows[2]["reason"].endswith("empty file")

    assert main(["edge", "results", "--db", str(path), "--csv", "--verdict", "defect"]) == 0
    [row] = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert row["verdict"] == "defect" and json.loads(row["scores"]) == [0.9]

    assert main(["edge", "results", "--db", str(path), "--json", "--since", "1h"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3

    # the boxes `predict --score-threshold` would report: the others and their entries dropped
    store = ResultStore(path)
    image_id, _, _ = store.record_pending(arrival(4), 0.9, "req-4", b"x", FINGERPRINT, {})
    store.complete(image_id, answer(3))  # scores 0.9, 0.8, 0.7
    store.close()
    assert main(["edge", "results", "--db", str(path), "--json", "--score-threshold", "0.75"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[-1]["scores"] == [0.9, 0.8] and rows[-1]["class_names"] == ["scratch"] * 2
    assert rows[-1]["boxes"] == [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 4.0, 5.0]]
    assert rows[-1]["labels"] == [1, 1] and rows[0]["boxes"] is None  # the ok row as it was
    with pytest.raises(SystemExit) as refused:
        main(["edge", "results", "--db", str(path), "--score-threshold", "2"])
    assert refused.value.code == 2 and "--score-threshold: must be 0-1" in capsys.readouterr().err
    future = str(time.time() + 3600)
    assert main(["edge", "results", "--db", str(path), "--json", "--since", future]) == 0
    assert json.loads(capsys.readouterr().out) == []

    assert main(["edge", "results", "--db", str(path)]) == 0
    table = capsys.readouterr().out
    assert "quarantine: /hot/img3.png: empty file" in table

    # a file --after archive moves: the table says where to (it named only the hot folder)
    store = ResultStore(path)
    moved, _ = store.record_ok(arrival(5), 0.1, FINGERPRINT, {}, lambda i: f"/archive/{i}.png")
    store.close()
    assert main(["edge", "results", "--db", str(path)]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.split()[0] == str(moved)]
    assert line.endswith(f"{arrival(5).path}  (to /archive/{moved}.png)"), line

    assert main(["edge", "results", "--db", str(tmp_path / "missing.sqlite")]) == 2
    assert "no such results database" in capsys.readouterr().err
    assert main(["edge", "results", "--db", str(path), "--since", "yesterday-ish"]) == 2


@pytest.mark.parametrize("name", ["run#1.sqlite", "50%?.sqlite"])
def test_results_reads_a_store_whose_name_looks_like_uri_syntax(tmp_path, capsys, name):
    store = ResultStore(tmp_path / name)
    store.record_ok(arrival(1), 0.1, FINGERPRINT, {"gate": 0.02})
    store.close()
    assert main(["edge", "results", "--db", str(tmp_path / name), "--json"]) == 0
    assert [r["verdict"] for r in json.loads(capsys.readouterr().out)] == ["ok"]
    # no stray database made from part of the name (only the store's own -wal/-shm beside it)
    assert all(p.name.startswith(name) for p in tmp_path.iterdir())


def test_backoff_is_capped_exponential_with_jitter():
    backoff = Backoff(initial_s=0.5, max_s=8.0)
    rng = random.Random(0)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (40, 8.0)]:
        delays = [backoff.delay(failures, rng) for _ in range(200)]
        assert ceiling / 2 <= min(delays) and max(delays) <= ceiling
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not constant
    with pytest.raises(ValueError):
        Backoff(initial_s=2.0, max_s=1.0)


def test_edge_daemon_modules_import_without_torch():
    result = run_without_torch(
        """
        import splitdet.edge.cli_edge, splitdet.edge.daemon, splitdet.edge.sender
        import splitdet.edge.store, splitdet.edge.watcher, sys
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        from splitdet.shared.cli import build_parser
        build_parser().parse_args(["edge", "run", "--model", "m", "--watch", "w",
                                   "--cloud", "127.0.0.1:1", "--db", "d"])
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_status_summarises_verdicts_outbox_and_dead_letters(tmp_path, capsys):
    from splitdet.edge.store_file import open_readonly
    from splitdet.edge.store_reads import store_status

    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    store.record_ok(arrival(1), 0.1, FINGERPRINT, {})
    pending, _, _ = store.record_pending(arrival(2), 0.9, "r2", b"p" * 300, FINGERPRINT, {})
    store.retry_later(pending, time.time() + 60, "UNAVAILABLE: connection refused")
    older = "0" * 64
    store.record_pending(arrival(3), 0.9, "r3", b"q" * 200, older, {})
    refused, _, _ = store.record_pending(arrival(4), 0.9, "r4", b"d" * 50, FINGERPRINT, {})
    store.dead_letter(refused, "dead letter: INTERNAL: bug")
    store.close()

    conn = open_readonly(db)
    try:
        summary = store_status(conn)
    finally:
        conn.close()
    assert summary["verdicts"] == {"ok": 1, "defect": 0, "pending": 2, "error": 1}
    assert summary["errors"] == {"dead_letter": 1}
    outbox = summary["outbox"]
    assert (outbox["requests"], outbox["bytes"]) == (2, 500)
    assert outbox["by_model"] == {FINGERPRINT: 1, older: 1}
    assert outbox["last_error"] == "UNAVAILABLE: connection refused"
    assert 0 <= outbox["next_try_in_s"] < 1  # the request of `older` is due now
    assert summary["dead_letters"] == {"kept": 1, "kept_bytes": 50, "not_kept": 0}
    assert summary["counters"] == {"dead_letters": 1}

    assert main(["edge", "status", "--db", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outbox"]["bytes"] == 500
    assert main(["edge", "status", "--db", str(db)]) == 0
    text = capsys.readouterr().out
    assert "pending 2" in text and "1 made by model 000000000000" in text
    assert "1 kept for `splitdet edge requeue`" in text
    assert main(["edge", "status", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "no such results database" in capsys.readouterr().err


def test_status_is_one_snapshot_while_the_daemon_writes(tmp_path):
    """A dead letter committed by the daemon between two of status's queries: both queries
    still see the database as it was when the first ran (one read transaction), so the counts
    agree (before, 'not_kept' came out as -1)."""
    from splitdet.edge.store_file import open_readonly
    from splitdet.edge.store_reads import store_status

    db = tmp_path / "edge.sqlite"
    daemon = ResultStore(db)

    def refused(n: int) -> None:
        image_id, _, _ = daemon.record_pending(arrival(n), 0.9, f"r{n}", b"x" * 10, FINGERPRINT, {})
        daemon.dead_letter(image_id, "dead letter: INTERNAL: bug")

    refused(1)

    class WriteMidway:
        """The reader's connection; the daemon's next dead letter lands after the first query."""

        def __init__(self, conn):
            self.conn, self.queries = conn, 0

        def execute(self, sql, *params):
            cursor = self.conn.execute(sql, *params)
            if sql.lstrip().upper().startswith("SELECT"):
                self.queries += 1
                if self.queries == 2:  # mid-status: after the verdict counts
                    rows = cursor.fetchall()
                    refused(2)
                    return iter(rows)
            return cursor

    conn = open_readonly(db)
    try:
        summary = store_status(WriteMidway(conn))
        later = store_status(conn)
    finally:
        conn.close()
        daemon.close()
    assert summary["errors"] == {"dead_letter": 1}
    assert summary["dead_letters"] == {"kept": 1, "kept_bytes": 10, "not_kept": 0}
    assert later["dead_letters"]["kept"] == 2  # the write did land
