"""The edge's gRPC client of the cloud detection server (torch-free).

    client = CloudClient(ClientConfig("10.0.0.5:50051,10.0.0.6:50051", token=token))
    try:
        result = client.detect(encoded_levels, ImageMeta((2048, 2448), (800, 956)), request_id,
                               manifest.fingerprint)
    except RetryLater:   # UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED: keep it, try again
        ...
    except NeverRetry:   # INVALID_ARGUMENT, FAILED_PRECONDITION, UNAUTHENTICATED, INTERNAL, ...
        ...              # (BadAnswer: the call succeeded but its answer breaks the contract)

Every answer is checked before anyone sees it (`checked_detections`): the request's id and
model, finite corners and scores in [0, 1], boxes inside the image, labels and class names of
the model's manifest, no more boxes than its `box_detections_per_img`. The manifest is the
edge's own (`CloudClient.expect`), or one the cloud sent (a GetManifest call made for its own
sake: a start-up check), believed only when its contents hash to the request's fingerprint;
kept for the process. No call is made to fetch it: an answer of a model whose manifest this
process never read keeps the bounds every answer keeps (labels from 1, class names of at most
CLASS_NAME_BYTES_ALLOWED characters, at most ANSWER_BOXES_ALLOWED boxes).
An answer is received only up to `MAX_ANSWER_BYTES` (a real one is kilobytes), whatever the
bound on the edge's own requests.

Every channel option lives in `channel_options` (message bounds, keepalive, round_robin over
several addresses); every call has a deadline. gRPC's own retries are not relied upon: it buffers
at most 256 KiB per call for retrying and our requests are MBs, so the edge's outbox re-sends,
and the cloud's idempotency on request_id makes re-sending safe.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitdet.shared.codec import EncodedTensor
from splitdet.shared.config import ModelConfig
from splitdet.shared.detection import ImageMeta
from splitdet.shared.edge_name import EDGE_NAME_KEY, check_edge_name
from splitdet.shared.manifest import MAX_MANIFEST_BYTES, Manifest, compute_fingerprint
from splitdet.shared.messages import build_request
from splitdet.shared.wire import detection_pb2 as pb
from splitdet.shared.wire import detection_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_R = TypeVar("_R")

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

#: How far (px) a box corner may lie outside its original image and still be taken (then
#: clamped onto the image). The cloud clips every box to the resized image, then scales it by
#: original / resized in float32 (torchvision's `resize_boxes`), and the wire carries float32:
#: a corner on the image's edge may come out a few float32 steps past it, at most ~0.01 px at
#: the largest side a request may have (65536 px). 1 px allows that a hundredfold; a box further
#: out was not mapped onto this image, and clamping would turn it into a plausible box on the
#: image's border (which `edge collect` would write as a label): it is refused.
BOX_TOLERANCE_PX = 1.0
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
#: gRPC's refusal of a message over the receive bound: "... larger than max (N vs. M)"; since
#: gRPC 1.5x its side says whose: "CLIENT: Received ..." is an answer this edge refused.
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")


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


class BadAnswer(NeverRetry):
    """The call succeeded but its answer is not one a splitdet cloud of this model gives (an
    id or model not the request's, a NaN corner, an unknown label, too many boxes, an answer
    larger than `MAX_ANSWER_BYTES`, a manifest that does not hash to its fingerprint). Nothing
    of it may be kept. Permanent: the cloud answers a repeated request id from its store, so
    sending it again gets the same answer; the edge dead-letters the request, which
    `splitdet edge requeue` sends again once the cloud is fixed. `code` is INTERNAL (a server
    bug, as the wire contract calls it), RESOURCE_EXHAUSTED for an answer over the bound."""


def classify(code: grpc.StatusCode, message: str) -> CloudError:
    """RetryLater for UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED; NeverRetry otherwise.

    A message over the size bound is reported as RESOURCE_EXHAUSTED but never fits later: it is
    NeverRetry.
    """
    if code in RETRY_LATER_CODES and "larger than max" not in message:
        return RetryLater(code, message)
    return NeverRetry(code, message)


def answer_too_large(code: grpc.StatusCode, message: str, bound: int) -> BadAnswer | None:
    """The error for an answer gRPC refused as larger than this client's receive bound
    `bound`, naming the cloud's answer (a request over the cloud's bound is the edge's own, with
    other advice); None for any other failure. gRPC 1.5x and later say "CLIENT: Received";
    older ones say only "Received", told apart by the bound they name being ours."""
    if code is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    match = _TOO_LARGE.search(message)
    if match is None or "SERVER:" in message:
        return None
    if "CLIENT: Received" not in message and int(match.group(2)) != bound:
        return None
    return BadAnswer(
        code,
        f"the cloud's answer of {match.group(1)} bytes is larger than this edge takes "
        f"({bound} bytes; a splitdet cloud's answer is kilobytes): a cloud that is not "
        "splitdet's, or a broken one, or a proxy in between; nothing of it was kept, and the "
        "request itself is fine",
    )


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
        max_message_bytes: bound on one request (the server's bound should match: int8
            features of an 800x960 input are ~16 MB, fp32 ~65 MB); answers are bounded by it
            too, and by `max_answer_bytes`.
        max_answer_bytes: bound on one answer (default MAX_ANSWER_BYTES: a real one is
            kilobytes).
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
    max_answer_bytes: int = MAX_ANSWER_BYTES
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
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("mutual TLS needs both a client certificate and its key")

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is TLS: asked for, or implied by root or client certificates."""
        return bool(self.tls or self.root_certs or self.client_cert)

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
        """The model's foreground class names (label k is class_names[k - 1])."""
        return tuple(self.data.get("class_names", ()))


