"""The gRPC face of the detection core: protobuf -> domain -> core -> protobuf, nothing more.

Exceptions become status codes in one place (`_rpc`, table `STATUS_FOR_ERROR`):

    InvalidRequest: bad tensors, shapes, codecs, sizes, ids; bad protobuf   INVALID_ARGUMENT
    FingerprintMismatch: a model this server does not serve                 FAILED_PRECONDITION
    Overloaded: beyond --max-concurrent + --max-queued Detect calls, or a   RESOURCE_EXHAUSTED
        call that waited --queue-wait for a slot
    TooLarge: a request over --max-message-mib                              RESOURCE_EXHAUSTED
    DeadlinePassed: the caller's deadline passed during the work            DEADLINE_EXCEEDED
    Cancelled: the caller went away                                         CANCELLED
    ShuttingDown: a new or waiting call after SIGTERM                       UNAVAILABLE
    anything else: a bug (logged with its traceback)                        INTERNAL

A missing or wrong bearer token is refused before the servicer by `TokenInterceptor`
(UNAUTHENTICATED). Requests arrive as raw bytes and are parsed here, so a malformed protobuf is an
INVALID_ARGUMENT naming the problem rather than gRPC's generic INTERNAL. Before a DetectRequest is
parsed, `check_request_wire` bounds its repeated fields: the parser and the conversion to Python
turn a few wire bytes into many (an empty tensor: 2 bytes on the wire, hundreds in memory).
Status messages are cut to MAX_STATUS_CHARS: they travel in a trailer that clients bound (8 KiB).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import logging
import math
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from splitdet.cloud.core import (
    Cancelled,
    DeadlinePassed,
    DetectCall,
    DetectionCore,
    DetectResult,
    FingerprintMismatch,
    InvalidRequest,
)
from splitdet.cloud.idempotency import answers_scope, scope_of_token
from splitdet.cloud.inflight import InFlight
from splitdet.cloud.log_limit import LineLimiter, repeats_note
from splitdet.cloud.slots import FairSlots, Outcome
from splitdet.shared.edge_name import EDGE_NAME_KEY, is_edge_name
from splitdet.shared.messages import image_from_proto, tensors_from_proto
from splitdet.shared.wire import detection_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detection"].full_name  # "splitdet.v1.Detection"
#: Methods reachable without a bearer token (load balancers and orchestrators probe health).
TOKEN_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
#: Latency histogram buckets, seconds.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Longest status message sent (percent-encoded, 500 characters stay below clients' 8 KiB bound).
MAX_STATUS_CHARS = 500
#: Seconds between two looks at --token-file for a change (AcceptedTokens).
TOKEN_CHECK_S = 2.0
#: The label of the calls whose edge name has none of its own.
OTHER_EDGE = "other"
#: Distinct edge names the per-edge metrics label; later ones are counted as "other".
MAX_EDGE_LABELS = 256
#: Edge names remembered with the exports they used, for the warning of a reload that drops an
#: export still in use (`ServerMetrics.edges_using`): a name with no label of its own (a camera
#: that has only checked its export so far, or one past MAX_EDGE_LABELS) is named there too;
#: the least recently heard beyond this many are forgotten.
MAX_EDGE_NAMES_USING = 4 * MAX_EDGE_LABELS
#: Seconds an edge name keeps its per-edge series and its place among MAX_EDGE_LABELS after its
#: last call (--forget-edges-after): retired or renamed cameras leave, new ones get a label.
FORGET_EDGES_S = 7 * 24 * 3600.0
#: Seconds between two looks for edges to forget (also done at once when the labels are full).
FORGET_SWEEP_S = 60.0
#: Seconds of its deadline a call may have left, as the server sees it, when its caller gives
#: up, and still count as ended by its deadline (DEADLINE_EXCEEDED, not CANCELLED): the
#: caller's timer fires first, by the call's transit and dispatch (`deadline_over`).
DEADLINE_SLACK_S = 0.5
#: Bounds on a DetectRequest's wire form, checked before it is parsed. Generous: a valid request
#: has 5 tensors of rank 3 with one scale and zero point per channel (256) and ~40 fields; beyond
#: these bounds only a hostile or broken sender goes, and the codec names smaller excesses.
MAX_WIRE_FIELDS = 1 << 14  # fields of the request and its tensors together, packed or not
MAX_TENSORS = 16
MAX_SHAPE_VALUES = 16  # per tensor
MAX_PARAM_VALUES = 1 << 14  # per tensor, each of scale and zero_point


class Overloaded(Exception):
    """The server already runs its maximum of concurrent Detect calls."""


class ShuttingDown(Exception):
    """The server is draining before it stops; another replica (or a later try) must answer."""


class TooLarge(Exception):
    """A request over the server's message bound; it will not fit later either. Its message
    says "larger than max", which edges read as final (`edge.client.classify`), as they do
    gRPC's own refusal of a message over the bound gRPC enforces (`server.grpc_options`)."""


#: Exception type -> status code; the first match wins, anything unlisted is INTERNAL.
STATUS_FOR_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (FingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlinePassed, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
)


