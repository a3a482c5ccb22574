"""The edge's gRPC client of the cloud detection server (torch-free).

    client = CloudClient(ClientConfig("10.0.0.5:50051,10.0.0.6:50051", token=token))
    try:
        result = client.detect(encoded_levels, ImageMeta((2048, 2448), (800, 956)), request_id,
                               manifest.fingerprint)
    except RetryLater:   # UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED: keep it, try again
        ...
    except NeverRetry:   # INVALID_ARGUMENT, FAILED_PRECONDITION, UNAUTHENTICATED, INTERNAL, ...
        ...

Every channel option lives in `channel_options` (message bounds, keepalive, round_robin over
several addresses); every call has a deadline. gRPC's own retries are not relied upon: it buffers
at most 256 KiB per call for retrying and our requests are MBs, so the edge's outbox re-sends,
and the cloud's idempotency on request_id makes re-sending safe.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitdet.shared.codec import EncodedTensor
from splitdet.shared.detection import ImageMeta
from splitdet.shared.edge_name import EDGE_NAME_KEY, check_edge_name
from splitdet.shared.messages import build_request
from splitdet.shared.wire import detection_pb2 as pb
from splitdet.shared.wire import detection_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Status codes worth retrying later (the server is down, slow or busy).
RETRY_LATER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
#: Target schemes passed to gRPC unchanged.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "xds:")


class CloudError(Exception):
    """A failed call to the cloud, with its gRPC status code and the server's message.

    `likely_cause` names the edge's options to look at when the call failed at the TLS
    handshake (set by `CloudClient`, see `likely_cause`), else None.
    """

    retry = False

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.likely_cause: str | None = None


class RetryLater(CloudError):
    """Transient: the cloud is unreachable, too slow or busy. Keep the request; send it again."""

    retry = True


class NeverRetry(CloudError):
    """Permanent: the request, the model or the credentials are wrong, or the server has a bug.
    Sending the same request again gives the same answer."""


def classify(code: grpc.StatusCode, message: str) -> CloudError:
    """RetryLater for UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED; NeverRetry otherwise.

    A message over the size bound is reported as RESOURCE_EXHAUSTED but never fits later: it is
    NeverRetry.
    """
    if code in RETRY_LATER_CODES and "larger than max" not in message:
        return RetryLater(code, message)
    return NeverRetry(code, message)


def likely_cause(config: ClientConfig, error: CloudError) -> str | None:
    """What most likely failed, naming the edge's options to look at, when a call fails at
    the TLS handshake; None for any other failure. gRPC reports those only as UNAVAILABLE,
    which reads like a cloud that is down: a cloud under mutual TLS closes the connection of
    an edge without an accepted client certificate ("Socket closed"), as a TLS cloud does a
    plaintext edge's. A connection closed at once is also what a load balancer with no cloud
    behind it, or a cloud restarting, gives: the cause says so. One dropped mid-call ("Stream
    removed") is no handshake: None."""
    if error.code is not grpc.StatusCode.UNAVAILABLE or "Stream removed" in error.message:
        return None
    message = error.message
    if "Socket closed" in message:
        return f"{_closed_cause(config)} {DROPPED_ALSO}"
    if not config.uses_tls:
        return None
    if "WRONG_VERSION_NUMBER" in message:
        return (
            "the cloud serves no TLS at this address (or another service answers there, e.g. "
            "a metrics port): drop --tls, --root-certs, --client-cert and --client-key, or "
            "give the cloud --tls-cert and --tls-key"
        )
    if "CERTIFICATE_VERIFY_FAILED" in message:
        return "this edge does not trust the cloud's certificate: give --root-certs with its CA"
    if "Hostname Verification" in message:
        return (
            "the cloud's certificate does not name the host of --cloud: give --server-name "
            "with a name it holds"
        )
    return None


#: Appended to the cause of a connection closed at once: what else closes one so.
DROPPED_ALSO = (
    "(or, with the cloud down or restarting, a load balancer or proxy in front of it closed "
    "the connection: check the cloud first)"
)


def _closed_cause(config: ClientConfig) -> str:
    """The TLS reason a cloud closes this edge's connection at once."""
    if not config.uses_tls:
        return (
            "the cloud serves TLS and this edge connects without: give --root-certs (the CA "
            "of the cloud's certificate) or --tls"
        )
    if config.client_cert is None:
        return (
            "the cloud requires a client certificate (mutual TLS: its --client-ca) and this "
            "edge sends none: give --client-cert and --client-key"
        )
    return (
        f"the cloud does not accept --client-cert {config.client_cert} (mutual TLS: it must "
        "be signed by the CA of the cloud's --client-ca)"
    )


@dataclass(frozen=True)
class ClientConfig:
    """How to reach the cloud.

    Attributes:
        addresses: "host:port", several "ip:port,ip:port" (balanced round-robin; a dead one is
            routed around), or any gRPC target ("dns:///name:port" resolving to every replica).
        timeout_s: deadline of a Detect call, seconds.
        manifest_timeout_s: deadline of the small calls (manifest, health), seconds.
        max_message_bytes: bound on one message, both directions (the server's bound should
            match: int8 features of an 800x960 input are ~16 MB, fp32 ~65 MB).
        keepalive_time_s: ping an idle connection this often to notice a dead peer.
        keepalive_timeout_s: a ping unanswered this long closes the connection.
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
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    tls: bool = False
    root_certs: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)
    edge_name: str | None = None
    own_connection: bool = False

    def __post_init__(self) -> None:
        channel_target(self.addresses)  # raises on a malformed address list
        if self.edge_name is not None:
            check_edge_name(self.edge_name)
        if self.timeout_s <= 0 or self.manifest_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")

    @property
    def uses_tls(self) -> bool:
        return bool(self.tls or self.root_certs or self.client_cert)


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
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # gRPC 1.85 ends a keepalive ping's wait at the ping timeout (60 s), not the above
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.service_config", json.dumps(service_config)),
        # A restarted replica is found again within seconds rather than gRPC's 2 minutes.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 10_000),
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


@dataclass(frozen=True)
class CloudDetections:
    """The cloud's answer for one image.

    Attributes:
        request_id: the request's id.
        fingerprint: the fingerprint of the model that answered.
        boxes: float32 [K, 4], x1y1x2y2 in original-image px, by decreasing score.
        scores: float32 [K].
        labels: int64 [K], 1-based class indices.
        class_names: per box, the class name of its label.
        timings: server-side seconds: "decode_s", "rpn_s", "roi_s", "total_s".
        cached: the server answered from its idempotency store (heads not run again).
    """

    request_id: str
    fingerprint: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    timings: dict[str, float]
    cached: bool


@dataclass(frozen=True)
class ServedManifest:
    """The manifest of a model the cloud serves.

    Attributes:
        fingerprint: that model's fingerprint.
        data: its manifest.json's contents.
        served: every model the server serves, its default first (a server older than this
            field reports only `fingerprint`).
    """

    fingerprint: str
    data: dict[str, Any]
    served: tuple[str, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.data.get("class_names", ()))


def detections_from_proto(response: pb.DetectResponse) -> CloudDetections:
    """A DetectResponse as numpy arrays."""
    boxes = response.boxes
    t = response.timings
    return CloudDetections(
        request_id=response.request_id,
        fingerprint=response.model_fingerprint,
        boxes=np.array([[b.x1, b.y1, b.x2, b.y2] for b in boxes], dtype=np.float32).reshape(-1, 4),
        scores=np.array([b.score for b in boxes], dtype=np.float32),
        labels=np.array([b.label for b in boxes], dtype=np.int64),
        class_names=tuple(b.class_name for b in boxes),
        timings={"decode_s": t.decode_s, "rpn_s": t.rpn_s, "roi_s": t.roi_s, "total_s": t.total_s},
        cached=response.cached,
    )


class CloudClient:
    """A channel to the cloud detection server (one or several replicas).

    Thread-safe; one per process is enough. Failures raise RetryLater or NeverRetry.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        target = channel_target(config.addresses)
        options = channel_options(config)
        if config.uses_tls:
            self._channel = grpc.secure_channel(target, channel_credentials(config), options)
        else:
            if config.token:
                log.warning("sending the bearer token without TLS to %s", target)
            self._channel = grpc.insecure_channel(target, options)
        self._stub = pb_grpc.DetectionStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = tuple(
            (key, value)
            for key, value in (
                ("authorization", f"Bearer {config.token}" if config.token else None),
                (EDGE_NAME_KEY, config.edge_name),
            )
            if value is not None
        )

    def detect(
        self,
        encoded: Sequence[EncodedTensor],
        image: ImageMeta,
        request_id: str,
        fingerprint: str,
        timeout: float | None = None,
    ) -> CloudDetections:
        """Detections for one image's encoded FPN levels.

        Args:
            encoded: the five levels from `splitdet.shared.codec.encode`.
            image: the image's original and resized sizes.
            request_id: idempotency key; re-send a failed request with the same id.
            fingerprint: the manifest fingerprint of the model the edge ran.
            timeout: deadline, seconds (default config.timeout_s).

        Raises:
            RetryLater, NeverRetry: the call failed (see `classify`).
        """
        return self.send_request(build_request(encoded, image, request_id, fingerprint), timeout)

    def send_request(
        self, request: pb.DetectRequest, timeout: float | None = None
    ) -> CloudDetections:
        """`detect` for an already built request (e.g. one stored in the edge's outbox).

        Raises:
            RetryLater, NeverRetry: the call failed (see `classify`).
        """
        size = request.ByteSize()
        if size > self.config.max_message_bytes:
            raise NeverRetry(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes is larger than max message size "
                f"{self.config.max_message_bytes}; use a smaller codec (e.g. int8)",
            )
        response = self._call(self._stub.Detect, request, timeout or self.config.timeout_s)
        return detections_from_proto(response)

    def manifest(self, fingerprint: str = "", timeout: float | None = None) -> ServedManifest:
        """The manifest of the served model `fingerprint` ("" = the server's default).

        Raises:
            NeverRetry: FAILED_PRECONDITION when the server does not serve that model (its
                message lists what it serves), or a bad manifest.
            RetryLater: the server is unreachable or busy.
        """
        response = self._call(
            self._stub.GetManifest,
            pb.GetManifestRequest(model_fingerprint=fingerprint),
            timeout or self.config.manifest_timeout_s,
        )
        try:
            data = json.loads(response.manifest_json)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise NeverRetry(
                grpc.StatusCode.INTERNAL, f"server sent a bad manifest: {exc}"
            ) from None
        served = tuple(response.served_fingerprints) or (response.model_fingerprint,)
        return ServedManifest(response.model_fingerprint, data, served)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status name, e.g. "SERVING" or "NOT_SERVING"."""
        response = self._call(
            self._health.Check,
            health_pb2.HealthCheckRequest(service=service),
            timeout or self.config.manifest_timeout_s,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _call(self, method, request, timeout: float):
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            error = classify(exc.code(), exc.details() or "")
            error.likely_cause = likely_cause(self.config, error)
            raise error from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
