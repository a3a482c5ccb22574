"""The cloud detection server: `CloudServer`, the gRPC server around the servicer.

    server = CloudServer(ServerConfig(model_dir=Path("model"), listen="0.0.0.0:50051")).start()
    server.reload()   # SIGHUP: serve what the configured directories hold now
    server.stop()     # health NOT_SERVING, drain within --grace, release everything; bounded:
                      # StopIncomplete when gRPC's stop does not complete within --grace + 5 s

What runs: splitdet.v1.Detection (the servicer), grpc.health.v1 health (SERVING while up, and
each served export's fingerprint), optionally server reflection, a Prometheus /metrics HTTP
endpoint, TLS or mutual TLS from certificate files (read again when they change), and an
optional bearer token. Its settings are `server_config.ServerConfig`; `serve_loop.serve` runs
one until a signal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from splitdet.cloud.call_guard import CallGuard
from splitdet.cloud.channel_options import grpc_options
from splitdet.cloud.cli_cloud import check_tls_files
from splitdet.cloud.core import DetectionCore
from splitdet.cloud.health_status import HealthStatus
from splitdet.cloud.idempotency import IdempotencyStore
from splitdet.cloud.listen_address import check_listen_address
from splitdet.cloud.metrics import ServerMetrics
from splitdet.cloud.served_exports import export_dirs, gather_models, no_export_problem
from splitdet.cloud.server_config import MIB, ServerConfig
from splitdet.cloud.servicer import SERVICE_NAME, DetectionServicer
from splitdet.cloud.threads import handler_pools, server_pool
from splitdet.cloud.tokens import AcceptedTokens, TokenInterceptor, file_stamp
from splitdet.shared.manifest import ManifestError
from splitdet.shared.metrics_http import start_metrics_server
from splitdet.shared.stacks import log_stacks
from splitdet.shared.version import splitdet_version

log = logging.getLogger(__name__)


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
                *export_dirs(config), checked=self._checked,
                max_decoded_bytes=config.max_decoded_bytes,
            )  # fmt: skip
            for problem in problems:  # a found export: the others are served
                log.error("%s", problem, extra={"fields": {"event": "export_problem",
                                                           "problem": problem}})  # fmt: skip
            if not models:
                raise ManifestError(
                    no_export_problem(config.models_dir)
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
        if config.models_dir is not None:
            core.serve_hint = (
                f"this server serves every export in --models-dir {config.models_dir}: copy "
                "the export's folder in and send the server SIGHUP"
            )
        self.core = core
        self.metrics = ServerMetrics(core.fingerprints, config.forget_edges_s)
        core.on_store_error = self.metrics.answers_store_errors.inc
        core.on_id_conflict = self.metrics.request_id_conflicts.inc
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
        pools = handler_pools(config)
        self._refusal_threads = pools.refusal
        # the guard first: it counts every call, those the token refuses too
        self._guard = CallGuard(self.metrics, pools.bounds, self._refusal_threads)
        interceptors: list[grpc.ServerInterceptor] = [self._guard]
        self._token_guard = TokenInterceptor(self.tokens, self.metrics) if self.tokens else None
        if self._token_guard is not None:
            interceptors.append(self._token_guard)
        self._server = grpc.server(
            server_pool(),
            interceptors=interceptors,
            options=grpc_options(config),
            # no maximum_concurrent_rpcs: gRPC applies it after the interceptors, so a call it
            # refused would keep the place CallGuard gave it; CallGuard is the bound
        )
        self.servicer.add_to_server(self._server, pools.detect, pools.manifest)
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
                self._metrics_httpd = start_metrics_server(
                    config.metrics_port, config.metrics_host, self.metrics.registry
                )
            except OSError as exc:  # in use, unresolvable, port out of range
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
                              "metrics_port": self.metrics_port,
                              "version": splitdet_version()}},
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
                named, found, current, False, self._held, self._checked,
                max_decoded_bytes=self.core.max_decoded_bytes,
            )  # fmt: skip
        except ManifestError as exc:  # the folder cannot be listed
            models, problems, held, unlisted = [], [str(exc)], self._held, True
        if not models and not problems:
            problems = [no_export_problem(self.config.models_dir)]
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
        # (the last directory of a fingerprint is the one serving it; the ones before, copies)
        folder = {fp: d for d, fp in dirs.items()}.get(fingerprint)
        where = f" ({folder})" if folder is not None else ""
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
        to end, and one with a grace of 0 ends that one's grace at once.

        Raises:
            StopIncomplete: (the first call) gRPC's stop did not complete within `grace` +
                _CUT_WAIT_S; logged, the rest released.
        """
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
        stuck = self._let_calls_finish(grace, hurry)
        self.health.close()
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        if self._own_store and self.core.store is not None:
            self.core.store.close()
        if stuck is not None:
            self.write_lines_left_out()
            raise StopIncomplete(stuck)
        if self.port:  # (not after a start that could not listen: it never served)
            self._wait_for_handlers(_CUT_WAIT_S)
            self.write_lines_left_out()
            log.info("stopped", extra={"fields": {"event": "stopped"}})

    def write_lines_left_out(self) -> int:
        """Write each log line the limiters left out after the last line of its kind (a
        `refused` line per minute per edge, a `threads_exhausted` line per pool per 10 s ...):
        the last one left out, saying how many more were and about whom (`LineLimiter.flush`);
        nothing for a kind none was left out of. The stop calls it before its `stopped`
        line, once the Detect calls it waited for have logged how they ended; a line left out
        later, by a call still ending, is counted in the metrics only. Thread-safe; returns
        how many lines it wrote."""
        limiters = [
            *([] if self._token_guard is None else [self._token_guard.refusal_lines]),
            *self._guard.line_limiters(),
            self.servicer.refusal_lines,
            self.metrics.labels_full_lines,
            self.core.id_conflict_lines,
            self.core.store_failure_lines,
        ]
        return sum(limiter.flush() for limiter in limiters)

    def _wait_for_handlers(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for the Detect calls cancelled by the stop to end in their
        threads, which log their refusal: "stopped" is the last line."""
        deadline = time.monotonic() + timeout
        while self.servicer.running() and time.monotonic() < deadline:
            time.sleep(0.02)

    def _let_calls_finish(self, grace: float, hurry: threading.Event | None) -> str | None:
        """gRPC's stop, the grace kept here: the Detect calls still running when `grace` ends,
        or when `hurry` is set, and the calls still receiving their request (a slow link), are
        counted, then cancelled (UNAVAILABLE or CANCELLED to their callers, which edges retry),
        and a WARNING says how many (`calls_cut`; their edges send them again).

        Bounded: gRPC's stop is asked for in a thread of its own (`_grpc_stop`), since it can
        block for good (its state lock held by a thread of its own that never gets on, as a
        `Thread.start()` whose new thread died during start-up under an address-space limit
        does). Not done _CUT_WAIT_S after the cut: logged as ERROR (`stop_incomplete`, with
        every thread's stack) and returned as a message naming what did not stop; else None.
        """
        done = self._grpc_stop(grace + _CUT_WAIT_S)  # (gRPC's own cut, never first)
        deadline = time.monotonic() + grace
        while not done.wait(0.05):
            hurried = self._hurry.is_set() or (hurry is not None and hurry.is_set())
            if hurried or time.monotonic() >= deadline:
                cut, edges = self.servicer.running_edges()
                receiving, senders = self._guard.receiving()
                cut_done = self._grpc_stop(0)  # (a shorter grace overrides the one running)
                if cut or receiving:
                    why = "asked again to stop" if hurried else f"--grace {grace:g} s ended"
                    edges = sorted({*edges, *senders})
                    log.warning(
                        f"{why}: {cut} Detect call(s) still running"
                        + (f" and {receiving} still receiving their request" if receiving
                           else "")
                        + f" were cancelled, from edge(s) {', '.join(edges)} (UNAVAILABLE or "
                        "CANCELLED to them; they send them again: nothing is lost)",
                        extra={"fields": {"event": "calls_cut", "calls": cut,
                                          "receiving": receiving, "edges": edges,
                                          "hurried": hurried, "grace_s": grace}},
                    )  # fmt: skip
                if cut_done.wait(_CUT_WAIT_S) or done.is_set():
                    return None
                return self._stop_incomplete(grace)
        return None

    def _grpc_stop(self, grace: float) -> threading.Event:
        """gRPC's `stop(grace)` run in a daemon thread; the Event returned is set once gRPC's
        shutdown is complete. Without a thread to spare (short of memory), called here."""
        done = threading.Event()

        def stop() -> None:
            self._server.stop(grace).wait()
            done.set()

        try:
            threading.Thread(target=stop, name="splitdet-grpc-stop", daemon=True).start()
        except RuntimeError:  # ("can't start new thread")
            return self._server.stop(grace)
        return done

    def _stop_incomplete(self, grace: float) -> str:
        """The ERROR line (`stop_incomplete`) of a gRPC stop not complete _CUT_WAIT_S after the
        grace's end, then every thread's stack (as SIGUSR1 logs them); returns its message."""
        running, edges = self.servicer.running_edges()
        # every other thread, daemon ones too: gRPC's (its handlers', its cancel after the
        # grace) and the stop's own are daemon threads, and the ones left stuck
        threads = sorted(
            thread.name
            for thread in threading.enumerate()
            if thread is not threading.current_thread()
        )
        message = (
            f"gRPC's stop did not complete within --grace {grace:g} s + {_CUT_WAIT_S:g} s (its "
            f"calls and threads did not end: {running} Detect call(s) still running"
            + (f", from edge(s) {', '.join(edges)}" if edges else "")
            + f"; threads left: {', '.join(threads) or 'none'}); exiting with status "
            f"{STOP_INCOMPLETE_EXIT} for a supervisor to restart the server (the stacks follow)"
        )
        log.error(message, extra={"fields": {"event": "stop_incomplete", "grace_s": grace,
                                             "calls": running, "edges": edges,
                                             "threads": threads}})  # fmt: skip
        try:
            log_stacks(STOP_INCOMPLETE_STACKS)
        except Exception:  # (the stacks are a help; the exit must happen)
            log.exception("could not log the threads' stacks")
        return message

    def __enter__(self) -> CloudServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop(0)


#: Seconds a stop waits for gRPC to end the calls it cancelled at the end of the grace; past
#: them the stop is incomplete (`StopIncomplete`).
_CUT_WAIT_S = 5.0
#: The exit status of `splitdet cloud` whose stop did not complete (`StopIncomplete`).
STOP_INCOMPLETE_EXIT = 1
#: Why the stacks `stop_incomplete` logs are dumped (their line's header, not SIGUSR1's).
STOP_INCOMPLETE_STACKS = "(the stop did not complete; exiting)"


class StopIncomplete(RuntimeError):
    """gRPC's stop did not complete within the grace + _CUT_WAIT_S (logged as ERROR with the
    threads' stacks): threads of the server may never end, so the process must end at once
    (`cli_cloud.run`: os._exit with STOP_INCOMPLETE_EXIT), not wait for them at its exit."""
