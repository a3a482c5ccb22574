"""The edge client's failures (torch-free): the errors a call to the cloud raises, which of
them are worth retrying, an answer refused as too large, and the likely cause of a call that
failed at the TLS handshake, naming the edge's options to look at."""

from __future__ import annotations

import re

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
    """RetryLater for RETRY_LATER_CODES (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
    CANCELLED); NeverRetry otherwise.

    A message over the size bound is reported as RESOURCE_EXHAUSTED but never fits later: it is
    NeverRetry.
    """
    too_large = code is grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message
    if code in RETRY_LATER_CODES and not too_large:
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