#: The outcomes of a reload, as `splitdet_cloud_reloads_total` counts them.
RELOAD_OUTCOMES = ("ok", "problems", "refused")
#: The methods of the Detection service (counted by method in ServerMetrics).
METHODS = ("Detect", "GetManifest")
#: Every status code a call of METHODS can end with but OK: STATUS_FOR_ERROR's, INTERNAL (a
#: bug) and UNAUTHENTICATED (TokenInterceptor).
FAILURE_CODES = (
    *dict.fromkeys(code for _, code in STATUS_FOR_ERROR),
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAUTHENTICATED,
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call reports for `exc`."""
    for error_type, code in STATUS_FOR_ERROR:
        if isinstance(exc, error_type):
            return code, _clip(str(exc))
    return grpc.StatusCode.INTERNAL, _clip(f"internal error: {type(exc).__name__}: {exc}")


def _clip(message: str) -> str:
    if len(message) <= MAX_STATUS_CHARS:
        return message
    return f"{message[: MAX_STATUS_CHARS - 30]}… ({len(message)} characters, cut)"


class ServerMetrics:
    """The server's Prometheus metrics, in their own registry (one per server).

    The series of requests and failures by method and code exist at 0 from the start (every
    method with every code it can end with): one that first appeared at its first call (at 1)
    would be one Prometheus' rate() and increase() see no increase in, so an alert such as
    `rate(splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED"}[5m]) > 0` would miss the
    first refusals after each start. The per-edge series cannot be known in advance."""

    def __init__(
        self,
        fingerprints: Sequence[str] = (),
        forget_edges_s: float = FORGET_EDGES_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`fingerprints`: the served models, default first (the `splitdet_cloud_model` info);
        `forget_edges_s`: seconds after its last call an edge's series go (`edge_of`);
        `clock`: unix s now (tests step it)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "splitdet_cloud_requests",
            "RPCs finished, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.failures = Counter(
            "splitdet_cloud_failures",
            "RPCs that did not finish OK, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        for method in METHODS:
            self.requests.labels(method, grpc.StatusCode.OK.name)
            for code in FAILURE_CODES:
                self.requests.labels(method, code.name)
                self.failures.labels(method, code.name)
        self.stage_seconds = Histogram(
            "splitdet_cloud_stage_seconds",
            "Server-side wall-clock seconds per Detect stage (decode, rpn, roi, total).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "splitdet_cloud_in_flight", "Detect calls running now.", registry=self.registry
        )
        self.queued = Gauge(
            "splitdet_cloud_queued",
            "Detect calls waiting for a slot now (--max-queued).",
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "splitdet_cloud_cache_hits",
            "Detect calls answered from the idempotency store.",
            registry=self.registry,
        )
        self.heads_runs = Counter(
            "splitdet_cloud_heads_runs",
            "Detect calls that ran the RPN and ROI heads.",
            registry=self.registry,
        )
        self.answers_store_errors = Counter(
            "splitdet_cloud_answers_store_errors",
            "Answers the idempotency store (--answers-db) could not keep (its disk full, its "
            "file read-only): answered without it, a repeat is computed again.",
            registry=self.registry,
        )
        self.model = Gauge(
            "splitdet_cloud_model",
            'Served models: 1 per fingerprint; default="true" on the first --model.',
            ["fingerprint", "default"],
            registry=self.registry,
        )
        self.model_answers = Counter(
            "splitdet_cloud_model_answers",
            "Detect calls answered, by the model's fingerprint: when an old export's count "
            "stops rising during a rolling upgrade, its edges have all moved on.",
            ["fingerprint"],
            registry=self.registry,
        )
        self._model_labels: set[tuple[str, str]] = set()
        self.served(fingerprints)
        self.edge_answers = Counter(
            "splitdet_cloud_edge_answers",
            "Detect calls answered, by the calling edge's name and the model's fingerprint: "
            "which cameras still send for an old export.",
            ["edge", "fingerprint"],
            registry=self.registry,
        )
        self.edge_refusals = Counter(
            "splitdet_cloud_edge_refusals",
            "Calls refused or failed, by the calling edge's name and status code.",
            ["edge", "code"],
            registry=self.registry,
        )
        self.edge_last_seen = Gauge(
            "splitdet_cloud_edge_last_seen_timestamp_seconds",
            "Unix time of each edge's last call (Detect or GetManifest): a camera gone quiet.",
            ["edge"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "splitdet_cloud_reloads",
            'Reloads (SIGHUP) by outcome: "ok"; "problems" (served what it could, an export '
            'skipped: see the reload_problem log lines); "refused" (nothing left to serve, '
            "nothing changed).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.rpc_threads_busy = Gauge(
            "splitdet_cloud_rpc_threads_busy",
            "Calls holding a handler thread now, by thread pool (detect, manifest, server: "
            "health checks and token refusals), those still receiving their request included.",
            ["pool"],
            registry=self.registry,
        )
        self.rpc_threads_exhausted = Counter(
            "splitdet_cloud_rpc_threads_exhausted",
            "Calls refused at once with RESOURCE_EXHAUSTED because every thread of their pool "
            "was held (see CallGuard): an overload, or callers that never send their request.",
            ["pool"],
            registry=self.registry,
        )
        self._edges: set[str] = set()
        self._edges_lock = threading.Lock()
        self._edge_models: dict[str, dict[str, float]] = {}  # edge -> {fingerprint: unix s}
        # edge name (not label) -> {fingerprint: unix s}, least recently used first
        self._names_using: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.forget_edges_s = forget_edges_s
        self._clock = clock
        self._edge_seen: dict[str, float] = {}  # edge -> unix s of its last call
        self._edge_codes: dict[str, set[str]] = {}  # edge -> status codes it was refused with
        self._next_sweep = clock() + FORGET_SWEEP_S

    def served(self, fingerprints: Sequence[str]) -> None:
        """`splitdet_cloud_model` lists exactly these models, the first the default; each one's
        answer count is exported (at 0 for a new one)."""
        wanted = {(fp, str(index == 0).lower()) for index, fp in enumerate(fingerprints)}
        for labels in wanted:  # set before any removal: a scrape never finds no model
            self.model.labels(*labels).set(1)
            self.model_answers.labels(labels[0])
        for labels in self._model_labels - wanted:
            self.model.remove(*labels)
        self._model_labels = wanted

    def used(self, edge: str, fingerprint: str, name: str | None = None) -> None:
        """The edge labelled `edge`, named `name` (its label when None), asked for, or was
        answered by, the model `fingerprint` now."""
        now = time.time()
        with self._edges_lock:
            self._edge_models.setdefault(edge, {})[fingerprint] = now
            name = name or edge
            self._names_using.setdefault(name, {})[fingerprint] = now
            self._names_using.move_to_end(name)
            while len(self._names_using) > MAX_EDGE_NAMES_USING:
                self._names_using.popitem(last=False)

    def edges_using(self, fingerprint: str) -> dict[str, float]:
        """The edges that asked for or were answered by `fingerprint` since this server
        started (at most MAX_EDGE_NAMES_USING names, the most recent): {edge name: unix time
        of the last such call}."""
        with self._edges_lock:
            return {
                name: models[fingerprint]
                for name, models in self._names_using.items()
                if fingerprint in models
            }

    def forget(self, fingerprints: Sequence[str]) -> None:
        """Drop what `used` recorded of models no longer served, and their answer series
        (overall and per edge): the metrics stay bounded however many exports come and go."""
        with self._edges_lock:
            for edge, models in self._edge_models.items():
                for fingerprint in fingerprints:
                    if models.pop(fingerprint, None) is not None:
                        with contextlib.suppress(KeyError):  # (asked, never answered)
                            self.edge_answers.remove(edge, fingerprint)
            for models in self._names_using.values():
                for fingerprint in fingerprints:
                    models.pop(fingerprint, None)
        for fingerprint in fingerprints:
            with contextlib.suppress(KeyError):
                self.model_answers.remove(fingerprint)

    def edge_of(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, claim: bool = False
    ) -> str:
        """The calling edge's name as a metric label, from a call's metadata ((key, value)
        pairs): its `splitdet-edge` entry, "unnamed" without one, "invalid" for a name that is
        not one (shared/edge_name.py), and "other" for a name without a label of its own.

        Only `claim` gives a name a label, while fewer than MAX_EDGE_LABELS are held: a Detect
        for a served model with a valid id (answered, or refused for load) or too large for
        --max-message-mib, or any call when tokens are required (it passed their check); cheap
        or malformed unauthenticated calls under made-up names cannot use up the labels and
        push real cameras into "other"."""
        name = claimed_edge(metadata)
        with self._edges_lock:
            now = self._clock()
            full = claim and name not in self._edges and len(self._edges) >= MAX_EDGE_LABELS
            if full or now >= self._next_sweep:
                self._forget_idle_edges(now)
            if name not in self._edges:
                if not claim or len(self._edges) >= MAX_EDGE_LABELS:
                    name = OTHER_EDGE  # (no place of its own: the names labelled stay 256)
                else:
                    self._edges.add(name)
            self._edge_seen[name] = now
        return name

    def _forget_idle_edges(self, now: float) -> None:
        """Remove every per-edge series of the edges not heard from for `forget_edges_s`, and
        their places among MAX_EDGE_LABELS (under `_edges_lock`). Logged once per sweep."""
        self._next_sweep = now + FORGET_SWEEP_S
        idle = sorted(edge for edge, seen in self._edge_seen.items()
                      if now - seen >= self.forget_edges_s)  # fmt: skip
        for edge in idle:
            with contextlib.suppress(KeyError):  # (a series never made)
                self.edge_last_seen.remove(edge)
            for fingerprint in self._edge_models.pop(edge, {}):
                with contextlib.suppress(KeyError):
                    self.edge_answers.remove(edge, fingerprint)
            self._names_using.pop(edge, None)
            for code in self._edge_codes.pop(edge, set()):
                with contextlib.suppress(KeyError):
                    self.edge_refusals.remove(edge, code)
            self._edges.discard(edge)
            del self._edge_seen[edge]
        if idle:
            log.info(
                "forgot %d edge(s) silent for %g h or more: their per-edge series are gone",
                len(idle), self.forget_edges_s / 3600,
                extra={"fields": {"event": "edges_forgotten", "edges": idle[:20],
                                  "count": len(idle)}},
            )  # fmt: skip

    def refused(self, edge: str, code: grpc.StatusCode) -> None:
        """A call of `edge` refused or failed with `code`: counted per edge."""
        self.edge_refusals.labels(edge, code.name).inc()
        with self._edges_lock:
            self._edge_codes.setdefault(edge, set()).add(code.name)

    def finished(self, method: str, code: grpc.StatusCode) -> None:
        """Count a finished call of `method` by its status code (and as a failure unless OK)."""
        self.requests.labels(method, code.name).inc()
        if code is not grpc.StatusCode.OK:
            self.failures.labels(method, code.name).inc()

    def observe(self, result: DetectResult, edge: str, name: str | None = None) -> None:
        """An answer given to `edge`: counted, and its heads' run if it had one. By model only
        while the model is served: an answer of an export a reload dropped meanwhile must not
        bring back the series `forget` removed."""
        if any(result.fingerprint == fingerprint for fingerprint, _ in self._model_labels):
            self.model_answers.labels(result.fingerprint).inc()
            self.edge_answers.labels(edge, result.fingerprint).inc()
            self.used(edge, result.fingerprint, name)
        if result.cached:
            self.cache_hits.inc()
            return
        self.observe_heads(result)

    def observe_heads(self, result: DetectResult) -> None:
        """A run of the heads (its stage times), answered or not."""
        self.heads_runs.inc()
        timings = result.timings
        for stage, seconds in (
            ("decode", timings.decode_s),
            ("rpn", timings.rpn_s),
            ("roi", timings.roi_s),
            ("total", timings.total_s),
        ):
            self.stage_seconds.labels(stage).observe(seconds)


class CallEdge:
    """The edge label a call is counted under (`ServerMetrics.edge_of`), which a Detect
    changes once it claims a label (`DetectionServicer._answered`)."""

    __slots__ = ("label",)

    def __init__(self, label: str) -> None:
        """`label`: what the call counts as so far."""
        self.label = label


def _rpc(method: Callable) -> Callable:
    """Run one RPC: count it, and turn any exception into a status (the one place)."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: DetectionServicer, request: bytes, context: grpc.ServicerContext) -> bytes:
        code = grpc.StatusCode.OK
        # any call that passed the token check claims a label for its name; without tokens a
        # call counts under its name's label if it has one, else as "other", and a Detect
        # claims one only once it is checked (a served model, a valid id: a camera whose Detect
        # is answered or refused for load shows under its own name) or refused as too large
        # (no cheap call: over --max-message-mib), so that made-up names in cheap or malformed
        # unauthenticated calls cannot use up the labels
        edge = CallEdge(
            self.metrics.edge_of(context.invocation_metadata(), claim=self.scope_by_token)
        )
        if edge.label != OTHER_EDGE:  # ("other": once the call ends as it, not claiming)
            self.metrics.edge_last_seen.labels(edge.label).set_to_current_time()
        # the log names the name claimed, also when its metrics count as "other"
        claimed = claimed_edge(context.invocation_metadata())
        peer = context.peer()  # now: once the caller has gone it reads ""
        try:
            if self.max_message_bytes is not None and len(request) > self.max_message_bytes:
                if name == "Detect":  # (its edge must show; its many bytes make it no cheap call)
                    edge.label = self._answered(context, edge.label)
                raise TooLarge(
                    f"request of {len(request)} bytes is larger than max message size "
                    f"{self.max_message_bytes} (the cloud's --max-message-mib "
                    f"{self.max_message_bytes / (1 << 20):g}): raise it on the cloud, or send "
                    "fewer bytes (--codec int8, a smaller input size)"
                )
            return method(self, request, context, edge)
        except Exception as exc:
            code, message = status_for(exc)
            self.metrics.refused(edge.label, code)
            # which edge: an operator of many cameras must find it; one line per kind (event,
            # edge label, code) per minute at most, counting those left out and naming the
            # edges they were about (many share "other") (`refusal_lines`)
            event = "failed" if code is grpc.StatusCode.INTERNAL else "refused"
            admitted = self.refusal_lines.admit_from((event, edge.label, code.name), claimed)
            if admitted is not None:
                _log_refusal(name, peer, claimed, code, message, event, admitted,
                             self.refusal_lines.every_s)  # fmt: skip
            context.abort(code, message)  # raises
        finally:
            self.metrics.finished(name, code)
            if edge.label == OTHER_EDGE:  # (a new camera's first Detect claims its own)
                self.metrics.edge_last_seen.labels(OTHER_EDGE).set_to_current_time()

    return wrapper


def _log_refusal(
    method: str,
    peer: str,
    edge: str,
    code: grpc.StatusCode,
    message: str,
    event: str,
    admitted: tuple[int, list[str]],
    every_s: float,
    claims: bool = False,
) -> None:
    """The log line of a call refused (INFO) or failed (ERROR, with the traceback being
    handled); `admitted`: how many lines of its kind were left out since the last one, and the
    edges they named (`LineLimiter.admit_from`); `claims`: `edge` is only what the call
    claims (refused before its token was checked)."""
    fields = {"event": event, "method": method, "peer": peer, "edge": edge,
              "code": code.name, "message": message}  # fmt: skip
    repeats, names = admitted
    if repeats:
        fields["repeats"] = repeats
        fields["repeats_from"] = names
    note = repeats_note(repeats, every_s, names)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s from %s (edge %s) failed%s", method, peer, edge, note,
                      extra={"fields": fields})  # fmt: skip
    else:
        log.info("%s from %s (%s %s) refused (%s): %s%s", method, peer,
                 "claims edge" if claims else "edge", edge, code.name, message, note,
                 extra={"fields": fields})  # fmt: skip


