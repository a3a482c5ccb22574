"""`splitdet cloud`: serve a model directory's RPN + ROI heads over gRPC.

    splitdet cloud --model models/gasket --listen 0.0.0.0:50051 --metrics-port 9464

Top-level imports are stdlib only (see splitdet.shared.cli); torch and grpc load in `run`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sqlite3
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.shared.cli import (
    TOKEN_ENV,
    CommandError,
    host_problem,
    memory_limit_hint,
    read_pem,
    read_token,
    remove_ready_file,
    split_host_port,
    thread_limit_message,
    write_ready_file,
)
from splitdet.shared.shortage import short_of
from splitdet.shared.signal_event import event_setter

if TYPE_CHECKING:  # imports torch and grpc: `run` loads it when it runs
    from splitdet.cloud.server import CloudServer

log = logging.getLogger(__name__)

#: Bounds of the numeric options: beyond them torch crashes (--threads 100000 segfaults) or
#: waiting on shutdown overflows (--grace 1e12). Inclusive; None: no upper bound.
OPTION_BOUNDS: dict[str, tuple[float, float | None]] = {
    "threads": (1, 1024),
    "max_concurrent": (1, None),
    "max_queued": (0, 256),  # each waiting call holds a thread, polling for its caller
    "queue_wait": (0, 3600),
    "max_message_mib": (1, 2047),  # gRPC's bound is a signed 32-bit byte count
    "max_decoded_mib": (1, None),
    "grace": (0, 3600),
    "max_call": (1, 86_400),
    "max_receive": (1, 86_400),
    "metrics_port": (0, 65535),
    "answers_cap": (0, None),
    "forget_edges_after": (0.01, 87_600),  # hours: 36 s to 10 years
}
#: The address space the cloud was measured to need (a small export; more for a larger one).
NEEDS_ADDRESS_SPACE = "about 4.7 GB of address space"
EXAMPLE = """\
example:
  splitdet cloud --model models/gasket --listen 0.0.0.0:50051 --metrics-port 9464 \\
      --tls-cert server.pem --tls-key server.key --client-ca edge-ca.pem --token-file token.txt

Health (grpc.health.v1): "" and splitdet.v1.Detection for the server, and each served export's
fingerprint (all 64 hex digits, as the ready file's "fingerprints" and the manifest give it; the
16 the log shows are not a health name) for that export, SERVING while it is served and unknown
once a reload drops it (e.g. grpc_health_probe -service FINGERPRINT, after a SIGHUP).

Stops on SIGTERM/SIGINT: health turns NOT_SERVING (health Watch streams hear it and are ended),
new calls are refused, in-flight calls get --grace seconds to finish, then the process exits 0
(1 if gRPC's stop is not complete 5 s later: an ERROR stop_incomplete and every thread's stack);
another SIGTERM/SIGINT a quarter of a second or more into the drain ends the grace at once.
Calls cut by its end are logged (WARNING calls_cut) and sent again by their edges. SIGUSR1 logs
every thread's stack (what a server that seems stuck waits on) and the server goes on.

