"""Mutant audit, second round: the daemon's result pruner and the outbox's room check.

`edge.result_pruner` promises a prune "at most every PRUNE_EVERY_S", and "in a thread beside
the loop": a turn while one runs starts no other. `StoreOutbox.outbox_has_room` promises
whether "one more request of `payload_bytes` bytes fits the outbox's cap". Each test names the
one-line mutant it kills.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

from splitdet.edge import result_pruner
from splitdet.edge.result_pruner import ResultPruner
from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_types import OutboxCap

DAY = 86400.0
FINGERPRINT = "f" * 64


def _arrival(n: int) -> Arrival:
    return Arrival(f"/gone/{n}.png", f"{n}.png|1|{n}|{n}", f"{n:064x}", 1, time.time())


def _age(db: Path, days: float) -> None:
    """Make every result `days` old, written in an earlier boot (the wall clock decides)."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE images SET finished = ?, finished_boot = 'an-earlier-boot'",
            (time.time() - days * DAY,),
        )
    conn.close()


def _ids(store: ResultStore) -> list[int]:
    return [row["id"] for row in store.results()]


def test_a_second_turn_within_the_prune_period_prunes_nothing(tmp_path):
    """Kills: `self._next_prune = time.monotonic() + PRUNE_EVERY_S` dropped from
    `prune_when_due` (a prune every turn of the loop, not at most every PRUNE_EVERY_S)."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    try:
        pruner = ResultPruner(store, 1 * DAY, once=True, stop=threading.Event())
        store.record_ok(_arrival(1), 0.1, FINGERPRINT, {})
        _age(db, 3)
        pruner.prune_when_due()  # the first turn: due at start
        assert _ids(store) == []
        store.record_ok(_arrival(2), 0.1, FINGERPRINT, {})
        _age(db, 3)
        pruner.prune_when_due()  # the next turn, well within PRUNE_EVERY_S (an hour)
        assert _ids(store) == [2]
    finally:
        store.close()


class _HeldStore(ResultStore):
    """A real store whose prune waits, once entered, until the test lets it go."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._count = threading.Lock()

    def prune(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._count:
            self.calls += 1
        self.entered.set()
        assert self.release.wait(60), "the test never released the prune"
        return super().prune(*args, **kwargs)


def test_a_turn_while_a_prune_runs_starts_no_second_one(tmp_path, monkeypatch):
    """Kills: the `busy` check dropped from `prune_when_due` (a turn due while the last
    prune's thread still runs starts a second prune thread beside it)."""
    monkeypatch.setattr(result_pruner, "PRUNE_EVERY_S", 0.0)  # every turn is due
    store = _HeldStore(tmp_path / "edge.sqlite")
    stop = threading.Event()
    pruner = ResultPruner(store, 1 * DAY, once=False, stop=stop)
    try:
        pruner.prune_when_due()
        assert store.entered.wait(60), "the prune thread never started"
        for _ in range(3):  # turns of the loop while it runs
            pruner.prune_when_due()
        store.release.set()
        pruner.join(60)  # (the thread last started: a second one, if any was)
        assert store.calls == 1
    finally:
        stop.set()
        store.release.set()
        pruner.join(60)
        store.close()


def test_outbox_room_counts_the_requests_own_bytes(tmp_path):
    """Kills: `outbox_has_room` passing 0 for `payload_bytes` to the cap (a request that
    would take the outbox past max_bytes said to fit)."""
    store = ResultStore(tmp_path / "edge.sqlite", OutboxCap(max_items=10, max_bytes=100))
    try:
        store.record_pending(_arrival(1), 0.9, "r1", b"x" * 60, FINGERPRINT, {})
        assert store.outbox_has_room(40)  # 100 bytes: just fits
        assert not store.outbox_has_room(41)
        assert store.outbox_has_room()
    finally:
        store.close()
