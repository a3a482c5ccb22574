"""The cloud detection server's bootstrap: one config object, the gRPC server around the servicer.

    config = ServerConfig(model_dir=Path("model"), listen="0.0.0.0:50051", metrics_port=9464)
    sys.exit(serve(config))   # until SIGTERM/SIGINT: health NOT_SERVING, drain, exit 0

What runs: splitdet.v1.Detection (the servicer), grpc.health.v1 health (SERVING while up),
optionally server reflection, a Prometheus /metrics HTTP endpoint, TLS or mutual TLS from
certificate files, and an optional bearer token.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from splitdet.cloud.call_guard import CallGuard
from splitdet.cloud.cli_cloud import OPTION_BOUNDS, check_tls_files
from splitdet.cloud.core import DetectionCore, ServedModel, load_cloud
from splitdet.cloud.health_status import HealthStatus
from splitdet.cloud.idempotency import IdempotencyStore
from splitdet.cloud.metrics import FORGET_EDGES_S, ServerMetrics
from splitdet.cloud.servicer import SERVICE_NAME, DetectionServicer
from splitdet.cloud.tokens import AcceptedTokens, TokenInterceptor, file_stamp
from splitdet.shared.codec import DEFAULT_MAX_TOTAL_BYTES
from splitdet.shared.manifest import (
    MANIFEST_NAME,
    PUBLISHING_MARKER,
    ManifestError,
    read_manifest,
)

log = logging.getLogger(__name__)

MIB = 1 << 20
#: Default bound on one gRPC message: int8 FPN payloads at 800x960 are ~16 MB, fp32 ~65 MB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * MIB
#: gRPC handler threads beyond --max-concurrent + --max-queued for Detect (calls to refuse as
#: busy need one), and the threads of GetManifest and of the rest (health checks, refusals of a
#: missing token), each method its own pool: a call holds its thread from its first byte, so
#: callers that never finish sending a request can use up their method's threads (until their
#: deadline), never the health checks'.
SPARE_RPC_THREADS = 8
#: Threads of the server's own pool: health checks, reflection, refusals of a missing token.
#: Many, so that callers stalling health checks (exempt from the token) must open many calls
#: before a probe is refused; each pool's calls beyond its threads are refused at once with
#: RESOURCE_EXHAUSTED (call_guard.CallGuard), never left waiting for a thread.
SERVER_RPC_THREADS = 32
#: Threads refusing calls beyond their pool's threads (each refusal ends at once).
REFUSAL_THREADS = 2
#: Seconds a connection serves new calls (gRPC adds up to 10% jitter); then it is closed
#: gracefully (GOAWAY: clients reconnect without a failed call) and the calls on it get
#: --max-call seconds to finish before they are cancelled: a call that never sends its request
#: holds its thread for at most about MAX_CONNECTION_AGE_S * 1.1 + --max-call.
MAX_CONNECTION_AGE_S = 300.0
#: Default --max-call, seconds: above the edge's default --timeout (60 s) with room for its
#: wait for a slot (--queue-wait, 30 s).
MAX_CALL_S = 120.0


def all_cores() -> int:
    """The CPU cores this process may run on (its affinity mask; else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
            call holds a thread for at most about their sum (one that never sends its request
            included), and a call running longer than max_call_s may be cut.
        keepalive_timeout_s: ... and closes it, cancelling its calls, when a ping of its stays
            unanswered this many seconds (gRPC's ping timeout; it bounds the bandwidth probes'
            pings too, so it stays at gRPC's own 60 s by default). A caller cut off mid-request
            (a dead NAT entry, a pulled cable) then gives back its Detect thread within about
            their sum, even without a deadline, instead of after gRPC's server default of 2 hours.
        debug_delay_s: TEST ONLY: every Detect call sleeps this long first (slow calls on purpose).
    """

    model_dir: Path | None = None
    more_model_dirs: tuple[Path, ...] = ()
    models_dir: Path | None = None
    listen: str = "127.0.0.1:50051"
    threads: int = field(default_factory=all_cores)
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

    @property
    def security(self) -> str:
        """'mTLS', 'TLS' or 'plaintext', plus '+token' when a token is required."""
        mode = "mTLS" if self.client_ca else "TLS" if self.tls_cert else "plaintext"
        return mode + ("+token" if self.token or self.token_file else "")


def receive_bound(max_message_bytes: int) -> int:
    """gRPC's own bound on a received message, bytes: --max-message-mib plus a quarter, at
    least 16 MiB more, below 2 GiB (a call over the bound by less is refused in the servicer)."""
    return min(max_message_bytes + max(max_message_bytes // 4, 16 * MIB), (1 << 31) - 1)


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
        ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", round(config.keepalive_timeout_s * 1000)),
        # gRPC sends two pings at most on a connection with no data to send.
        ("grpc.http2.max_pings_without_data", 0),
        # A connection takes new calls for max_connection_age_s, then is closed gracefully
        # (GOAWAY: the client reconnects for its next call) and its calls get max_call_s to end
        # before they are cancelled. Keepalive never ends a call that sends headers and then
        # nothing (its connection answers pings): this bounds how long it holds a thread.
        ("grpc.max_connection_age_ms", round(config.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", round(config.max_call_s * 1000)),
        # gRPC sets SO_REUSEPORT by default: two servers could then share a port unnoticed.
        ("grpc.so_reuseport", 0),
    ]


class CertificateFiles:
    """The server's TLS files, read again whenever one of them changes: a certificate renewed on
    disk is served to the next connection without a restart. gRPC calls `fetch` before each new
    connection's handshake; connections already open keep theirs. A renewal that is not a
    usable set yet (the key written before its certificate, a damaged file) is logged and the
    current certificate kept until the files form a pair again.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.cert, self.key, self.client_ca = config.tls_cert, config.tls_key, config.client_ca
        self.paths = tuple(Path(p) for p in (self.cert, self.key, self.client_ca) if p)
        self._stamp = self._stamps()
        self._lock = threading.Lock()

    def _stamps(self) -> tuple | None:
        stamps = tuple(file_stamp(path) for path in self.paths)
        return None if None in stamps else stamps  # (a file replaced just now)

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """The files as gRPC's server certificate configuration."""
        chain, key = Path(self.cert).read_bytes(), Path(self.key).read_bytes()
        client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], client_ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed and form a usable set; else None (keep
        the current one). Never raises: it runs inside gRPC's handshake."""
        try:
            with self._lock:
                stamp = self._stamps()
                if stamp is None or stamp == self._stamp:
                    return None
                self._stamp = stamp
                check_tls_files(self.cert, self.key, self.client_ca)
                configuration = self.configuration()
            log.info("TLS files changed: new connections get the renewed certificate",
                     extra={"fields": {"event": "tls_reloaded"}})  # fmt: skip
            return configuration
        except Exception as exc:  # e.g. half a renewal: keep serving the certificate we have
            log.error("TLS files changed but cannot be used (%s); keeping the current "
                      "certificate", exc, extra={"fields": {"event": "tls_reload_failed",
                                                            "error": str(exc)}})  # fmt: skip
            return None


def _server_credentials(config: ServerConfig) -> grpc.ServerCredentials:
    files = CertificateFiles(config)
    return grpc.dynamic_ssl_server_credentials(
        files.configuration(), files.fetch, require_client_authentication=bool(config.client_ca)
    )


def export_dirs(config: ServerConfig) -> tuple[list[Path], list[Path]]:
    """(named, found): the model directories `config` names (model_dir, then more_model_dirs),
    and the exports found in models_dir now (subfolders holding a manifest.json, newest
    manifest first; one named too is left out; one that cannot be read is logged and skipped).

    Raises:
        ManifestError: models_dir cannot be listed.
    """
    named = [] if config.model_dir is None else [config.model_dir, *config.more_model_dirs]
    if config.models_dir is None:
        return named, []
    try:
        entries = list(Path(config.models_dir).iterdir())
    except OSError as exc:
        raise ManifestError(
            f"--models-dir {config.models_dir}: cannot list ({exc.strerror or exc})"
        ) from None
    found = []
    for entry in entries:
        if entry.name.startswith(".") or entry in named:
            continue  # (a folder being copied in under a dot name)
        try:
            exported = (entry / MANIFEST_NAME).stat().st_mtime
        except NotADirectoryError:
            continue  # a file: not an export
        except FileNotFoundError:
            _note_not_an_export(entry)
            continue
        except OSError as exc:  # e.g. a lost+found the server may not read
            log.warning("%s: cannot read (%s); skipped", entry, exc.strerror or exc)
            continue
        found.append((exported, entry.name, entry))
    found.sort(reverse=True)
    return named, [entry for _, _, entry in found]


#: --models-dir subfolders logged as holding no export (each once per process).
_NOT_EXPORTS: set[Path] = set()


def _note_not_an_export(folder: Path) -> None:
    """Log once that the --models-dir subfolder `folder` holds no manifest.json: not served."""
    if folder in _NOT_EXPORTS:
        return
    _NOT_EXPORTS.add(folder)
    log.info("%s: no %s in it, so no export; not served (logged once)", folder, MANIFEST_NAME,
             extra={"fields": {"event": "not_an_export", "folder": str(folder)}})  # fmt: skip


def gather_models(
    named: Sequence[Path],
    found: Sequence[Path],
    loaded: dict[str, ServedModel] | None = None,
    strict: bool = True,
    held: dict[Path, str] | None = None,
    checked: dict[Path, tuple] | None = None,
) -> tuple[list[ServedModel], list[str], dict[Path, str]]:
    """The models to serve from the directories, in order (the default first), one line per
    directory that could not be read, saying what became of it, and the fingerprint each
    directory served from (the next reload's `held`). An export already in `loaded`, read from
    the directory `held` says it came from, keeps its loaded model (its files are still
    verified: damage on disk is a problem line, as a restart would not serve them); any other
    directory's files are verified against its manifest in full first (a new export is loaded,
    one already loaded may be a broken copy that a restart could not serve). A found export that
    cannot be served, or one served already from another directory, is skipped (the latter with
    a warning only, once its files are verified). With `strict`, a named directory's problem
    raises instead, and so does an export named twice; without, a named directory that cannot be
    read (a copy in progress, a file server's hiccup) keeps serving the export `held` says it
    held, if loaded: an operator's `--model` is not dropped by a reload (SIGHUP) it did not ask
    of it. So does any directory holding a re-export killed while it replaced its files
    (`PUBLISHING_MARKER`, checked in full even where `held` says it served): a problem line says
    so, as a restart would refuse that folder until it is exported again. `checked` (updated
    here) holds the file sizes and times of each directory whose files last matched their
    manifest: a kept export whose files still show them is not hashed again.

    Raises:
        ManifestError, OSError: with `strict`, a named directory that cannot be served.
    """
    loaded = loaded or {}
    models: list[ServedModel] = []
    where: dict[str, Path] = {}
    problems = []
    for index, model_dir in enumerate([*named, *found]):
        is_named = index < len(named)
        kept = False  # an export served from this directory before, its model kept as loaded
        signature = _file_signature(model_dir)  # (before loading: a change meanwhile shows)
        try:
            fingerprint = read_manifest(model_dir, verify=False).fingerprint
            if fingerprint in where:
                if is_named and strict:
                    raise ManifestError(
                        f"--model {model_dir} is the same export as --model "
                        f"{where[fingerprint]} (fingerprint {fingerprint[:16]}): give each "
                        "export once"
                    )
                read_manifest(model_dir)  # a broken copy is a problem, not a served export
                log.warning("%s: the same export as %s, which serves it; skipped", model_dir,
                            where[fingerprint])  # fmt: skip
                continue
            model = loaded.get(fingerprint)
            if model is None:
                model = ServedModel(*load_cloud(model_dir))
            elif (held or {}).get(model_dir) != fingerprint or (
                model_dir / PUBLISHING_MARKER
            ).exists():  # loaded from another directory, or a re-export killed midway in it
                read_manifest(model_dir)  # verify this one
            else:
                kept = True
        except Exception as exc:  # whatever one export's loading raises is that export's
            if not isinstance(exc, (ManifestError, OSError)):
                what = f"{type(exc).__name__}: {exc}"
                exc = ManifestError(f"{model_dir}: cannot be served ({what})")
            if is_named and strict:
                raise exc from None
            problem = _naming(model_dir, exc)
            # a named folder, or one a re-export was killed in, keeps the export it served
            interrupted = (model_dir / PUBLISHING_MARKER).exists()
            before = (held or {}).get(model_dir) if is_named or interrupted else None
            if before is None or before not in loaded or before in where:
                problems.append(f"{problem}; skipped")
                continue
            problems.append(f"{problem}; still serving the export it held ({before[:16]})")
            model = loaded[before]
        if kept and (checked or {}).get(model_dir) != signature:
            damage = _damage(model_dir)
            if damage is not None:
                signature = None  # (checked again at the next reload)
                problems.append(
                    f"{damage}; still serving the export loaded from it "
                    f"({model.fingerprint[:16]}), which a restart would not serve: export into "
                    "it again, or restore its files"
                )
        if checked is not None and signature is not None:
            checked[model_dir] = signature
        where[model.fingerprint] = model_dir
        models.append(model)
    return models, problems, {d: fp for fp, d in where.items()}


def _file_signature(model_dir: Path) -> tuple | None:
    """(name, inode, size, mtime ns, ctime ns) of each file in `model_dir`, sorted; None if it
    cannot be read. Any write or replacement changes the ctime, which no tool can set back
    (`touch -r`, `cp -p` and restores keep the mtime only)."""
    try:
        with os.scandir(model_dir) as entries:
            stats = [(e.name, e.stat()) for e in entries if e.is_file()]
    except OSError:
        return None
    return tuple(sorted(
        (name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) for name, st in stats
    ))  # fmt: skip


def _naming(model_dir: Path, exc: BaseException) -> str:
    """`exc`'s text, led by the export folder it concerns unless it names it already."""
    return f"{model_dir}: {exc}" if str(model_dir) not in str(exc) else str(exc)


def _damage(model_dir: Path) -> str | None:
    """What is wrong with the files of an export served from `model_dir` (a file changed,
    truncated or gone since it was loaded: its hashes are checked in full), or None."""
    try:
        read_manifest(model_dir)
    except (ManifestError, OSError) as exc:
        return _naming(model_dir, exc)
    return None


class CloudServer:
    """The running server: gRPC + health + metrics around a DetectionCore.

    Args:
        config: the settings.
        core: a ready core (tests share one model between servers); by default the model is
            loaded from config.model_dir with an idempotency store at config.answers_db.
    """

    def __init__(self, config: ServerConfig, core: DetectionCore | None = None) -> None:
        self.config = config
        torch.set_num_threads(config.threads)
        self._own_store = core is None
        self._held: dict[Path, str] = {}  # directory -> the fingerprint served from it
        self._checked: dict[Path, tuple] = {}  # directory -> its files when last verified
        if core is None:
            models, problems, self._held = gather_models(
                *export_dirs(config), checked=self._checked
            )
            for problem in problems:  # a found export: the others are served
                log.error("%s", problem, extra={"fields": {"event": "export_problem",
                                                           "problem": problem}})  # fmt: skip
            if not models:
                raise ManifestError(
                    f"--models-dir {config.models_dir}: holds no export that can be served "
                    "(a folder with manifest.json, made by splitdet export)"
                    + "".join(f"; {problem}" for problem in problems)
                )
            first, *more = models
            also = [(model.cloud, model.manifest) for model in more]
            store = (
                IdempotencyStore(config.answers_db, config.answers_capacity)
                if config.answers_capacity
                else None
            )
            core = DetectionCore(first.cloud, first.manifest, store, config.max_decoded_bytes, also)
        self.core = core
        self.metrics = ServerMetrics(core.fingerprints, config.forget_edges_s)
        core.on_store_error = self.metrics.answers_store_errors.inc
        self.health = HealthStatus()
        self.servicer = DetectionServicer(
            core, self.metrics, config.max_concurrent, config.debug_delay_s,
            max_queued=config.max_queued, max_queue_wait_s=config.max_queue_wait_s,
            max_message_bytes=config.max_message_bytes,
            scope_by_token=bool(config.token or config.token_file),
        )  # fmt: skip
        self.tokens = (
            AcceptedTokens(config.token, config.token_file)
            if config.token or config.token_file
            else None
        )
        # a waiting call holds its thread; the spare ones refuse calls beyond the queue
        detect_workers = config.max_concurrent + config.max_queued + SPARE_RPC_THREADS
        detect_threads = futures.ThreadPoolExecutor(
            max_workers=detect_workers, thread_name_prefix="splitdet-detect"
        )
        manifest_threads = futures.ThreadPoolExecutor(
            SPARE_RPC_THREADS, thread_name_prefix="splitdet-manifest"
        )
        self._refusal_threads = futures.ThreadPoolExecutor(
            REFUSAL_THREADS, thread_name_prefix="splitdet-refuse"
        )
        pools = {
            "server": (None, SERVER_RPC_THREADS),
            "detect": (detect_threads, detect_workers),
            "manifest": (manifest_threads, SPARE_RPC_THREADS),
        }
        # the guard first: it counts every call, those the token refuses too
        interceptors = [CallGuard(self.metrics, pools, self._refusal_threads)]
        if self.tokens:
            interceptors.append(TokenInterceptor(self.tokens, self.metrics))
        self._server = grpc.server(
            futures.ThreadPoolExecutor(SERVER_RPC_THREADS, thread_name_prefix="splitdet-rpc"),
            interceptors=interceptors,
            options=grpc_options(config),
            # no maximum_concurrent_rpcs: gRPC applies it after the interceptors, so a call it
            # refused would keep the place CallGuard gave it; CallGuard is the bound
        )
        self.servicer.add_to_server(self._server, detect_threads, manifest_threads)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if config.reflection:
            reflection.enable_server_reflection(
                (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
            )
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_httpd = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._hurry = threading.Event()  # a later stop(0) while the first waits out its grace
        self._stop_done = threading.Event()

    def start(self) -> CloudServer:
        """Bind, start serving and report SERVING; returns self."""
        config = self.config
        check_listen_address(config.listen)
        try:
            if config.tls_cert:
                port = self._server.add_secure_port(config.listen, _server_credentials(config))
            else:
                port = self._server.add_insecure_port(config.listen)
        except RuntimeError as exc:  # grpc raises RuntimeError on a failed bind
            raise OSError(f"cannot listen on {config.listen}: {exc}") from None
        if not port:
            raise OSError(f"cannot listen on {config.listen}")
        if config.metrics_port is not None:
            try:
                self._metrics_httpd, _ = start_http_server(
                    config.metrics_port, config.metrics_host, registry=self.metrics.registry
                )
            except (OSError, OverflowError) as exc:  # in use, unresolvable, port out of range
                self._server.stop(0)
                where = f"{config.metrics_host}:{config.metrics_port}"
                raise OSError(f"metrics endpoint {where}: {exc.strerror or exc}") from None
            self.metrics_port = self._metrics_httpd.server_port
        self.port = port  # (only now: a start that failed never served, and logs no "stopped")
        self._server.start()
        for service in ("", SERVICE_NAME, *self.core.fingerprints):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on port %d (%s, %d torch threads, max %d concurrent, "
            "messages up to %d MiB, metrics %s)",
            ("models " if len(self.core.fingerprints) > 1 else "model ")
            + self._named(self.core.fingerprints),
            self.port,
            config.security,
            config.threads,
            config.max_concurrent,
            config.max_message_bytes // MIB,
            f"port {self.metrics_port}" if self.metrics_port is not None else "off",
            extra={"fields": {"event": "serving", "port": self.port,
                              "models": list(self.core.fingerprints),
                              "security": config.security, "threads": config.threads,
                              "max_concurrent": config.max_concurrent,
                              "max_message_mib": config.max_message_bytes // MIB,
                              "metrics_port": self.metrics_port}},
        )  # fmt: skip
        return self

    def reload(self) -> dict[str, list[str]]:
        """Serve what the configured directories hold now (SIGHUP): an export added to
        --models-dir is served, one removed (or re-exported in place, under a new fingerprint)
        is dropped; one unchanged keeps its loaded model. A directory that cannot be served is
        logged and skipped, the rest served; with nothing left to serve, nothing changes.

        Returns:
            {"served", "added", "dropped", "problems"}: fingerprints, and one line per problem.
        """
        current = self.core.models
        unlisted = False
        try:
            named, found = export_dirs(self.config)
            models, problems, held = gather_models(
                named, found, current, False, self._held, self._checked
            )
        except ManifestError as exc:  # the folder cannot be listed
            models, problems, held, unlisted = [], [str(exc)], self._held, True
        if not models and not problems:
            problems = [f"--models-dir {self.config.models_dir}: holds no export"]
        for problem in problems:
            fields = {"event": "reload_problem", "problem": problem}
            log.error("reload: %s", problem, extra={"fields": fields})
        if not models:
            why = (  # (not what --model names, which may be fine: nothing was read)
                f"--models-dir {self.config.models_dir} cannot be listed, so nothing changes"
                if unlisted
                else "nothing left to serve"
            )
            log.error("reload: %s; still serving %s", why, self._named(current),
                      extra={"fields": {"event": "reload_refused"}})  # fmt: skip
            self.metrics.reloads.labels("refused").inc()
            return {"served": list(current), "added": [], "dropped": [], "problems": problems}
        dirs_before = self._held
        self.core.serve(models)
        self._held = held
        self.servicer.refresh()
        self.metrics.served(self.core.fingerprints)
        served = list(self.core.fingerprints)
        change = {
            "served": served,
            "added": [fp for fp in served if fp not in current],
            "dropped": [fp for fp in current if fp not in served],
            "problems": problems,
        }
        log.info(
            "reloaded: serving %s (added %d, dropped %d)", self._named(served),
            len(change["added"]), len(change["dropped"]),
            extra={"fields": {"event": "reloaded", **change,
                              "dirs": {fp: str(d) for d, fp in held.items()}}},
        )  # fmt: skip
        for fingerprint in change["added"]:  # each export's health name: its fingerprint
            self.health.set(fingerprint, health_pb2.HealthCheckResponse.SERVING)
        for fingerprint in change["dropped"]:
            self.health.clear(fingerprint)
            self._warn_of_edges_using(fingerprint, dirs_before)
        self.metrics.forget(change["dropped"])
        self.metrics.reloads.labels("problems" if problems else "ok").inc()
        return change

    def _named(self, fingerprints: Sequence[str]) -> str:
        """Served `fingerprints` as "fp16 (folder), ...": which export is which."""
        dirs = {fp: d for d, fp in self._held.items()}
        return ", ".join(
            f"{fp[:16]} ({dirs[fp]})" if fp in dirs else fp[:16] for fp in fingerprints
        )

    def _warn_of_edges_using(self, fingerprint: str, dirs: dict[Path, str]) -> None:
        """A WARNING naming the edges that used the dropped export `fingerprint` (a check at
        their start, or an answer) since this server started: their next requests for it are
        refused until it is served again."""
        edges = self.metrics.edges_using(fingerprint)
        if not edges:
            return
        now = time.time()
        where = next((f" ({d})" for d, fp in dirs.items() if fp == fingerprint), "")
        used = ", ".join(
            f"{edge} ({(now - at) / 60:.0f} min ago)"
            for edge, at in sorted(edges.items(), key=lambda item: -item[1])
        )
        log.warning(
            "reload: dropped %s%s, which edges used since this server started: %s; their "
            "requests for it wait in their outboxes (model_refused) until it is served again",
            fingerprint[:16], where, used,
            extra={"fields": {"event": "dropped_export_in_use", "fingerprint": fingerprint,
                              "edges": sorted(edges)}},
        )  # fmt: skip

    def stop(self, grace: float | None = None, hurry: threading.Event | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish within `grace`
        seconds (default config.grace_s), then release everything. `hurry`, once set (a
        second SIGTERM), ends the grace at once. Idempotent: a later call waits for the first
        to end, and one with a grace of 0 ends that one's grace at once."""
        with self._stop_lock:
            first = not self._stopped.is_set()
            self._stopped.set()
        if not first:
            if grace is not None and grace <= 0:
                self._hurry.set()
            self._stop_done.wait()
            return
        try:
            self._stop(grace, hurry)
        finally:
            self._stop_done.set()

    def _stop(self, grace: float | None, hurry: threading.Event | None) -> None:
        if self.tokens is not None:
            self.tokens.close()
        grace = self.config.grace_s if grace is None else grace
        self.servicer.drain()
        self.health.enter_graceful_shutdown()
        self._let_calls_finish(grace, hurry)
        self.health.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        if self._own_store and self.core.store is not None:
            self.core.store.close()
        if self.port:  # (not after a start that could not listen: it never served)
            self._wait_for_handlers(_CUT_WAIT_S)
            log.info("stopped", extra={"fields": {"event": "stopped"}})

    def _wait_for_handlers(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for the Detect calls cancelled by the stop to end in their
        threads, which log their refusal: "stopped" is the last line."""
        deadline = time.monotonic() + timeout
        while self.servicer.running() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _let_calls_finish(self, grace: float, hurry: threading.Event | None) -> None:
        """gRPC's stop, the grace kept here: the Detect calls still running when `grace` ends,
        or when `hurry` is set, are counted, then cancelled (UNAVAILABLE to their callers),
        and a WARNING says how many (`calls_cut`; their edges send them again)."""
        done = self._server.stop(grace + _CUT_WAIT_S)  # (gRPC's own cut, never first)
        deadline = time.monotonic() + grace
        while not done.wait(0.05):
            hurried = self._hurry.is_set() or (hurry is not None and hurry.is_set())
            if hurried or time.monotonic() >= deadline:
                cut, edges = self.servicer.running_edges()
                self._server.stop(0)  # (a shorter grace overrides the one running)
                if cut:
                    why = "asked again to stop" if hurried else f"--grace {grace:g} s ended"
                    log.warning(
                        f"{why}: {cut} Detect call(s) still running were cancelled, from "
                        f"edge(s) {', '.join(edges)} (UNAVAILABLE to them; they send them "
                        "again: nothing is lost)",
                        extra={"fields": {"event": "calls_cut", "calls": cut, "edges": edges,
                                          "hurried": hurried, "grace_s": grace}},
                    )  # fmt: skip
                done.wait(_CUT_WAIT_S)
                return

    def __enter__(self) -> CloudServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop(0)


#: Seconds a stop waits for gRPC to end the calls it cancelled at the end of the grace.
_CUT_WAIT_S = 5.0
#: A SIGTERM or SIGINT at least this many seconds into a drain ends its grace (`serve`): not
#: one sent with the first (a terminal's and a wrapper's come within milliseconds).
HURRY_AFTER_S = 0.25


def check_listen_address(listen: str) -> None:
    """OSError naming the cause when `listen` ("host:port") is held by another server, needs
    privileges or names an address this host lacks; gRPC says only "Failed to bind". Port 0
    and other failures are left to gRPC."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        addresses = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
    bound = lacking = False
    for family, kind, proto, _, address in addresses:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
            bound = True
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
            lacking |= exc.errno == errno.EADDRNOTAVAIL
    # gRPC binds every address the name gives and fails only when none binds ("localhost"
    # is 127.0.0.1 and ::1; with IPv6 off, ::1 is not there, and 127.0.0.1 serves)
    if lacking and not bound:
        raise OSError(
            f"cannot listen on {listen}: {host} is not an address of this machine "
            "(listen on one it has, or on 0.0.0.0 for all of them)"
        )


def serve(
    config: ServerConfig,
    on_ready: Callable[[CloudServer], object] | None = None,
    stop: threading.Event | None = None,
    reload: threading.Event | None = None,
    on_reload: Callable[[CloudServer], object] | None = None,
    on_draining: Callable[[], object] | None = None,
) -> int:
    """Run a server until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the
    exports (`CloudServer.reload`). Returns 0.

    Args:
        config: the settings.
        on_ready: called with the started CloudServer (e.g. to write a ready file).
        stop: the event that ends serving; if a caller's signal handler set it while the model
            loaded, the server never starts.
        reload: the event that asks for a reload (SIGHUP sets it); one set while the model
            loaded is honoured once serving.
        on_reload: called with the server after each reload (e.g. to rewrite the ready file).
        on_draining: called once the drain begins (health NOT_SERVING from then: e.g. to
            remove the ready file).
    """
    stop = threading.Event() if stop is None else stop
    reload = threading.Event() if reload is None else reload
    server = CloudServer(config)
    received: list[int] = []

    hurry = threading.Event()
    draining_since: list[float] = []  # monotonic s the drain began

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        # another SIGTERM or SIGINT once draining: no more grace (not one sent with the first,
        # as a terminal's and a wrapper's SIGINT often are)
        if draining_since and time.monotonic() - draining_since[0] >= HURRY_AFTER_S:
            hurry.set()
        stop.set()

    # before start(): once it serves, a signal drains it rather than killing it
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda _signum, _frame: reload.set())
    try:
        if stop.is_set():
            log.info("stopped before serving")
            return 0
        server.start()
        if on_ready is not None:
            on_ready(server)
        while not stop.wait(0.1):
            if reload.is_set():
                reload.clear()
                reloaded = False
                try:
                    server.reload()
                    reloaded = True
                    if on_reload is not None:
                        on_reload(server)
                except Exception as exc:  # never the end of serving: the exports stay
                    error = f"{type(exc).__name__}: {exc}"
                    log.error("%s (%s)", "reloaded, but what follows it failed" if reloaded
                              else "reload failed; serving as before", error,
                              extra={"fields": {"event": "reload_failed",
                                                "error": error}})  # fmt: skip
                    log.debug("reload failed", exc_info=True)  # (the traceback, for a bug)
                    if not reloaded:  # (counted by the reload itself otherwise)
                        server.metrics.reloads.labels("refused").inc()
        name = signal.Signals(received[0]).name if received else "stop"
        draining_since.append(time.monotonic())
        log.info("%s: draining for up to %.1f s", name, config.grace_s,
                 extra={"fields": {"event": "draining", "signal": name,
                                   "grace_s": config.grace_s}})  # fmt: skip
        if on_draining is not None:
            on_draining()
        server.stop(hurry=hurry)
    finally:
        for sig, handler in previous.items():  # (the CLI's keep the ending process from a late
            signal.signal(sig, handler)  # signal's default action: `cli_cloud.run`)
        server.stop(0)
    return 0