# ------------------------------------------------------------------------------- translation


def call_from_proto(request: pb.DetectRequest) -> DetectCall:
    """A DetectRequest as the core's DetectCall (no validation: the core does that)."""
    return DetectCall(
        request_id=request.request_id,
        fingerprint=request.model_fingerprint,
        image=image_from_proto(request.image),
        tensors=tensors_from_proto(request),
    )


def call_from_bytes(raw: bytes) -> DetectCall:
    """A serialized DetectRequest as the core's DetectCall: wire bounds checked, then parsed.

    Raises:
        InvalidRequest: beyond the wire bounds (`check_request_wire`) or not a DetectRequest.
    """
    check_request_wire(raw)
    return call_from_proto(_parse(pb.DetectRequest, raw))


def result_to_proto(result: DetectResult) -> pb.DetectResponse:
    """The core's DetectResult as a DetectResponse."""
    t = result.timings
    return pb.DetectResponse(
        request_id=result.request_id,
        model_fingerprint=result.fingerprint,
        boxes=[
            pb.Box(
                x1=d.box[0],
                y1=d.box[1],
                x2=d.box[2],
                y2=d.box[3],
                score=d.score,
                label=d.label,
                class_name=d.class_name,
            )
            for d in result.detections
        ],
        timings=pb.ServerTimings(
            decode_s=t.decode_s, rpn_s=t.rpn_s, roi_s=t.roi_s, total_s=t.total_s
        ),
        cached=result.cached,
    )


