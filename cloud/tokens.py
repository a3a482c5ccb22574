"""Bearer tokens on the cloud server: the accepted set (`AcceptedTokens`, from --token or a
--token-file watched for rotation) and the interceptor that refuses calls without one
(`TokenInterceptor`, UNAUTHENTICATED; health checks exempt)."""

from __future__ import annotations

import hmac
import logging
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

from splitdet.cloud.bearer import bearer_token
from splitdet.cloud.call_guard import HANDLER_FACTORIES
from splitdet.cloud.call_status import refusal_line, refuse
from splitdet.cloud.log_limit import LineLimiter, OwnLines
from splitdet.cloud.metrics import UNAUTHENTICATED_EDGE, ServerMetrics, claimed_edge
from splitdet.edge.client_errors import UNAUTHENTICATED

log = logging.getLogger(__name__)

#: Methods reachable without a bearer token (load balancers and orchestrators probe health).
TOKEN_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)
#: Seconds between two looks at --token-file for a change (AcceptedTokens).
TOKEN_CHECK_S = 2.0
#: How a refused caller is told to send its token (ends every UNAUTHENTICATED message).
SEND_TOKEN = "send metadata 'authorization: Bearer <token>'"


def token_refusal(supplied: str) -> str:
    """The UNAUTHENTICATED message of a call whose authorization metadata `supplied` (""
    when it sent none) holds no accepted token. Never quotes the value: it may be a token."""
    token = bearer_token(supplied)
    if not supplied or token == "":
        return f"missing bearer token: {SEND_TOKEN}"
    if token is None:
        return (
            "authorization metadata must be `Bearer <token>`: its scheme is missing or not "
            f"Bearer (in any case); {SEND_TOKEN}"
        )
    return f"wrong bearer token: {SEND_TOKEN}"


