"""A damaged --answers-db never fails a Detect call (a backup/recovery review: a page
overwritten made every call INTERNAL "database disk image is malformed", and a damaged row
INTERNAL "UnicodeDecodeError": the edges kept their defects as dead letters), and a file SQLite
finds damaged is refused at start, saying what to do."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
from pathlib import Path

import grpc
import pytest
from cloud_fixtures import detect_bytes, detect_code, loopback_detect, make_sample, shared_model_dir

from splitdet.cloud.idempotency import DamagedAnswersDatabase, IdempotencyStore, StoredAnswer
from splitdet.shared.wire import detection_pb2 as pb

STORE_ERRORS = "splitdet_cloud_answers_store_errors_total"


def _one_digit_changed(payload: bytes) -> bytes:
    """`payload` (the stored answer: JSON of boxes) with its first digit changed by one bit
    ("1" to "0", "4" to "5"): still JSON, another box."""
    at = next(i for i, byte in enumerate(payload) if chr(byte).isdigit())
    changed = payload[:at] + bytes([payload[at] ^ 1]) + payload[at + 1 :]
    assert json.loads(changed) != json.loads(payload)
    return changed


@pytest.mark.parametrize(
    "damage",
    [lambda _: b"\xf2 not json", lambda _: "a text payload", lambda _: 2**62, _one_digit_changed],
    ids=["bytes", "text", "integer", "digit"],
)
def test_a_damaged_stored_answer_is_computed_afresh(tmp_path, caplog, damage):
    """(An integer payload was made bytes(N): 2**62 a MemoryError, answered RESOURCE_EXHAUSTED
    and retried by the edge for ever; 2**31, 2 GB allocated for one lookup. SQLite checks no
    page's contents: one bit flipped on the disk in a stored answer that still parses, a box's
    digit, was given as the answer, `cached`; each answer now carries a checksum.) Each call
    counts its failed read once."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=1, codec="int8")
    raw = detect_bytes(sample, manifest.fingerprint, "req-1")
    with loopback_detect(tmp_path) as (server, send), caplog.at_level(logging.WARNING):
        first = pb.DetectResponse.FromString(send(raw, timeout=60))
        with sqlite3.connect(tmp_path / "answers.sqlite") as db:
            [payload] = db.execute("SELECT payload FROM answers").fetchone()
            assert db.execute("UPDATE answers SET payload = ?", (damage(payload),)).rowcount == 1
        code, details = detect_code(send, raw)
        assert code == grpc.StatusCode.OK, details
        assert server.metrics.registry.get_sample_value(STORE_ERRORS) == 1
        again = pb.DetectResponse.FromString(send(raw, timeout=60))
    assert list(again.boxes) == list(first.boxes) and len(first.boxes) > 0
    assert not again.cached  # computed afresh (the damaged row is not replaced)
    failed = [r for r in caplog.records if getattr(r, "fields", {}).get("event")
              == "answers_store_failed"]  # fmt: skip
    assert failed and failed[0].fields["doing"] == "read", [r.getMessage() for r in failed]


def _killed_with_a_page_overwritten(tmp_path) -> Path:
    """An answers file of 200 answers as a killed server leaves it (its -wal beside it, one
    answer in it), a page in the middle of the file overwritten."""
    live = tmp_path / "live.sqlite"
    store = IdempotencyStore(live)
    for n in range(200):  # many pages
        store.put(f"r{n}", StoredAnswer("f" * 64, f"{n:064x}", b"[]" * 2000))
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.put("last", StoredAnswer("f" * 64, "0" * 64, b"[]"))  # (into the -wal)
    path = tmp_path / "answers.sqlite"
    shutil.copyfile(live, path)
    shutil.copyfile(f"{live}-wal", f"{path}-wal")
    store.close()
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    with open(path, "r+b") as fh:  # a page in the middle overwritten
        fh.seek(page * (pages // 2))
        fh.write(bytes(range(256)) * (page // 256))
    return path


def test_a_damaged_answers_file_is_refused_at_start_saying_what_to_do(tmp_path):
    """Checked when a -wal lies beside it (a crash, a kill, a restore beside a stale one);
    a file closed cleanly is not read whole at every start."""
    path = _killed_with_a_page_overwritten(tmp_path)
    with pytest.raises(DamagedAnswersDatabase, match="move it aside with its -wal and -shm") as e:
        IdempotencyStore(path)
    assert "\n" not in str(e.value) and "***" not in str(e.value)  # one line


def test_an_answers_file_from_before_checksums_is_read_and_checksummed_from_then_on(tmp_path):
    """A file an earlier splitdet wrote has no checksum column: it is added at open; the
    answers already there are read unchecked, the new ones checked; an earlier splitdet
    sharing the file (its inserts name their columns) writes rows read unchecked."""
    path = tmp_path / "answers.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute(
            "CREATE TABLE answers (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT "
            "NULL UNIQUE, fingerprint TEXT NOT NULL, digest TEXT NOT NULL, payload BLOB NOT "
            "NULL, created REAL NOT NULL)"
        )
        db.execute("INSERT INTO answers (request_id, fingerprint, digest, payload, created) "
                   "VALUES ('old', 'f', 'd', x'00', 0)")  # fmt: skip
        db.commit()
    store = IdempotencyStore(path)
    assert store.get("old") == StoredAnswer("f", "d", b"\0")
    store.put("new", StoredAnswer("f", "d2", b"\1\2"))
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        rows = dict(db.execute("SELECT request_id, checksum FROM answers"))
        assert rows["old"] is None and len(rows["new"]) == 64
        db.execute("UPDATE answers SET fingerprint = 'g' WHERE request_id = 'new'")
        db.execute("INSERT INTO answers (request_id, fingerprint, digest, payload, created) "
                   "VALUES ('older', 'f', 'd3', x'03', 0)")  # fmt: skip
    store = IdempotencyStore(path)
    assert store.get("older") == StoredAnswer("f", "d3", b"\3")
    with pytest.raises(ValueError, match=r"'new' is damaged \(its checksum does not match"):
        store.get("new")  # (the fingerprint is covered too, not the payload alone)
    store.close()
