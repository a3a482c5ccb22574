"""Mutant audit, second round: `edge.sender` beyond its backoff.

The sender's docstring: a transient failure pauses it "with capped exponential backoff" over
the failures *in a row* (an answer, or a permanent refusal, is the cloud answering: the count
starts again); "after a few refused connections in a row the channel is rebuilt" (a cloud
reached but busy is no refused connection: no new channel). The cloud here is a stand-in for
`CloudClient` (the sender under test is the real one, on a real store); each test names the
one-line mutant it kills.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import grpc
import numpy as np

from splitdet.edge.client import CloudDetections, NeverRetry, RetryLater
from splitdet.edge.sender import REBUILD_AFTER_FAILURES, Backoff, Sender
from splitdet.edge.store import Arrival, ResultStore
from splitdet.shared.wire import detection_pb2 as pb

FINGERPRINT = "f" * 64
DOWN = RetryLater(grpc.StatusCode.UNAVAILABLE, "connection refused")
BUSY = RetryLater(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy")
REFUSED = NeverRetry(grpc.StatusCode.INVALID_ARGUMENT, "bad request")


class _Cloud:
    """A CloudClient stand-in: raises the next of `outcomes` (None: answers with one box);
    counts the channels made (each call of it is Sender's make_client)."""

    def __init__(self) -> None:
        self.outcomes: list[Exception | None] = []
        self.channels = 0

    def __call__(self) -> _Cloud:
        self.channels += 1
        return self

    def send_request(self, request: pb.DetectRequest, timeout: float | None = None):
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return CloudDetections(
            request.request_id, FINGERPRINT, np.array([[1.0, 1.0, 5.0, 5.0]], np.float32),
            np.array([0.9], np.float32), np.array([1]), ("scratch",), {}, False,
        )  # fmt: skip

    def close(self) -> None:
        pass


def _store(db: Path, n: int) -> ResultStore:
    store = ResultStore(db)
    for i in range(n):
        arrival = Arrival(f"/hot/{i}.png", f"{i}.png|1|1|{i}", f"{i:064d}", 1, time.time())
        payload = pb.DetectRequest(request_id=f"r{i}").SerializeToString()
        store.record_pending(arrival, 0.9, f"r{i}", payload, FINGERPRINT, {})
    return store


def _send(sender: Sender, store: ResultStore) -> float:
    """One attempt of the next request (due or not: the test plays the sender's thread)."""
    item = store.next_due(now=time.time() + 10_000)
    assert item is not None
    return sender.send(item)


def test_an_answer_or_a_dead_letter_starts_the_backoff_again(tmp_path):
    """Kills: `self.failures = self._unreached = 0` dropped after a committed answer, or after
    a permanent refusal (the pause after the next failure would grow on from the old run of
    failures: 4 s and more here, where the first step is at most 1 s)."""
    cloud = _Cloud()
    with contextlib.closing(_store(tmp_path / "edge.sqlite", 6)) as store:
        sender = Sender(store, cloud, Backoff(1.0, 64.0), seed=1)
        cloud.outcomes = [BUSY, BUSY, None, BUSY, BUSY, REFUSED, BUSY]
        for _ in range(2):  # answered, then dead-lettered
            assert _send(sender, store) <= 1.0  # a first failure
            assert 1.0 <= _send(sender, store) <= 2.0  # (the second step: it grows)
            assert _send(sender, store) == 0.0  # the cloud answered: no pause
            assert sender.failures == 0
        assert _send(sender, store) <= 1.0  # a first failure again
        assert sender.delivered == 1 and sender.dead_lettered == 1


def test_the_channel_is_rebuilt_after_refused_connections_in_a_row_only(tmp_path):
    """Kills: `self._unreached >= REBUILD_AFTER_FAILURES` made `>` (one refused connection
    more before a fresh channel), and `self._unreached = 0` dropped after a failure that
    reached the cloud (a busy cloud between refused connections: not in a row)."""
    cloud = _Cloud()
    n = REBUILD_AFTER_FAILURES
    with contextlib.closing(_store(tmp_path / "edge.sqlite", 1)) as store:
        sender = Sender(store, cloud, Backoff(0.01, 0.01))
        cloud.outcomes = [DOWN] * (n - 1) + [BUSY] + [DOWN] * (n - 1)
        for _ in range(2 * n - 1):
            _send(sender, store)
        assert cloud.channels == 1  # never n refused connections in a row
        cloud.outcomes = [DOWN, None]
        _send(sender, store)  # the n-th in a row: the channel is dropped
        _send(sender, store)  # ... and the next call makes a new one
        assert cloud.channels == 2
        [row] = store.results()
        assert row["verdict"] == "defect"


NOT_SERVED = NeverRetry(grpc.StatusCode.FAILED_PRECONDITION, "model not served")


def test_an_answer_for_a_refused_export_lifts_its_refusal(tmp_path):
    """Kills: `self._refusals.pop(item.fingerprint, None)` dropped after a committed answer
    (`refused_by_cloud` kept naming an export the cloud answers again, while requests of it
    still wait: "dropped when an answer shows it fixed")."""
    cloud = _Cloud()
    with contextlib.closing(_store(tmp_path / "edge.sqlite", 3)) as store:
        sender = Sender(store, cloud, Backoff(0.5, 30.0))
        cloud.outcomes = [NOT_SERVED, None]
        _send(sender, store)  # refused: the export's requests held
        assert sender.refused_by_cloud is not None
        _send(sender, store)  # the export is served again: answered
        assert store.outbox_stats().depth == 2  # (its other requests still wait)
        assert sender.refused_by_cloud is None


def test_a_hold_set_before_the_clock_stepped_back_does_not_hold(tmp_path, monkeypatch):
    """Kills: `now < until <= now + self.backoff.max_s` made `now < until` in `_pass` (a
    refused export's hold made while the wall clock ran a day ahead held its requests for
    that day once the clock was set right: "a hold beyond the cap predates a backward clock
    step")."""
    cloud = _Cloud()
    real = time.time
    with contextlib.closing(_store(tmp_path / "edge.sqlite", 1)) as store:
        sender = Sender(store, cloud, Backoff(0.5, 30.0))
        cloud.outcomes = [NOT_SERVED, None]
        with monkeypatch.context() as patch:
            patch.setattr(time, "time", lambda: real() + 86400.0)  # the clock a day ahead
            _send(sender, store)  # refused: held until a day and 30 s from now
        assert sender._pass() == 0.0  # the clock set right: due now, and sent
        [row] = store.results()
        assert row["verdict"] == "defect" and cloud.outcomes == []
