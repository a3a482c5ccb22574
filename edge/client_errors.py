"""The edge client's failures (torch-free): the errors a call to the cloud raises, which of
them are worth retrying, an answer refused as too large, and the likely cause of a call that
failed at the TLS handshake, naming the edge's options to look at.

Also the contract of the reason a splitdet cloud gives its own refusals, as trailing metadata
(REASON_KEY, one of REASONS): RESOURCE_EXHAUSTED is both "busy, retry later" and "too large,
never", which only the reason, or an older cloud's message text, tells apart.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import grpc

from splitdet.edge.client_channel import ClientConfig

#: Status codes worth retrying later (the server is down, slow or busy). CANCELLED too: a call
#: this edge cancels itself never gets here (the sender knows its own cancel), so it is the
#: cloud's stop cutting a call still receiving its request, or a proxy's: nothing about the
#: request, which a dead letter would wrongly keep from the cloud until `edge requeue`.
RETRY_LATER_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)
#: gRPC's refusal of a message over the receive bound: "... larger than max (N vs. M)"; since
#: gRPC 1.5x its side says whose: "CLIENT: Received ..." is an answer this edge refused.
_TOO_LARGE = re.compile(r"Received message larger than max \((\d+) vs\. (\d+)\)")

#: Trailing metadata key of a splitdet cloud's own refusals: why, one of REASONS. Absent from
#: an older cloud's, and from gRPC's own (a message over gRPC's bound, a connection failed).
REASON_KEY = "splitdet-reason"
#: RESOURCE_EXHAUSTED: the cloud's queue is full, or a call waited --queue-wait for a slot.
BUSY = "busy"
#: RESOURCE_EXHAUSTED: the request is over the cloud's --max-message-mib; it never fits.
TOO_LARGE = "too-large"
#: RESOURCE_EXHAUSTED: the cloud ran short of memory or threads answering it.
SHORTAGE = "shortage"
#: INVALID_ARGUMENT: the request is malformed (tensors, sizes, ids, protobuf).
INVALID_REQUEST = "invalid-request"
#: FAILED_PRECONDITION: the request's model fingerprint is not served there.
UNKNOWN_MODEL = "unknown-model"
#: UNAUTHENTICATED: no accepted bearer token.
UNAUTHENTICATED = "unauthenticated"
#: DEADLINE_EXCEEDED: the call's deadline passed while it waited or ran.
DEADLINE_PASSED = "deadline-passed"
#: CANCELLED: the caller went away.
CANCELLED = "cancelled"
#: UNAVAILABLE: the cloud is stopping (SIGTERM); another replica, or a later try, answers.
SHUTTING_DOWN = "shutting-down"
#: INTERNAL: a bug of the cloud's.
INTERNAL = "internal"
#: Every reason a cloud gives -> whether the same request is worth sending again.
REASONS: dict[str, bool] = {
    BUSY: True,
    TOO_LARGE: False,
    SHORTAGE: True,
    INVALID_REQUEST: False,
    UNKNOWN_MODEL: False,
    UNAUTHENTICATED: False,
    DEADLINE_PASSED: True,
    CANCELLED: True,
    SHUTTING_DOWN: True,
    INTERNAL: False,
}


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


def classify(
    code: grpc.StatusCode,
    message: str,
    trailers: Sequence[tuple[str, str | bytes]] | None = None,
) -> CloudError:
    """RetryLater or NeverRetry for a failed call of status `code` and `message`, with the
    call's trailing metadata `trailers` (`grpc.RpcError.trailing_metadata()`).

    The reason a splitdet cloud gives (`reason_of`, one of REASONS) decides when there is one.
    Without (an older cloud, gRPC's own refusals): RetryLater for RETRY_LATER_CODES
    (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, CANCELLED), NeverRetry otherwise; a
    message over the size bound is reported as RESOURCE_EXHAUSTED but never fits later, told
    by its text ("larger than max", gRPC's and an older cloud's): it is NeverRetry.
    """
    reason = reason_of(trailers)
    if reason is not None:
        retry = REASONS[reason]
        return RetryLater(code, message) if retry else NeverRetry(code, message)
    too_large = code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message
    if code in RETRY_LATER_CODES and not too_large:
        return RetryLater(code, message)
    return NeverRetry(code, message)


def reason_of(trailers: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The reason a splitdet cloud gave its refusal in the trailing metadata `trailers`
    (REASON_KEY), when it is one of REASONS; None when there is none (an older cloud, gRPC's
    own refusal) or one this edge does not know (a newer cloud's: the status code decides)."""
    for key, value in trailers or ():
        if key == REASON_KEY and isinstance(value, str) and value in REASONS:
            return value
    return None


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
