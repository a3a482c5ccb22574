"""A damaged --answers-db never fails a Detect call (a backup/recovery review: a page
overwritten made every call INTERNAL "database disk image is malformed", and a damaged row
INTERNAL "UnicodeDecodeError": the edges kept their defects as dead letters), and a file SQLite
finds damaged is refused at start, saying what to do."""

from __future__ import annotations

import logging
import sqlite3

import grpc
import pytest
from cloud_fixtures import detect_bytes, detect_code, loopback_detect, make_sample, shared_model_dir

from splitdet.cloud.idempotency import DamagedAnswersDatabase, IdempotencyStore, StoredAnswer
from splitdet.shared.wire import detection_pb2 as pb


@pytest.mark.parametrize("payload", [b"\xf2 not json", "a text payload"], ids=["bytes", "text"])
def test_a_damaged_stored_answer_is_computed_afresh(tmp_path, caplog, payload):
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=1, codec="int8")
    raw = detect_bytes(sample, manifest.fingerprint, "req-1")
    with loopback_detect(tmp_path) as (_, send), caplog.at_level(logging.WARNING):
        first = pb.DetectResponse.FromString(send(raw, timeout=60))
        with sqlite3.connect(tmp_path / "answers.sqlite") as db:
            assert db.execute("UPDATE answers SET payload = ?", (payload,)).rowcount == 1
        code, details = detect_code(send, raw)
        assert code == grpc.StatusCode.OK, details
        again = pb.DetectResponse.FromString(send(raw, timeout=60))
    assert len(again.boxes) == len(first.boxes) > 0
    assert [b.score for b in again.boxes] == [b.score for b in first.boxes]
    assert not again.cached  # computed afresh (the damaged row is not replaced)
    failed = [r for r in caplog.records if getattr(r, "fields", {}).get("event")
              == "answers_store_failed"]  # fmt: skip
    assert failed and failed[0].fields["doing"] == "read", [r.getMessage() for r in failed]


def test_a_damaged_answers_file_is_refused_at_start_saying_what_to_do(tmp_path):
    path = tmp_path / "answers.sqlite"
    store = IdempotencyStore(path)
    for n in range(200):  # many pages
        store.put(f"r{n}", StoredAnswer("f" * 64, f"{n:064x}", b"[]" * 2000))
    store.close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    with open(path, "r+b") as fh:  # a page in the middle overwritten
        fh.seek(page * (pages // 2))
        fh.write(bytes(range(256)) * (page // 256))
    with pytest.raises(DamagedAnswersDatabase, match="move it aside with its -wal and -shm") as e:
        IdempotencyStore(path)
    assert "\n" not in str(e.value) and "***" not in str(e.value)  # one line
