"""The gRPC channel arguments of the cloud detection server, made from its `ServerConfig`.

They bound a message (gRPC's own receive bound a margin above --max-message-mib, so the
servicer refuses, counts and logs what lies between), accept the edges' keepalive pings,
ping a connection gone silent, close a connection after its age (its calls given --max-call
to end) and keep two servers from sharing a port unnoticed.
"""

from __future__ import annotations

from splitdet.cloud.server_config import MIB, ServerConfig


def receive_bound(max_message_bytes: int) -> int:
    """gRPC's own bound on a received message, bytes: --max-message-mib plus a quarter, at
    least 16 MiB more, below 2 GiB (a call over the bound by less is refused in the servicer)."""
    return min(max_message_bytes + max(max_message_bytes // 4, 16 * MIB), (1 << 31) - 1)


def ping_timeout_s(config: ServerConfig) -> float:
    """Seconds the server waits for the answer to a ping of its (keepalive, or gRPC's own
    bandwidth probes, sent while a request arrives): keepalive_timeout_s, and never less than
    --max-receive. On a slow link the edge's answer waits behind the rest of its upload, so a
    shorter wait would close the connection under a request --max-receive allows (a network
    review measured uploads cut at 60 s on a 128 kbit/s link)."""
    return max(config.keepalive_timeout_s, config.max_receive_s)


def grpc_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments."""
    return [
        # gRPC refuses a message over its bound before splitdet sees it: nothing counted, nothing
        # logged. So its bound is a margin above --max-message-mib, and the servicer refuses
        # (and counts, and logs) what lies between; only beyond the margin does gRPC refuse.
        ("grpc.max_receive_message_length", receive_bound(config.max_message_bytes)),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Accept the edge client's keepalive pings (every 30 s by default) without GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        # ...and never answer pings with GOAWAY "too_many_pings": measured in `splitdet bench`,
        # where a connection idles between large requests, the default 2 strikes were reached.
        ("grpc.http2.max_ping_strikes", 0),
        # Ping a connection that has gone silent (gRPC's server default: after 2 hours); an
        # unanswered ping closes it and frees the threads its calls hold. In gRPC 1.85 the
        # ping timeout, not keepalive_timeout_ms, is what ends a keepalive ping's wait.
        ("grpc.keepalive_time_ms", round(config.keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(ping_timeout_s(config) * 1000)),
        ("grpc.http2.ping_timeout_ms", round(ping_timeout_s(config) * 1000)),
        # gRPC sends two pings at most on a connection with no data to send.
        ("grpc.http2.max_pings_without_data", 0),
        # A connection takes new calls for max_connection_age_s, then is closed gracefully
        # (GOAWAY: the client reconnects for its next call) and its calls get max_call_s to end
        # before they are cancelled. Keepalive never ends a call that sends headers and then
        # nothing (its connection answers pings): --max-receive ends such a call first
        # (`call_guard.ReceiveTimer`); this is the backstop.
        ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", round(config.max_call_s * 1000)),
        # gRPC sets SO_REUSEPORT by default: two servers could then share a port unnoticed.
        ("grpc.so_reuseport", 0),
    ]
