"""How many defective images a cloud answers per second, at 1, 2, 4... edges sending at once.

An operator sizing the cloud for many cameras needs the answers per second one server gives
and the latency an edge then sees. `measure_level` runs ``clients`` threads, each with its own
channel (one connection, as a separate edge has) and edge name, sending real DetectRequests
back to back for ``seconds``; every call carries a new request id, so the server's answers
store never answers from memory. RESOURCE_EXHAUSTED (more calls than ``--max-concurrent``)
is counted as "busy", any other failure by its code; after either, that edge backs off as the
edge daemon does before it sends the request again. A request still unanswered when its edge
stops (the level's end) counts in the latency at the time it waited: a server that dies or
hangs mid-level shows in the percentiles, not only in the failure counts.

Torch-free: the requests come from the edge pipeline; the server is whatever ``--cloud`` is.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitdet.edge.client import CloudClient, CloudError, RetryLater
from splitdet.edge.sender import Backoff
from splitdet.shared.wire import detection_pb2 as pb

__all__ = ["LevelResult", "fresh_request", "measure_level"]

#: Tries of each client's first call (before the clock starts) against a busy server.
WARMUP_TRIES = 4


#: The latency percentiles reported.
PERCENTILES = (50, 90, 99)
#: The fewest requests a percentile is reported from: q needs 100 / (100 - q) of them (p50 2,
#: p90 10, p99 100). With fewer, the nearest-rank percentile is the slowest request itself
#: (of 9, p90 and p99 were both the maximum): it is null, and the maximum is reported as such.
MIN_SAMPLES = {q: math.ceil(100 / (100 - q)) for q in PERCENTILES}


@dataclass
class LevelResult:
    """One concurrency level's outcome.

    ``latencies_s``: seconds from each answered request's first try to its answer (with the
    backoff of any refusals before it: the delay an edge sees). ``unanswered_s``: for each
    request its edge was still trying when the level ended (at most one per edge), seconds from
    its first try to when the edge stopped: it waited at least that long, with no answer.
    ``failures``: status code name -> calls (``RESOURCE_EXHAUSTED``: the server was busy).
    """

    clients: int
    seconds: float  # from the start to the last call's end
    latencies_s: list[float] = field(default_factory=list)
    failures: Counter = field(default_factory=Counter)
    per_edge: list[int] = field(default_factory=list)  # answered calls of each edge
    unanswered_s: list[float] = field(default_factory=list)

    @property
    def answered(self) -> int:
        """Calls answered with detections."""
        return len(self.latencies_s)

    @property
    def answers_per_second(self) -> float:
        """Answered calls per second of wall time."""
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def edges_unanswered(self) -> int:
        """Edges that got no answer at all in the level."""
        return sum(1 for n in self.per_edge if n == 0)

    @property
    def failed(self) -> dict[str, int]:
        """Failed calls by status code, the server's busy refusals (RESOURCE_EXHAUSTED) left
        out: any of these means the level measured a failing server or network, not its
        capacity."""
        return {k: v for k, v in sorted(self.failures.items()) if k != "RESOURCE_EXHAUSTED"}

    def _samples(self) -> list[tuple[float, bool]]:
        """(seconds, answered) of every request of the level, sorted."""
        return sorted(
            [(s, True) for s in self.latencies_s] + [(s, False) for s in self.unanswered_s]
        )

    def to_json(self) -> dict:
        """Plain JSON types; latencies in ms.

        ``latency_ms``: percentiles over every request, an unanswered one at the time it waited
        (``latency_at_least`` lists those that fell on one: lower bounds, and "max" when the
        slowest is one), each null when the level had fewer requests than it needs
        (`MIN_SAMPLES`: p50 2, p90 10, p99 100; the keys stay); ``latency_samples``: the
        requests they are over; ``latency_max_ms``: the slowest of them;
        ``answered_latency_ms`` and ``answered_latency_max_ms``: over the answered requests
        only."""
        samples = self._samples()
        every = _percentiles(samples)
        answered = sorted((s, True) for s in self.latencies_s)
        slowest = samples[-1] if samples else None
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 3),
            "answered": self.answered,
            "unanswered": len(self.unanswered_s),
            "answers_per_second": round(self.answers_per_second, 3),
            "latency_ms": {k: _ms(v) for k, v in every.items()},
            "latency_at_least": [
                *(k for k, v in every.items() if v is not None and not v[1]),
                *(["max"] if slowest is not None and not slowest[1] else []),
            ],
            "latency_samples": len(samples),
            "latency_max_ms": _ms(slowest),
            "answered_latency_ms": {k: _ms(v) for k, v in _percentiles(answered).items()},
            "answered_latency_max_ms": _ms(answered[-1] if answered else None),
            "answered_per_edge": {
                "min": min(self.per_edge, default=0),
                "max": max(self.per_edge, default=0),
            },
            "edges_unanswered": self.edges_unanswered,
            "busy": self.failures.get("RESOURCE_EXHAUSTED", 0),
            "failed": self.failed,
        }


def _percentiles(samples: Sequence[tuple[float, bool]]) -> dict[str, tuple[float, bool] | None]:
    """``"p50"`` ... of sorted ``samples`` by nearest rank, None for a percentile with fewer
    samples than `MIN_SAMPLES` asks (it would be the maximum)."""
    return {
        f"p{q}": _nearest_rank(samples, q) if len(samples) >= MIN_SAMPLES[q] else None
        for q in PERCENTILES
    }


def _nearest_rank(samples: Sequence[tuple[float, bool]], q: int) -> tuple[float, bool] | None:
    """The ``q``-th percentile of sorted ``samples`` by nearest rank (numpy's "inverted_cdf"):
    the smallest sample with at least q % of them at or below it; None for no sample."""
    if not samples:
        return None
    return samples[max(0, -(-len(samples) * q // 100) - 1)]


def _ms(sample: tuple[float, bool] | None) -> float | None:
    return None if sample is None else round(sample[0] * 1000, 1)


def fresh_request(base: pb.DetectRequest) -> pb.DetectRequest:
    """``base`` with a new request id (the server computes it again, never from its store)."""
    request = pb.DetectRequest()
    request.CopyFrom(base)
    request.request_id = f"load-{uuid.uuid4().hex}"
    return request


def measure_level(
    make_client: Callable[[int], CloudClient],
    requests: Sequence[pb.DetectRequest],
    clients: int,
    seconds: float,
    backoff: Backoff | None = None,
) -> LevelResult:
    """``clients`` edges sending ``requests`` in turn, back to back, for ``seconds``.

    ``make_client(k)``: the k-th edge's client (its own channel). A call that starts before
    the deadline is waited for and counted. After a failed call an edge waits as the edge
    daemon's sender does (``backoff``, default the daemon's: 0.5 s doubling, with jitter), so
    a saturated server is measured as real edges would load it, not hammered. Raises
    `CloudError` when a warm-up call fails (the server cannot answer at all: wrong model,
    credentials, address).
    """
    if clients < 1 or seconds <= 0 or not requests:
        raise ValueError("need at least one client, a positive duration and a request")
    backoff = backoff or Backoff()
    channels = [make_client(k) for k in range(clients)]
    result = LevelResult(clients=clients, seconds=0.0, per_edge=[0] * clients)
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)
    deadline = [math.inf]

    def send(k: int) -> None:
        client, n, failures = channels[k], k, 0
        rng = random.Random(k)
        try:
            start_line.wait()
        except threading.BrokenBarrierError:  # stopped before the start
            return
        began = None  # the first try of the request being sent
        while time.perf_counter() < deadline[0]:
            request = fresh_request(requests[n % len(requests)])
            began = began or time.perf_counter()
            try:
                client.send_request(request)
            except CloudError as exc:
                with lock:
                    result.failures[exc.code.name] += 1
                failures += 1  # then wait as an edge's sender does, the same request next
                pause = backoff.delay(failures, rng)
                time.sleep(max(0.0, min(pause, deadline[0] - time.perf_counter())))
                continue
            except ValueError:  # the channel was closed under us: the run is being stopped
                return
            with lock:
                result.latencies_s.append(time.perf_counter() - began)
                result.per_edge[k] += 1
            n, failures, began = n + 1, 0, None
        if began is not None:  # the level ended with this edge's request still unanswered
            with lock:
                result.unanswered_s.append(time.perf_counter() - began)

    threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(clients)]
    try:
        for k, client in enumerate(channels):
            _warm_up(client, requests[k % len(requests)], backoff)
        for thread in threads:
            thread.start()
        started = time.perf_counter()
        deadline[0] = started + seconds
        start_line.wait()
        for thread in threads:
            thread.join()
        result.seconds = time.perf_counter() - started
        return result
    finally:
        deadline[0] = -math.inf  # Ctrl-C or an error: the senders stop after their call
        start_line.abort()
        for thread in threads:
            if thread.is_alive():
                thread.join(5.0)
        for client in channels:
            client.close()


def _warm_up(client: CloudClient, request: pb.DetectRequest, backoff: Backoff) -> None:
    """The client's first call, before the clock starts (connection set-up); a busy or
    unreachable server is tried again as an edge would, up to ``WARMUP_TRIES`` times."""
    for attempt in range(1, WARMUP_TRIES + 1):
        try:
            client.send_request(fresh_request(request))
            return
        except RetryLater:
            if attempt == WARMUP_TRIES:
                raise
            time.sleep(backoff.delay(attempt))
