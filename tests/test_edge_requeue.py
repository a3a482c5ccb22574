"""Dead letters keep their request, and `splitdet edge requeue` sends them again once the cause
is fixed: the store's side in-process, and the whole story through a real daemon and real
cloud servers on loopback (a server whose message bound is too small for the edge's fp32
features, then one whose bound is raised, as the README's troubleshooting says to do)."""

from __future__ import annotations

import contextlib
import sqlite3
import time

import numpy as np
import pytest
from cloud_fixtures import shared_model_dir

from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import MIB, ServerConfig
from splitdet.edge.store import Arrival, OutboxCap, ResultStore
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.edge.store_schema import SCHEMA_VERSION
from splitdet.shared.cli import main

pytestmark = pytest.mark.timeout(180)
FINGERPRINT = "f" * 64


def _arrival(n: int) -> Arrival:
    return Arrival(f"/hot/img{n}.png", f"img{n}.png|100|{n}|{n}", f"{n:064x}", 100, time.time())


def _refused(store: ResultStore, n: int, payload_bytes: int = 100) -> int:
    """A pending request for image n, then refused for good: its image id."""
    image_id, _, verdict = store.record_pending(
        _arrival(n), 0.9, f"req-{n}", bytes([n]) * payload_bytes, FINGERPRINT, {}
    )
    assert verdict == "pending"
    assert store.dead_letter(image_id, f"dead letter: INTERNAL: bug {n}")
    return image_id


