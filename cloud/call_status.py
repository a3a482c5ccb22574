"""How a call of the Detection service ends: the exceptions the servicer raises, the status
code and message each becomes, and the log line of a refusal.

    InvalidRequest: bad tensors, shapes, codecs, sizes, ids; bad protobuf   INVALID_ARGUMENT
    FingerprintMismatch: a model this server does not serve                 FAILED_PRECONDITION
    Overloaded: beyond --max-concurrent + --max-queued Detect calls, or a   RESOURCE_EXHAUSTED
        call that waited --queue-wait for a slot
    TooLarge: a request over --max-message-mib                              RESOURCE_EXHAUSTED
    DeadlinePassed: the caller's deadline passed during the work            DEADLINE_EXCEEDED
    Cancelled: the caller went away                                         CANCELLED
    ShuttingDown: a new or waiting call after SIGTERM                       UNAVAILABLE
    the server short of memory or threads (`shortage`): MemoryError, torch's RESOURCE_EXHAUSTED
        allocator's RuntimeError, a thread that cannot start (the error itself, or
        what it was raised from; not what it was raised while handling)
    anything else: a bug (logged with its traceback)                        INTERNAL

A missing or wrong bearer token is refused before the servicer (cloud/tokens.py,
UNAUTHENTICATED). Status messages are cut to MAX_STATUS_CHARS: they travel in a trailer that
clients bound (8 KiB).

Every refusal also carries its reason, machine-readable, as trailing metadata
(`splitdet-reason`: edge/client_errors.py REASONS): `busy` (Overloaded) and `too-large`
(TooLarge) share RESOURCE_EXHAUSTED, and a client must not have to read the message to tell
retry-later from never (`reason_for`, `refuse`).
"""

from __future__ import annotations

import logging

import grpc

from splitdet.cloud.core import Cancelled, DeadlinePassed, FingerprintMismatch, InvalidRequest
from splitdet.cloud.log_limit import Line, repeats_fields, repeats_note
from splitdet.edge import client_errors as reasons
from splitdet.shared.shortage import short_of

log = logging.getLogger(__name__)

#: Longest status message sent (percent-encoded, 500 characters stay below clients' 8 KiB bound).
MAX_STATUS_CHARS = 500


class Overloaded(Exception):
    """The server already runs its maximum of concurrent Detect calls."""


class ShuttingDown(Exception):
    """The server is draining before it stops; another replica (or a later try) must answer."""


class TooLarge(Exception):
    """A request over the server's message bound; it will not fit later either. Its message
    says "larger than max", which edges read as final (`edge.client.classify`), as they do
    gRPC's own refusal of a message over the bound gRPC enforces
    (`channel_options.grpc_options`)."""


#: Exception type -> status code; the first match wins, anything unlisted is INTERNAL (or
#: RESOURCE_EXHAUSTED when it says the server is short of memory or threads: `shortage`).
STATUS_FOR_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (FingerprintMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (DeadlinePassed, grpc.StatusCode.DEADLINE_EXCEEDED),
    (Cancelled, grpc.StatusCode.CANCELLED),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
)
#: Exception type -> the reason its refusal carries (`reason_for`), as STATUS_FOR_ERROR.
REASON_FOR_ERROR: tuple[tuple[type[BaseException], str], ...] = (
    (FingerprintMismatch, reasons.UNKNOWN_MODEL),
    (DeadlinePassed, reasons.DEADLINE_PASSED),
    (Cancelled, reasons.CANCELLED),
    (InvalidRequest, reasons.INVALID_REQUEST),
    (Overloaded, reasons.BUSY),
    (TooLarge, reasons.TOO_LARGE),
    (ShuttingDown, reasons.SHUTTING_DOWN),
)


#: Refusals that mean a misconfigured edge or bad input, logged at WARNING (an operator running
#: --log-level WARNING must see a camera on the wrong model or sending what cannot be read); the
#: others (busy, deadline passed, caller gone, shutting down) shed load and are logged at INFO.
#: A missing or wrong token (UNAUTHENTICATED, cloud/tokens.py) is a WARNING too.
MISCONFIGURED: tuple[type[BaseException], ...] = (FingerprintMismatch, InvalidRequest, TooLarge)


def refusal_level(exc: BaseException) -> int:
    """The level of a refused call's log line: WARNING for MISCONFIGURED and for a server
    short of memory or threads (`is_shortage`: the operator's to fix), else INFO."""
    if isinstance(exc, MISCONFIGURED) or is_shortage(exc):
        return logging.WARNING
    return logging.INFO


def is_shortage(exc: BaseException) -> bool:
    """Whether `exc` fails its call as a shortage (`shortage`): of no type STATUS_FOR_ERROR
    names (their codes win). Such refusals get log lines of their own, apart from the busy
    ones they share RESOURCE_EXHAUSTED with (`servicer._rpc`)."""
    return not _listed(exc) and shortage(exc) is not None


def _listed(exc: BaseException) -> bool:
    """Whether `exc` is of a type STATUS_FOR_ERROR names (its code wins over `shortage`)."""
    return any(isinstance(exc, error_type) for error_type, _ in STATUS_FOR_ERROR)