_M = TypeVar("_M", bound=Message)


def _parse(message_type: type[_M], raw: bytes) -> _M:
    try:
        return message_type.FromString(raw)
    except DecodeError as exc:
        raise InvalidRequest(
            f"request is not a valid {message_type.DESCRIPTOR.full_name} protobuf ({exc})"
        ) from None


# ------------------------------------------------------------------------- wire-level bounds
# Field numbers in proto/splitdet/v1/detection.proto.
_REQUEST_ID, _REQUEST_FINGERPRINT, _REQUEST_TENSORS = 1, 2, 4
_TENSOR_SHAPE, _TENSOR_SCALE, _TENSOR_ZERO_POINT = 2, 5, 6
#: Tensor field -> (its name, most values it may hold).
_TENSOR_BOUNDS = {
    _TENSOR_SHAPE: ("shape", MAX_SHAPE_VALUES),
    _TENSOR_SCALE: ("scale", MAX_PARAM_VALUES),
    _TENSOR_ZERO_POINT: ("zero_point", MAX_PARAM_VALUES),
}


def check_request_wire(raw: bytes) -> tuple[str, str]:
    """Refuse a serialized DetectRequest whose repeated fields are beyond the MAX_* bounds;
    return its (request_id, model_fingerprint), read on the way (the last occurrence wins,
    as in protobuf), so that a call can be checked before it is parsed.

    Walks the request's fields and those of its tensors without parsing or copying anything
    (other fields, `data` included, are skipped by their length), so that the parser never sees
    a million empty tensors or a shape of millions of dimensions.

    Raises:
        InvalidRequest: a bound is exceeded, the bytes are not protobuf wire format, or a key
            is not UTF-8 text.
    """
    budget = [MAX_WIRE_FIELDS]
    tensors = 0
    keys = {_REQUEST_ID: b"", _REQUEST_FINGERPRINT: b""}
    for number, wire, start, end in _wire_fields(raw, 0, len(raw), budget):
        if number in keys and wire == 2:
            keys[number] = raw[start:end]
        if number != _REQUEST_TENSORS or wire != 2:
            continue
        tensors += 1
        if tensors > MAX_TENSORS:
            raise InvalidRequest(f"request has more than {MAX_TENSORS} tensors")
        counts = dict.fromkeys(_TENSOR_BOUNDS, 0)
        for field, kind, first, last in _wire_fields(raw, start, end, budget):
            if field == _TENSOR_SHAPE and kind == 2:  # packed varints of 1..10 bytes each
                size = last - first
                if size > 10 * MAX_SHAPE_VALUES:
                    counts[field] += size  # too long for the bound whatever the values
                else:
                    counts[field] += sum(byte < 0x80 for byte in raw[first:last])  # value ends
            elif field in (_TENSOR_SCALE, _TENSOR_ZERO_POINT) and kind == 2:  # packed doubles
                counts[field] += (last - first) // 8
            elif field in counts:
                counts[field] += 1
        for field, (what, bound) in _TENSOR_BOUNDS.items():
            if counts[field] > bound:
                raise InvalidRequest(f"tensor {tensors - 1}: {what} has more than {bound} values")
    if budget[0] < 0:
        raise InvalidRequest(f"request has more than {MAX_WIRE_FIELDS} protobuf fields")
    try:
        return keys[_REQUEST_ID].decode("utf-8"), keys[_REQUEST_FINGERPRINT].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("request_id or model_fingerprint is not UTF-8 text") from None