def _rows(db) -> dict[int, tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT id, verdict, error_kind, reason, finished FROM images")
        return {row[0]: row[1:] for row in rows}


def test_a_requeued_dead_letter_is_pending_again_with_its_own_request(tmp_path):
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        first, second = _refused(store, 1), _refused(store, 2)
        assert store.outbox_stats().depth == 0
        assert store.dead_letter_stats().depth == 2
        assert store.requeue_dead_letters(dry_run=True) == ([first, second], [], [])
        assert store.dead_letter_stats().depth == 2  # a dry run changes nothing
        assert _rows(store.path)[first][0] == "error"

        assert store.requeue_dead_letters() == ([first, second], [], [])
        assert store.dead_letter_stats().depth == 0
        item = store.next_due()
        assert (item.image_id, item.request_id, item.payload) == (first, "req-1", b"\x01" * 100)
        assert _rows(store.path)[first] == ("pending", None, None, None)
        assert store.counters() == {"dead_letters": 2, "requeued": 2}
        assert store.requeue_dead_letters() == ([], [], [])  # nothing twice
    finally:
        store.close()


def test_requeue_takes_only_what_the_outbox_caps_allow(tmp_path):
    store = ResultStore(tmp_path / "edge.sqlite", OutboxCap(max_items=2, max_bytes=10_000))
    try:
        refused = [_refused(store, n) for n in (1, 2)]
        store.record_pending(_arrival(3), 0.9, "req-3", b"x" * 100, FINGERPRINT, {})
        assert store.requeue_dead_letters() == ([refused[0]], [refused[1]], [])
        assert store.outbox_stats().depth == 2
        assert _rows(store.path)[refused[1]][1] == "dead_letter"  # still, for the next requeue
    finally:
        store.close()


def test_kept_requests_are_bounded_and_the_oldest_dropped(tmp_path):
    cap = OutboxCap(dead_letter_max_bytes=2500)
    store = ResultStore(tmp_path / "edge.sqlite", cap)
    try:
        oldest, *newer = [_refused(store, n, payload_bytes=1000) for n in (1, 2, 3)]
        assert store.dead_letter_stats().depth == 2 and store.dead_letter_stats().bytes == 2000
        assert store.counters()["dead_letter_payloads_dropped"] == 1
        # its row stays a dead letter with its reason; only the request is gone
        assert _rows(store.path)[oldest][1:3] == ("dead_letter", "dead letter: INTERNAL: bug 1")
        assert store.requeue_dead_letters() == (newer, [], [oldest])
    finally:
        store.close()


def test_a_request_larger_than_the_cap_is_dropped_alone(tmp_path):
    """One refused request over the whole cap emptied the kept dead letters: the older ones
    were dropped, oldest first, to make room it could never have, then it went too."""
    store = ResultStore(tmp_path / "edge.sqlite", OutboxCap(dead_letter_max_bytes=2500))
    try:
        kept = [_refused(store, n, payload_bytes=1000) for n in (1, 2)]
        huge = _refused(store, 3, payload_bytes=3000)
        assert store.dead_letter_stats().depth == 2 and store.dead_letter_stats().bytes == 2000
        assert store.counters()["dead_letter_payloads_dropped"] == 1
        assert store.requeue_dead_letters() == (kept, [], [huge])
    finally:
        store.close()


def test_a_dead_letter_requeued_while_prune_looks_is_neither_deleted_nor_counted(
    tmp_path, monkeypatch
):
    """prune picks its rows, then deletes those still final: one requeued in between (by
    `edge requeue` in another process) stayed, but was counted as pruned."""
    from splitdet.edge import store_maintenance

    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        requeued = _refused(store, 1)
        pruned, _ = store.record_ok(_arrival(2), 0.1, FINGERPRINT, {})

        def requeue_meanwhile(path, key) -> bool:
            if _rows(store.path)[requeued][0] == "error":
                store.requeue_dead_letters()
            return False

        monkeypatch.setattr(store_maintenance, "lies_there", requeue_meanwhile)
        assert store.prune(before=time.time() + 60).deleted == 1
        assert store.counters()["pruned"] == 1
        assert pruned not in _rows(store.path) and requeued in _rows(store.path)
        assert store.next_due().image_id == requeued  # its request kept, in the outbox
    finally:
        store.close()


def test_since_selects_by_the_time_of_the_refusal(tmp_path):
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        early = _refused(store, 1)
        time.sleep(0.05)
        cut = time.time()
        late = _refused(store, 2)
        assert store.requeue_dead_letters(since=cut) == ([late], [], [])
        assert _rows(store.path)[early][0] == "error"
    finally:
        store.close()


def test_a_version_1_store_is_migrated_and_its_old_dead_letters_named(tmp_path):
    """A store written before requests were kept: opened, it gains the dead-letter table; its
    earlier dead letters have nothing to requeue and are reported as such."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    old = _refused(store, 1)
    store.close()
    with contextlib.closing(sqlite3.connect(db)) as conn:  # as version 1 left it
        conn.execute("DROP TABLE dead_letters")
        conn.execute("ALTER TABLE images DROP COLUMN threshold")  # (added since)
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    readonly = open_readonly(db)  # `splitdet edge status` reads it as it is
    try:
        assert store_status(readonly)["dead_letters"] == {"kept": 0, "kept_bytes": 0,
                                                          "not_kept": 1}  # fmt: skip
    finally:
        readonly.close()
    store = ResultStore(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 2
        new = _refused(store, 2)
        assert store.requeue_dead_letters() == ([new], [], [old])
    finally:
        store.close()


def test_the_requeue_command(tmp_path, capsys):
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    _refused(store, 1)
    store.close()
    assert main(["edge", "requeue", "--db", str(db), "--dry-run"]) == 0
    assert "would requeue 1 dead letter" in capsys.readouterr().out
    assert main(["edge", "requeue", "--db", str(db), "--since", "1h"]) == 0
    assert "requeued 1 dead letter" in capsys.readouterr().out
    assert [row[0] for row in _rows(db).values()] == ["pending"]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--db", "{missing}"], "no such results database"),
        (["--db", "{db}", "--since", "yesterday-ish"], "--since"),
        (["--db", "{db}", "--outbox-max-items", "0"], "--outbox-max-items"),
        (["--db", "{text}"], "not"),
    ],
)
def test_requeue_refusals_are_one_line(tmp_path, capsys, options, message):
    db, text = tmp_path / "edge.sqlite", tmp_path / "notes.txt"
    ResultStore(db).close()
    text.write_text("not a database\n")
    paths = {"missing": tmp_path / "nope.sqlite", "db": db, "text": text}
    try:
        code = main(["edge", "requeue", *(o.format(**paths) for o in options)])
    except SystemExit as exc:  # argparse's refusal of a value
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or err[0].startswith("usage"), err
    assert message in err[-1] and "Traceback" not in err[-1]


def test_a_request_refused_as_too_large_is_delivered_after_requeue(tmp_path, caplog):
    """The story end to end: the cloud's message bound is below the edge's fp32 features, so
    each request is refused for good (RESOURCE_EXHAUSTED "larger than max"): dead letters.
    The operator raises the bound, runs `splitdet edge requeue`, and the same edge delivers them
    with boxes. Before, their features were dropped with the refusal."""
    from PIL import Image

    from splitdet.edge.daemon import EdgeDaemon
    from splitdet.edge.daemon_config import DaemonConfig

    _, model_dir, _ = shared_model_dir(0)
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    rng = np.random.default_rng(7)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(watch / name)

    def cloud(max_message_bytes: int):
        answers = tmp_path / f"answers-{max_message_bytes}.sqlite"
        config = ServerConfig(model_dir=model_dir, listen="127.0.0.1:0", threads=2,
                              max_message_bytes=max_message_bytes, answers_db=answers)  # fmt: skip
        return CloudServer(config).start()

    def edge(server) -> EdgeDaemon:
        return EdgeDaemon(
            DaemonConfig(
                model_dir=model_dir, watch=watch, cloud=f"127.0.0.1:{server.port}", db=db,
                codec="fp32", settle_s=0.05, poll_s=0.05, once=True, drain_timeout_s=60.0,
                threshold=0.0, retry_initial_s=0.05, retry_max_s=0.1,
            )
        )  # fmt: skip

    small = cloud(1 * MIB)  # the tiny model's fp32 requests are about 1.2 MB
    try:
        assert edge(small).run() == 0  # nothing pending: both refused for good
    finally:
        small.stop(0)
    rows = _rows(db)
    assert [(v, kind) for v, kind, *_ in rows.values()] == [("error", "dead_letter")] * 2
    assert all("larger than max" in reason for _, _, reason, _ in rows.values())

    assert main(["edge", "requeue", "--db", str(db)]) == 0
    large = cloud(64 * MIB)
    try:
        assert edge(large).run() == 0
    finally:
        large.stop(0)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        delivered = conn.execute("SELECT verdict, boxes, finished FROM images").fetchall()
    assert [verdict for verdict, *_ in delivered] == ["defect", "defect"]
    assert all(boxes is not None and finished is not None for _, boxes, finished in delivered)
