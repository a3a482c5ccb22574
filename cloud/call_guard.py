"""The cloud server's thread budget: at most as many calls per thread pool as it has threads,
the rest refused at once (`CallGuard`)."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc

from splitdet.cloud.call_status import METHODS, refusal_line, refuse, shortage
from splitdet.cloud.log_limit import LineLimiter
from splitdet.cloud.metrics import ServerMetrics, claimed_edge
from splitdet.cloud.servicer import SERVICE_NAME
from splitdet.cloud.threads import PoolBound
from splitdet.edge import client_errors as reasons

#: A method handler's constructor by (request streaming, response streaming).
HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}

#: Seconds between two log lines of one pool's calls refused for want of a thread, and of one
#: pool's calls ended because their request did not arrive within --max-receive.
EXHAUSTED_LOG_S = 10.0


class CallGuard(grpc.ServerInterceptor):
    """At most as many calls per thread pool as it has threads; the rest refused at once.

    gRPC's sync server gives a call a pool thread as soon as its headers arrive, and a unary
    call holds it while its request arrives: a caller that never sends the request holds it
    until the connection ends, and a call finding every thread held waits, unanswered and
    unseen, in the pool's queue. Here each call is counted against the pool its handler runs
    in (by the handler's ``experimental_thread_pool``; the server's own pool otherwise) from
    its headers to its end, and a call beyond the pool's limit is refused at once with
    RESOURCE_EXHAUSTED (counted in `splitdet_cloud_rpc_threads_exhausted_total{pool}` and, for
    Detect and GetManifest, per edge; logged with its method, peer, edge, code and message at
    most every EXHAUSTED_LOG_S per pool) by a small pool of its own that never waits for a
    request.
    Calls holding threads show in `splitdet_cloud_rpc_threads_busy{pool}`.

    To count a call to its end whatever becomes of it, a unary-request handler is run as a
    request-streaming one that reads the one request itself (gRPC would otherwise read it
    before any code of ours runs, and a call cancelled meanwhile would never be seen to end).
    Stalled calls are ended there: a unary call whose request has not arrived within its
    pool's receive bound (--max-receive) of its start is ended by a timer with
    DEADLINE_EXCEEDED and a message saying so, which frees its thread (counted, for Detect and
    GetManifest, by method and per edge as a refusal; logged as `request_not_received` at most
    every EXHAUSTED_LOG_S per pool). Without it such a call held its thread until its
    connection's age closed it (`channel_options.grpc_options`): about 5.5 min + --max-call.
    A timer that cannot start (the server short of memory or threads) refuses its call with
    RESOURCE_EXHAUSTED (`_short`), which edges retry, not gRPC's UNKNOWN.

    Args:
        metrics: where refusals and busy threads are counted.
        pools: pool name -> its `threads.PoolBound` (the pool, None for the server's own; calls
            it may hold at once; seconds a call may take to receive its request).
        refusals: the pool that refuses calls beyond a limit (its calls end at once).
    """

    def __init__(
        self,
        metrics: ServerMetrics,
        pools: dict[str, PoolBound],
        refusals: futures.ThreadPoolExecutor,
    ) -> None:
        self._metrics = metrics
        self._names = {id(bound.pool): name for name, bound in pools.items()}
        self._limits = {name: bound.threads for name, bound in pools.items()}
        self._receive_s = {name: bound.receive_s for name, bound in pools.items()}
        self._active = dict.fromkeys(pools, 0)
        #: which refusals are logged: at most one line per pool per EXHAUSTED_LOG_S
        self._lines = LineLimiter(EXHAUSTED_LOG_S)
        #: which calls ended for a request not received are logged: likewise
        self._unreceived_lines = LineLimiter(EXHAUSTED_LOG_S)
        #: which calls refused for a thread that could not start are logged: likewise
        self._short_lines = LineLimiter(EXHAUSTED_LOG_S)
        self._lock = threading.Lock()
        #: the Detect calls still receiving their request: id -> the edge name they claim
        #: (a stop counts them as cut: their edges send them again; a health check or a
        #: GetManifest cut loses nothing)
        self._receiving: dict[int, str] = {}
        self._refusals = refusals
        for name in pools:
            metrics.rpc_threads_busy.labels(name).set_function(functools.partial(self.busy, name))
            metrics.rpc_threads_exhausted.labels(name)

    def line_limiters(self) -> tuple[LineLimiter, ...]:
        """The limiters of the guard's log lines (`threads_exhausted`, `request_not_received`,
        `refused` for want of a thread), for the stop to write what they left out
        (`LineLimiter.flush`)."""
        return self._lines, self._unreceived_lines, self._short_lines

    def busy(self, pool: str) -> int:
        """Calls holding a thread of `pool` now."""
        with self._lock:
            return self._active[pool]

    def receiving(self) -> tuple[int, list[str]]:
        """(the Detect calls holding a thread while their request still arrives, the edge
        names they claim, sorted, each once): what a stop cuts besides the calls running."""
        with self._lock:
            return len(self._receiving), sorted(set(self._receiving.values()))

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
        receive_s = self._receive_s[pool]
        detect = method == f"/{SERVICE_NAME}/Detect"  # (counted by `receiving`)

        def run(requests: Iterator, context: grpc.ServicerContext, *callback: Callable) -> Any:
            if not context.add_callback(release):  # (the call has ended already)
                release()
            if not unary:
                return behaviour(requests, context, *callback)
            peer, failed = context.peer(), None  # (once the call is ended the peer reads "")
            try:
                watch = ReceiveTimer(context, receive_s, not_received_message(method, receive_s))
            except RuntimeError as exc:  # ("can't start new thread": short of memory)
                short = shortage(exc)
                if short is None:
                    raise
                self._short(method, pool, peer, context, short)  # (raises)
            context.add_callback(watch.cancel)  # (the call ended: no timer left running)
            if detect:
                with self._lock:
                    self._receiving[id(context)] = claimed_edge(context.invocation_metadata())
            try:
                request = next(requests)
            except (StopIteration, grpc.RpcError) as exc:  # (no request; the call ended)
                request, failed = None, exc
            finally:
                with self._lock:
                    self._receiving.pop(id(context), None)
            # the timer fired: the call is ended, also when its request came just then
            if not watch.received():
                self._not_received(method, pool, peer, context, receive_s)  # (raises)
            if isinstance(failed, grpc.RpcError):
                raise failed
            if request is None:
                context.abort(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f'"{method}" requires exactly one request message.',
                )
            return behaviour(request, context, *callback)

        for attribute in ("experimental_thread_pool", "experimental_non_blocking"):
            if hasattr(behaviour, attribute):
                setattr(run, attribute, getattr(behaviour, attribute))
        return HANDLER_FACTORIES[(True, handler.response_streaming)](
            run,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _refusal(self, details: grpc.HandlerCallDetails, pool: str) -> grpc.RpcMethodHandler:
        """A handler refusing the call at once, without reading its request: counted (by pool,
        method and, for the Detection service's methods, the edge its metadata names, as the
        servicer counts a refused call) and logged with the caller's address and edge name,
        both known before the request arrives."""
        name = details.method.rsplit("/", 1)[-1]
        limit = self._limits[pool]
        message = (
            f"server busy: all {limit} threads for {name} calls are held (an overload, or "
            "callers that do not send their request); retry later"
        )
        self._metrics.rpc_threads_exhausted.labels(pool).inc()
        if name in METHODS:
            self._count_refused(name, details.invocation_metadata)
        claimed = claimed_edge(details.invocation_metadata)  # (the log names the claim)

        def held(requests: Iterator, context: grpc.ServicerContext) -> None:
            self._log_refusal(name, pool, context.peer(), claimed, message)
            refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, message, reasons.BUSY)

        held.experimental_thread_pool = self._refusals  # type: ignore[attr-defined]
        return grpc.stream_unary_rpc_method_handler(held)

    def _not_received(
        self,
        method: str,
        pool: str,
        peer: str,
        context: grpc.ServicerContext,
        receive_s: float,
    ) -> None:
        """A call `ReceiveTimer` ended (its request not received within `receive_s`): counted
        as a DEADLINE_EXCEEDED refusal (for the Detection service's methods, as `_refusal`
        counts them), logged as `request_not_received` (at most one line per pool per
        EXHAUSTED_LOG_S, carrying the count and edges of those left out); then the handler
        ends (the call has its status already)."""
        self._end(method, pool, peer, context, grpc.StatusCode.DEADLINE_EXCEEDED,
                  not_received_message(method, receive_s), "request_not_received",
                  self._unreceived_lines, reasons.DEADLINE_PASSED,  # (the timer sent the
                  {"max_receive_s": receive_s})  # status already, without it)  # fmt: skip

    def _short(
        self, method: str, pool: str, peer: str, context: grpc.ServicerContext, message: str
    ) -> None:
        """A call refused because its receive timer's thread could not start (the server
        short of memory or threads: `call_status.shortage`'s `message`): RESOURCE_EXHAUSTED,
        which edges retry later, not the UNKNOWN gRPC makes of an exception here (which they
        keep as a dead letter); counted (for the Detection service's methods, as `_refusal`
        counts them) and logged as `refused` (WARNING, at most one line per pool per
        EXHAUSTED_LOG_S, carrying the count and edges of those left out)."""
        self._end(method, pool, peer, context, grpc.StatusCode.RESOURCE_EXHAUSTED, message,
                  "refused", self._short_lines, reasons.SHORTAGE)  # fmt: skip

    def _end(
        self,
        method: str,
        pool: str,
        peer: str,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        message: str,
        event: str,
        lines: LineLimiter,
        reason: str,
        more: dict[str, Any] | None = None,
    ) -> None:
        """End a call the guard refuses after taking it (`_not_received`, `_short`) with `code`
        and `message`, `reason` in its trailing metadata (`call_status.refuse`): counted (for
        the Detection service's methods, as `_refusal` counts them), logged as WARNING `event`
        with `more` fields at most as `lines` admits (one line per pool per its every_s,
        carrying the count and edges of those left out); then the handler ends (raises: the
        call has its status)."""
        name = method.rsplit("/", 1)[-1]
        metadata = context.invocation_metadata()
        if name in METHODS:
            self._count_refused(name, metadata, code)
        claimed = claimed_edge(metadata)
        lines.write_from(pool, claimed, refusal_line(
            name, peer, claimed, code, message, event, lines.every_s, level=logging.WARNING,
            more={"pool": pool, **(more or {})}))  # fmt: skip
        refuse(context, code, message, reason)  # (raises; not sent)

    def _count_refused(
        self,
        method: str,
        metadata: Sequence | None,
        code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        """A call of the Detection service `method` refused for want of a thread (or ended
        with `code` before its request arrived): counted by method and code, and per edge
        under the label its name holds (none claimed: the request, which would show a served
        model, is never read), its edge seen now."""
        self._metrics.finished(method, code)
        label = self._metrics.edge_of(metadata)
        self._metrics.refused(label, code)
        self._metrics.edge_last_seen.labels(label).set_to_current_time()

    def _log_refusal(self, method: str, pool: str, peer: str, edge: str, message: str) -> None:
        """The `threads_exhausted` line of a refused call (method, peer, edge, code, message,
        as every refused call's line): at most one per pool per EXHAUSTED_LOG_S, carrying how
        many were left out since and the edges they named."""
        self._lines.write_from(pool, edge, refusal_line(
            method, peer, edge, grpc.StatusCode.RESOURCE_EXHAUSTED, message,
            "threads_exhausted", self._lines.every_s, level=logging.WARNING,
            more={"pool": pool, "threads": self._limits[pool]}))  # fmt: skip


def _behaviour(handler: grpc.RpcMethodHandler) -> Callable:
    """The one behaviour a method handler has."""
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary
        or handler.stream_stream
    )  # fmt: skip


def not_received_message(method: str, receive_s: float) -> str:
    """The status message of a call ended because its request did not arrive in time."""
    return (
        f"the request of this {method.rsplit('/', 1)[-1]} call did not arrive within "
        f"{receive_s:g} s of the call's start (the server's --max-receive): the call was "
        "ended to free its thread; send the request as the call starts, or, on a slow link, "
        "have the server's --max-receive raised"
    )


class ReceiveTimer:
    """Ends a call whose request has not been received `seconds` after this is made (a timer
    thread; cancelled by `received` or `cancel`): with DEADLINE_EXCEEDED and `message` (the
    caller sees both; an edge retries it later), which makes its blocked request iterator
    stop and frees the thread that waits on it.

    The status is set through gRPC's call object (`Call.cancel(code, details)`, not public
    API); without it (another gRPC) the call is ended with `context.cancel()`: CANCELLED,
    without the message.
    """

    def __init__(self, context: grpc.ServicerContext, seconds: float, message: str) -> None:
        self._context = context
        self._message = message
        self._lock = threading.Lock()
        self._state = "waiting"  # -> "received", "ended" or "cancelled"
        self._timer = threading.Timer(seconds, self._end)
        self._timer.daemon = True
        self._timer.name = "splitdet-receive-timer"
        self._timer.start()

    def received(self) -> bool:
        """The request arrived (or the call ended otherwise): stop the timer. False when the
        timer has ended the call already."""
        self._timer.cancel()
        with self._lock:
            if self._state in ("waiting", "cancelled"):
                self._state = "received"
            return self._state == "received"

    def cancel(self) -> None:
        """The call has ended: stop the timer."""
        self._timer.cancel()
        with self._lock:
            if self._state == "waiting":
                self._state = "cancelled"

    def _end(self) -> None:
        with self._lock:
            if self._state != "waiting":
                return
            self._state = "ended"
        call = getattr(getattr(self._context, "_rpc_event", None), "call", None)
        code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
        try:
            call.cancel(code, self._message)  # type: ignore[union-attr]
        except Exception:  # (no such call object or method: another gRPC)
            self._context.cancel()