def _wire_fields(
    raw: bytes, pos: int, end: int, budget: list[int]
) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in raw[pos:end].

    Fields inside (deprecated) groups are skipped. Every field spends one unit of `budget[0]`;
    the walk stops when it is spent (the caller refuses the request).
    """
    depth = 0
    while pos < end:
        budget[0] -= 1
        if budget[0] < 0:
            return
        key, pos = _varint(raw, pos, end)
        number, wire = key >> 3, key & 7
        start = pos
        if wire == 0:
            _, pos = _varint(raw, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            length, start = _varint(raw, pos, end)
            pos = start + length
        elif wire == 5:
            pos += 4
        elif wire == 3:
            depth += 1
            continue
        elif wire == 4 and depth > 0:
            depth -= 1
            continue
        else:
            raise _malformed(f"wire type {wire} at byte {start}")
        if number == 0 or pos > end:
            raise _malformed(f"field {number} at byte {start} is invalid or truncated")
        if depth == 0:
            yield number, wire, start, pos


def _varint(raw: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            break
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _malformed(f"truncated or overlong varint before byte {pos}")


def _malformed(problem: str) -> InvalidRequest:
    return InvalidRequest(
        f"request is not a valid {pb.DetectRequest.DESCRIPTOR.full_name} ({problem})"
    )


# --------------------------------------------------------------------------------- servicer


class DetectionServicer:
    """splitdet.v1.Detection over a DetectionCore.

    Args:
        core: the detection core.
        metrics: where calls are counted and timed.
        max_concurrent: Detect calls allowed at once.
        max_queued: calls beyond those that wait, in arrival order, for one to finish (at
            most their deadline or ``max_queue_wait_s``); more are refused with
            RESOURCE_EXHAUSTED, as are those whose wait ends.
        max_queue_wait_s: the longest a call waits for a slot, seconds.
        max_message_bytes: requests over this many bytes are refused (RESOURCE_EXHAUSTED,
            counted and logged); None = only gRPC's own bound.
        debug_delay_s: TEST ONLY: sleep this long inside each Detect call (holding its slot)
            before running the core, to make a call slow on purpose.
        scope_by_token: tokens are required (a TokenInterceptor checks them): each token's
            callers get their own request ids (`caller_scope`); False: one shared scope.
    """

    def __init__(
        self,
        core: DetectionCore,
        metrics: ServerMetrics,
        max_concurrent: int,
        debug_delay_s: float = 0.0,
        max_queued: int = 0,
        max_queue_wait_s: float = 30.0,
        max_message_bytes: int | None = None,
        scope_by_token: bool = False,
    ) -> None:
        self.core = core
        self.scope_by_token = scope_by_token
        self.max_message_bytes = max_message_bytes
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_queue_wait_s = max_queue_wait_s
        self.debug_delay_s = debug_delay_s
        self._slots = FairSlots(max_concurrent, max_queued)
        self._inflight = InFlight()  # identical calls answered once
        metrics.queued.set_function(lambda: self._slots.waiting)
        self._draining = threading.Event()
        self._active, self._active_lock = 0, threading.Lock()  # Detect calls being handled
        self._manifests: dict[str, bytes] = {}
        #: which refused calls are logged (at most one line per event, edge label and code
        #: per minute; the counters count each)
        self.refusal_lines = LineLimiter()
        self.refresh()

    def refresh(self) -> None:
        """Answer GetManifest for the models the core serves now (after a reload)."""
        self._manifests = {fp: self._manifest_answer(fp) for fp in self.core.fingerprints}

    def _manifest_answer(self, fingerprint: str) -> bytes:
        """GetManifest's serialized answer for a served model."""
        return pb.ManifestResponse(
            model_fingerprint=fingerprint,
            manifest_json=self.core.manifest_json(fingerprint),
            served_fingerprints=self.core.fingerprints,
        ).SerializeToString()

    def drain(self) -> None:
        """Refuse every later Detect call with UNAVAILABLE (calls already running finish)."""
        self._draining.set()

    def running(self) -> int:
        """Detect calls being handled now: running the heads, waiting for an identical call's
        answer or for a slot, or reading a stored answer."""
        with self._active_lock:
            return self._active

    def caller_scope(self, context: grpc.ServicerContext) -> str:
        """The answers scope of a call (idempotency.answers_scope): with tokens required, a
        digest of the token that authenticated it, so that request ids of edges holding
        different tokens never meet (one cannot poison the id another will send); without,
        the one shared scope ("")."""
        if not self.scope_by_token:
            return ""
        supplied = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                supplied = value
        return scope_of_token(supplied)

    @_rpc
    def Detect(self, raw: bytes, context: grpc.ServicerContext, edge: CallEdge) -> bytes:
        """A serialized DetectRequest from `edge` in, its serialized DetectResponse out; request
        ids (stored answers, identical calls joined) are the caller's own (`caller_scope`)."""
        scope = self.caller_scope(context)
        with self._active_lock:
            self._active += 1
        try:
            with answers_scope(scope):
                return self._detect(raw, context, edge, scope)
        finally:
            with self._active_lock:
                self._active -= 1

    def _detect(
        self, raw: bytes, context: grpc.ServicerContext, edge: CallEdge, scope: str
    ) -> bytes:
        """Detect within the caller's answers scope `scope`."""
        if self._draining.is_set():
            raise ShuttingDown("server is shutting down; send to another replica or retry later")
        # Checked before any wait: a malformed call, one for a model not served and the repeat
        # of an answered one (--answers-db) are answered without a slot. Parsed only once it
        # has one: a waiting call holds its request once, not twice.
        request_id, fingerprint = check_request_wire(raw)
        model = self.core.served_model(request_id, fingerprint)  # held: a reload ends no call
        repeat = self.core.is_repeat(model, request_id)
        # checked, for a served model: from here its edge name claims a label (a camera whose
        # calls are refused for load must show under its own name; malformed ones stay under
        # the label they had, or "other")
        edge.label = self._answered(context, edge.label)
        holding = False
        key = (scope, fingerprint, request_id)
        lead = answer = None

        def is_cancelled() -> bool:
            remaining = context.time_remaining()
            return not context.is_active() or (remaining is not None and remaining <= 0)

        def abandoned() -> bool:  # a call others wait for goes on for them without its caller
            return is_cancelled() and not (lead is not None and lead.followers)

        def take_slot() -> None:
            nonlocal holding
            if holding:
                return
            self._take_slot(context)
            holding = True
            self.metrics.in_flight.inc()
            self._debug_delay(abandoned)

        try:
            if not repeat:
                lead, follow = self._inflight.lead_or_follow(key, raw)
                if follow is not None:  # the same request is being answered: its answer
                    answered = InFlight.wait(follow, is_cancelled)
                    if answered is not None:  # (the heads did not run for this call)
                        result = replace(answered, cached=True)
                        self._observe_answer(result, context, edge.label)
                        return result_to_proto(result).SerializeToString()
                take_slot()  # (the identical call failed: this one is computed itself)
            call = call_from_proto(_parse(pb.DetectRequest, raw))
            # (a repeat whose stored answer went meanwhile, or that differs, takes a slot now)
            result = self.core.detect(call, abandoned, before_compute=take_slot, model=model)
            answer = result
            if is_cancelled():  # its caller left while it ran (on for a call waiting, or late)
                if not result.cached:  # (a stored answer ran no heads)
                    self.metrics.observe_heads(result)
                self._check_not_cut_by_shutdown(context)
                raise DeadlinePassed(
                    f"request {request_id!r}: the caller was gone when its answer was ready "
                    "(its deadline passed); a retry gets it from --answers-db, or waits for it"
                )
        except Cancelled as exc:
            self._check_not_cut_by_shutdown(context)
            # Still connected: its deadline passed here before its own timer fired, and it
            # would read CANCELLED as final; DEADLINE_EXCEEDED says "retry later". Gone with
            # its deadline (nearly) over: its own timer fired first (`deadline_over`).
            if context.is_active() or deadline_over(context):
                raise DeadlinePassed(str(exc)) from None
            raise
        finally:
            if holding:
                self.metrics.in_flight.dec()
                self._slots.release()
            self._inflight.finish(key, lead, answer)
        self._observe_answer(result, context, edge.label)
        return result_to_proto(result).SerializeToString()

    def _observe_answer(
        self, result: DetectResult, context: grpc.ServicerContext, edge: str
    ) -> None:
        """Count `result`, the answer of a Detect counted so far as `edge`, under the label
        its edge claims now (`_answered`), remembering the name that edge gave."""
        name = claimed_edge(context.invocation_metadata())
        self.metrics.observe(result, self._answered(context, edge), name)

    def _answered(self, context: grpc.ServicerContext, edge: str) -> str:
        """The edge label of a Detect checked (a served model, a valid id) or about to be
        answered, which claims a label for its name (`ServerMetrics.edge_of`): `edge`, what
        the call was counted as so far, unless it had none or a label was freed meanwhile."""
        claimed = self.metrics.edge_of(context.invocation_metadata(), claim=True)
        if claimed != edge:
            self.metrics.edge_last_seen.labels(claimed).set_to_current_time()
        return claimed

    def _check_not_cut_by_shutdown(self, context: grpc.ServicerContext) -> None:
        """Raise ShuttingDown for a call the server's own stop ended (--grace over) before its
        deadline: it is not the edge's timeout, and is counted and logged as not."""
        remaining = context.time_remaining()
        if self._draining.is_set() and (remaining is None or remaining > 0):
            raise ShuttingDown(
                "server stopped before the answer was ready (its --grace ended, or it was asked "
                "again to stop); send to another replica or retry later"
            )

    def _take_slot(self, context: grpc.ServicerContext) -> None:
        """Wait for a Detect slot (see `FairSlots`); raise the status that says why not."""
        remaining = context.time_remaining()
        wait_s = self.max_queue_wait_s
        if remaining is not None and remaining < wait_s:
            wait_s = remaining  # then it is the caller's deadline that ends the wait
        outcome = self._slots.acquire(
            wait_s, lambda: self._draining.is_set() or not context.is_active()
        )
        if outcome:
            return
        if self._draining.is_set():  # a queued call when SIGTERM came: go elsewhere now
            raise ShuttingDown("server is shutting down; send to another replica or retry later")
        if outcome is Outcome.GAVE_UP:
            if deadline_over(context):  # gRPC, or the caller, ends a call at its deadline
                raise DeadlinePassed(f"deadline passed after {wait_s:.1f} s waiting for a slot")
            raise Cancelled("caller went away while waiting for a Detect slot")
        if outcome is Outcome.TIMED_OUT and remaining is not None and remaining <= wait_s:
            raise DeadlinePassed(f"deadline passed after {wait_s:.1f} s waiting for a slot")
        waited = f"waited {wait_s:g} s" if outcome is Outcome.TIMED_OUT else "queue full"
        raise Overloaded(
            f"server busy ({waited}): {self.max_concurrent} Detect calls running and up to "
            f"{self.max_queued} waiting (--max-concurrent {self.max_concurrent}, "
            f"--max-queued {self.max_queued}); retry later"
        )

    @_rpc
    def GetManifest(self, raw: bytes, context: grpc.ServicerContext, edge: CallEdge) -> bytes:
        """A serialized GetManifestRequest in, the named (or default) model's serialized
        ManifestResponse out."""
        request = _parse(pb.GetManifestRequest, raw)
        served = self.core.models  # one snapshot: a reload may swap them meanwhile
        wanted = served.get(request.model_fingerprint or next(iter(served)))
        if wanted is None:
            wanted = self.core.model(request.model_fingerprint)  # raises, naming those served
        if request.model_fingerprint:  # an edge checking the export it runs is served
            name = claimed_edge(context.invocation_metadata())
            self.metrics.used(edge.label, wanted.fingerprint, name)
        answer = self._manifests.get(wanted.fingerprint)
        # (a model served since a reload that has not refreshed the answers yet)
        return answer if answer is not None else self._manifest_answer(wanted.fingerprint)

    def _debug_delay(self, is_cancelled: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.debug_delay_s
        while (left := deadline - time.monotonic()) > 0:
            if is_cancelled():
                raise Cancelled("caller went away during the debug delay")
            time.sleep(min(left, 0.05))

    def add_to_server(
        self,
        server: grpc.Server,
        detect_threads: futures.ThreadPoolExecutor | None = None,
        manifest_threads: futures.ThreadPoolExecutor | None = None,
    ) -> None:
        """Register the service; requests are parsed by the servicer, not by gRPC.

        `detect_threads`, `manifest_threads`: the pools Detect and GetManifest calls run in,
        apart from the server's own (health checks), so that calls holding a thread while
        their request arrives (or, for Detect, while they wait for a slot) cannot leave a
        health check, or the other method, without one.
        """

        def handler(
            behaviour: Callable, threads: futures.ThreadPoolExecutor | None = None
        ) -> grpc.RpcMethodHandler:
            def run(request: bytes, context: grpc.ServicerContext) -> bytes:
                return behaviour(request, context)

            if threads is not None:  # gRPC runs a handler whose behaviour names a pool there
                run.experimental_thread_pool = threads  # type: ignore[attr-defined]
            return grpc.unary_unary_rpc_method_handler(
                run, request_deserializer=None, response_serializer=None
            )

        methods = {
            "Detect": handler(self.Detect, detect_threads),
            "GetManifest": handler(self.GetManifest, manifest_threads),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, methods),)
        )