def file_stamp(path: Path) -> tuple[int, int] | None:
    """(mtime in ns, size) of a file, to notice that it changed; None when it cannot be read
    (gone, or replaced just now)."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_mtime_ns, found.st_size


class AcceptedTokens:
    """The bearer tokens the server accepts. Without a token file, the one token given. With
    a regular file, each token line of it (shared/cli.token_lines), read again by a watcher
    thread within TOKEN_CHECK_S of a change (a rotation without a restart: add the new token as
    a line, move the edges to it, remove the old line); calls only read the cached set, so a
    file that blocks or hangs never stalls the server. A line that is not a usable token is
    logged and skipped, the rest applied; a file left with no usable token, or gone, is logged
    and the tokens before it kept. A file that is not regular (a pipe) is not read again: the
    one token given is accepted. A file other users can read is warned of at start, and at a
    re-read only when its mode changed (shared/cli.warn_if_others_can_read).
    """

    def __init__(self, token: str | None = None, token_file: Path | None = None) -> None:
        self.token_file = None if token_file is None else Path(token_file)
        self._expected = tuple(t.encode() for t in ([token] if token else []))
        self._stamp: tuple[int, int] | None = None
        self._stop = threading.Event()
        if self.token_file is not None and self._regular():
            # stamped before reading: a change meanwhile is read again
            self._stamp = file_stamp(self.token_file)
            self._load(startup=True)
            threading.Thread(target=self._watch, name="splitdet-tokens", daemon=True).start()
        if not self._expected:
            raise ValueError("a bearer token is required")

    def _regular(self) -> bool:
        try:
            return stat.S_ISREG(self.token_file.stat().st_mode)
        except OSError:
            return False

    def _load(self, startup: bool = False) -> None:
        """Read the file's tokens into the accepted set (see the class docstring)."""
        from splitdet.shared.cli import (
            CommandError,
            token_lines,
            token_problem,
            warn_if_others_can_read,
        )

        try:
            lines = token_lines(self.token_file)
        except CommandError as exc:
            log.error("%s; keeping the tokens before it", exc,
                      extra={"fields": {"event": "token_file_unreadable"}})  # fmt: skip
            return
        # once per mode: a rotation that leaves the file as open as before says nothing again
        warn_if_others_can_read(self.token_file)
        tokens = []
        for number, line in enumerate(lines, 1):
            problem = token_problem(line)
            if problem:
                log.error("--token-file %s, token line %d: %s; skipped", self.token_file,
                          number, problem,
                          extra={"fields": {"event": "token_line_skipped"}})  # fmt: skip
            else:
                tokens.append(line)
        if not tokens:
            log.error("--token-file %s holds no usable token; keeping the tokens before it",
                      self.token_file,
                      extra={"fields": {"event": "token_file_empty"}})  # fmt: skip
            return
        self._expected = tuple(t.encode() for t in tokens)
        if not startup:
            fields = {"event": "tokens_reloaded", "tokens": len(tokens)}
            log.info("--token-file changed: %d token(s) accepted", len(tokens),
                     extra={"fields": fields})  # fmt: skip

    def _watch(self) -> None:
        while not self._stop.wait(TOKEN_CHECK_S):
            stamp = file_stamp(self.token_file)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            if stamp is None:
                log.warning("--token-file %s is gone; keeping the tokens read before",
                            self.token_file,
                            extra={"fields": {"event": "token_file_gone"}})  # fmt: skip
            elif not self._regular():
                log.warning("--token-file %s is no longer a regular file; not read",
                            self.token_file,
                            extra={"fields": {"event": "token_file_not_regular"}})  # fmt: skip
            else:
                self._load()

    def close(self) -> None:
        """Stop watching the file."""
        self._stop.set()

    def accepts(self, supplied: str) -> bool:
        """Whether `supplied` (the authorization metadata) is `Bearer <token>` of an accepted
        token (the scheme in any case: `bearer_token`), compared in constant time against
        each."""
        token = bearer_token(supplied)
        if not token:
            return False
        given = token.encode()
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(given, expected)
        return matched


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without `authorization: Bearer <token>` of an accepted token
    (AcceptedTokens; the scheme in any case; constant-time comparison).

    Health checks are exempt (TOKEN_EXEMPT_PREFIXES): probes rarely carry credentials.
    """

    def __init__(self, tokens: AcceptedTokens | str, metrics: ServerMetrics) -> None:
        self._tokens = tokens if isinstance(tokens, AcceptedTokens) else AcceptedTokens(tokens)
        self._metrics = metrics
        #: which refusals are logged: at most one line per minute per name claimed, for
        #: MAX_OWN_NAMES names; more share one (the counters count each)
        self.refusal_lines = LineLimiter()
        self.own_lines = OwnLines(UNAUTHENTICATED_EDGE, self.refusal_lines.every_s)
        # the one per-edge series known in advance: at 0 from the start (see ServerMetrics)
        metrics.edge_refusals.labels(UNAUTHENTICATED_EDGE, "UNAUTHENTICATED")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """The call's handler when its token is accepted (or it is exempt); else one that
        refuses it with UNAUTHENTICATED (None, UNIMPLEMENTED, for an unknown method)."""
        method = handler_call_details.method
        if method.startswith(TOKEN_EXEMPT_PREFIXES):
            return continuation(handler_call_details)
        supplied = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                supplied = value if isinstance(value, str) else ""
        if self._tokens.accepts(supplied):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: UNIMPLEMENTED, as without a token
        name = method.rsplit("/", 1)[-1]
        self._metrics.finished(name, grpc.StatusCode.UNAUTHENTICATED)
        message = token_refusal(supplied)
        # Counted under the label of the name it claims if that name has one (a camera the
        # server knew, its token revoked or rotated away), else under "unauthenticated": never
        # a new label (a caller without the token could use up the labels), never "seen" (it
        # could keep a dead camera alive). The log line names the claim, for the operator to
        # find the edge with the wrong token: at once, one line per minute per name claimed.
        edge = claimed_edge(handler_call_details.invocation_metadata)
        self._metrics.refused_unauthenticated(edge)

        def deny(request: Iterator[bytes], context: grpc.ServicerContext) -> None:
            peer = context.peer()
            kind = ("refused", self.own_lines.name_of(edge), "UNAUTHENTICATED")
            self.refusal_lines.write_from(kind, edge, refusal_line(
                name, peer, edge, grpc.StatusCode.UNAUTHENTICATED, message, "refused",
                self.refusal_lines.every_s, claims=True, level=logging.WARNING))  # fmt: skip
            refuse(context, grpc.StatusCode.UNAUTHENTICATED, message, UNAUTHENTICATED)

        # Taken as a request stream whatever the method: refused without waiting for (and
        # holding a thread through) a request body that a caller may never finish sending.
        return HANDLER_FACTORIES[(True, handler.response_streaming)](deny)
