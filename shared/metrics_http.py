"""The Prometheus endpoint (/metrics) of the cloud server and the edge daemon, bounded.

prometheus_client's `start_http_server` serves each connection on a thread of its own with no
read timeout and no cap: a caller that opens connections and sends nothing kept a thread and a
file descriptor each for good, and a thousand of them left the gRPC listener beside it no
descriptor to accept a camera's call with ("File descriptor limit reached"). This serves the same
WSGI app (`prometheus_client.make_wsgi_app`) with at most `MAX_CONNECTIONS` connections at once,
`MAX_PER_PEER` of them from one address (one more is closed as soon as it is accepted), and each
one closed `READ_TIMEOUT_S` seconds after it was accepted, however it trickles its bytes. A
scrape takes milliseconds; Prometheus scrapes one at a time. A connection closed so, or gone, is
not a traceback on stderr (the log stream): wsgiref's handler does not catch a timeout.

Standard library and prometheus_client only: the edge imports it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

__all__ = [
    "HEALTH_PATH",
    "MAX_CONNECTIONS",
    "MAX_PER_PEER",
    "READ_TIMEOUT_S",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

#: Connections served at once; one beyond is closed as soon as it is accepted.
MAX_CONNECTIONS = 16
#: Connections served at once from one address: a host that opens many cannot hold them all
#: (the scraper, from another, still finds one free).
MAX_PER_PEER = 4
#: Seconds a connection may last from its acceptance to its end (its request read, its answer
#: written); then it is closed, also one that sends a byte now and then.
READ_TIMEOUT_S = 10.0
#: The path a liveness probe asks (`start_metrics_server`'s `health`): 200 or 503, one line.
HEALTH_PATH = "/healthz"

#: (alive, one line of text): what `health` answers.
Health = Callable[[], tuple[bool, str]]


class _QuietHandler(WSGIRequestHandler):
    """One request per connection (HTTP/1.0), no access log, a socket timeout, and a deadline
    on the whole connection (`timeout` seconds from its acceptance)."""

    timeout = READ_TIMEOUT_S  # (StreamRequestHandler sets it on the connection's socket)

    def setup(self) -> None:
        super().setup()
        self._deadline = threading.Timer(self.timeout, self._close)
        self._deadline.daemon = True
        self._deadline.start()

    def _close(self) -> None:
        """The deadline: end the connection, which makes a read or write waiting on it fail."""
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):  # (a connection the deadline or the caller ended)
            super().finish()

    def log_message(self, format: str, *args: object) -> None:
        """No line per scrape."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """A thread per connection, at most `max_connections` of them at once."""

    daemon_threads = True  # (a stop does not wait for a caller that stalls)
    max_connections = MAX_CONNECTIONS

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._lock = threading.Lock()
        self._open = 0  # connections being served
        self._by_peer: dict[str, int] = {}  # of them, per address
        super().__init__(*args, **kwargs)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        peer = client_address[0]
        with self._lock:
            full = self._open >= self.max_connections
            if full or self._by_peer.get(peer, 0) >= MAX_PER_PEER:  # closed at once
                self.shutdown_request(request)
                return
            self._open += 1
            self._by_peer[peer] = self._by_peer.get(peer, 0) + 1
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: its place is free again
            self._release(peer)
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    def _release(self, peer: str) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_peer.pop(peer) - 1
            if left:
                self._by_peer[peer] = left

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        """A connection that failed: one that timed out or went away is nothing to report; any
        other failure is logged (not printed to stderr, socketserver's way)."""
        if isinstance(sys.exception(), OSError):
            return
        log.error("metrics endpoint: a request from %s failed", client_address[0], exc_info=True,
                  extra={"fields": {"event": "metrics_request_failed",
                                    "peer": client_address[0]}})  # fmt: skip


def _family(host: str, port: int) -> socket.AddressFamily:
    """The address family `host` resolves to first (IPv6 for "::"); OSError if it does not."""
    return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]


def _with_health(app: Callable, health: Health) -> Callable:
    """`app`, but for HEALTH_PATH: 200 while `health()` says alive, else 503; its line as the
    plain-text body."""

    def serve(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != HEALTH_PATH:
            return app(environ, start_response)
        alive, text = health()
        body = text.encode()
        status = "200 OK" if alive else "503 Service Unavailable"
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(body)))])  # fmt: skip
        return [body]

    return serve


def start_metrics_server(
    port: int,
    host: str,
    registry: CollectorRegistry,
    *,
    max_connections: int = MAX_CONNECTIONS,
    read_timeout_s: float = READ_TIMEOUT_S,
    health: Health | None = None,
) -> WSGIServer:
    """Serve `registry` at http://HOST:PORT/metrics on a daemon thread; port 0 takes a free one
    (the server's `server_port` says which). Stop it with `shutdown()` then `server_close()`.
    With `health`, http://HOST:PORT/healthz answers 200 or 503 by it (a liveness probe's).

    Raises OSError when `host` does not resolve, the port cannot be bound or is out of range
    (its `strerror` says which)."""
    if not 0 <= port <= 65535:
        raise OSError(errno.EINVAL, f"port {port} is out of range (0-65535)")

    class _Server(_BoundedServer):
        address_family = _family(host, port)

    class _Handler(_QuietHandler):
        timeout = read_timeout_s

    _Server.max_connections = max_connections
    app = make_wsgi_app(registry)
    if health is not None:
        app = _with_health(app, health)
    server = make_server(host, port, app, _Server, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