def deadline_over(context: grpc.ServicerContext) -> bool:
    """Whether a call's deadline has passed, or is within DEADLINE_SLACK_S of it: the caller's
    own timer starts before the server's (by the transit and dispatch of the call), so a
    caller whose deadline ends the call resets it while the server still sees a little time
    left; that is its deadline passing, not a caller going away."""
    left = context.time_remaining()
    return left is not None and left <= DEADLINE_SLACK_S


# ------------------------------------------------------------------------------ bearer token


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


#: The per-edge metrics' label for calls refused for their credentials (see TokenInterceptor).
UNAUTHENTICATED_EDGE = "unauthenticated"


def claimed_edge(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The edge name a call's metadata claims: the name, "unnamed", or "invalid"."""
    name = "unnamed"
    for key, value in metadata or ():
        if key == EDGE_NAME_KEY:
            name = value if isinstance(value, str) and is_edge_name(value) else "invalid"
    return name


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of a file, to notice that it changed; None when it cannot be read
    (gone, or replaced just now)."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_mtime_ns, found.st_size


class AcceptedTokens:
    """The bearer tokens the server accepts. Without a token file, the one token given. With
    a regular file, each token line of it (shared/cli.token_lines), read again by a watcher
    thread within TOKEN_CHECK_S of a change (a rotation without a restart: add the new token as
    a line, move the edges to it, remove the old line); calls only read the cached set, so a
    file that blocks or hangs never stalls the server. A line that is not a usable token is
    logged and skipped, the rest applied; a file left with no usable token, or gone, is logged
    and the tokens before it kept. A file that is not regular (a pipe) is not read again: the
    one token given is accepted.
    """

    def __init__(self, token: str | None = None, token_file: Path | None = None) -> None:
        self.token_file = None if token_file is None else Path(token_file)
        self._expected = tuple(f"Bearer {t}".encode() for t in ([token] if token else []))
        self._stamp: tuple[int, int] | None = None
        self._stop = threading.Event()
        if self.token_file is not None and self._regular():
            # stamped before reading: a change meanwhile is read again
            self._stamp = file_stamp(self.token_file)
            self._load(startup=True)
            threading.Thread(target=self._watch, name="splitdet-tokens", daemon=True).start()
        if not self._expected:
            raise ValueError("a bearer token is required")

    def _regular(self) -> bool:
        try:
            return stat.S_ISREG(self.token_file.stat().st_mode)
        except OSError:
            return False

    def _load(self, startup: bool = False) -> None:
        """Read the file's tokens into the accepted set (see the class docstring)."""
        from splitdet.shared.cli import CommandError, token_lines, token_problem

        try:
            lines = token_lines(self.token_file)
        except CommandError as exc:
            log.error("%s; keeping the tokens before it", exc)
            return
        tokens = []
        for number, line in enumerate(lines, 1):
            problem = token_problem(line)
            if problem:
                log.error("--token-file %s, token line %d: %s; skipped", self.token_file,
                          number, problem)  # fmt: skip
            else:
                tokens.append(line)
        if not tokens:
            log.error("--token-file %s holds no usable token; keeping the tokens before it",
                      self.token_file)  # fmt: skip
            return
        self._expected = tuple(f"Bearer {t}".encode() for t in tokens)
        if not startup:
            fields = {"event": "tokens_reloaded", "tokens": len(tokens)}
            log.info("--token-file changed: %d token(s) accepted", len(tokens),
                     extra={"fields": fields})  # fmt: skip

    def _watch(self) -> None:
        while not self._stop.wait(TOKEN_CHECK_S):
            stamp = file_stamp(self.token_file)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            if stamp is None:
                log.warning("--token-file %s is gone; keeping the tokens read before",
                            self.token_file)  # fmt: skip
            elif not self._regular():
                log.warning("--token-file %s is no longer a regular file; not read",
                            self.token_file)  # fmt: skip
            else:
                self._load()

    def close(self) -> None:
        """Stop watching the file."""
        self._stop.set()

    def accepts(self, supplied: str) -> bool:
        """Whether `supplied` (the authorization metadata) is one of the accepted values,
        compared in constant time against each."""
        given = supplied.encode()
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(given, expected)
        return matched


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without `authorization: Bearer <token>` of an accepted token
    (AcceptedTokens; constant-time comparison).

    Health checks are exempt (TOKEN_EXEMPT_PREFIXES): probes rarely carry credentials.
    """

    def __init__(self, tokens: AcceptedTokens | str, metrics: ServerMetrics) -> None:
        self._tokens = tokens if isinstance(tokens, AcceptedTokens) else AcceptedTokens(tokens)
        self._metrics = metrics
        #: which refusals are logged: at most one line per minute (the counter counts each)
        self.refusal_lines = LineLimiter()
        # the one per-edge series known in advance: at 0 from the start (see ServerMetrics)
        metrics.edge_refusals.labels(UNAUTHENTICATED_EDGE, "UNAUTHENTICATED")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The call's handler when its token is accepted (or it is exempt); else one that
        refuses it with UNAUTHENTICATED (None, UNIMPLEMENTED, for an unknown method)."""
        method = handler_call_details.method
        if method.startswith(TOKEN_EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        supplied = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                supplied = value if isinstance(value, str) else ""
        if self._tokens.accepts(supplied):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without a token
        name = method.rsplit("/", 1)[-1]
        self._metrics.finished(name, grpc.StatusCode.UNAUTHENTICATED)
        problem = "missing" if not supplied else "wrong"
        message = f"{problem} bearer token: send metadata 'authorization: Bearer <token>'"
        # Counted under one label, never as the edge it claims to be: without the token a
        # caller could otherwise use up the edge labels, or keep a dead camera "seen". The log
        # line names the claim, for the operator to find the edge with the wrong token.
        self._metrics.edge_refusals.labels(UNAUTHENTICATED_EDGE, "UNAUTHENTICATED").inc()
        edge = claimed_edge(handler_call_details.invocation_metadata)

        def deny(request: Iterator[bytes], context: grpc.ServicerContext) -> None:
            peer = context.peer()
            kind = ("refused", UNAUTHENTICATED_EDGE, "UNAUTHENTICATED")
            admitted = self.refusal_lines.admit_from(kind, edge)
            if admitted is not None:  # (the edges with a wrong token named, if a minute late)
                _log_refusal(name, peer, edge, grpc.StatusCode.UNAUTHENTICATED, message,
                             "refused", admitted, self.refusal_lines.every_s,
                             claims=True)  # fmt: skip
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # Taken as a request stream whatever the method: refused without waiting for (and
        # holding a thread through) a request body that a caller may never finish sending.
        return _HANDLER_FACTORIES[(True, handler.response_streaming)](deny)


# ------------------------------------------------------------------------------ thread budget

#: Seconds between two log lines of one pool's calls refused for want of a thread.
EXHAUSTED_LOG_S = 10.0


class CallGuard(grpc.ServerInterceptor):
    """At most as many calls per thread pool as it has threads; the rest refused at once.

    gRPC's sync server gives a call a pool thread as soon as its headers arrive, and a unary
    call holds it while its request arrives: a caller that never sends the request holds it
    until the connection ends, and a call finding every thread held waits, unanswered and
    unseen, in the pool's queue. Here each call is counted against the pool its handler runs
    in (by the handler's ``experimental_thread_pool``; the server's own pool otherwise) from
    its headers to its end, and a call beyond the pool's limit is refused at once with
    RESOURCE_EXHAUSTED (counted in `splitdet_cloud_rpc_threads_exhausted_total{pool}`, logged
    at most every EXHAUSTED_LOG_S per pool) by a small pool of its own that never waits for a
    request.
    Calls holding threads show in `splitdet_cloud_rpc_threads_busy{pool}`. Stalled calls
    themselves are ended by the server's connection age (`server.grpc_options`).

    To count a call to its end whatever becomes of it, a unary-request handler is run as a
    request-streaming one that reads the one request itself (gRPC would otherwise read it
    before any code of ours runs, and a call cancelled meanwhile would never be seen to end).

    Args:
        metrics: where refusals and busy threads are counted.
        pools: pool name -> (the pool, None for the server's own; calls it may hold at once).
        refusals: the pool that refuses calls beyond a limit (its calls end at once).
    """

    def __init__(
        self,
        metrics: ServerMetrics,
        pools: dict[str, tuple[futures.ThreadPoolExecutor | None, int]],
        refusals: futures.ThreadPoolExecutor,
    ) -> None:
        self._metrics = metrics
        self._names = {id(pool): name for name, (pool, _) in pools.items()}
        self._limits = {name: limit for name, (_, limit) in pools.items()}
        self._active = dict.fromkeys(pools, 0)
        self._logged = dict.fromkeys(pools, -math.inf)
        self._lock = threading.Lock()
        self._refusals = refusals
        for name in pools:
            metrics.rpc_threads_busy.labels(name).set_function(functools.partial(self.busy, name))
            metrics.rpc_threads_exhausted.labels(name)

    def busy(self, pool: str) -> int:
        """Calls holding a thread of `pool` now."""
        with self._lock:
            return self._active[pool]

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The call's handler, counted against its pool; or, the pool full, one that refuses
        it with RESOURCE_EXHAUSTED (None, UNIMPLEMENTED, for an unknown method)."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        behaviour = _behaviour(handler)
        pool = self._names.get(id(getattr(behaviour, "experimental_thread_pool", None)))
        # not guarded: a pool not given, and a non-blocking handler (health Watch), which
        # gives its thread back when it returns while its stream stays open for good
        if pool is None or getattr(behaviour, "experimental_non_blocking", False):
            return handler
        with self._lock:
            full = self._active[pool] >= self._limits[pool]
            if not full:
                self._active[pool] += 1
        if full:
            return self._refusal(handler_call_details, pool)
        return self._counted(handler, behaviour, handler_call_details.method, pool)

    def _release(self, pool: str) -> None:
        with self._lock:
            self._active[pool] -= 1

    def _counted(
        self, handler: grpc.RpcMethodHandler, behaviour: Callable, method: str, pool: str
    ) -> grpc.RpcMethodHandler:
        """`handler` as a request-streaming handler that gives its place back when the call
        ends (context.add_callback: however it ends)."""
        released = threading.Event()

        def release() -> None:
            if not released.is_set():
                released.set()
                self._release(pool)

        unary = not handler.request_streaming

        def run(requests: Iterator, context: grpc.ServicerContext, *callback: Callable) -> Any:
            if not context.add_callback(release):  # (the call has ended already)
                release()
            if not unary:
                return behaviour(requests, context, *callback)
            try:
                request = next(requests)
            except StopIteration:
                context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f'"{method}" requires exactly one request message.',
                )
            return behaviour(request, context, *callback)

        for attribute in ("experimental_thread_pool", "experimental_non_blocking"):
            if hasattr(behaviour, attribute):
                setattr(run, attribute, getattr(behaviour, attribute))
        return _HANDLER_FACTORIES[(True, handler.response_streaming)](
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _refusal(self, details: grpc.HandlerCallDetails, pool: str) -> grpc.RpcMethodHandler:
        """A handler refusing the call at once, without reading its request."""
        name = details.method.rsplit("/", 1)[-1]
        limit = self._limits[pool]
        message = (
            f"server busy: all {limit} threads for {name} calls are held (an overload, or "
            "callers that do not send their request); retry later"
        )
        self._metrics.rpc_threads_exhausted.labels(pool).inc()
        if name in METHODS:
            self._metrics.finished(name, grpc.StatusCode.RESOURCE_EXHAUSTED)
        now = time.monotonic()
        with self._lock:
            quiet = now - self._logged[pool] < EXHAUSTED_LOG_S
            if not quiet:
                self._logged[pool] = now
        if not quiet:
            fields = {"event": "threads_exhausted", "pool": pool, "method": name,
                      "threads": limit}  # fmt: skip
            log.warning("%s refused (RESOURCE_EXHAUSTED): all %d threads of the %s pool are "
                        "held by calls; further refusals of this pool are counted in "
                        "splitdet_cloud_rpc_threads_exhausted_total", name, limit, pool,
                        extra={"fields": fields})  # fmt: skip

        def refuse(requests: Iterator, context: grpc.ServicerContext) -> None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

        refuse.experimental_thread_pool = self._refusals  # type: ignore[attr-defined]
        return grpc.stream_unary_rpc_method_handler(refuse)


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable:
    """The one behaviour a method handler has."""
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary
        or handler.stream_stream
    )  # fmt: skip
