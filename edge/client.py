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

The parts: the errors and the likely cause of a failed call (`client_errors`), the config,
channel options and credentials (`client_channel`), the answers, their checks and the rules
kept per model (`client_answers`); this module holds the client, and every name its callers
import from here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitdet.edge.client_answers import (
    AnswerRules,
    CloudDetections,
    ServedManifest,
    checked_detections,
    forget_rules,
    known_rules,
    remember_rules,
)
from splitdet.edge.client_channel import (
    MAX_ANSWER_BYTES,
    ClientConfig,
    channel_credentials,
    channel_options,
    channel_target,
)
from splitdet.edge.client_errors import (
    RETRY_LATER_CODES,
    BadAnswer,
    CloudError,
    NeverRetry,
    RetryLater,
    answer_too_large,
    classify,
    likely_cause,
)
from splitdet.shared.codec import EncodedTensor
from splitdet.shared.detection import ImageMeta
from splitdet.shared.edge_name import EDGE_NAME_KEY
from splitdet.shared.messages import build_request
from splitdet.shared.wire import detection_pb2 as pb
from splitdet.shared.wire import detection_pb2_grpc as pb_grpc

#: What callers import from here, wherever it is defined.
__all__ = [
    "MAX_ANSWER_BYTES",
    "RETRY_LATER_CODES",
    "AnswerRules",
    "BadAnswer",
    "ClientConfig",
    "CloudClient",
    "CloudDetections",
    "CloudError",
    "ImageMeta",
    "NeverRetry",
    "RetryLater",
    "build_request",
    "channel_options",
    "channel_target",
    "classify",
    "forget_rules",
    "likely_cause",
]

log = logging.getLogger(__name__)

_R = TypeVar("_R")


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
                log.warning(
                    "sending the bearer token without TLS to %s (said once per process)",
                    target,
                    extra={"fields": {"event": "token_without_tls", "target": target}},
                )
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
                message lists what it serves); BadAnswer: a manifest that is not a JSON object.
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
        if not isinstance(data, dict):
            raise BadAnswer(
                grpc.StatusCode.INTERNAL,
                f"server sent a bad manifest: a JSON {type(data).__name__}, not an object",
            )
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
            error = classify(code, details, exc.trailing_metadata())
            error.likely_cause = likely_cause(self.config, error)
            raise error from None

    def close(self) -> None:
        """Close the client's gRPC channel."""
        self._channel.close()

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
