"""An export the cloud refused, served again (user review): the sender held its requests for
the backoff cap (`Sender._hold_export`), and the probe's `model_served_again` line said "its
requests go out" while they waited out the hold. Now the probe's find ends the hold at once
(`Sender.release_export`, `ResultStore.release_export`) and the line says how many it released.

A real cloud on loopback (in-process `CloudServer`s, one after the other on one port), a real
edge daemon in-process on the tiny export, real SQLite.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time

import grpc
import numpy as np
import pytest
from PIL import Image

import splitdet.edge.daemon as daemon_module
from splitdet.edge.client_errors import NeverRetry
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.model_probe import ModelProbe
from splitdet.edge.sender import Backoff, Sender
from splitdet.edge.store import Arrival, ResultStore
from splitdet.shared.manifest import read_manifest

from support import daemon_config, free_port, running, wait_for

pytestmark = pytest.mark.timeout(240)

#: The backoff cap of the tests: far above any wait they allow for.
CAP_S = 60.0


def _pending(store: ResultStore, name: str, fingerprint: str) -> int:
    arrival = Arrival(f"/hot/{name}.png", f"{name}.png|1|1|1", name * 64, 1, time.time())
    image_id, _, verdict = store.record_pending(
        arrival, 0.9, f"req-{name}", b"x", fingerprint, {}, None
    )
    assert verdict == "pending"
    return image_id


def _next_tries(store: ResultStore) -> dict[int, float]:
    return dict(store._query("SELECT image_id, next_try FROM outbox"))


def test_release_export_makes_only_that_exports_held_requests_due(tmp_path):
    """Held requests of the export are due now, in one write; another export's hold and the
    last errors are left as they were; nothing held: nothing written."""
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        a1, a2, b = (_pending(store, n, f) for n, f in [("a", "A" * 64), ("c", "A" * 64),
                                                         ("b", "B" * 64)])  # fmt: skip
        until = time.time() + CAP_S
        assert store.hold_export("A" * 64, until, "not served here") == 2
        assert store.hold_export("B" * 64, until, "not served here") == 1
        now = time.time()
        commits = store.commits
        assert store.release_export("A" * 64, now) == 2
        assert store.commits == commits + 1
        assert _next_tries(store) == {a1: now, a2: now, b: until}
        errors = {row[0] for row in store._query("SELECT last_error FROM outbox")}
        assert errors == {"not served here"}
        assert store.release_export("A" * 64) == 0  # (nothing held any more)
        assert store.commits == commits + 1
    finally:
        store.close()


class _RefusedWhileReleased:
    """A client whose Detect call is refused (FAILED_PRECONDITION) while the probe, meanwhile,
    finds the export served and releases it."""

    def __init__(self, sender_of, fingerprint: str) -> None:
        self.sender_of, self.fingerprint = sender_of, fingerprint

    def send_request(self, request, timeout):
        self.sender_of().release_export(self.fingerprint)
        raise NeverRetry(grpc.StatusCode.FAILED_PRECONDITION, "model not served here")

    def close(self) -> None:
        pass


def test_a_refusal_older_than_a_release_holds_nothing(tmp_path):
    """A refusal answered to a call made before the export was released may predate the
    cloud serving it: it holds nothing (the item is tried again after one backoff step),
    lest the release be undone for the whole cap."""
    from splitdet.edge.store_types import OutboxItem
    from splitdet.shared.wire import detection_pb2 as pb

    store = ResultStore(tmp_path / "edge.sqlite")
    senders: list[Sender] = []
    fingerprint = "B" * 64
    try:
        sender = Sender(store, lambda: _RefusedWhileReleased(lambda: senders[0], fingerprint),
                        Backoff(0.05, CAP_S), seed=1)  # fmt: skip
        senders.append(sender)
        first, other = _pending(store, "a", fingerprint), _pending(store, "b", fingerprint)
        payload = pb.DetectRequest(request_id="req-a").SerializeToString()
        item = OutboxItem(first, "req-a", payload, time.time(), 0, None, "/hot/a.png",
                          fingerprint)  # fmt: skip
        assert sender.send(item) == 0.0
        tries = _next_tries(store)
        assert tries[first] < time.time() + 1.0 and tries[other] < time.time() + 1.0
        assert not sender._held
    finally:
        store.close()


def _cloud(tmp_path, port: int, name: str, *more):
    from cloud_fixtures import shared_model_dir

    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig

    _, other_dir, _ = shared_model_dir(0)
    config = ServerConfig(model_dir=other_dir, more_model_dirs=more, listen=f"127.0.0.1:{port}",
                          threads=1, answers_db=tmp_path / f"answers-{name}.sqlite")  # fmt: skip
    return CloudServer(config).start()


class _QuickProbe(ModelProbe):
    """The daemon's probe asking every 0.2 s, not every --retry-max (the hold's cap): what is
    checked is that its find ends the hold, not how soon it finds."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.every_s = 0.2