Bounds on calls: each kind has its threads (Detect: --max-concurrent + --max-queued + 8;
GetManifest: 8; health checks and token refusals: 32); a call holds one from its headers on,
also while its request arrives, and a call finding them all held is refused at once with
RESOURCE_EXHAUSTED (splitdet_cloud_rpc_threads_exhausted_total{pool}, a threads_exhausted line;
held threads: splitdet_cloud_rpc_threads_busy{pool}). A call whose request has not arrived
--max-receive seconds after its start is ended with DEADLINE_EXCEEDED, freeing its thread (a
request_not_received line). A connection takes new calls for 5 min (+ up to 10%), then is
closed gracefully (clients reconnect) and its calls get --max-call seconds to finish.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `cloud` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "cloud",
        help="serve the detection heads over gRPC (the cloud side)",
        description=(
            "Serve the RPN + ROI heads of one or more exported model directories as the gRPC "
            "service splitdet.v1.Detection, with grpc.health.v1 health checking and Prometheus "
            "metrics."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        metavar="MODEL_DIR",
        help="exported model directory (made by `splitdet export`); repeat it to serve several "
        "exports at once, each request answered by the model it names (a rolling upgrade: "
        "edges on the old and the new export are both answered); the first is the default; "
        "on SIGHUP one re-exported in place is served anew (its new fingerprint)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        metavar="DIR",
        help="serve every export in this folder too (each subfolder holding a manifest.json; "
        "without --model the newest is the default); on SIGHUP the server serves what the "
        "folder holds then: copy a new export in, remove an old one, `kill -HUP` the server, "
        "no call is dropped",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        metavar="ADDRESS",
        help="gRPC address host:port; 0.0.0.0:PORT accepts other hosts, port 0 "
        "picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="log lines on stderr: text for people (the message, then the event name and "
        "fields it does not show as key=value), json (one object per line: ts, level, event, "
        "and e.g. method, peer, edge, code, message of a refused call) for a log pipeline "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads for the heads, 1-1024 (default: all cores)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=2,
        metavar="N",
        help="Detect calls running at once; more wait (--max-queued) or are refused with "
        "RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        default=8,
        metavar="N",
        help="Detect calls that wait, first come first served, for a running one to finish, "
        "0-256; more are refused with RESOURCE_EXHAUSTED, and the edge backs off. A waiting "
        "call holds its request in memory (int8 features of the cpu model: ~1 MB; at most "
        "--max-message-mib); a repeat of an answered request does not wait. On SIGTERM "
        "waiting calls get "
        "UNAVAILABLE at once. 0: refuse at once, which lets the edge answered last take every "
        "freed slot under load (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="the longest a call waits for a slot, 0-3600 (its own deadline too; the edge's "
        "is --timeout, 60 s) (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="largest gRPC message accepted, 1-2047 MiB (default: %(default)s; int8 "
        "features of an 800x960 input are ~16 MB, fp32 ~65 MB); larger "
        "messages are refused with RESOURCE_EXHAUSTED, counted and logged; past a quarter "
        "more (at least 16 MiB) gRPC refuses them itself, naming its own bound, uncounted",
    )
    parser.add_argument(
        "--max-decoded-mib",
        type=int,
        default=512,  # shared.codec.DEFAULT_MAX_TOTAL_BYTES (not imported here: numpy)
        metavar="MIB",
        help="largest float32 feature size one request may decode to, MiB; an export whose "
        "largest input (its manifest's min_size x max_size) needs more is refused, at start or "
        "at a reload, naming the MiB it needs (default: %(default)s: every preset's; paper's "
        "needs 411)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on shutdown, time in-flight calls get to finish, 0-3600 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-call",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="the longest a call may last once its connection is being closed (each is closed "
        "gracefully after 5 min; clients reconnect), 1-86400. Keep it above the edges' "
        "--timeout (default 60 s), or their longest calls may be cut (default: %(default)s)",
    )
    parser.add_argument(
        "--max-receive",
        type=float,
        default=60.0,  # server_config.MAX_RECEIVE_S
        metavar="SECONDS",
        help="the longest a call may take to receive its request, from its start, 1-86400: a "
        "call whose request has not arrived by then (a caller that opens calls and never sends "
        "them) is ended with DEADLINE_EXCEEDED, freeing its thread; the edge sends it again. "
        "The default, the edges' default --timeout, takes a 50 MB request (the paper preset's "
        "are tens of MB) over an 8 Mbit/s link: raise it for larger requests or slower links "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="server certificate chain; with --tls-key enables TLS",
    )
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    parser.add_argument(
        "--client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="require a bearer token: any non-empty line of this file that is not a # "
        "comment (read again when it changes: add the new token as a line, move the edges, "
        f"remove the old one); default: the {TOKEN_ENV} environment variable if set, else no "
        "token",
    )
    parser.add_argument(
        "--reflection", action="store_true", help="serve gRPC server reflection (off by default)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics "
        "(default: off; 0 picks a free port)",
    )
    parser.add_argument(
        "--metrics-host",
        default=None,
        metavar="HOST",
        help="address of the metrics endpoint (default: the host of --listen, so a server "
        "listening on 127.0.0.1 shows its metrics to this machine only; 0.0.0.0 exposes them "
        "to every interface)",
    )
    parser.add_argument(
        "--forget-edges-after",
        type=float,
        default=168.0,
        metavar="HOURS",
        help="an edge silent this long loses its per-edge series (last seen, answers, "
        "refusals) and its place among the 256 edge names labelled (default: %(default)s, a "
        "week: a camera gone quiet stays visible that long)",
    )
    parser.add_argument(
        "--answers-db",
        type=Path,
        default=Path("splitdet-cloud-answers.sqlite"),
        metavar="FILE",
        help="SQLite file keeping answers by request id, so a repeated request "
        "is answered without recomputing, also after a restart "
        "(default: %(default)s, in the current directory: under systemd that is / unless "
        "the unit sets WorkingDirectory=, so give an absolute path)",
    )
    parser.add_argument(
        "--answers-cap",
        type=int,
        default=100_000,
        metavar="N",
        help="answers kept, oldest evicted first; 0 disables (default: %(default)s). An "
        "answer of 100 boxes takes about 12 KB: the default cap holds about 1.2 GB",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        metavar="FILE",
        help="once serving, write {pid, port, metrics_port, fingerprint, fingerprints, "
        "security, pid_start_ticks, boot_id} as JSON here (for supervisors and tests; the last "
        "two tell this process from a later one given its pid); removed when the drain "
        "begins, and at start, before the models load (one an earlier run left, unless its "
        "process still runs)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the ready line as JSON on stdout"
    )
    parser.add_argument("--debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def check_options(args: argparse.Namespace) -> None:
    """CommandError naming the first option whose value cannot be served, found before anything
    heavy is imported or loaded (gRPC would serve a port past 65535 on another port, and say
    only "cannot listen" about a bad certificate)."""
    if not args.model and args.models_dir is None:
        raise CommandError("give the export(s) to serve: --model MODEL_DIR or --models-dir DIR")
    if args.models_dir is not None and not args.models_dir.is_dir():
        raise CommandError(f"--models-dir {args.models_dir}: no such folder")
    split_host_port(args.listen, "--listen")
    for name, (low, high) in OPTION_BOUNDS.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and low <= value <= (high or math.inf)):
            span = f"{low}-{high}" if high is not None else f">= {low}"
            raise CommandError(f"--{name.replace('_', '-')} must be {span}, got {value}")
    if args.metrics_host is None:  # the host --listen serves gRPC on
        args.metrics_host = split_host_port(args.listen, "--listen")[0]
    problem = host_problem(args.metrics_host)
    if problem:
        raise CommandError(f"--metrics-host: {problem}")
    check_tls_files(args.tls_cert, args.tls_key, args.client_ca)
    ready = args.ready_file
    if ready is not None and ready.is_dir():
        raise CommandError(f"--ready-file {ready}: is a directory")
    if ready is not None and not ready.parent.is_dir():
        raise CommandError(f"--ready-file {ready}: no folder {ready.parent}")
    answers = args.answers_db
    if args.answers_cap and answers.is_dir():
        raise CommandError(f"--answers-db {answers}: is a directory, give a file")
    if args.answers_cap:
        try:
            answers.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(
                f"--answers-db {answers}: cannot create its folder {answers.parent} "
                f"({exc.strerror or exc})"
            ) from None
        # only what cannot work at all, now (not after the models' load: ~25 s); a disk
        # nearly full is no refusal: a store that fails is not fatal, answers still go out
        problem = answers_disk_problem(answers, "cannot write it", full_too=False)
        if problem is None:  # (a folder or file this user may not write: a root-owned volume)
            problem = answers_access_problem(answers)
        if problem is not None:
            raise CommandError(problem)


def answers_shown(path: Path) -> str:
    """--answers-db `path` for a message: as given, and its absolute path too when it is
    relative (the default is: in a container's or a service's working directory, /)."""
    if path.is_absolute():
        return str(path)
    return f"{path} ({os.path.abspath(path)})"


def answers_access_problem(path: Path) -> str | None:
    """Why this process's user may not create or write --answers-db `path`, or None: SQLite
    needs to write the file (and its -wal and -shm files, when they are there) and, to create
    whichever of them is missing, its folder; asked of `os.access` with the effective user and
    group ids (nothing is written to find it out). Found before the models load, where SQLite
    would say only "unable to open database file" after it."""
    real = Path(os.path.realpath(path))  # (SQLite writes beside the file a link names)
    folder = real.parent
    effective = os.access in os.supports_effective_ids

    def writable(target: Path | str, mode: int) -> bool:
        return os.access(target, mode, effective_ids=effective)

    denied: Path | None = None
    companions = [Path(f"{real}-wal"), Path(f"{real}-shm")]
    for target in (real, *companions):
        if target.exists() and not writable(target, os.R_OK | os.W_OK):
            denied = target
            break
    missing = not real.exists() or not all(c.exists() for c in companions)
    if denied is None and missing and not writable(folder, os.W_OK | os.X_OK):
        denied = folder
    if denied is None:
        return None
    what = "" if denied in (real, folder) else f" (its {denied.name})"
    return (
        f"--answers-db {answers_shown(path)}: cannot create or write it{what} in {folder} "
        f"(permission denied for uid {os.geteuid()}); give --answers-db in a folder this user "
        "may write (a volume owned by it), or --answers-cap 0 to keep no answers"
    )


def answers_disk_problem(path: Path, failed: str, full_too: bool = True) -> str | None:
    """What stops --answers-db `path` from being written when its file system is mounted
    read-only or (`full_too`) full (less than FULL_BELOW_BYTES free, or what root may use):
    the message (`failed` says what failed: "cannot write it", "cannot open it (unable to
    open database file)") with what to do; None when the file system is neither (or cannot be
    told). Told by `os.statvfs` of its folder, so nothing is written to find it out.

    Free space is only a reading of why opening the store failed (`full_too`, `_run`), never
    a reason to refuse to start: an existing store on a nearly full disk keeps answers, and
    one that cannot is not fatal (`core.DetectionCore`: answers still go out)."""
    from splitdet.shared.atomic_file import FULL_BELOW_BYTES, free_bytes

    folder = Path(os.path.realpath(path)).parent  # (of the file a symbolic link names)
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return None
    if read_only:
        return (
            f"--answers-db {answers_shown(path)}: {failed}: the file system holding it ({folder}) "
            "is mounted read-only; remount it read-write or give --answers-db on another"
        )
    if not full_too:
        return None
    free = free_bytes(folder)
    if free is not None and free < FULL_BELOW_BYTES:
        return (
            f"--answers-db {answers_shown(path)}: {failed}: no space left on device "
            f"({free // 1024} KiB free in {folder}); free space there or give --answers-db on "
            "another file system"
        )
    return None


def check_tls_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> None:
    """CommandError naming the TLS option whose file is missing, not PEM, encrypted, or not the
    key of the certificate: gRPC refuses such files with "cannot listen on ADDRESS" only."""
    if (cert is None) != (key is None):
        raise CommandError("--tls-cert and --tls-key go together: give both or neither")
    if client_ca is not None and cert is None:
        raise CommandError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for option, path, kind in (("--tls-cert", cert, "certificate"),
                               ("--tls-key", key, "private key"),
                               ("--client-ca", client_ca, "certificate")):  # fmt: skip
        if path is not None:
            read_pem(option, path, kind)
    if cert is None:
        return
    import ssl

    def no_password() -> bytes:
        raise CommandError(f"--tls-key {key}: encrypted; gRPC needs an unencrypted key")

    def context() -> ssl.SSLContext:
        made = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        made.set_ciphers("DEFAULT:@SECLEVEL=0")  # judge the files, not this OpenSSL's key policy
        return made

    for option, path in (("--tls-cert", cert), ("--client-ca", client_ca)):
        try:
            if path is not None:
                context().load_verify_locations(path)
        except ssl.SSLError:
            raise CommandError(f"{option} {path}: a damaged PEM certificate") from None
    try:
        context().load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CommandError(f"--tls-key {key}: not the key of --tls-cert {cert}") from None
        raise CommandError(f"--tls-key {key}: a damaged or unsupported private key") from None
    if not grpc_takes_tls_pair(Path(cert).read_bytes(), Path(key).read_bytes()):
        raise CommandError(
            f"--tls-key {key}: a key (or --tls-cert {cert}) that OpenSSL reads but gRPC's TLS "
            "cannot serve with (e.g. an EC key on a curve other than P-256/P-384/P-521, "
            "Ed448, DSA): issue the certificate for an RSA or ECDSA P-256 key"
        )


def grpc_takes_tls_pair(chain: bytes, key: bytes) -> bool:
    """Whether gRPC's own TLS serves with this certificate chain and key (PEM): it refuses
    some that OpenSSL reads, with only "Failed to bind" at start, and on a renewal keeps the
    old certificate without a word. Tried on a throwaway loopback server; True when loopback
    itself cannot be bound (then this check cannot tell)."""
    import grpc

    def binds(credentials: grpc.ServerCredentials | None) -> bool:
        server = grpc.server(ThreadPoolExecutor(max_workers=1))
        try:
            if credentials is None:
                server.add_insecure_port("127.0.0.1:0")
            else:
                server.add_secure_port("127.0.0.1:0", credentials)
        except RuntimeError:
            server.stop(None)
            return False
        server.start()  # a bound server never started keeps its socket open after stop()
        server.stop(None).wait()
        return True

    return binds(grpc.ssl_server_credentials([(key, chain)])) or not binds(None)


def run(args: argparse.Namespace) -> int:
    """Serve the exports `args` names until SIGTERM/SIGINT (SIGHUP reloads them); returns 0."""
    if args.json:  # (`>&-`: before the model loads and the port binds, not once ready)
        from splitdet.shared.cli import refuse_closed_stdout

        refuse_closed_stdout("--json prints the ready line there")
    if args.log_format == "json":  # before anything logs
        from splitdet.shared.logs import use_json_logs

        use_json_logs()
    check_options(args)
    if args.ready_file is not None:  # (an earlier run's: not ready while this one loads)
        remove_ready_file(args.ready_file, unless_running=True)
    # SIGTERM while importing or loading: exit 0 once loaded, never serving (not a bare 143).
    # SIGHUP then: reloaded once serving (its default action would end the process).
    stop, reload = threading.Event(), threading.Event()
    try:  # (the first setter starts the signal events' thread)
        previous = {
            signal.SIGTERM: signal.signal(signal.SIGTERM, event_setter(stop)),
            signal.SIGINT: signal.signal(signal.SIGINT, event_setter(stop)),
            signal.SIGHUP: signal.signal(signal.SIGHUP, event_setter(reload)),
        }
    except RuntimeError as exc:  # ("can't start new thread")
        if short_of(exc) != "threads":
            raise
        raise CommandError(thread_limit_message(exc)) from None
    if args.forget_edges_after < 1:  # (the README's alert waits an hour)
        log.warning(
            "--forget-edges-after %g h: an edge silent that long is forgotten, its "
            "splitdet_cloud_edge_last_seen_timestamp_seconds series gone, before the 'camera "
            "gone quiet' alert (silent for an hour) can fire on it; give 1 or more, or alert "
            "sooner", args.forget_edges_after,
            extra={"fields": {"event": "forget_before_alert"}},
        )  # fmt: skip
    where = _models_named(args)
    log.info("loading model%s %s", "s" * (len(where) > 1), ", ".join(where),
             extra={"fields": {"event": "loading", "models": where}})  # fmt: skip
    try:
        return _run(args, stop, reload)
    finally:  # stopped by a signal, the process ends: another (SIGHUP too) must not end it
        for sig, handler in previous.items():  # by the default action (exit 143, 130, 129)
            signal.signal(sig, signal.SIG_IGN if stop.is_set() else handler)


def short_of_memory(what: str, exc: BaseException) -> CommandError | None:
    """The CommandError saying that loading `what` ran out of memory, naming the limit to raise
    (`shared.cli.memory_limit_hint`), when `exc` says so (`shared.shortage.short_of`: torch's
    libraries that "failed to map segment" under an address-space limit, its allocator's
    "can't allocate memory" while the model is built); else None."""
    if short_of(exc) != "memory":
        return None
    said = " ".join(str(exc).split())[:300]  # (one line)
    return CommandError(
        f"not enough memory to load {what} ({memory_limit_hint()}; the cloud needs "
        f"{NEEDS_ADDRESS_SPACE}): {type(exc).__name__}: {said}"
    )


def _run(args: argparse.Namespace, stop: threading.Event, reload: threading.Event) -> int:
    try:  # (torch loads here: its libraries may find no room under an address-space limit)
        from splitdet.cloud.serve_loop import serve
        from splitdet.cloud.server import STOP_INCOMPLETE_EXIT, StopIncomplete
        from splitdet.cloud.server_config import MIB, ServerConfig
        from splitdet.shared.cores import usable_cores
    except (ImportError, OSError) as exc:
        problem = short_of_memory("torch", exc)
        if problem is None:
            raise
        raise problem from None
    from splitdet.shared.manifest import ManifestError

    try:
        config = ServerConfig(
            model_dir=args.model[0] if args.model else None,
            more_model_dirs=tuple(args.model[1:]),
            models_dir=args.models_dir,
            listen=args.listen.strip(),
            threads=usable_cores() if args.threads is None else args.threads,
            max_concurrent=args.max_concurrent,
            max_queued=args.max_queued,
            max_queue_wait_s=args.queue_wait,
            max_message_bytes=args.max_message_mib * MIB,
            max_decoded_bytes=args.max_decoded_mib * MIB,
            grace_s=args.grace,
            max_call_s=args.max_call,
            max_receive_s=args.max_receive,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            token=read_token(args.token_file),  # (checks the file now, before loading)
            token_file=args.token_file,
            reflection=args.reflection,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            answers_db=args.answers_db,
            answers_capacity=args.answers_cap,
            forget_edges_s=args.forget_edges_after * 3600,
            debug_delay_s=args.debug_delay,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None

    def ready_info(server: CloudServer) -> dict:
        return {
            "pid": os.getpid(),
            "port": server.port,
            "metrics_port": server.metrics_port,
            "fingerprint": server.core.fingerprint,
            "fingerprints": list(server.core.fingerprints),
            "security": config.security,
        }

    def on_ready(server: CloudServer) -> None:
        info = ready_info(server)
        if args.ready_file is not None:
            try:
                write_ready_file(args.ready_file, info)
            except OSError as exc:
                raise CommandError(str(exc)) from None
        if args.json:
            print(json.dumps(info), flush=True)

    def on_reload(server: CloudServer) -> None:  # the ready file says what is served now
        if args.ready_file is not None:
            write_ready_file(args.ready_file, ready_info(server))

    def on_draining() -> None:  # health NOT_SERVING from now: no longer ready
        if args.ready_file is not None:
            remove_ready_file(args.ready_file, os.getpid())

    try:
        return serve(config, on_ready=on_ready, stop=stop, reload=reload, on_reload=on_reload,
                     on_draining=on_draining)  # fmt: skip
    except StopIncomplete:  # (logged with the threads' stacks: `CloudServer.stop`)
        pass
    except (ManifestError, OSError, MemoryError) as exc:  # (a model built short of memory:
        # its ManifestError says "can't allocate memory", not the export's fault)
        short = short_of_memory(", ".join(_models_named(args)), exc)
        raise short or CommandError(str(exc)) from None
    except sqlite3.Error as exc:  # e.g. --answers-db names a file that is not SQLite
        problem = answers_disk_problem(args.answers_db, f"cannot open it ({exc})")
        shown = answers_shown(args.answers_db)
        raise CommandError(problem or f"--answers-db {shown}: {exc}") from None
    finally:  # stopped: no longer ready (a kill -9 leaves it: the next start removes it)
        if args.ready_file is not None:
            remove_ready_file(args.ready_file, os.getpid())
    return exit_at_once(STOP_INCOMPLETE_EXIT)


def _models_named(args: argparse.Namespace) -> list[str]:
    """The exports `args` names, for messages: each --model, and --models-dir's folders."""
    return [*map(str, args.model), *([f"{args.models_dir}/*"] if args.models_dir else [])]


def exit_at_once(status: int) -> int:
    """End the process now with `status`, the logs flushed: not Python's exit, which waits for
    every non-daemon thread (gRPC's and its handler pools'), those a stuck stop left among
    them (`server.StopIncomplete`). Never returns."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
