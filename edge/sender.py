"""The outbox's delivery thread: sends stored requests to the cloud while the daemon keeps
classifying (no torch).

    sender = Sender(store, lambda: CloudClient(ClientConfig(address)), Backoff(0.5, 30))
    sender.start()
    ...
    sender.wake()          # a new item is in the outbox
    sender.stop(); sender.join(timeout=5)

One request at a time, oldest due first. The answer and the outbox deletion commit together
(`ResultStore.complete`). A transient failure (RetryLater: the cloud is down, slow or busy)
reschedules the item and pauses the whole sender with capped exponential backoff and jitter: when
one request cannot get through, the next would not either. After a few refused connections in a
row the channel is rebuilt, so a cloud that comes back is found within one backoff step rather
than after gRPC's own reconnect backoff. A permanent refusal (NeverRetry: INVALID_ARGUMENT,
INTERNAL, a message too large) moves the item to the dead-letter state with the reason; so does
an answer that fails the client's checks (BadAnswer: another request's id or model, a NaN or
out-of-image box, an unknown label or class name, too many boxes, an answer over the receive
bound): nothing of it is stored, and the request is kept for `edge requeue`.
UNAUTHENTICATED, PERMISSION_DENIED and FAILED_PRECONDITION are the exception: a wrong token, or a
cloud that does not serve a request's model (yet, or any more: during a model upgrade), is the
operator's to fix, and the requests themselves are fine; so the items stay in the outbox (retried
at the backoff cap) and the log says why. A refused model holds only the requests made with that
export: an outbox may hold requests of the edge's previous export beside its current one, and
while the cloud serves only one of the two, the other's requests wait without holding up the
first's (one refused call per export per backoff cap). Once the cloud is found serving that
export again (the daemon's `ModelProbe`), `release_export` ends the hold at once rather than at
the cap. A request in the outbox that no longer parses is dead-lettered too. Any other failure
(a database locked past its timeout, a channel that cannot be built) is logged and retried after
a backoff step: the thread never ends before `stop`; but a write to the database failing for any
other reason than a lock (`stops_the_daemon`: the disk full, an I/O error, a read-only file) ends
it when it was given `on_fatal` (the daemon, which stops on it, exit 2, as it does when its intake
meets one): its line says that the daemon stops, not that it retries.

The request id is the idempotency key derived from the image bytes; the cloud answers a repeated
id from its store, so re-sending after a lost answer never makes a second result.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from splitdet.edge.client import (
    RETRY_LATER_CODES,
    BadAnswer,
    CloudClient,
    CloudDetections,
    CloudError,
    NeverRetry,
    RetryLater,
)
from splitdet.edge.file_identity import file_path, path_text
from splitdet.edge.store import Answer, OutboxItem, ResultStore
from splitdet.edge.store_file import is_busy
from splitdet.shared.atomic_file import write_problem
from splitdet.shared.wire import detection_pb2 as pb

if TYPE_CHECKING:  # the daemon's metrics import this module
    from splitdet.edge.daemon_metrics import EdgeMetrics

log = logging.getLogger(__name__)

_AUTH_REFUSED = (
    "auth_refused",
    "the cloud refuses our credentials (%s); requests stay in the outbox until the token or "
    "certificates are fixed: a new --token-file is read when the edge restarts (restart it), "
    "renewed --client-cert and --client-key files are taken up by themselves",
)
#: Codes the client calls NeverRetry that the edge keeps retrying, with the log event and line:
#: a credentials problem, or a cloud that does not serve a request's model, is fixed by the
#: operator, and the requests themselves are fine.
OPERATOR_PROBLEMS = {
    grpc.StatusCode.UNAUTHENTICATED: _AUTH_REFUSED,
    grpc.StatusCode.PERMISSION_DENIED: _AUTH_REFUSED,
    grpc.StatusCode.FAILED_PRECONDITION: (
        "model_refused",
        "the cloud does not serve the model of these requests (%s); they stay in the outbox "
        "until it does",
    ),
}
#: The operator problems that concern one model export, not the edge's every request.
PER_EXPORT = frozenset({grpc.StatusCode.FAILED_PRECONDITION})
#: The codes a failed Detect call is counted under (EdgeMetrics.send_failed): the transient
#: ones and the operator problems, the failures the sender retries.
SEND_FAILURE_CODES = tuple(
    code.name for code in grpc.StatusCode if code in RETRY_LATER_CODES or code in OPERATOR_PROBLEMS
)
#: A dead letter's code when its outbox row no longer parses (no call was made).
CORRUPT_OUTBOX = "CORRUPT_OUTBOX"
#: The codes a dead letter is counted under (EdgeMetrics.dead_letter): every status code the
#: client can call NeverRetry (`classify`: RESOURCE_EXHAUSTED for a message over the bound)
#: but the operator problems, which stay in the outbox; and CORRUPT_OUTBOX.
DEAD_LETTER_CODES = (
    *(code.name for code in grpc.StatusCode
      if code is not grpc.StatusCode.OK and code not in OPERATOR_PROBLEMS),
    CORRUPT_OUTBOX,
)  # fmt: skip
#: Consecutive connection failures (UNAVAILABLE) after which the channel is rebuilt, and rebuilt
#: again at each one after: a fresh channel connects at its first call, where the old one may
#: be waiting out gRPC's reconnect backoff (up to 10 s, `client_channel`).
REBUILD_AFTER_FAILURES = 3
#: Free database pages beyond which an idle sender gives them back to the file system: an
#: outage's backlog, not a single request's (the file would shrink and grow at every defect).
RECLAIM_ABOVE_BYTES = 64 << 20
#: At most one `annotate_failed` line per this many seconds (a full disk fails every image).
ANNOTATE_LOG_EVERY_S = 60.0


class _Cancelled(Exception):
    """The call in flight ended because `Sender.cancel` closed its channel."""


def stops_the_daemon(exc: BaseException) -> bool:
    """Whether `exc`, met by the sender, is a failure of the store's file the daemon stops on
    (as it does when its intake meets one: `splitdet edge run` exits 2): SQLite's operational
    errors but another program's lock (SQLITE_FULL "database or disk is full", an I/O error, a
    read-only file). A lock is waited out, as is anything else: a channel that cannot be built,
    or an error of one request's row (an integrity or data error: that request waits, the
    others and the intake go on, where a stop would meet it again at every restart)."""
    return isinstance(exc, sqlite3.OperationalError) and not is_busy(exc)


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter: attempt n (1-based) waits
    uniform(0.5, 1.0) * min(max_s, initial_s * 2 ** (n - 1)) seconds."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError("backoff needs 0 < initial <= max")

    def ceiling(self, failures: int) -> float:
        """The longest wait after `failures` (1-based): min(max_s, initial_s * 2 ** (n - 1))."""
        return min(self.max_s, self.initial_s * 2 ** min(max(failures, 1) - 1, 60))

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after `failures` (1-based): `ceiling(failures)` times a jitter in
        [0.5, 1.0) drawn from `rng` (the `random` module without one)."""
        return self.ceiling(failures) * (rng or random).uniform(0.5, 1.0)


