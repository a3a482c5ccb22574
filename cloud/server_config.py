"""The cloud detection server's settings: `ServerConfig`, checked when it is made, and its bounds.

`ServerConfig` holds every setting of `splitdet cloud` (its options map onto it in
`cli_cloud`); a value out of its bounds raises ValueError naming it. Beside it stand the
defaults its fields start from that other modules use too: a MiB, the bound on one gRPC
message, a connection's age and a call's longest run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from splitdet.cloud.cli_cloud import OPTION_BOUNDS
from splitdet.cloud.metrics import FORGET_EDGES_S
from splitdet.shared.codec import DEFAULT_MAX_TOTAL_BYTES
from splitdet.shared.cores import usable_cores

MIB = 1 << 20
#: Default bound on one gRPC message: int8 FPN payloads at 800x960 are ~16 MB, fp32 ~65 MB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * MIB
#: Seconds a connection serves new calls (gRPC adds up to 10% jitter); then it is closed
#: gracefully (GOAWAY: clients reconnect without a failed call) and the calls on it get
#: --max-call seconds to finish before they are cancelled (a call that never sends its request
#: is ended sooner: --max-receive).
MAX_CONNECTION_AGE_S = 300.0
#: Default --max-call, seconds: above the edge's default --timeout (60 s) with room for its
#: wait for a slot (--queue-wait, 30 s).
MAX_CALL_S = 120.0
#: Default --max-receive, seconds: the longest a call may take from its headers to the end of
#: its request; then it is ended (DEADLINE_EXCEEDED) and its thread freed. The edge's default
#: --timeout (60 s): a request still arriving then is one a default edge has given up on, and
#: 50 MB (the `paper` preset's requests are tens of MB) arrive in it at 8 Mbit/s.
MAX_RECEIVE_S = 60.0


@dataclass(frozen=True)
class ServerConfig:
    """Every setting of the cloud detection server.

    Attributes:
        model_dir: an exported model directory (manifest.json, cloud_heads.pt, ...): the
            default model.
        more_model_dirs: more exports served beside it (requests go to the model they name).
        models_dir: a folder whose every subfolder holding a manifest.json is served too (the
            newest export the default when no model_dir is given); `CloudServer.reload`
            (SIGHUP) serves what it holds then.
        listen: gRPC address, "host:port"; port 0 picks a free port.
        threads: torch threads for the heads (default: every core this process may use).
        max_concurrent: Detect calls running at once.
        max_queued: Detect calls beyond those that wait, first come first served, for a slot;
            more, and those whose wait ends, are refused with RESOURCE_EXHAUSTED.
        max_queue_wait_s: the longest a call waits for a slot (its deadline too), seconds.
        max_message_bytes: bound on one gRPC message, both directions.
        max_decoded_bytes: bound on the float32 bytes one request's features decode to.
        grace_s: on shutdown, seconds in-flight calls get to finish before they are cancelled.
        tls_cert, tls_key: PEM server certificate chain and key; both or neither (plaintext).
        client_ca: PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
        token: bearer token clients must send ("authorization: Bearer <token>"); None = none.
        token_file: a file of accepted tokens, one per line, read again when it changes (a
            rotation without a restart); used instead of `token` when given.
        reflection: serve gRPC server reflection (off in production: it lists the API).
        metrics_port: Prometheus /metrics HTTP port (0 = any free port); None = no endpoint.
        metrics_host: address the metrics endpoint binds.
        answers_db: SQLite file of the idempotency store (answers by request id).
        answers_capacity: answers kept; 0 disables idempotency.
        forget_edges_s: seconds after its last call an edge loses its per-edge series.
        keepalive_s: the server pings a connection after this many seconds without a frame
            from it, ...
        max_connection_age_s: a connection takes new calls this long (MAX_CONNECTION_AGE_S)...
        max_call_s: ... then its calls get this long to finish before they are cancelled: a
            call running longer than max_call_s may be cut (one that never sends its request
            is ended sooner, by max_receive_s).
        keepalive_timeout_s: ... and closes it, cancelling its calls, when a ping of its stays
            unanswered this many seconds (gRPC's ping timeout; it bounds the bandwidth probes'
            pings too, so it stays at gRPC's own 60 s by default). A caller cut off mid-request
            (a dead NAT entry, a pulled cable) then gives back its Detect thread within about
            their sum, even without a deadline, instead of after gRPC's server default of 2 hours.
        max_receive_s: the longest a call may take to receive its request, from its headers
            on (MAX_RECEIVE_S); a call whose request has not arrived by then (a caller that
            opens calls and never sends them, or a link too slow) is ended with
            DEADLINE_EXCEEDED, freeing its thread.
        debug_delay_s: TEST ONLY: every Detect call sleeps this long first (slow calls on purpose).
    """

    model_dir: Path | None = None
    more_model_dirs: tuple[Path, ...] = ()
    models_dir: Path | None = None
    listen: str = "127.0.0.1:50051"
    threads: int = field(default_factory=usable_cores)
    max_concurrent: int = 2
    max_queued: int = 8
    max_queue_wait_s: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_decoded_bytes: int = DEFAULT_MAX_TOTAL_BYTES
    grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    reflection: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    answers_db: Path = Path("splitdet-cloud-answers.sqlite")
    answers_capacity: int = 100_000
    forget_edges_s: float = FORGET_EDGES_S
    keepalive_s: float = 60.0
    keepalive_timeout_s: float = 60.0
    max_connection_age_s: float = MAX_CONNECTION_AGE_S
    max_call_s: float = MAX_CALL_S
    max_receive_s: float = MAX_RECEIVE_S
    debug_delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.model_dir is None and (self.models_dir is None or self.more_model_dirs):
            raise ValueError("give a model directory (--model) or a folder of them (--models-dir)")
        if self.threads < 1 or self.max_concurrent < 1:
            raise ValueError("threads and max_concurrent must be at least 1")
        if not 0 <= self.max_queued <= 256 or not 0 <= self.max_queue_wait_s <= 3600:
            raise ValueError("max_queued must be in [0, 256] and max_queue_wait_s in [0, 3600]")
        if self.threads > OPTION_BOUNDS["threads"][1]:
            raise ValueError(f"threads must be at most {OPTION_BOUNDS['threads'][1]}")
        if not (math.isfinite(self.grace_s) and self.grace_s <= OPTION_BOUNDS["grace"][1]):
            raise ValueError(f"grace_s must be finite and at most {OPTION_BOUNDS['grace'][1]}")
        if self.max_message_bytes < MIB or self.max_message_bytes >= 1 << 31:
            raise ValueError("max_message_bytes must be in [1 MiB, 2 GiB)")
        if self.max_decoded_bytes < MIB:
            raise ValueError("max_decoded_bytes must be at least 1 MiB")
        if self.grace_s < 0 or self.debug_delay_s < 0 or self.answers_capacity < 0:
            raise ValueError("grace_s, debug_delay_s and answers_capacity must be non-negative")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("mutual TLS (client_ca) needs a server certificate and key")
        if self.token is not None and not self.token:
            raise ValueError("the bearer token must not be empty")
        if not (math.isfinite(self.forget_edges_s) and self.forget_edges_s > 0):
            raise ValueError("forget_edges_s must be a positive number of seconds")
        if not all(0.001 <= s <= 86_400 for s in (self.keepalive_s, self.keepalive_timeout_s)):
            raise ValueError("keepalive_s and keepalive_timeout_s must be in [0.001, 86400]")
        if not all(0.001 <= s <= 86_400 for s in (self.max_connection_age_s, self.max_call_s)):
            raise ValueError("max_connection_age_s and max_call_s must be in [0.001, 86400]")
        if not 0.001 <= self.max_receive_s <= 86_400:  # (False for NaN)
            raise ValueError("max_receive_s must be in [0.001, 86400]")

    @property
    def security(self) -> str:
        """'mTLS', 'TLS' or 'plaintext', plus '+token' when a token is required."""
        mode = "mTLS" if self.client_ca else "TLS" if self.tls_cert else "plaintext"
        return mode + ("+token" if self.token or self.token_file else "")
