"""The /metrics endpoint's bounds (shared/metrics_http.py), on a real server on loopback.

prometheus_client's own server gave every connection a thread and kept it for as long as the
caller stayed silent: about a thousand idle connections used up the process's file descriptors,
and the gRPC listener beside it could accept no camera's call."""

from __future__ import annotations

import socket
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter

from splitdet.shared.metrics_http import start_metrics_server


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("splitdet_test_scrapes", "a counter to read back", registry=registry).inc(3)
    return registry


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        return answer.read().decode()


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closed `sock` (EOF or reset) within `within_s` seconds."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_connections_beyond_the_cap_are_closed_and_the_held_ones_time_out():
    server = start_metrics_server(0, "127.0.0.1", _registry(), max_connections=4,
                                  read_timeout_s=1.0)  # fmt: skip
    port = server.server_port
    try:
        assert "splitdet_test_scrapes_total 3.0" in _scrape(port)
        silent = []
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of its headers
            silent.append(sock)
        time.sleep(0.3)  # (the server accepts them in turn)
        closed_at_once = sum(_closed_by_server(s, 0.2) for s in silent)
        assert closed_at_once >= len(silent) - 4, closed_at_once  # beyond the cap: closed
        held = [s for s in silent if s.fileno() != -1]
        assert all(_closed_by_server(s, 5.0) for s in held)  # each dropped once silent 1 s
        for sock in silent:
            sock.close()
        time.sleep(0.2)
        assert "splitdet_test_scrapes_total 3.0" in _scrape(port)  # serving again
    finally:
        server.shutdown()
        server.server_close()


def test_an_unresolvable_host_or_a_port_in_use_is_an_os_error():
    server = start_metrics_server(0, "127.0.0.1", _registry())
    try:
        for host, port in (("no-such-host.invalid", 0), ("127.0.0.1", server.server_port)):
            try:
                start_metrics_server(port, host, _registry())
            except OSError:
                continue
            raise AssertionError(f"{host}:{port} was served")
    finally:
        server.shutdown()
        server.server_close()
