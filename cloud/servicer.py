"""The gRPC face of the detection core: protobuf -> domain -> core -> protobuf, nothing more.

Exceptions become status codes in one place (`_rpc`, with cloud/call_status.py's table).
Requests arrive as raw bytes and are checked and parsed by cloud/request_wire.py.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import replace

import grpc

from splitdet.cloud.bearer import bearer_token
from splitdet.cloud.call_status import (
    Overloaded,
    ShuttingDown,
    TooLarge,
    is_shortage,
    reason_for,
    refusal_level,
    refusal_line,
    refuse,
    status_for,
)
from splitdet.cloud.core import (
    Cancelled,
    DeadlinePassed,
    DetectCall,
    DetectionCore,
    DetectResult,
    ServedModel,
    level_shapes,
    request_digest,
)
from splitdet.cloud.idempotency import answers_scope, scope_of_token
from splitdet.cloud.inflight import InFlight
from splitdet.cloud.log_limit import LineLimiter
from splitdet.cloud.metrics import OTHER_EDGE, ServerMetrics, claimed_edge
from splitdet.cloud.request_wire import (
    call_from_proto,
    check_manifest_request_wire,
    check_request_wire,
    parse_message,
    result_to_proto,
)
from splitdet.cloud.slots import FairSlots, Outcome
from splitdet.shared.manifest import Manifest
from splitdet.shared.wire import detection_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Detection"].full_name  # "splitdet.v1.Detection"
#: Seconds of its deadline a call may have left, as the server sees it, when its caller gives
#: up, and still count as ended by its deadline (DEADLINE_EXCEEDED, not CANCELLED): the
#: caller's timer fires first, by the call's transit and dispatch (`deadline_over`).
DEADLINE_SLACK_S = 0.5


class CallEdge:
    """The edge label a call is counted under (`ServerMetrics.edge_of`), which a Detect
    changes once it claims a label (`DetectionServicer._answered`); and its request's size
    after resizing once parsed, which a shortage's message names (`call_status.shortage`)."""

    __slots__ = ("label", "resized_hw", "started")

    def __init__(self, label: str) -> None:
        """`label`: what the call counts as so far; `started`: monotonic s it arrived;
        `resized_hw`: None until its request is parsed (`DetectionServicer._checked_call`)."""
        self.label = label
        self.started = time.monotonic()
        self.resized_hw: tuple[int, int] | None = None


