"""The server's grpc.health.v1 service (Check and Watch), which never sends while holding the
lock that gRPC's event thread may need.

grpc_health's HealthServicer (1.85) sends a Watch stream its status while holding its lock, in
Watch itself and in `set`. A send waits for gRPC's event thread to complete it, and that
thread, meanwhile forgetting a Watch its client cancelled, waits for the same lock: both wait
for good, and with the event thread every call of the server. Clients opening and cancelling
Watch streams (no token needed: health is exempt) froze a server in seconds, and a server
stopped while probes watched it never stopped. Here the lock guards only the table of statuses
and watchers; each watcher has a lock of its own that keeps its statuses in order, and the
event thread takes neither while a send waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

Response = health_pb2.HealthCheckResponse
NOT_SERVING = Response.NOT_SERVING


class _Watcher:
    """One Watch stream: its statuses sent one at a time, in the order they were set."""

    def __init__(self, send: Callable[[Response], object]) -> None:
        self.send = send
        self.in_turn = threading.Lock()

    def tell(self, status: int) -> None:
        """Send `status` (a ServingStatus value); a stream already closed just drops it."""
        with self.in_turn:
            self.send(Response(status=status))


class HealthStatus(health_pb2_grpc.HealthServicer):
    """grpc.health.v1.Health: the status of each service name ("" for the whole server)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._status: dict[str, int] = {"": Response.SERVING}
        self._watchers: dict[str, set[_Watcher]] = {}
        self._shutting_down = False

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
        send_response_callback: Callable[[Response], object] | None = None,
    ) -> None:
        """Non-blocking: sends the current status (SERVICE_UNKNOWN for a name never set), then
        each change, until the client goes; returns at once, holding no thread."""
        if send_response_callback is None:
            raise RuntimeError("HealthStatus.Watch needs gRPC's non-blocking streaming")
        service = request.service
        watcher = _Watcher(send_response_callback)
        with self._lock:
            status = self._status.get(service, Response.SERVICE_UNKNOWN)
            watcher.in_turn.acquire()  # before any `set` can reach it: this status goes first
            self._watchers.setdefault(service, set()).add(watcher)
        try:
            watcher.send(Response(status=status))
        finally:
            watcher.in_turn.release()
        if not context.add_callback(lambda: self._forget(service, watcher)):
            self._forget(service, watcher)  # the call had already ended

    def set(self, service: str, status: int) -> None:
        """Set `service`'s status (a ServingStatus value) and tell its watchers; ignored once
        `enter_graceful_shutdown` has run."""
        with self._lock:
            if self._shutting_down:
                return
            self._status[service] = status
            watchers = list(self._watchers.get(service, ()))
        for watcher in watchers:
            watcher.tell(status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good, its watchers told; later `set` calls ignored."""
        with self._lock:
            if self._shutting_down:
                return
            self._shutting_down = True
            watchers = []
            for service in self._status:
                self._status[service] = NOT_SERVING
                watchers += self._watchers.get(service, ())
        for watcher in watchers:
            watcher.tell(NOT_SERVING)

    def _forget(self, service: str, watcher: _Watcher) -> None:
        """Run by gRPC's event thread when a Watch ends: takes the table's lock only."""
        with self._lock:
            watchers = self._watchers.get(service, set())
            watchers.discard(watcher)
            if not watchers:  # (names are the client's: none kept once nobody watches it)
                self._watchers.pop(service, None)


# gRPC passes `send_response_callback` to a handler so marked and keeps no thread for it.
HealthStatus.Watch.experimental_non_blocking = True
HealthStatus.Watch.experimental_thread_pool = None
