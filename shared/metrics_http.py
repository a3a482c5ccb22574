"""The Prometheus endpoint (/metrics) of the cloud server and the edge daemon, bounded.

prometheus_client's `start_http_server` serves each connection on a thread of its own with no
read timeout and no cap: a caller that opens connections and sends nothing kept a thread and a
file descriptor each for good, and a thousand of them left the gRPC listener beside it no
descriptor to accept a camera's call with ("File descriptor limit reached"). This serves the same
WSGI app (`prometheus_client.make_wsgi_app`) with at most `MAX_CONNECTIONS` connections at once
(one more is closed as soon as it is accepted) and each one dropped once silent for
`READ_TIMEOUT_S` seconds. A scrape takes milliseconds; Prometheus scrapes one at a time.

Standard library and prometheus_client only: the edge imports it.
"""

from __future__ import annotations

import socket
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = ["MAX_CONNECTIONS", "READ_TIMEOUT_S", "start_metrics_server"]

#: Connections served at once; one beyond is closed as soon as it is accepted.
MAX_CONNECTIONS = 16
#: Seconds a connection may stay silent (while its request is read, or its answer written)
#: before it is dropped.
READ_TIMEOUT_S = 10.0


class _QuietHandler(WSGIRequestHandler):
    """One request per connection (HTTP/1.0), no access log, and a socket timeout."""

    timeout = READ_TIMEOUT_S  # (StreamRequestHandler sets it on the connection's socket)

    def log_message(self, format: str, *args: object) -> None:
        """No line per scrape."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `max_connections` of them at once."""

    daemon_threads = True  # (a stop does not wait for a caller that stalls)
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(*args, **kwargs)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):  # full: this one is closed at once
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its slot is free again
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _family(host: str, port: int) -> socket.AddressFamily:
    """The address family `host` resolves to first (IPv6 for "::"); OSError if it does not."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]


def start_metrics_server(
    port: int,
    host: str,
    registry: CollectorRegistry,
    *,
    max_connections: int = MAX_CONNECTIONS,
    read_timeout_s: float = READ_TIMEOUT_S,
) -> WSGIServer:
    """Serve `registry` at http://HOST:PORT/metrics on a daemon thread; port 0 takes a free one
    (the server's `server_port` says which). Stop it with `shutdown()` then `server_close()`.

    Raises OSError when `host` does not resolve or the port cannot be bound, OverflowError for a
    port out of range."""

    class _Server(_BoundedServer):
        address_family = _family(host, port)

    class _Handler(_QuietHandler):
        timeout = read_timeout_s

    _Server.max_connections = max_connections
    server = make_server(host, port, make_wsgi_app(registry), _Server, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