def shortage(exc: BaseException, resized_hw: tuple[int, int] | None = None) -> str | None:
    """The status message for `exc` (or an exception it was explicitly raised from: `raise
    ... from`) when it says the server ran short of memory or threads: a MemoryError (numpy's
    too), torch's allocator RuntimeError, a RuntimeError of a thread that could not start
    (e.g. under an address-space limit, `prlimit --as`): `shared.shortage.short_of`. None
    for anything else: an exception raised while handling a shortage (its `__context__`) is
    a failure of its own, a bug whose traceback must be logged, not a shortage retried for
    ever. `resized_hw`: the request's
    size after resizing, named when known (`shortage_message`).

    Such a call failed for want of the server's resources, not for its request: it is refused
    with RESOURCE_EXHAUSTED, which edges retry later as for a busy server, instead of INTERNAL,
    which they keep as a dead letter (`edge.client_errors.classify`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        what = short_of(exc)
        if what is not None:
            return shortage_message(what, exc, resized_hw)
        exc = exc.__cause__
    return None


def shortage_message(
    what: str, exc: BaseException, resized_hw: tuple[int, int] | None = None
) -> str:
    """The status message of a call failed short of `what` ("memory", "threads") by `exc`.
    Honest about a retry: a request at an export's largest input can fail every time on a
    cloud without the memory for it (2048x2448 px under `prlimit --as=4.7G`, where 400x2448
    px were answered), so it says what to do when the edge's retries keep failing."""
    detail = _first_line(exc) or type(exc).__name__
    size = f" ({resized_hw[0]}x{resized_hw[1]} px after resizing)" if resized_hw else ""
    if what == "threads":  # (the process/thread limit, RLIMIT_NPROC, not memory)
        remedy = (
            "the cloud's process/thread limit is too low (raise `ulimit -u`, systemd "
            "LimitNPROC= / TasksMax=, or lower --threads, --max-concurrent, --max-queued)"
        )
    else:
        remedy = (
            "the cloud needs more memory for this export's largest inputs (lower "
            "--max-concurrent, or more memory)"
        )
    return (
        f"the cloud ran short of {what} ({type(exc).__name__}: {detail}) for this "
        f"request{size}: not the request's fault; it is retried; if it keeps failing, {remedy}"
    )


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else ""


#: The methods of the Detection service (counted by method in ServerMetrics).
METHODS = ("Detect", "GetManifest")
#: Every status code a call of METHODS can end with but OK: STATUS_FOR_ERROR's, INTERNAL (a
#: bug) and UNAUTHENTICATED (TokenInterceptor).
FAILURE_CODES = (
    *dict.fromkeys(code for _, code in STATUS_FOR_ERROR),
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAUTHENTICATED,
)


def status_for(
    exc: BaseException, resized_hw: tuple[int, int] | None = None
) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call reports for `exc`; `resized_hw`: its
    request's size after resizing, when known (named by a shortage's message)."""
    for error_type, code in STATUS_FOR_ERROR:
        if isinstance(exc, error_type):
            return code, _clip(str(exc))
    short = shortage(exc, resized_hw)
    if short is not None:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, _clip(short)
    return grpc.StatusCode.INTERNAL, _clip(f"internal error: {type(exc).__name__}: {exc}")


def reason_for(exc: BaseException) -> str:
    """The reason (edge/client_errors.py REASONS) a call failed by `exc` is refused with,
    matching `status_for`'s code: REASON_FOR_ERROR's, `shortage` for a server short of memory
    or threads, `internal` for anything else."""
    for error_type, reason in REASON_FOR_ERROR:
        if isinstance(exc, error_type):
            return reason
    return reasons.SHORTAGE if shortage(exc) is not None else reasons.INTERNAL


def refuse(context: grpc.ServicerContext, code: grpc.StatusCode, message: str, reason: str) -> None:
    """End the call with `code` and `message`, its reason (edge/client_errors.py REASONS) in
    the trailing metadata (`splitdet-reason`): clients tell a busy refusal from a final one
    without reading the message. Raises, as `context.abort` does."""
    set_trailers = getattr(context, "set_trailing_metadata", None)
    if set_trailers is not None:  # (a stand-in context of a test may have none)
        set_trailers(((reasons.REASON_KEY, reason),))
    context.abort(code, message)


def _clip(message: str) -> str:
    if len(message) <= MAX_STATUS_CHARS:
        return message
    return f"{message[: MAX_STATUS_CHARS - 30]}… ({len(message)} characters, cut)"


def refusal_line(
    method: str,
    peer: str,
    edge: str,
    code: grpc.StatusCode,
    message: str,
    event: str,
    every_s: float,
    claims: bool = False,
    level: int = logging.INFO,
    more: dict | None = None,
) -> Line:
    """The log line of a call refused (at `level`: `refusal_level`) or failed (ERROR, with the
    traceback being handled), as a `log_limit.Line` for `LineLimiter.write_from`: written at
    once with how many lines of its kind (at most one per `every_s`) were left out since the
    last one and the edges they named, or, itself left out, as the server stops
    (`LineLimiter.flush`: field `at_stop`, and a failure's line without a traceback then).
    `claims`: `edge` is only what the call claims (refused before its token was checked);
    `more`: fields of the line beside those every refusal's carries (method, peer, edge, code,
    message)."""

    def line(repeats: int, names: list[str], at_stop: bool) -> None:
        fields = {"event": event, "method": method, "peer": peer, "edge": edge,
                  "code": code.name, "message": message, **(more or {}),
                  **repeats_fields(repeats, names, at_stop)}  # fmt: skip
        note = repeats_note(repeats, every_s, names, at_stop)
        if code is grpc.StatusCode.INTERNAL:
            write = log.error if at_stop else log.exception  # (no traceback in hand at a stop)
            write("%s from %s (edge %s) failed%s", method, peer, edge, note,
                  extra={"fields": fields})  # fmt: skip
        else:
            log.log(level, "%s from %s (%s %s) refused (%s): %s%s", method, peer,
                    "claims edge" if claims else "edge", edge, code.name, message, note,
                    extra={"fields": fields})  # fmt: skip

    return line