class Sender(threading.Thread):
    """Delivers outbox items until stopped; see the module docstring.

    Args:
        store: the results store holding the outbox.
        make_client: builds a CloudClient (called again to rebuild the channel).
        backoff: pause after transient failures.
        timeout_s: deadline of one Detect call.
        metrics: an EdgeMetrics (or None).
        on_answer: called as on_answer(item, detections) after an answer is committed (e.g. to
            draw annotated images); exceptions are logged, never fatal.
        seed: for the jitter (tests).
        on_fatal: called as on_fatal(exc) when the store fails so that the daemon stops
            (`stops_the_daemon`), after the ERROR line saying so; the thread then ends. Without
            it such a failure is retried like any other.
        refusal_hint: called as refusal_hint(fingerprint, client) when the cloud refuses the
            model of a request (the daemon's `ModelOnDisk.refusal_hint`): a fix to add to the
            `model_refused` line (restart the edge, when --model holds the export the cloud
            serves now), or None.
    """

    def __init__(
        self,
        store: ResultStore,
        make_client: Callable[[], CloudClient],
        backoff: Backoff | None = None,
        timeout_s: float = 60.0,
        metrics: EdgeMetrics | None = None,
        on_answer: Callable[[OutboxItem, CloudDetections], None] | None = None,
        seed: int | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
        refusal_hint: Callable[[str, CloudClient], str | None] | None = None,
    ) -> None:
        super().__init__(name="splitdet-sender", daemon=True)
        self.store = store
        self._make_client = make_client
        self._client: CloudClient | None = None
        self.backoff = backoff or Backoff()
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.on_answer = on_answer
        self.on_fatal = on_fatal
        self.refusal_hint = refusal_hint
        self.fatal: BaseException | None = None  # the store failure that ended it (`on_fatal`)
        self._sending: OutboxItem | None = None  # the item of the pass under way, if any
        self._rng = random.Random(seed)
        self._wake = threading.Event()
        self._halt = threading.Event()
        self.failures = 0  # consecutive transient failures (and unexpected sender errors)
        self._unreached = 0  # consecutive UNAVAILABLE failures: the channel rebuilt from the 3rd
        self.errors = 0  # consecutive unexpected sender errors (a call answered in between too)
        self.local_error: str | None = None  # the last of them, while the row lasts
        self._failed_sends = 0  # calls of them that failed to reach the cloud or get an answer
        self._failing_since: float | None = None  # monotonic s of the first of those
        self._reclaim_due = False  # the outbox lost rows since the last `_reclaim`
        self.delivered = 0
        self.dead_lettered = 0  # requests this sender made dead letters
        #: the refusals a person must act on (OPERATOR_PROBLEMS), "CODE: message", by what they
        #: refuse: "" for this edge itself (a token), an export's fingerprint for its model not
        #: served; dropped when an answer shows it fixed (`refused_by_cloud`)
        self._refusals: dict[str, str] = {}
        self._held: dict[str, float] = {}  # export fingerprint -> unix s its requests wait until
        self._released: dict[str, float] = {}  # export fingerprint -> perf_counter s, released
        self._hold_lock = threading.Lock()  # the holds (`_held`, the store's) vs `release_export`
        self._cancelled = threading.Event()  # `cancel`: no call any more, the one in flight ended
        self._client_lock = threading.Lock()  # `cancel` against a client being made
        self._in_flight = False  # a Detect call is under way (for `cancel` to report)

    def wake(self) -> None:
        """A new item is in the outbox: send it without waiting for the next check."""
        self._wake.set()

    def release_export(self, fingerprint: str) -> int:
        """The cloud serves `fingerprint` again (from any thread: the daemon's `ModelProbe`):
        end its hold now rather than at the backoff cap, i.e. its requests held in the store
        made due now, and the sender woken. A refusal of that export's call under way meanwhile
        holds nothing (`_hold_export`). Returns how many requests were released."""
        with self._hold_lock:
            self._held.pop(fingerprint, None)
            self._released[fingerprint] = time.perf_counter()
            released = self.store.release_export(fingerprint)
        self.wake()
        return released

    def stop(self) -> None:
        """Finish the call in flight (its answer is still committed), then end."""
        self._halt.set()
        self._wake.set()

    def cancel(self) -> bool:
        """`stop`, and end the call in flight now rather than at its deadline (the channel is
        closed under it): for a run that must end at its own deadline (`edge run --once` at
        --drain-timeout). The cancelled call's item stays in the outbox as it was, not counted
        as an attempt, and the next run sends it again (the request id makes that safe, should
        the cloud have answered meanwhile). Returns whether a call was in flight."""
        with self._client_lock:
            self._cancelled.set()
            in_flight = self._in_flight
            client = self._client
        self.stop()
        if client is not None:
            try:
                client.close()  # (the blocked call raises CANCELLED at once)
            except Exception:
                log.debug("closing the channel failed", exc_info=True)
        return in_flight

    def run(self) -> None:
        """Deliver outbox items, pausing as `send` says, until `stop`."""
        try:
            while not self._halt.is_set():
                try:
                    pause = self._pass()
                    if not self._cancelled.is_set():  # (a cancelled call says nothing of it)
                        self.errors, self.local_error = 0, None
                except Exception as exc:
                    if self.on_fatal is not None and stops_the_daemon(exc):
                        self._fatal(exc)  # (the disk full: the daemon stops, exit 2)
                        return
                    # e.g. a database locked past its timeout (the answer came, and could not
                    # be stored), a channel that cannot be built: nothing was marked, so the
                    # item is tried again after the pause, which grows with each error in a
                    # row (a call answered meanwhile does not end the row)
                    self.errors += 1
                    self.failures += 1
                    self._unreached = 0  # (the channel is dropped below)
                    self.local_error = f"{type(exc).__name__}: {exc}"
                    pause = self.backoff.delay(self.errors, self._rng)
                    log.exception(
                        "the sender failed unexpectedly; retrying in %.1f s", pause,
                        extra={"fields": {"event": "sender_error", "retry_in_s": round(pause, 3),
                                          "errors": self.errors}},
                    )  # fmt: skip
                    self._drop_client()
                if pause > 0:
                    self._halt.wait(pause)  # a new item does not end the pause: the cloud is down
        finally:
            self._drop_client()

    def _fatal(self, exc: BaseException) -> None:
        """A store failure the daemon stops on (`stops_the_daemon`): ERROR `sender_error`
        saying so (with `fatal`, no retry promised: none comes), then `on_fatal(exc)`. Nothing is
        lost: what could not be written was rolled back, the request stays in the outbox."""
        self.fatal = exc
        self.local_error = f"{type(exc).__name__}: {exc}"
        item = self._sending
        during = f" storing the outcome of image {item.image_id} ({item.path})" if item else ""
        log.error(
            f"the sender cannot write to --db {self.store.path}{during} ({exc}): the daemon "
            "stops (exit 2), no retry; nothing is lost: what was being written is rolled back, "
            "the requests stay in the outbox and are sent again at the next start",
            exc_info=True,
            extra={"fields": {"event": "sender_error", "fatal": True, "errors": self.errors + 1,
                              "error": self.local_error, "db": str(self.store.path),
                              "image_id": item.image_id if item else None}},
        )  # fmt: skip
        self._drop_client()
        self.on_fatal(exc)  # type: ignore[misc]  (called only with one: `run`)

    def _pass(self) -> float:
        """Send the next due item, or wait a little for one; returns seconds to pause."""
        self._sending = None
        # (a wait longer than the backoff cap means the wall clock stepped back: due now)
        item = self.store.next_due(max_wait_s=self.backoff.max_s)
        if item is None and self._reclaim_due:
            self._reclaim()
        if item is None:
            due = self.store.next_try_at()
            self._wake.wait(1.0 if due is None else min(1.0, max(0.0, due - time.time())))
            self._wake.clear()
            return 0.0
        self._sending = item
        with self._hold_lock:  # (not released between the look and the hold)
            until, now = self._held.get(item.fingerprint, 0.0), time.time()
            if now < until <= now + self.backoff.max_s:  # made after its export was refused:
                # wait beside the others (a hold beyond the cap predates a backward clock step)
                self.store.hold_export(item.fingerprint, until)  # (keeps the cloud's refusal)
                return 0.0
        return self.send(item)

    def _reclaim(self) -> None:
        """Nothing due: give the file the outbox's freed pages back when they are more than
        RECLAIM_ABOVE_BYTES (after an outage's backlog), logged as `store_reclaimed`."""
        self._reclaim_due = False
        freed = self.store.reclaim(RECLAIM_ABOVE_BYTES, should_stop=self._halt.is_set)
        if freed:
            log.info(
                "gave %.1f MB of the database's free pages back to the file system", freed / 1e6,
                extra={"fields": {"event": "store_reclaimed", "bytes": freed}},
            )  # fmt: skip

    def _drop_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                log.debug("closing the channel failed", exc_info=True)

    def send(self, item: OutboxItem) -> float:
        """Try one item; returns seconds to pause before the next attempt (0: go on)."""
        try:
            request = pb.DetectRequest.FromString(item.payload)
        except DecodeError as exc:  # the outbox row itself is damaged: no retry can help
            self._dead_letter(item, f"dead letter: the outbox holds a corrupt request ({exc})",
                              CORRUPT_OUTBOX)  # fmt: skip
            return 0.0
        start = time.perf_counter()
        try:
            answer = self._call(request)
        except _Cancelled:  # (`cancel`: the item is left as it was, due now, for the next run)
            log.debug("call cancelled", extra={"fields": {"event": "send_cancelled",
                                                          "image_id": item.image_id}})  # fmt: skip
            return 0.0
        except RetryLater as exc:
            return self._transient(item, exc, len(item.payload))
        except NeverRetry as exc:
            if exc.code in PER_EXPORT:
                return self._hold_export(item, exc, start)
            if exc.code in OPERATOR_PROBLEMS:
                event, line = OPERATOR_PROBLEMS[exc.code]
                log.error(line, exc, extra={"fields": {"event": event, "code": exc.code.name}})
                self._refusals[""] = f"{exc.code.name}: {exc.message}"
                return self._transient(item, exc, len(item.payload), at_cap=True)
            self._count_bytes(len(item.payload))
            if isinstance(exc, BadAnswer):  # the cloud answered, but nothing of it is kept
                reason = f"dead letter: refused the cloud's answer, stored nothing: {exc}"
            else:
                reason = f"dead letter: the cloud refused the request permanently: {exc}"
            self._dead_letter(item, reason, exc.code.name)
            self.failures = self._unreached = 0
            self._resumed()  # (the cloud answered, if only with a refusal)
            return 0.0
        round_trip = time.perf_counter() - start
        self._count_bytes(len(item.payload))
        self.failures = self._unreached = 0
        timings = {f"cloud_{k.removesuffix('_s')}": v for k, v in answer.timings.items()}
        timings["round_trip"] = round_trip
        committed = self.store.complete(
            item.image_id,
            Answer(
                boxes=answer.boxes.tolist(),
                scores=answer.scores.tolist(),
                labels=answer.labels.tolist(),
                class_names=answer.class_names,
                timings=timings,
            ),
        )
        self._reclaim_due = True
        if committed:
            self.delivered += 1
            self._refusals.pop("", None)  # (this edge is let in again)
            self._refusals.pop(item.fingerprint, None)  # (and that export is served)
            log.info(
                "defect",
                extra={"fields": {"event": "defect", "image_id": item.image_id,
                                  "path": item.path, "boxes": len(answer.scores),
                                  "cached": answer.cached, "round_trip_s": round(round_trip, 4),
                                  "attempts": item.attempts + 1}},
            )  # fmt: skip
            if self.metrics is not None:
                # (not below 0: `created` may be ahead of a clock that stepped back)
                self.metrics.answered(round_trip, max(0.0, time.time() - item.created))
            if self.on_answer is not None:
                self._after_answer(item, answer)
        self._resumed()
        return 0.0

    def _call(self, request: pb.DetectRequest) -> CloudDetections:
        """One Detect call on the client (made first when there is none).

        Raises:
            _Cancelled: `cancel` was called before or during the call.
            RetryLater, NeverRetry: the call failed (`CloudClient.send_request`).
        """
        with self._client_lock:
            if self._cancelled.is_set():
                raise _Cancelled
            if self._client is None:
                self._client = self._make_client()
            client = self._client
            self._in_flight = True
        try:
            return client.send_request(request, timeout=self.timeout_s)
        except Exception:
            if self._cancelled.is_set():  # CANCELLED ("Channel closed!"), or a closed channel
                raise _Cancelled from None
            raise
        finally:
            self._in_flight = False

    def _after_answer(self, item: OutboxItem, answer: CloudDetections) -> None:
        """`on_answer` after a committed answer; a failure is logged (WARNING
        `answer_hook_failed`, one line, the traceback at DEBUG), never fatal: the result is
        stored whatever the hook does."""
        if self.on_answer is None:
            return
        try:
            self.on_answer(item, answer)
        except Exception as exc:
            log.warning(
                "the after-answer step failed for image %d (%s): %s; its result is stored",
                item.image_id, item.path, f"{type(exc).__name__}: {exc}",
                extra={"fields": {"event": "answer_hook_failed", "image_id": item.image_id,
                                  "path": item.path, "error": f"{type(exc).__name__}: {exc}"}},
            )  # fmt: skip
            log.debug("after-answer step traceback", exc_info=True)

    def _resumed(self) -> None:
        """After the cloud answered a call (its outcome committed): when calls had failed
        before it (`send_retry`: the cloud down, busy, refusing us), INFO `send_resumed` with
        how many, since when, and how many requests still wait; the outage's `send_retry`
        lines then have their end in the log."""
        if not self._failed_sends:
            return
        failed, since = self._failed_sends, self._failing_since
        self._failed_sends, self._failing_since = 0, None
        log.info(
            "delivering again",
            extra={"fields": {"event": "send_resumed", "failures": failed,
                              "failing_for_s": round(time.monotonic() - since, 1),
                              "outbox_depth": self.store.outbox_stats().depth}},
        )  # fmt: skip

    def _dead_letter(self, item: OutboxItem, reason: str, code: str) -> None:
        self._reclaim_due = True
        if self.store.dead_letter(item.image_id, reason):
            self.dead_lettered += 1
            log.error(
                "dead letter",
                extra={"fields": {"event": "dead_letter", "image_id": item.image_id,
                                  "path": item.path, "code": code, "reason": reason}},
            )  # fmt: skip
            if self.metrics is not None:
                self.metrics.dead_letter(code)

    def _hold_export(self, item: OutboxItem, exc: NeverRetry, sent: float) -> float:
        """The cloud refused the model of `item` (its call made at perf_counter `sent`): hold
        every request of that export for the backoff cap, and go on with the others (no pause).
        Released since the call was made (`release_export`: the cloud serves it now), the
        refusal may be older than that: nothing is held, `item` is tried again after one
        backoff step."""
        self._count_bytes(len(item.payload))  # it reached the server
        self._unreached = 0
        with self._hold_lock:
            if self._released.get(item.fingerprint, float("-inf")) >= sent:
                delay, held = self.backoff.delay(1, self._rng), 0
                self.store.retry_later(item.image_id, time.time() + delay, str(exc))
            else:
                delay = self.backoff.max_s
                until = time.time() + delay
                self._held[item.fingerprint] = until
                self.store.retry_later(item.image_id, until, str(exc))
                held = self.store.hold_export(item.fingerprint, until, str(exc))
        if self.metrics is not None:
            self.metrics.send_failed(exc.code.name)
        self._refusals[item.fingerprint] = f"{exc.code.name}: {exc.message}"
        event, line = OPERATOR_PROBLEMS[exc.code]
        fields = {"event": event, "code": exc.code.name, "fingerprint": item.fingerprint,
                  "held": held, "retry_in_s": round(delay, 3)}  # fmt: skip
        hint = self._refusal_hint(item.fingerprint)
        if hint is None:
            log.error(line, exc, extra={"fields": fields})
        else:  # (the cloud's words say to deploy one export on both sides: done already)
            fields["fix"] = hint
            log.error(f"{line % (exc,)}. {hint}", extra={"fields": fields})
        return 0.0

    @property
    def refused_by_cloud(self) -> str | None:
        """The refusals a person must act on that still stand ("CODE: message"; several
        joined by "; "): this edge's token, an export the cloud does not serve while the
        outbox still holds its requests (another export's answer does not lift it; `edge
        abandon` does); None when there is none."""
        waiting = self.store.outbox_fingerprints()
        standing = [message for key, message in self._refusals.items() if not key or key in waiting]
        return "; ".join(dict.fromkeys(standing)) or None

    def _refusal_hint(self, fingerprint: str) -> str | None:
        """`refusal_hint` for a refusal of `fingerprint`'s model on this sender's client; None
        without one, or when it fails (the refusal is logged all the same)."""
        with self._client_lock:
            client = self._client
        if self.refusal_hint is None or client is None:
            return None
        try:
            return self.refusal_hint(fingerprint, client)
        except Exception:
            log.debug("the refusal's hint failed", exc_info=True)
            return None

    def _transient(
        self, item: OutboxItem, exc: CloudError, sent_bytes: int, at_cap: bool = False
    ) -> float:
        self.failures += 1
        self._failed_sends += 1
        if self._failing_since is None:  # (not the wall clock: an NTP step is no outage)
            self._failing_since = time.monotonic()
        if exc.code is not grpc.StatusCode.UNAVAILABLE:
            self._count_bytes(sent_bytes)  # it probably reached the server
        delay = self.backoff.max_s if at_cap else self.backoff.delay(self.failures, self._rng)
        self.store.retry_later(item.image_id, time.time() + delay, str(exc))
        if self.metrics is not None:
            self.metrics.send_failed(exc.code.name)
        fields = {"event": "send_retry", "image_id": item.image_id, "code": exc.code.name,
                  "message": exc.message[:200], "failures": self.failures,
                  "retry_in_s": round(delay, 3)}  # fmt: skip
        if exc.likely_cause:  # a TLS handshake refused: UNAVAILABLE reads like a cloud down
            fields["likely_cause"] = exc.likely_cause
        log.warning("send failed, retrying", extra={"fields": fields})
        # a fresh channel connects at once on its first call; only for a cloud not reached
        # (a busy or slow one is reached: a new channel would pay a TLS handshake for nothing)
        if exc.code is grpc.StatusCode.UNAVAILABLE:
            self._unreached += 1
            if self._unreached >= REBUILD_AFTER_FAILURES:
                self._drop_client()
        else:
            self._unreached = 0
        return delay

    def _count_bytes(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.bytes_sent.inc(n)


def annotate_hook(
    save_dir: Path,
    pixel_bits: int = 16,
    log_every_s: float = ANNOTATE_LOG_EVERY_S,
    watch: Path | None = None,
) -> Callable[[OutboxItem, CloudDetections], None]:
    """on_answer that writes the defect image with its boxes drawn into `save_dir`
    (`pixel_bits`: the model's, so that 16-bit images show as the model saw them). A
    `save_dir` inside --watch `watch` that is, or lies under, a symbolic link there is not
    written through (`file_moves.write_in_folder`, relative to the folder opened right before
    each image: the camera's account could point it anywhere); that image fails as below.

    Each image is written whole or not at all. One that cannot be written
    (the disk full, the folder gone or read-only) is logged as a WARNING `annotate_failed`
    naming the folder and why, at most once per `log_every_s` seconds (the line counts the
    failures it stands for; a full disk fails every image); once an image is written again,
    INFO `annotate_resumed` says how many were not. The result itself is stored either way."""
    from splitdet.edge.annotate import annotated_bytes
    from splitdet.edge.file_moves import write_in_folder
    from splitdet.edge.preprocess import load_image

    failures = _AnnotateFailures(Path(save_dir), log_every_s)

    def hook(item: OutboxItem, answer: CloudDetections) -> None:
        # each stored path as written, then unescaped (a name that was not UTF-8: path_text);
        # only a file holding the image's own bytes: the camera's next shot under its name
        # would get this one's boxes
        paths = (q for p in (item.stored_path, item.path) if p for q in (p, file_path(p)))
        source = next((Path(p) for p in paths if _holds(Path(p), item.content_hash)), None)
        if source is None:
            log.warning(
                "no file left to annotate for image %d (%s)", item.image_id, item.path,
                extra={"fields": {"event": "annotate_skipped", "image_id": item.image_id,
                                  "path": item.path}},
            )  # fmt: skip
            return
        target = Path(save_dir) / annotated_name(item.image_id, item.path)
        image = load_image(source, pixel_bits)
        try:
            data = annotated_bytes(image, answer.boxes.tolist(), answer.scores.tolist(),
                                   list(answer.class_names), target, p_defect=item.p_defect,
                                   labels=answer.labels.tolist())  # fmt: skip
            write_in_folder(target, data, watch, create=True)
        except OSError as exc:
            failures.failed(item, target, exc)
        else:
            failures.succeeded()

    return hook


def annotated_name(image_id: int, path: str) -> str:
    """The name of the annotated copy of image `image_id`, whose row's path is `path` (as
    stored: `file_identity.path_text`): ID_STEM.jpg by the rule the archive and quarantine
    name their copies by (`file_moves.stored_name`): a long name cut short to fit (it failed
    with "File name too long" and no copy), and a name that was not UTF-8 with U+FFFD for each
    such byte, as there (its stored ``\\xNN`` escapes were kept as text)."""
    from splitdet.edge.file_moves import stored_name

    name = Path(path).name
    real = Path(file_path(name)).name  # (the file's own name, its \xNN bytes as they were)
    if path_text(real) == name:  # (else a UTF-8 name that holds "\x41" itself: kept)
        name = real
    return stored_name(image_id, f"{Path(name).stem}.jpg")


def _holds(path: Path, content_hash: str | None) -> bool:
    """Whether `path` is a file holding the bytes of SHA-256 `content_hash` (None: any)."""
    from splitdet.shared.manifest import file_sha256

    try:
        return path.is_file() and (content_hash is None or file_sha256(path) == content_hash)
    except OSError:
        return False


class _AnnotateFailures:
    """The `annotate_failed` lines of one `annotate_hook`: at most one per `every_s` seconds,
    each counting the failures since the last line; `annotate_resumed` once one succeeds."""

    def __init__(self, folder: Path, every_s: float) -> None:
        self.folder = folder
        self.every_s = every_s
        self._next_line = float("-inf")  # monotonic s before which failures are only counted
        self._unlogged = 0  # failures since the last line
        self._failed = 0  # failures since the last success

    def failed(self, item: OutboxItem, target: Path, exc: OSError) -> None:
        """Count one image not written; log it unless a line was logged within `every_s`."""
        self._failed += 1
        self._unlogged += 1
        now = time.monotonic()
        if now < self._next_line:
            return
        self._next_line = now + self.every_s
        reason = write_problem(target, exc)
        also = f" ({self._unlogged - 1} more since the last line)" if self._unlogged > 1 else ""
        log.warning(
            f"cannot save annotated images in --save-annotated {self.folder} ({reason}): image "
            f"{item.image_id} ({item.path}) has none{also}; its result is stored as usual. "
            f"Logged at most once per {self.every_s:g} s while it lasts",
            extra={"fields": {"event": "annotate_failed", "folder": str(self.folder),
                              "reason": reason, "image_id": item.image_id,
                              "path": item.path, "failures": self._unlogged}},
        )  # fmt: skip
        self._unlogged = 0

    def succeeded(self) -> None:
        """One image written: after failures, log (INFO) that they have ended."""
        if not self._failed:
            return
        log.info(
            f"annotated images are saved in --save-annotated {self.folder} again; "
            f"{self._failed} were not",
            extra={"fields": {"event": "annotate_resumed", "folder": str(self.folder),
                              "failures": self._failed}},
        )  # fmt: skip
        self._failed = self._unlogged = 0
        self._next_line = float("-inf")
