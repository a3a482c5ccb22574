"""The server's grpc.health.v1 service: grpc_health's HealthServicer with its watchers told of
a change after its lock is released.

grpc_health (1.85) sends each Watch stream its new status while holding the servicer's lock.
A send waits for gRPC's event thread to complete it; that thread, meanwhile handling a Watch the
client cancelled, waits for the same lock to forget the watcher. Both wait for good: a server
stopped while edges or probes watch its health never stopped (`enter_graceful_shutdown` hung).
Here the lock guards only the table of statuses and watchers; the sends happen outside it.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthStatus(health.HealthServicer):
    """Check and Watch as grpc_health serves them; `set` and `enter_graceful_shutdown` as
    there, except that watchers hear of the change after the lock is released."""

    def set(self, service: str, status: int) -> None:
        """Set `service`'s status (a HealthCheckResponse.ServingStatus value) and tell its
        watchers; ignored once `enter_graceful_shutdown` has run."""
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            watchers = list(self._send_response_callbacks.get(service, ()))
        _tell(watchers, status)

    def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good, its watchers told; later `set` calls ignored."""
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._gracefully_shutting_down = True
            watchers = []
            for service in self._server_status:
                self._server_status[service] = NOT_SERVING
                watchers += self._send_response_callbacks.get(service, ())
        _tell(watchers, NOT_SERVING)


def _tell(watchers: list, status: int) -> None:
    """Send `status` to each watcher's stream; a stream already closed just drops it."""
    response = health_pb2.HealthCheckResponse(status=status)
    for send in watchers:
        send(response)
