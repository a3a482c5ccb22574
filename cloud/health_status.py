"""The server's grpc.health.v1 service (Check and Watch). Watch streams are sent to by one
thread of their own, never by gRPC's threads, `set` or `stop`.

grpc_health's HealthServicer (1.85) sends a Watch stream its status while holding its lock, in
Watch itself and in `set`. A send waits for gRPC's event thread to complete it, and that
thread, meanwhile forgetting a Watch its client cancelled, waits for the same lock: both wait
for good, and with the event thread every call of the server. Clients opening and cancelling
Watch streams (no token needed: health is exempt) froze a server in seconds, and a server
stopped while probes watched it never stopped.

Here the lock guards only the table of statuses and watchers, and every send goes through one
queue, filled under that lock (so each watcher hears its statuses in the order they were set)
and emptied by one sender thread. A send can wait for long: a client may announce a flow
control window of 0 and never let a byte through. That holds the sender thread only (the other
watchers hear later), never a thread of gRPC's pool, and never `stop`: once the server stops,
its calls are cancelled, which ends the waiting send.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

Response = health_pb2.HealthCheckResponse
NOT_SERVING = Response.NOT_SERVING
#: What the sender thread takes to end (`close`).
_END = None
#: The status that ends a Watch stream instead of telling it one (`enter_graceful_shutdown`).
_CLOSE = -1


#: One Watch stream: gRPC's `send_response_callback` for it (a function of its own per call).
Send = Callable[[Response | None], object]


class HealthStatus(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health: the status of each service name ("" for the whole server)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, int] = {"": Response.SERVING}
        self._watchers: dict[str, set[Send]] = {}
        self._shutting_down = False
        self._sends: queue.SimpleQueue[tuple[Send, int] | None] = queue.SimpleQueue()
        self._sender = threading.Thread(
            target=self._send_all, name="splitdet-health-send", daemon=True
        )
        self._sender.start()

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> Response:
        """The service's status; NOT_FOUND for a name never set."""
        with self._lock:
            status = self._status.get(request.service)
        if status is None:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return Response()
        return Response(status=status)

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Send | None = None,
    ) -> None:
        """Non-blocking: the current status (SERVICE_UNKNOWN for a name never set), then each
        change, are sent by the sender thread until the client goes; returns at once."""
        if send_response_callback is None:
            raise RuntimeError("HealthStatus.Watch needs gRPC's non-blocking streaming")
        service, watcher = request.service, send_response_callback
        with self._lock:
            self._watchers.setdefault(service, set()).add(watcher)
            self._sends.put((watcher, self._status.get(service, Response.SERVICE_UNKNOWN)))
            if self._shutting_down:  # (told, and ended: it must not hold the stop's grace)
                self._sends.put((watcher, _CLOSE))
        if not context.add_callback(lambda: self._forget(service, watcher)):
            self._forget(service, watcher)  # the call had already ended

    def set(self, service: str, status: int) -> None:
        """Set `service`'s status (a ServingStatus value); its watchers hear of it. Ignored
        once `enter_graceful_shutdown` has run."""
        with self._lock:
            if self._shutting_down:
                return
            self._status[service] = status
            for watcher in self._watchers.get(service, ()):
                self._sends.put((watcher, status))

    def clear(self, service: str) -> None:
        """Forget `service` (Check: NOT_FOUND again); its watchers hear SERVICE_UNKNOWN.
        Ignored once `enter_graceful_shutdown` has run."""
        with self._lock:
            if self._shutting_down or self._status.pop(service, None) is None:
                return
            for watcher in self._watchers.get(service, ()):
                self._sends.put((watcher, Response.SERVICE_UNKNOWN))

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; every Watch stream hears it (one on a name
        never set hears nothing more), then ends with OK, so that no probe that reads holds
        the server's stop for its whole grace (one that lets nothing through holds the sender
        thread, and the stop waits out its grace, as before); later `set` calls ignored, a
        Watch opened later ended at once. Returns without waiting for any send."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            for service in self._status:
                self._status[service] = NOT_SERVING
                for watcher in self._watchers.get(service, ()):
                    self._sends.put((watcher, NOT_SERVING))
            for watchers in self._watchers.values():
                for watcher in watchers:
                    self._sends.put((watcher, _CLOSE))

    def close(self) -> None:
        """End the sender thread once the sends queued before are done (or dropped: the
        server's calls are cancelled by then)."""
        self._sends.put(_END)

    def _send_all(self) -> None:
        """The sender thread: each queued status to its watcher, in order."""
        while (item := self._sends.get()) is not _END:
            send, status = item
            try:  # (None ends the stream with OK; a send returns at once if the call ended)
                send(None if status is _CLOSE else Response(status=status))
            except Exception as exc:  # (never seen; one stream must not end the others')
                log.debug("health watch send failed: %s", exc)

    def _forget(self, service: str, watcher: Send) -> None:
        """Run by gRPC's event thread when a Watch ends: takes the table's lock only."""
        with self._lock:
            watchers = self._watchers.get(service, set())
            watchers.discard(watcher)
            if not watchers:  # (names are the client's: none kept once nobody watches it)
                self._watchers.pop(service, None)


# gRPC passes `send_response_callback` to a handler so marked and keeps no thread for it.
HealthStatus.Watch.experimental_non_blocking = True
HealthStatus.Watch.experimental_thread_pool = None