def _rpc(method: Callable) -> Callable:
    """Run one RPC: count it, and turn any exception into a status (the one place)."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: DetectionServicer, request: bytes, context: grpc.ServicerContext) -> bytes:
        code = grpc.StatusCode.OK
        # any call that passed the token check claims a label for its name; without tokens a
        # call counts under its name's label if it has one, else as "other", and a Detect
        # claims one only once its request passed its checks (`_checked_call`: a served model,
        # a valid id, image sizes and levels the model takes; a camera whose Detect is then
        # answered or refused for load shows under its own name) or refused as too large (no
        # cheap call: over --max-message-mib), so that made-up names in cheap or malformed
        # unauthenticated calls cannot use up the labels
        edge = CallEdge(
            self.metrics.edge_of(context.invocation_metadata(), claim=self.scope_by_token)
        )
        if edge.label != OTHER_EDGE:  # ("other": once the call ends as it, not claiming)
            self.metrics.edge_last_seen.labels(edge.label).set_to_current_time()
        # the log names the name claimed, also when its metrics count as "other"
        claimed = claimed_edge(context.invocation_metadata())
        peer = context.peer()  # now: once the caller has gone it reads ""
        if name == "Detect":  # running until its line is logged (a stop logs "stopped" after)
            self._enter(edge, claimed)
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
            code, message = status_for(exc, edge.resized_hw)
            self.metrics.refused(edge.label, code)
            # which edge: an operator of many cameras must find it; one line per kind (event,
            # edge label, code; a shortage apart from the busy refusals of its code, which
            # would hide it under steady load) per minute at most, counting those left out
            # and naming the edges they were about (many share "other") (`refusal_lines`)
            event = "failed" if code is grpc.StatusCode.INTERNAL else "refused"
            kind = (event, edge.label, code.name, is_shortage(exc))
            self.refusal_lines.write_from(kind, claimed, refusal_line(
                name, peer, claimed, code, message, event, self.refusal_lines.every_s,
                level=refusal_level(exc)))  # fmt: skip
            refuse(context, code, message, reason_for(exc))  # raises
        finally:
            self.metrics.finished(name, code)
            if edge.label == OTHER_EDGE:  # (a new camera's first Detect claims its own)
                self.metrics.edge_last_seen.labels(OTHER_EDGE).set_to_current_time()
            if name == "Detect":
                self._leave(edge)

    return wrapper


def served_manifest_json(manifest: Manifest) -> str:
    """A manifest as GetManifest sends it: manifest.json's contents without `extra`, the
    export's own notes (the training machine's checkpoint path, its validation data, export
    checks), which no client reads and a caller without a token must not learn. What an edge
    checks is all there: the fingerprint's inputs (artifacts, model_config, gate_threshold,
    spec_version), which still hash to it, and the class names."""
    data = manifest.to_dict()
    del data["extra"]
    return json.dumps(data, indent=2)


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
        # identical calls answered once; another request of a running call's id is a conflict
        self._inflight = InFlight()
        metrics.queued.set_function(lambda: self._slots.waiting)
        self._draining = threading.Event()
        # Detect calls being handled: id of their CallEdge -> the edge name they claim
        self._active: dict[int, str] = {}
        self._active_lock = threading.Lock()
        self._manifests: dict[str, bytes] = {}
        #: which refused calls are logged (at most one line per event, edge label and code
        #: per minute; the counters count each)
        self.refusal_lines = LineLimiter()
        self.refresh()

    def refresh(self) -> None:
        """Answer GetManifest for the models the core serves now (after a reload)."""
        self._manifests = {fp: self._manifest_answer(fp) for fp in self.core.fingerprints}

    def _manifest_answer(self, fingerprint: str) -> bytes:
        """GetManifest's serialized answer for a served model: its manifest.json without
        `extra` (`served_manifest_json`)."""
        return pb.ManifestResponse(
            model_fingerprint=fingerprint,
            manifest_json=served_manifest_json(self.core.model(fingerprint).manifest),
            served_fingerprints=self.core.fingerprints,
        ).SerializeToString()

    def drain(self) -> None:
        """Refuse every later Detect call with UNAVAILABLE (calls already running finish)."""
        self._draining.set()

    def running(self) -> int:
        """Detect calls being handled now: running the heads, waiting for an identical call's
        answer or for a slot, reading a stored answer, or logging how they ended."""
        with self._active_lock:
            return len(self._active)

    def running_edges(self) -> tuple[int, list[str]]:
        """(`running`, the edge names those calls claim, sorted, each once), read together."""
        with self._active_lock:
            return len(self._active), sorted(set(self._active.values()))

    def _enter(self, edge: CallEdge, claimed: str) -> None:
        """A Detect call from the edge named `claimed` is handled from now (`running`)."""
        with self._active_lock:
            self._active[id(edge)] = claimed

    def _leave(self, edge: CallEdge) -> None:
        """The Detect call of `edge` is handled (answered, or refused and logged)."""
        with self._active_lock:
            self._active.pop(id(edge), None)

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
        token = bearer_token(supplied)  # (the scheme in any case: one token, one scope, kept
        # as the digest of "Bearer TOKEN" that answers files stored before it was so)
        return scope_of_token(supplied if token is None else f"Bearer {token}")

    @_rpc
    def Detect(self, raw: bytes, context: grpc.ServicerContext, edge: CallEdge) -> bytes:
        """A serialized DetectRequest from `edge` in, its serialized DetectResponse out; request
        ids (stored answers, identical calls joined) are the caller's own (`caller_scope`)."""
        scope = self.caller_scope(context)
        with answers_scope(scope):
            return self._detect(raw, context, edge, scope)

    def _detect(
        self, raw: bytes, context: grpc.ServicerContext, edge: CallEdge, scope: str
    ) -> bytes:
        """Detect within the caller's answers scope `scope`."""
        if self._draining.is_set():
            raise ShuttingDown("server is shutting down; send to another replica or retry later")
        # Checked before any wait: a malformed call, one for a model not served and the repeat
        # of an answered one (--answers-db) are answered without a slot. Parsed again only once
        # it has one: a waiting call holds its request once, not twice.
        request_id, fingerprint = check_request_wire(raw)
        model = self.core.served_model(request_id, fingerprint)  # held: a reload ends no call
        # its edge name claims a label only once the request passed its checks
        # (`_checked_call`), before any wait: a camera whose calls are refused for load shows
        # under its own name; malformed ones stay under the label they had, or "other"
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
            # hashed as a stored answer is compared (`request_digest`), not by its bytes: a
            # log-only field (the image's source) may differ
            checked = self._checked_call(raw, model, context, edge)
            digest = request_digest(checked)
            conflict = False  # another request of this id is running (`InFlight`)
            if self.core.is_repeat(model, request_id, digest):
                call = checked  # answered from the store, without a slot
            else:
                del checked  # (a call waiting for a slot holds its bytes only)
                lead, follow, conflict = self._inflight.lead_or_follow(key, digest)
                if follow is not None:  # the same request is being answered: its answer
                    answered = InFlight.wait(follow, is_cancelled)
                    if answered is not None:  # (the heads did not run for this call)
                        result = replace(answered, cached=True)
                        self._observe_answer(result, context, edge)
                        return result_to_proto(result).SerializeToString()
                take_slot()  # (the identical call failed: this one is computed itself)
                call = call_from_proto(parse_message(pb.DetectRequest, raw))
            # (a repeat whose stored answer went meanwhile takes a slot now)
            result = self.core.detect(
                call, abandoned, before_compute=take_slot, model=model, digest=digest,
                conflict=conflict,
            )  # fmt: skip
            answer = result
            if is_cancelled():  # its caller left while it ran (on for a call waiting, or late)
                if not result.cached:  # (a stored answer ran no heads)
                    self.metrics.observe_heads(result)
                self._check_not_cut_by_shutdown(context)
                raise DeadlinePassed(
                    f"request {request_id!r}: the caller was gone when its answer was ready "
                    f"({_how_gone(context)}); a retry gets it from --answers-db, or waits for it"
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
        self._observe_answer(result, context, edge)
        return result_to_proto(result).SerializeToString()

    def _checked_call(
        self, raw: bytes, model: ServedModel, context: grpc.ServicerContext, edge: CallEdge
    ) -> DetectCall:
        """The Detect request `raw` (wire bounds, id and model checked already) parsed, after
        the core's cheap checks of its image sizes (raising as `DetectionCore.detect` would);
        a request whose tensors are also the levels `model` expects for its size (names and
        shapes: all but decoding them) claims a label for the call's edge name (`_answered`).
        So made-up names in malformed unauthenticated calls cannot use up the labels: such a
        call counts under its name's label if it has one, else as "other"."""
        call = call_from_proto(parse_message(pb.DetectRequest, raw))
        self.core.check_call(call, model)  # (the same checks `detect` makes first)
        edge.resized_hw = tuple(call.image.resized_hw)  # (named if memory runs short)
        expected = level_shapes(model.manifest.model_config, call.image.resized_hw)
        levels = {tensor.name: tuple(tensor.shape) for tensor in call.tensors}
        if len(call.tensors) == len(expected) and levels == {
            name: tuple(shape) for name, shape in expected.items()
        }:
            edge.label = self._answered(context, edge.label)
        return call

    def _observe_answer(
        self, result: DetectResult, context: grpc.ServicerContext, edge: CallEdge
    ) -> None:
        """Count `result`, the answer of a Detect counted so far as `edge`, under the label
        its edge claims now (`_answered`), remembering the name that edge gave, with the
        seconds since the call arrived."""
        name = claimed_edge(context.invocation_metadata())
        seconds = time.monotonic() - edge.started
        self.metrics.observe(result, self._answered(context, edge.label), name, seconds)

    def _answered(self, context: grpc.ServicerContext, edge: str) -> str:
        """The edge label of a Detect checked (`_checked_call`) or about to be answered,
        which claims a label for its name (`ServerMetrics.edge_of`): `edge`, what
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
        started = time.monotonic()
        outcome = self._slots.acquire(
            wait_s, lambda: self._draining.is_set() or not context.is_active()
        )
        self.metrics.slot_wait_seconds.labels("slot" if outcome else "refused").observe(
            time.monotonic() - started
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
        check_manifest_request_wire(raw)
        request = parse_message(pb.GetManifestRequest, raw)
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


def _how_gone(context: grpc.ServicerContext) -> str:
    """How a caller found gone when its answer was ready went, as far as the server can tell:
    its deadline passed (`deadline_over`), or it cancelled the call or its connection dropped
    (killed, disconnected) before its deadline, or without one."""
    if deadline_over(context):
        return "its deadline passed"
    if context.time_remaining() is None:
        return "it cancelled the call or disconnected; it had no deadline"
    return "it cancelled the call or disconnected before its deadline"


def deadline_over(context: grpc.ServicerContext) -> bool:
    """Whether a call's deadline has passed, or is within DEADLINE_SLACK_S of it: the caller's
    own timer starts before the server's (by the transit and dispatch of the call), so a
    caller whose deadline ends the call resets it while the server still sees a little time
    left; that is its deadline passing, not a caller going away."""
    left = context.time_remaining()
    return left is not None and left <= DEADLINE_SLACK_S