def test_requests_held_for_a_refused_export_go_out_once_the_probe_finds_it_served(
    tiny_model_dir, tmp_path, caplog, monkeypatch
):
    """The cloud serves only another export; the edge's request is refused and held for the
    cap (60 s). The cloud then serves the edge's export too: the probe logs model_served_again
    with released=1, and the request is answered within seconds, not at the cap. Before: the
    line said "its requests go out", and they waited out the 60 s hold."""
    monkeypatch.setattr(daemon_module, "ModelProbe", _QuickProbe)
    fingerprint = read_manifest(tiny_model_dir).fingerprint
    port = free_port()
    config = daemon_config(tiny_model_dir, tmp_path, once=False, cloud=f"127.0.0.1:{port}",
                           threshold=0.0, retry_initial_s=0.05, retry_max_s=CAP_S)  # fmt: skip
    rng = np.random.default_rng(7)
    Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(config.watch / "a.png")

    def seen(event: str) -> list[dict]:
        return [getattr(r, "fields", {}) for r in caplog.records
                if getattr(r, "fields", {}).get("event") == event]  # fmt: skip

    def outbox() -> list[tuple[str, float]]:
        with contextlib.closing(sqlite3.connect(config.db)) as conn:
            return conn.execute(
                "SELECT i.verdict, o.next_try FROM images i LEFT JOIN outbox o ON o.image_id = i.id"
            ).fetchall()

    other_only = _cloud(tmp_path, port, "other")
    with caplog.at_level(logging.DEBUG, logger="splitdet.edge"), running(EdgeDaemon(config)):
        try:
            wait_for(lambda: [e for e in seen("model_refused") if e.get("held") == 1], 60,
                     "the sender's refusal and hold")  # fmt: skip
            [(verdict, next_try)] = outbox()
            assert verdict == "pending" and next_try > time.time() + CAP_S / 2  # held
        finally:
            other_only.stop(0)
        both = _cloud(tmp_path, port, "both", tiny_model_dir)
        try:
            wait_for(lambda: outbox() == [("defect", None)], 15, "the held request answered")
        finally:
            both.stop(0)
    [again] = seen("model_served_again")
    assert again["fingerprint"] == fingerprint and again["released"] == 1
    assert "go out now" in again["note"]


def test_a_start_up_check_that_finds_the_export_served_releases_nothing(tmp_path, caplog):
    """At start-up the probe finds the edge's export served: what waits in the outbox then
    waits for its own backoff (a busy cloud's, say); a release there would send a restarted
    edge's whole backlog at once."""
    from cloud_fixtures import shared_model_dir

    from splitdet.edge.client import ClientConfig

    _, _, manifest = shared_model_dir(0)
    port = free_port()
    cloud = _cloud(tmp_path, port, "served")
    released: list[str] = []
    stop = threading.Event()
    probe = ModelProbe(ClientConfig(f"127.0.0.1:{port}"), manifest.fingerprint, (), 0.2, stop,
                       on_served=lambda fingerprint: released.append(fingerprint) or 1)  # fmt: skip
    try:
        with caplog.at_level(logging.INFO, logger="splitdet.edge"):
            probe.start()
            wait_for(lambda: any(getattr(r, "fields", {}).get("event") == "cloud_checked"
                                 for r in caplog.records), 30, "the start-up check")  # fmt: skip
    finally:
        stop.set()
        probe.join(10)
        cloud.stop(0)
    assert released == []
