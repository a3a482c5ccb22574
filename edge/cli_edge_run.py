"""`splitdet edge run`: the daemon's options and epilog, the checks of their values
(check_run_options, taken_extensions), and the handler that builds the EdgeDaemon and runs it
within its own SIGTERM/SIGINT handlers. The daemon's modules load when the handler runs.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sqlite3
import threading
from pathlib import Path
from types import FrameType

from splitdet.edge.cli_edge_options import MAX_MB, retention_type
from splitdet.edge.cloud_args import (
    add_cloud_arguments,
    add_edge_model_arguments,
    check_cloud_addresses,
    check_edge_model_options,
    client_config,
)
from splitdet.edge.liveness import STALL_AFTER_S

RUN_EPILOG = """\
examples:
  splitdet edge run --model models/gasket --watch /data/camera --cloud 10.0.0.5:50051 \\
      --db /data/edge.sqlite --after archive --metrics-port 9465
  splitdet edge run --model models/gasket --watch batch/ --cloud 127.0.0.1:50051 \\
      --db batch.sqlite --once                      # process what is there, deliver, exit

How it works: a file is read once its size and mtime have been unchanged for --settle seconds
(hidden files and *.tmp/*.part names are ignored), in arrival order. Only images are taken:
files named *.jpg *.jpeg *.png *.bmp *.tif *.tiff in any case (--extensions for others).
Companion files (Thumbs.db, desktop.ini, .json/.xml/.txt sidecars) are left where they are,
never moved, deleted, quarantined or recorded; each is logged once (INFO, event file_skipped)
and they are counted in the splitdet_edge_skipped_files gauge, as are symbolic links (never
followed: take the file itself), subfolders without --recursive, FIFOs and devices (the line's
`why` says which). Nor is a symbolic link in place of a folder the daemon writes into inside
--watch (WATCH/archive, WATCH/quarantine): refused at start (exit 2); one swapped in while it
runs fails that image's move (it stays in --watch, retried), and the start-up sweep skips it.
An image the daemon may not read (permissions) waits, WARNING file_unreadable,
and is taken once it can be read. Defect-free images get a final
"ok" row. Flagged images get a "pending" row and their encoded features in the outbox, in one
SQLite commit; a background sender delivers them with capped exponential backoff and jitter
while classification goes on, and the cloud's answer ("defect" + boxes) replaces the outbox row
in one commit. Requests are idempotent (the id is a hash of the image bytes), so re-sending
after a lost answer never makes a second result. Unreadable files (empty, corrupt, truncated,
not an image) go to the quarantine folder as ID_NAME (ID: the row's id), with ID_NAME.reason.txt
beside each, and an "error" row.
Permanent refusals by the cloud (INVALID_ARGUMENT, INTERNAL, a message over the server's
bound, ...) become "error" rows (dead letter, with the reason) and are not retried; the refused
requests are kept (up to --dead-letter-max-mb), and once the cause is fixed
`splitdet edge requeue --db FILE` sends them again. A refusal the operator fixes is not
permanent: wrong credentials (UNAUTHENTICATED) and a model the cloud does not serve
(FAILED_PRECONDITION) keep the requests in the outbox, retried every --retry-max seconds.

Upgrading the model: restart the daemon with the new --model on the same --db. Requests still in
the outbox from the previous export go out under their own fingerprint; the cloud answers them
while it serves both exports (splitdet cloud --model OLD --model NEW, or both folders in its
--models-dir). While it serves only one, the other's requests wait in the outbox without holding
up the rest. Which export an edge runs: its
splitdet_edge_model_info{fingerprint,threshold,calibrated_threshold,codec} gauge (1), and the
`started` log line; `splitdet edge status` counts its results by export.

Gate threshold: the manifest's calibrated one, unless --threshold P overrides it for this edge
(no new export): the daemon then logs a WARNING at start (event threshold_override) naming both,
and splitdet_edge_model_info's threshold label shows P. Each result records the export's
fingerprint and the threshold it was judged at (`edge results --json`, `edge status`);
`splitdet eval --model MODEL_DIR --threshold P` measures the export at P.

Outbox cap: at most --outbox-max-items requests or --outbox-max-mb MB (an empty outbox takes
one request of any size). When full:
  --when-full wait    (default) stop taking images from the hot folder until the outbox has
                      room; images wait there, nothing is dropped; counted in
                      splitdet_edge_outbox_full_waits_total; while it waits,
                      splitdet_edge_outbox_full is 1, a WARNING outbox_full is logged and
                      `edge status` says "outbox full" and since when.
  --when-full reject  the flagged image gets verdict "error" (outbox_full) and its features are
                      dropped; counted in splitdet_edge_outbox_full_rejected_total and in the
                      database's counters table.

SIGTERM/SIGINT finish the current image and exit 0; restarting resumes the outbox, and files
recorded but not yet moved (kill -9) are moved, not processed again. SIGUSR1 logs every thread's
stack (what a daemon that seems stuck waits on) and the daemon goes on. One `edge run` per --db:
it holds FILE.lock (of the file a symbolic link names) and an flock on the database file itself
(the same file under another name, a hard link or a bind mount, is refused too), and a second one
exits at start (`edge status`, `results`, `prune` and `requeue` are safe beside it); one per
--watch too (a lock on the folder itself, nothing written there), and hot folders may not nest
under a --recursive daemon's, either way round (hidden folders, its archive and quarantine and
folders holding .splitdet-ignore aside); a --watch removed and made again is locked anew. A --db
deleted or replaced while it runs stops it (exit 2) before it moves or deletes another image. Logs
are JSON lines on stderr (--log-format text: one line each, the message, then its event and fields
as key=value). Exit status: 0; with --once 1 when requests are still pending after --drain-timeout
(the next run sends them) or images were left because the outbox stayed full, files were still
being written, or the --db stayed locked by another program (an `sqlite3` shell, a backup), for
--drain-timeout (also at its start:
a daemon without --once waits for such a lock to start), or a signal stopped it before it started
or with images left; 2 usage or model errors.
"""


def register_run(actions: argparse._SubParsersAction) -> None:
    """Add `run` to the actions of `splitdet edge`."""
    p = actions.add_parser(
        "run",
        help="watch a hot folder, classify, deliver defects to the cloud",
        description="Run the edge daemon on a hot folder.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="MODEL_DIR",
        help="exported model directory (from splitdet export)",
    )
    p.add_argument(
        "--watch",
        required=True,
        type=Path,
        metavar="DIR",
        help="the hot folder the camera writes into",
    )
    p.add_argument(
        "-r",
        "--recursive",
        action="store_true",
        help="take the images of --watch's subfolders too (camera software that writes a "
        "folder per day or line); hidden folders, the quarantine, the archive and any folder "
        "holding a .splitdet-ignore file (edge collect's output) are skipped",
    )
    taken = p.add_mutually_exclusive_group()
    taken.add_argument(
        "--extensions",
        metavar=".EXT,...",
        help="take only files whose name ends in one of these, comma-separated, any case, "
        "instead of the image ones .jpg,.jpeg,.png,.bmp,.tif,.tiff (e.g. .raw16,.png for a "
        "camera writing its images under its own extension; list every one to take); the "
        "other files are left alone",
    )
    taken.add_argument(
        "--any-extension",
        action="store_true",
        help="take every file whatever its name (images written without an extension); "
        "companion files (Thumbs.db, sidecars) are then quarantined as unreadable",
    )
    p.add_argument(
        "--db",
        required=True,
        type=Path,
        metavar="FILE",
        help="SQLite results + outbox database (created if missing)",
    )
    p.add_argument(
        "--after",
        choices=["keep", "archive", "delete"],
        default="keep",
        help="what happens to an image file once its result is stored (default: %(default)s)",
    )
    p.add_argument(
        "--archive",
        type=Path,
        metavar="DIR",
        help="archive folder for --after archive (default: WATCH/archive); files "
        "are renamed ID_NAME (a long NAME shortened; ID_NAME~N when another file has the "
        "name: nothing is overwritten). A symbolic link inside --watch is refused (the camera's "
        "account could point it anywhere): give its target",
    )
    p.add_argument(
        "--quarantine",
        type=Path,
        metavar="DIR",
        help="folder for unreadable files, each as ID_NAME with ID_NAME.reason.txt beside it "
        "(default: WATCH/quarantine); a symbolic link inside --watch is refused, as for "
        "--archive",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="batch mode: process what is in the folder, deliver, exit",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --once, how long to keep delivering the outbox, to wait for room in it, for "
        "files still being written, or for a --db another program holds locked (default: "
        "%(default)s)",
    )
    add_edge_model_arguments(p)
    p.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="a file must be unchanged this long before it is read (default: %(default)s)",
    )
    p.add_argument(
        "--unreadable-grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="an unchanged file that does not decode waits this much longer before "
        "quarantine (default: %(default)s)",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=0.25,
        metavar="SECONDS",
        help="seconds between scans of an idle folder (default: %(default)s)",
    )
    p.add_argument(
        "--outbox-max-items",
        type=int,
        default=10_000,
        metavar="N",
        help="outbox cap in requests (default: %(default)s)",
    )
    p.add_argument(
        "--outbox-max-mb",
        type=float,
        default=2048.0,
        metavar="MB",
        help="outbox cap in payload megabytes; an empty outbox takes one request of any size "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--dead-letter-max-mb",
        type=float,
        default=256.0,
        metavar="MB",
        help="requests the cloud refused for good are kept for `splitdet edge requeue`, up to "
        "this many megabytes; the oldest beyond it are dropped (default: %(default)s; 0 keeps "
        "none)",
    )
    p.add_argument(
        "--keep-results",
        type=retention_type,
        default=None,
        metavar="AGE",
        help="delete final results older than AGE (30d, 12h, ...; 1m at least) from --db, at "
        "start and hourly; pending ones are never deleted, nor one whose image is still in "
        "--watch, nor dead letters (flagged images the cloud never judged: `splitdet edge "
        "requeue`, or `splitdet edge prune --dead-letters`) (default: keep every result)",
    )
    p.add_argument(
        "--when-full",
        choices=["wait", "reject"],
        default="wait",
        help="policy when the outbox is full, see below (default: %(default)s)",
    )
    p.add_argument(
        "--retry-initial",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="first backoff after a failed send (default: %(default)s)",
    )
    p.add_argument(
        "--retry-max",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="backoff cap (default: %(default)s)",
    )
    add_cloud_arguments(p, required=True)
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics, and a liveness probe at "
        "/healthz (see --stall-after; 0: any free port; default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address of the metrics endpoint (default: %(default)s)",
    )
    p.add_argument(
        "--stall-after",
        type=float,
        default=STALL_AFTER_S,
        metavar="SECONDS",
        help="the metrics endpoint's /healthz (a liveness probe's) answers 503 once the "
        "daemon's loop has not gone round, nor finished an image, for this long: a read hung "
        "on a share that went away (default: %(default)s)",
    )
    p.add_argument(
        "--save-annotated",
        type=Path,
        metavar="DIR",
        help="write defect images with their boxes drawn here (needs --after keep or archive)",
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        metavar="FILE",
        help="once running, write {pid, metrics_port, fingerprint, pid_start_ticks, boot_id} "
        "JSON here; removed when it stops, and at start (one an earlier run left, unless its "
        "process still runs)",
    )
    p.add_argument(
        "--log-format",
        choices=["json", "text"],
        default="json",
        help="log lines on stderr: json (one object per line) or text (the message, then the "
        "event name and fields as key=value) (default: %(default)s)",
    )
    p.set_defaults(handler=run)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """The daemon; see RUN_EPILOG. SIGTERM and SIGINT are this command's own from the start
    (in the main thread): before the daemon is built one ends the start-up at once (it raises
    StoppedBeforeStart, which also ends a blocked call, as a FIFO for --token-file), then it
    is passed on to the daemon, whose own handlers, while it waits or runs, put these back.
    After a stop signal both are ignored, so that another one while the process ends (its
    interpreter's finalisation included) does not turn its exit status into 143 or 130."""
    from splitdet.edge.daemon import StoppedBeforeStart
    from splitdet.edge.daemon_log import log_event
    from splitdet.shared.logs import use_json_logs

    if args.log_format == "json":
        use_json_logs()  # before anything below logs
    built: list = []  # the EdgeDaemon, once built
    stopped = [False]  # set once a stop signal came

    def ask(signum: int, _frame: FrameType | None) -> None:
        stopped[0] = True
        if built:  # (before run() has its handlers, or after it put these back)
            built[0].request_stop(signum)
            return
        name = signal.Signals(signum).name
        raise StoppedBeforeStart(
            f"stopped by {name} before the daemon started (nothing taken)", signum
        )  # (`signum`: sent again if a finaliser the handler ran in swallowed it)

    previous = {}
    if threading.current_thread() is threading.main_thread():  # (tests run it in threads)
        previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run_daemon(args, built, stopped)
    except StoppedBeforeStart as exc:  # a signal before it started, or while it waited to
        stopped[0] = True  # (for a locked --db)
        log_event(logging.INFO, "stopped", processed=0, note=str(exc))
        return 1 if args.once else 0  # (a batch that took nothing)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_IGN if stopped[0] else handler)


def _run_daemon(args: argparse.Namespace, built: list, stopped: list[bool]) -> int:
    """`run` within its signal handlers: the daemon goes into `built` once made; `stopped[0]`
    is set when its own handlers caught a stop signal."""

    from splitdet.edge.daemon import EdgeDaemon
    from splitdet.edge.daemon_config import DaemonConfig, folder_problem
    from splitdet.edge.runtime import ModelOutputError
    from splitdet.edge.store import OutboxCap
    from splitdet.edge.store_file import (
        FREE_DB_SPACE,
        StoreError,
        StoreLocked,
        damaged_store,
        is_damage,
    )
    from splitdet.shared.cli import CommandError, remove_ready_file
    from splitdet.shared.manifest import ManifestError

    if args.ready_file is not None:  # an earlier run's, first: this start may fail its checks
        remove_ready_file(args.ready_file, unless_running=True)
    problem = folder_problem("--watch", args.watch, "give the folder the camera writes into")
    if problem is not None:  # (missing; a FIFO, a file, a device or a link to one)
        raise CommandError(problem)
    check_run_options(args)
    check_cloud_addresses(args.cloud)
    try:
        client = client_config(args)
        config = DaemonConfig(
            model_dir=args.model,
            watch=args.watch,
            recursive=args.recursive,
            cloud=args.cloud,
            db=args.db,
            after=args.after,
            archive_dir=args.archive,
            quarantine_dir=args.quarantine,
            once=args.once,
            drain_timeout_s=args.drain_timeout,
            threshold=args.threshold,
            codec=args.codec,
            threads=args.threads,
            device=args.device,
            settle_s=args.settle,
            unreadable_grace_s=args.unreadable_grace,
            poll_s=args.poll,
            outbox=OutboxCap(
                max_items=args.outbox_max_items,
                max_bytes=int(args.outbox_max_mb * 1e6),
                policy=args.when_full,
                dead_letter_max_bytes=int(args.dead_letter_max_mb * 1e6),
            ),
            retry_initial_s=args.retry_initial,
            retry_max_s=args.retry_max,
            client=client,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            stall_after_s=args.stall_after,
            save_annotated=args.save_annotated,
            ready_file=args.ready_file,
            keep_results_s=args.keep_results,
            extensions=taken_extensions(args),
        )
        daemon = EdgeDaemon(config)
    except StoreLocked:  # --once, the --db locked past --drain-timeout: logged, images left
        return 1
    except StoreError as exc:  # its message starts with the database's path
        raise CommandError(f"--db {exc}") from None
    except (ValueError, ManifestError, RuntimeError, OSError) as exc:
        raise CommandError(str(exc)) from None
    built.append(daemon)
    try:
        return daemon.run()  # start-up can still fail: a metrics port in use, a ready-file folder
    except sqlite3.Error as exc:  # e.g. the disk is full: the image being handled stays in --watch
        if is_damage(exc):  # (a damaged page met as it ran: what to do, as at a start)
            raise CommandError(f"--db {damaged_store(config.db, str(exc))}") from None
        full = "full" in str(exc)
        hint = f"; the image being handled stays in --watch: {FREE_DB_SPACE}" if full else ""
        raise CommandError(f"--db {config.db}: {exc}{hint}") from None
    except StoreError as exc:  # e.g. the database deleted while it ran; starts with its path
        raise CommandError(f"--db {exc}") from None
    except ModelOutputError as exc:  # the export's gate gives no verdict: nothing recorded
        raise CommandError(f"{exc}; the image being handled stays in --watch") from None
    except OSError as exc:
        raise CommandError(str(exc)) from None
    finally:
        stopped[0] = stopped[0] or daemon.signalled


def check_run_options(args: argparse.Namespace) -> None:
    """CommandError naming the first `edge run` option whose value cannot work (NaN and
    infinity included: a NaN threshold flags nothing unnoticed, an infinite wait overflows)."""
    from splitdet.shared.cli import CommandError

    def refuse(flag: str, value: object, why: str) -> None:
        shown = f"{value:g}" if isinstance(value, float) else value
        raise CommandError(f"{flag} {shown}: {why}")

    for flag, value in (("--settle", args.settle), ("--unreadable-grace", args.unreadable_grace),
                        ("--drain-timeout", args.drain_timeout)):  # fmt: skip
        if not (math.isfinite(value) and value >= 0):
            refuse(flag, value, "must be a number of seconds >= 0")
    for flag, value in (("--poll", args.poll), ("--retry-initial", args.retry_initial),
                        ("--retry-max", args.retry_max), ("--stall-after", args.stall_after),
                        ("--outbox-max-mb", args.outbox_max_mb)):  # fmt: skip
        if not (math.isfinite(value) and value > 0):
            refuse(flag, value, "must be a number > 0")
    for flag, value in (("--outbox-max-mb", args.outbox_max_mb),
                        ("--dead-letter-max-mb", args.dead_letter_max_mb)):  # fmt: skip
        if value > MAX_MB:  # (in bytes, past what an int of the store can hold)
            refuse(flag, value, f"must be at most {MAX_MB:g} MB")
    if args.retry_initial > args.retry_max:
        refuse("--retry-initial", args.retry_initial, f"is above --retry-max {args.retry_max:g}")
    if not (math.isfinite(args.dead_letter_max_mb) and args.dead_letter_max_mb >= 0):
        refuse("--dead-letter-max-mb", args.dead_letter_max_mb, "must be a number >= 0")
    if args.outbox_max_mb * 1e6 < 1:
        refuse("--outbox-max-mb", args.outbox_max_mb, "is less than one byte")
    if args.outbox_max_items < 1:
        refuse("--outbox-max-items", args.outbox_max_items, "must be at least 1")
    check_edge_model_options(args)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        refuse("--metrics-port", args.metrics_port, "must be 0-65535 (0: any free port)")
    if args.archive is not None and args.after != "archive":
        refuse("--archive", args.archive, f"is used only with --after archive, not {args.after}")
    taken_extensions(args)


def taken_extensions(args: argparse.Namespace) -> tuple[str, ...] | None:
    """The extensions `edge run` takes from the hot folder: --extensions's, the image ones
    by default, None (every file) with --any-extension; CommandError for a list that
    cannot be one."""
    from splitdet.edge.preprocess import IMAGE_SUFFIXES
    from splitdet.edge.watcher import parse_extensions
    from splitdet.shared.cli import CommandError

    if args.any_extension:
        return None
    if args.extensions is None:
        return IMAGE_SUFFIXES
    try:
        return parse_extensions(args.extensions)
    except ValueError as exc:
        raise CommandError(f"--extensions {args.extensions!r}: {exc}") from None