@dataclass(frozen=True)
class AnswerRules:
    """What an answer of one model export may hold, from that export's manifest.

    Attributes:
        fingerprint: the export's fingerprint.
        class_names: its foreground classes; label k (1-based) is class_names[k - 1].
        max_boxes: its `box_detections_per_img`, the most boxes one answer holds.
    """

    fingerprint: str
    class_names: tuple[str, ...]
    max_boxes: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> AnswerRules:
        """The rules of a manifest read (and verified) from a model directory."""
        config = manifest.model_config
        return cls(manifest.fingerprint, config.class_names, config.box_detections_per_img)

    @classmethod
    def from_served(cls, fingerprint: str, data: Any) -> AnswerRules:
        """The rules of a manifest the cloud sent as the one of `fingerprint`, believed only
        when its contents hash to that fingerprint (artifact digests, model settings, gate
        threshold and spec version, as `splitdet export` hashed them).

        Raises:
            ValueError: not a manifest, or one of another model.
        """
        try:
            config = ModelConfig.from_dict(data["model_config"])
            artifacts = {str(k): str(v) for k, v in data["artifacts"].items()}
            recomputed = compute_fingerprint(
                artifacts, config, float(data["gate_threshold"]), str(data["spec_version"])
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a manifest this edge reads ({exc!r})") from None
        if recomputed != fingerprint:
            raise ValueError(
                f"its contents hash to {_short(recomputed)}, not to the model's fingerprint "
                f"{_short(fingerprint)}"
            )
        return cls(fingerprint, config.class_names, config.box_detections_per_img)


def checked_detections(
    response: pb.DetectResponse, request: pb.DetectRequest, rules: AnswerRules | None
) -> CloudDetections:
    """The answer to `request` as numpy arrays, once it passed every check; corners within
    BOX_TOLERANCE_PX of the image are clamped onto it.

    Args:
        response: the cloud's answer.
        request: the request it answers (its id, model and original image size).
        rules: the rules of the request's model (its labels, class names and box cap); None
            when unknown (a request of an earlier export whose manifest this process never
            read): then any label from 1, a class name of at most CLASS_NAME_BYTES_ALLOWED
            characters, at most ANSWER_BOXES_ALLOWED boxes.

    Raises:
        BadAnswer: the answer is not one a splitdet cloud of this model gives; the message
            names what is wrong.
    """
    check_identity(response, request)
    n = len(response.boxes)  # (counted before the boxes are read into arrays)
    if rules is not None and n > rules.max_boxes:
        _bad(f"holds {n} boxes, beyond the model's box_detections_per_img ({rules.max_boxes})")
    if n > ANSWER_BOXES_ALLOWED:
        _bad(f"holds {n} boxes, beyond the {ANSWER_BOXES_ALLOWED} any answer may hold")
    result = detections_from_proto(response)
    _check_timings(result.timings)
    if n == 0:
        return result
    boxes, scores, labels = result.boxes, result.scores, result.labels
    for i in range(n):
        if not (np.isfinite(boxes[i]).all() and np.isfinite(scores[i])):
            _bad(f"holds a box with a non-finite corner or score (box {i + 1} of {n}: "
                 f"({_corners(boxes[i])}), score {scores[i]:g})")  # fmt: skip
        if not 0.0 <= scores[i] <= 1.0:
            _bad(f"holds score {scores[i]:g} (box {i + 1} of {n}), outside [0, 1]")
        label, name = int(labels[i]), result.class_names[i]
        if label < 1:
            _bad(f"holds label {label} (box {i + 1} of {n}), not a class index (labels are "
                 f"1-based; 0 is the background)")  # fmt: skip
        if rules is None:
            if not name or len(name) > CLASS_NAME_BYTES_ALLOWED:
                _bad(f"names label {label} {_shown(name)} (box {i + 1} of {n}), not a class "
                     f"name (1 to {CLASS_NAME_BYTES_ALLOWED} characters)")  # fmt: skip
            continue
        known = len(rules.class_names)
        if label > known:
            _bad(f"holds label {label}, beyond the model's {known} class(es)")
        if name != rules.class_names[label - 1]:
            _bad(f"names label {label} {_shown(name)} (box {i + 1} of {n}), "
                 f"not the model's {_shown(rules.class_names[label - 1])}")  # fmt: skip
    height, width = request.image.original_height, request.image.original_width
    bound = np.array([width, height, width, height], dtype=np.float64)
    tol = BOX_TOLERANCE_PX
    outside = ((boxes < -tol) | (boxes > bound + tol)).any(axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        _bad(f"holds box {i + 1} of {n} ({_corners(boxes[i])}) outside the {width}x{height} "
             f"px image (by more than {tol:g} px)")  # fmt: skip
    clamped = np.clip(boxes, 0.0, bound.astype(np.float32))
    inverted = (clamped[:, 0] >= clamped[:, 2]) | (clamped[:, 1] >= clamped[:, 3])
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        _bad(f"holds box {i + 1} of {n} ({_corners(boxes[i])}) that is empty or inverted "
             "(x1 < x2 and y1 < y2 is the contract)")  # fmt: skip
    return replace(result, boxes=clamped.astype(np.float32))


def check_identity(response: pb.DetectResponse, request: pb.DetectRequest) -> None:
    """The answer is to this request, by this request's model.

    A mismatch is permanent (BadAnswer), not RetryLater: an answer travels on the call's own
    HTTP/2 stream, so one for another request or model is the cloud's bug or a proxy's (an
    HTTP cache, a gateway mixing calls), and a splitdet cloud never answers with a model other
    than the one asked for (it refuses FAILED_PRECONDITION). Sending again would most likely
    get the same answer; as RetryLater it would pause the whole outbox at the backoff cap
    behind a fault only the operator can fix. As a dead letter the request is kept, counted
    (`splitdet_edge_dead_letters_total`), named in `edge status`, and `edge requeue` sends it
    again once the cloud or proxy is fixed.
    """
    if response.request_id != request.request_id:
        _bad(f"is for request_id {_shown(response.request_id)}, not this request's "
             f"{_shown(request.request_id)}")  # fmt: skip
    if response.model_fingerprint != request.model_fingerprint:
        _bad(f"comes from model {_short(response.model_fingerprint)}, not this request's "
             f"{_short(request.model_fingerprint)}")  # fmt: skip


def _check_timings(timings: dict[str, float]) -> None:
    for name, value in timings.items():
        if not (math.isfinite(value) and value >= 0):
            _bad(f"holds timing {name} = {value:g}, not a number of seconds >= 0")


def _corners(box: np.ndarray) -> str:
    """A box's corners, Float32[4] (x1, y1, x2, y2, px), as a message shows them."""
    return ", ".join(f"{v:g}" for v in box)


def _bad(what: str) -> None:
    raise BadAnswer(grpc.StatusCode.INTERNAL, f"the cloud's answer {what}")


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted, cut to `limit` characters (its length then given)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _short(fingerprint: str) -> str:
    return repr(fingerprint[:16] + "…") if len(fingerprint) > 16 else repr(fingerprint)


def detections_from_proto(response: pb.DetectResponse) -> CloudDetections:
    """A DetectResponse as numpy arrays, unchecked (`checked_detections` checks it)."""
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


#: The rules of every model this process has a manifest of that hashes to its fingerprint,
#: for every client: a fact about the fingerprint, whichever cloud sent it (the daemon's
#: start-up probe then spares its sender a GetManifest call). A few exports at a time; bounded.
_RULES: dict[str, AnswerRules] = {}
_RULES_LOCK = threading.Lock()
MAX_KEPT_RULES = 256


def remember_rules(rules: AnswerRules) -> None:
    """Keep `rules` for the answers of its model (the oldest dropped past MAX_KEPT_RULES)."""
    with _RULES_LOCK:
        _RULES.pop(rules.fingerprint, None)
        _RULES[rules.fingerprint] = rules
        while len(_RULES) > MAX_KEPT_RULES:
            del _RULES[next(iter(_RULES))]


def known_rules(fingerprint: str) -> AnswerRules | None:
    """The kept rules of model `fingerprint`, or None."""
    with _RULES_LOCK:
        return _RULES.get(fingerprint)


def forget_rules() -> None:
    """Drop every kept rule (tests: each fake cloud fetched afresh)."""
    with _RULES_LOCK:
        _RULES.clear()


#: Targets a bearer token was sent to without TLS, warned of once per process (a daemon makes a
#: client anew at every reconnect, loadtest one per simulated edge).
_PLAINTEXT_TOKEN_TARGETS: set[str] = set()
_PLAINTEXT_TOKEN_LOCK = threading.Lock()


def _first_plaintext_token(target: str) -> bool:
    """True the first time this process sends a token to `target` without TLS."""
    with _PLAINTEXT_TOKEN_LOCK:
        first = target not in _PLAINTEXT_TOKEN_TARGETS
        _PLAINTEXT_TOKEN_TARGETS.add(target)
    return first


class CloudClient:
    """A channel to the cloud detection server (one or several replicas).

    Thread-safe; one per process is enough. Failures raise RetryLater or NeverRetry (an
    answer that fails its checks: BadAnswer). The rules answers are checked by are kept per
    model for the process (`remember_rules`): from `expect`, or from a manifest the cloud sent
    that hashes to its fingerprint.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        target = channel_target(config.addresses)
        options = channel_options(config)
        if config.uses_tls:
            self._channel = grpc.secure_channel(target, channel_credentials(config), options)
        else:
            if config.token and _first_plaintext_token(target):
                log.warning("sending the bearer token without TLS to %s (said once per "
                            "process)", target)  # fmt: skip
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

    @staticmethod
    def expect(rules: AnswerRules) -> None:
        """Check answers for `rules.fingerprint` by these rules (e.g. from the edge's own
        manifest), in every client of this process, sparing the GetManifest call that would
        fetch them."""
        remember_rules(rules)

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

        The answer is checked (`checked_detections`), by the rules of the request's model
        when this process knows them (`known_rules`).

        Raises:
            RetryLater, NeverRetry: the call failed (see `classify`).
            BadAnswer: the answer failed its checks, or was larger than the receive bound.
        """
        size = request.ByteSize()
        if size > self.config.max_message_bytes:
            raise NeverRetry(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"request of {size} bytes is larger than max message size "
                f"{self.config.max_message_bytes}; use a smaller codec (e.g. int8)",
            )
        response = self._call(self._stub.Detect, request, timeout or self.config.timeout_s)
        # the model's own rules when this process knows them (`expect`, or a manifest of it
        # the cloud sent); else the bounds every answer keeps. No call is added for them: a
        # lookup failing would hold, or lose, an answer the cloud gave.
        return checked_detections(response, request, known_rules(request.model_fingerprint))

    def manifest(self, fingerprint: str = "", timeout: float | None = None) -> ServedManifest:
        """The manifest of the served model `fingerprint` ("" = the server's default).

        Raises:
            NeverRetry: FAILED_PRECONDITION when the server does not serve that model (its
                message lists what it serves); BadAnswer: a manifest that is not JSON.
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
            raise BadAnswer(
                grpc.StatusCode.INTERNAL, f"server sent a bad manifest: {exc}"
            ) from None
        served = tuple(response.served_fingerprints) or (response.model_fingerprint,)
        # a manifest that hashes to its fingerprint gives that model's rules (another is
        # refused when an answer needs them)
        with contextlib.suppress(ValueError):
            self.expect(AnswerRules.from_served(response.model_fingerprint, data))
        return ServedManifest(response.model_fingerprint, data, served)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """The server's grpc.health.v1 status name, e.g. "SERVING" or "NOT_SERVING"."""
        response = self._call(
            self._health.Check,
            health_pb2.HealthCheckRequest(service=service),
            timeout or self.config.manifest_timeout_s,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _call(self, method: Callable[..., _R], request: Message, timeout: float) -> _R:
        try:
            return method(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            too_large = answer_too_large(code, details, self.config.receive_bytes)
            if too_large is not None:
                raise too_large from None
            error = classify(code, details)
            error.likely_cause = likely_cause(self.config, error)
            raise error from None

    def close(self) -> None:
        """Close the client's gRPC channel."""
        self._channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
