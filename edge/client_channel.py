"""How the edge client reaches the cloud (torch-free): its `ClientConfig`, the gRPC target of
its addresses, every channel option (message bounds, keepalive, round_robin over several
addresses) and the TLS credentials; with the bound on an answer's size, `MAX_ANSWER_BYTES`."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from splitdet.shared.edge_name import check_edge_name
from splitdet.shared.manifest import MAX_MANIFEST_BYTES

MIB = 1 << 20
#: Target schemes passed to gRPC unchanged.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")

#: Bytes of one Box on the wire beside its class name's text: five float fields (5 bytes each
#: with their tags), the label (an int32 varint: 11 bytes with its tag when negative), the class
#: name's tag and length (4), the Box's own tag and length (4).
BOX_WIRE_BYTES = 5 * 5 + 11 + 4 + 4
#: The receive bound's allowance: boxes per answer (torchvision's, and the presets',
#: box_detections_per_img is 100), bytes per class name, models one cloud serves at once.
ANSWER_BOXES_ALLOWED = 1000
CLASS_NAME_BYTES_ALLOWED = 256
SERVED_MODELS_ALLOWED = 1000
#: The largest answer the edge receives (`grpc.max_receive_message_length`): twice the larger of
#: a Detect answer with ANSWER_BOXES_ALLOWED boxes (plus 1 KiB for the id, fingerprint and
#: timings) and a GetManifest answer (a manifest of MAX_MANIFEST_BYTES and SERVED_MODELS_ALLOWED
#: 64-hex fingerprints), and at least 4 MiB. A real answer is kilobytes; without this bound the
#: edge took whatever the cloud sent up to the bound on its own requests (256 MiB), holding it
#: in memory several times over.
MAX_ANSWER_BYTES = max(
    4 * MIB,
    2 * ANSWER_BOXES_ALLOWED * (BOX_WIRE_BYTES + CLASS_NAME_BYTES_ALLOWED) + 1024,
    2 * (MAX_MANIFEST_BYTES + SERVED_MODELS_ALLOWED * (64 + 3) + 1024),
)


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the cloud.

    Attributes:
        addresses: "host:port", several "ip:port,ip:port" (balanced round-robin; a dead one is
            routed around), or any gRPC target ("dns:///name:port" resolving to every replica).
        timeout_s: deadline of a Detect call, seconds.
        manifest_timeout_s: deadline of the small calls (manifest, health), seconds.
        max_message_bytes: bound on one request (the server's bound should match: int8
            features of an 800x960 input are ~16 MB, fp32 ~65 MB); answers are bounded by it
            too, and by `max_answer_bytes`.
        max_answer_bytes: bound on one answer (default MAX_ANSWER_BYTES: a real one is
            kilobytes).
        keepalive_time_s: ping the cloud after this long without a frame from it, to keep a
            firewall's or NAT's entry for an idle connection alive and to notice one dropped
            silently (the next call then opens a new connection); 0: no pings.
        keepalive_timeout_s: a ping unanswered this long closes the connection, cancelling its
            calls; None (the default): the longer call deadline (`ping_timeout_s`).
        tls: use TLS (implied by any of the certificate paths).
        root_certs: PEM CA bundle to verify the server with (None: the system's roots).
        client_cert, client_key: PEM certificate chain and key for mutual TLS.
        server_name: TLS name to expect instead of the address's host (e.g. for IP targets).
        token: bearer token sent as "authorization: Bearer <token>" metadata.
        edge_name: this edge's name, sent with every call (shared/edge_name.py) for the
            cloud's per-edge metrics and logs; None sends none.
        own_connection: this client's channel opens its own connection even where another
            channel of the process reaches the same target (loadtest's simulated edges).
    """

    addresses: str
    timeout_s: float = 60.0
    manifest_timeout_s: float = 10.0
    max_message_bytes: int = 256 * MIB
    max_answer_bytes: int = MAX_ANSWER_BYTES
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float | None = None
    tls: bool = False
    root_certs: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    edge_name: str | None = None
    own_connection: bool = False

    def __post_init__(self) -> None:
        target = channel_target(self.addresses)  # raises on a malformed address list
        if self.uses_tls and not self.server_name and "," in target:
            # the channel's one authority is then the list itself, which no certificate names
            raise ValueError(
                f"several cloud addresses over TLS ({self.addresses}) need --server-name NAME: "
                "gRPC checks one name for the whole channel, so give a name that every "
                "replica's certificate holds (e.g. a DNS name in each one's subjectAltName)"
            )
        if self.edge_name is not None:
            check_edge_name(self.edge_name)
        if self.timeout_s <= 0 or self.manifest_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not self.keepalive_time_s >= 0:  # (NaN too)
            raise ValueError("keepalive_time_s must be 0 (no pings) or more")
        if self.keepalive_timeout_s is not None and not self.keepalive_timeout_s > 0:
            raise ValueError("keepalive_timeout_s must be positive")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is TLS: asked for, or implied by root or client certificates."""
        return bool(self.tls or self.root_certs or self.client_cert)

    @property
    def ping_timeout_s(self) -> float:
        """How long a ping (keepalive, or gRPC's own bandwidth probe) may go unanswered before
        the connection is closed, seconds: `keepalive_timeout_s`, by default the longer call
        deadline. A ping is queued behind the bytes of a request being sent, so on a slow link
        it is answered only once they are through: a shorter wait cut every upload longer than
        the keepalive time plus it (30 + 10 s before), however long the call's deadline. gRPC
        also makes it the socket's TCP_USER_TIMEOUT, the longest data may stay unacknowledged
        (a lossy link's retransmissions). A connection dropped silently while idle is closed
        after keepalive_time_s plus this."""
        if self.keepalive_timeout_s is not None:
            return self.keepalive_timeout_s
        return max(self.timeout_s, self.manifest_timeout_s)

    @property
    def receive_bytes(self) -> int:
        """The bound on one answer: the smaller of the two message bounds."""
        return min(self.max_message_bytes, self.max_answer_bytes)


def channel_target(addresses: str) -> str:
    """The gRPC target for one address, several IP addresses, or a target with a scheme."""
    text = addresses.strip()
    if not text:
        raise ValueError("no cloud address given")
    if text.startswith(_SCHEMES) or "://" in text:
        return text
    parts = [part.strip() for part in text.split(",")]
    if any(not part or ":" not in part for part in parts):
        raise ValueError(f"cloud addresses must be host:port[,host:port...], got {addresses!r}")
    if len(parts) == 1:
        return parts[0]
    versions = {_ip_version(part) for part in parts}
    if versions == {4}:
        return "ipv4:" + ",".join(parts)
    if versions == {6}:
        return "ipv6:" + ",".join(parts)
    raise ValueError(
        f"several cloud addresses must all be IPv4 'a.b.c.d:port' or all IPv6 '[addr]:port', "
        f"got {addresses!r}; for host names use one name that resolves to every replica "
        f"('dns:///name:port')"
    )


def _ip_version(endpoint: str) -> int | None:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return None


def channel_options(config: ClientConfig) -> list[tuple[str, Any]]:
    """Every channel argument the client uses, in one place."""
    service_config = {"loadBalancingConfig": [{"round_robin": {}}]}
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.receive_bytes),
        ("grpc.service_config", json.dumps(service_config)),
        # A restarted replica is found again within seconds rather than gRPC's 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 10_000),
    ]
    # gRPC 1.85 ends the wait of any ping it sends (keepalive, or its own flow-control probes)
    # at the ping timeout (default 60 s), not at keepalive_timeout_ms: a ping sent during an
    # upload waits behind its bytes, so it gets as long as a call may take.
    ping_timeout_ms = int(config.ping_timeout_s * 1000)
    options.append(("grpc.http2.ping_timeout_ms", ping_timeout_ms))
    if config.keepalive_time_s > 0:  # (without it gRPC sends no keepalive pings and sets no
        # TCP_USER_TIMEOUT)
        options += [
            ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", ping_timeout_ms),  # also the TCP_USER_TIMEOUT
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    if config.own_connection:  # else channels to one target in a process share a connection
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    """TLS (optionally mutual) credentials from the config's PEM files."""

    def read(path: Path | None) -> bytes | None:
        return None if path is None else Path(path).read_bytes()

    return grpc.ssl_channel_credentials(
        root_certificates=read(config.root_certs),
        private_key=read(config.client_key),
        certificate_chain=read(config.client_cert),
    )
