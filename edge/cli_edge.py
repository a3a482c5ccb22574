"""`splitdet edge`: the camera-side daemon (`edge run`) and its results (`edge results`).

    splitdet edge run --model models/gasket --watch /data/camera --cloud 10.0.0.5:50051 \\
        --db /data/edge.sqlite --after archive --metrics-port 9465
    splitdet edge results --db /data/edge.sqlite --since 1h --json

Top-level imports are stdlib only (see splitdet.shared.cli); the daemon loads in the handler.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import shlex
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from splitdet.edge.cloud_args import (
    add_cloud_arguments,
    add_codec_argument,
    add_edge_model_arguments,
    check_cloud_addresses,
    check_edge_model_options,
    client_config,
)
from splitdet.shared.cli import float_in, int_in, silence_stdout

if TYPE_CHECKING:  # the handlers import it when they run
    from splitdet.edge.store import OutboxCap, ResultStore

EDGE_EPILOG = """\
actions:
  splitdet edge run      watch a hot folder, classify, deliver defects to the cloud (the daemon)
  splitdet edge results  print the results database for other tools (--json, --csv)
  splitdet edge requeue  send requests the cloud refused (dead letters) again, once fixed
  splitdet edge abandon  make the waiting requests of a retired model export dead letters
  splitdet edge status   what the database holds: verdicts, the outbox, dead letters
  splitdet edge prune    delete old final results (edge run --keep-results does it hourly)
  splitdet edge check    is this edge ready: the export, one image, the cloud, one round trip
  splitdet edge collect  copy chosen results' images into a VOC tree, the model's boxes as labels

examples:
  splitdet edge check --model models/gasket --cloud 10.0.0.5:50051 --image sample.png
  splitdet edge run --model models/gasket --watch /data/camera --cloud 10.0.0.5:50051 \\
      --db /data/edge.sqlite --after archive
  splitdet edge status --db /data/edge.sqlite
"""

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
`why` says which). An image the daemon may not read (permissions) waits, WARNING file_unreadable,
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
while it serves both exports (splitdet cloud --model OLD --model NEW). While it serves only one,
the other's requests wait in the outbox without holding up the rest. Which export an edge runs:
its splitdet_edge_model_info{fingerprint,threshold,calibrated_threshold,codec} gauge (1), and
the `started` log line; `splitdet edge status` counts its results by export.

Gate threshold: the manifest's calibrated one, unless --threshold P overrides it for this edge
(no new export): the daemon then logs a WARNING at start (event threshold_override) naming both,
and splitdet_edge_model_info's threshold label shows P. Each result records the export's
fingerprint and the threshold it was judged at (`edge results --json`, `edge status`);
`splitdet eval --model MODEL_DIR --threshold P` measures the export at P.

Outbox cap: at most --outbox-max-items requests or --outbox-max-mb MB. When full:
  --when-full wait    (default) stop taking images from the hot folder until the outbox has
                      room; images wait there, nothing is dropped; counted in
                      splitdet_edge_outbox_full_waits_total.
  --when-full reject  the flagged image gets verdict "error" (outbox_full) and its features are
                      dropped; counted in splitdet_edge_outbox_full_rejected_total and in the
                      database's counters table.

SIGTERM/SIGINT finish the current image and exit 0; restarting resumes the outbox, and files
recorded but not yet moved (kill -9) are moved, not processed again. SIGUSR1 logs every thread's
stack (what a daemon that seems stuck waits on) and the daemon goes on. One `edge run` per --db: it
holds FILE.lock (of the file a symbolic link names), and a second one exits at start (`edge status`,
`results`, `prune` and `requeue` are safe beside it); one per --watch too (a lock on the folder
itself, nothing written there), and hot folders may not nest under a --recursive daemon's, either
way round (hidden folders, its archive and quarantine and folders holding .splitdet-ignore
aside); a --watch removed and made again is locked anew. A --db deleted or replaced while it
runs stops it (exit 2) before it moves or deletes another image. Logs are JSON lines on
stderr (--log-format text: one line each, the message, then its event and fields as
key=value). Exit status: 0; with --once 1 when requests are still pending after --drain-timeout
(the next run sends them) or images were left because the outbox stayed full, or the --db stayed
locked by another program (an `sqlite3` shell, a backup), for --drain-timeout (also at its start:
a daemon without --once waits for such a lock to start), or a signal stopped it before it
started or with images left; 2 usage or model errors.
"""

RESULTS_EPILOG = """\
examples:
  splitdet edge results --db /data/edge.sqlite                 # a table
  splitdet edge results --db /data/edge.sqlite --since 1h --json
  splitdet edge results --db /data/edge.sqlite --since 2024-05-01T08:00 --csv > day.csv
  splitdet edge results --db /data/edge.sqlite --verdict defect --score-threshold 0.5

Columns: id, path, stored_path, content_hash, size_bytes, arrived, finished, updated (unix s),
verdict (ok | defect | pending | error), p_defect, request_id, fingerprint, boxes
[[x1, y1, x2, y2], ...] in original px, scores, labels, class_names, timings (s per stage),
bytes_sent, attempts, error_kind (quarantine | dead_letter | outbox_full), reason, threshold
(the gate threshold the image was judged at). The daemon stores every box the model returns
(from score 0.05); --score-threshold 0.5 shows the boxes `splitdet predict` reports.
--since keeps rows created or changed since then (a consumer polling with --since sees pending
rows again once they are final). Safe to run while the daemon writes.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `edge` with its actions `run` and `results`."""
    edge = subparsers.add_parser(
        "edge",
        help="the camera-side daemon: hot folder in, durable results out",
        description="The camera-side edge: a daemon and its results database.",
        epilog=EDGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = edge.add_subparsers(dest="edge_action", metavar="ACTION")
    _register_run(actions)
    _register_results(actions)
    _register_requeue(actions)
    _register_abandon(actions)
    _register_status(actions)
    _register_prune(actions)
    _register_check(actions)
    _register_collect(actions)
    edge.set_defaults(handler=lambda _args: _no_action(edge))


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _register_run(actions: argparse._SubParsersAction) -> None:
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
        "name: nothing is overwritten)",
    )
    p.add_argument(
        "--quarantine",
        type=Path,
        metavar="DIR",
        help="folder for unreadable files, each as ID_NAME with ID_NAME.reason.txt beside it "
        "(default: WATCH/quarantine)",
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
        help="with --once, how long to keep delivering the outbox, to wait for room in it, or "
        "to wait for a --db another program holds locked (default: %(default)s)",
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
        help="outbox cap in payload megabytes (default: %(default)s)",
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
        type=_duration,
        default=None,
        metavar="AGE",
        help="delete final results older than AGE (30d, 12h, ...) from --db, at start and "
        "hourly; pending ones are never deleted, nor one whose image is still in --watch "
        "(default: keep every result)",
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
        help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free "
        "port; default: off)",
    )
    p.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address of the metrics endpoint (default: %(default)s)",
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
        help="once running, write {pid, metrics_port, fingerprint} JSON here",
    )
    p.add_argument(
        "--log-format",
        choices=["json", "text"],
        default="json",
        help="log lines on stderr: json (one object per line) or text (the message, then the "
        "event name and fields as key=value) (default: %(default)s)",
    )
    p.set_defaults(handler=run)  # fmt: skip


def _add_db_and_since(p: argparse.ArgumentParser, since: str) -> None:
    """--db FILE and --since WHEN (parse_since), `since` starting the latter's help."""
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the database")
    p.add_argument(
        "--since",
        metavar="WHEN",
        help=f"{since}: 30s, 15m, 2h, 7d ago, an ISO time (2024-05-01T08:00, local unless it "
        "has an offset) or unix seconds",
    )


def _register_results(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "results",
        help="print the results database (--json, --csv)",
        description="Read the edge daemon's results database.",
        epilog=RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_db_and_since(p, "rows created or changed since")
    p.add_argument(
        "--verdict",
        choices=["ok", "defect", "pending", "error"],
        help="only rows with this verdict",
    )
    p.add_argument(
        "--fingerprint",
        metavar="HEX",
        help="only rows of the model export whose fingerprint starts with HEX (the table's "
        "export column; `edge status` counts results by export)",
    )
    p.add_argument(
        "--score-threshold",
        type=float_in(0.0, 1.0),
        default=0.0,
        metavar="S",
        help="only boxes scoring at least S (their scores and labels with them), as `splitdet "
        "predict --score-threshold` reports them (default: 0, every box stored: the model's own "
        "floor is 0.05)",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="a JSON array of row objects")
    fmt.add_argument(
        "--csv", action="store_true", help="CSV with a header; list columns as JSON text"
    )
    p.set_defaults(handler=results)  # fmt: skip


def _boxes_scoring_at_least(row: dict, score: float) -> dict:
    """`row` with only the boxes scoring at least `score`, and only their entries in the other
    per-box columns (scores, labels, class_names)."""
    scores = row["scores"]
    if not score or scores is None:
        return row
    kept = [i for i, s in enumerate(scores) if s >= score]
    per_box = ("boxes", "scores", "labels", "class_names")
    return {
        **row,
        **{k: [row[k][i] for i in kept] for k in per_box if row[k] is not None
           and len(row[k]) == len(scores)},
    }  # fmt: skip


REQUEUE_EPILOG = """\
examples:
  splitdet edge requeue --db /data/edge.sqlite --dry-run     # what would be sent again
  splitdet edge requeue --db /data/edge.sqlite --since 2h

A request the cloud refused for good (a dead letter: INVALID_ARGUMENT, INTERNAL, a message over
the server's --max-message-mib, ...) is kept in the database with its reason. Once the cause is
fixed (the server's bound raised, a cloud bug fixed), requeue puts it back in the outbox, due at
once, and its row turns "pending" again; a running daemon sends it within a second, otherwise
the next `splitdet edge run` does. The cloud answers it once: requests are idempotent. Only as
many as the outbox caps allow are requeued (give the daemon's --outbox-max-items/-mb); run it
again when the outbox has drained. Safe while the daemon runs.
"""


#: The largest megabyte cap an option takes (a petabyte): caps are kept as bytes.
MAX_MB = 1e9


def _register_requeue(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "requeue",
        help="send requests the cloud refused again, once the cause is fixed",
        description="Put dead letters (requests the cloud refused for good) back in the outbox.",
        epilog=REQUEUE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_db_and_since(p, "only requests refused since")
    p.add_argument("--dry-run", action="store_true", help="only say what would be requeued")
    p.add_argument(
        "--outbox-max-items",
        type=int_in(1),
        default=10_000,
        metavar="N",
        help="the daemon's outbox cap in requests (default: %(default)s)",
    )
    p.add_argument(
        "--outbox-max-mb",
        type=float_in(1e-6, MAX_MB),
        default=2048.0,
        metavar="MB",
        help="the daemon's outbox cap in payload megabytes (default: %(default)s)",
    )
    p.set_defaults(handler=requeue)  # fmt: skip


def requeue(args: argparse.Namespace) -> int:
    """Requeue dead letters; see REQUEUE_EPILOG."""
    from splitdet.edge.store import OutboxCap

    since = parse_since(args.since) if args.since is not None else None
    cap = OutboxCap(max_items=args.outbox_max_items, max_bytes=int(args.outbox_max_mb * 1e6))
    store = _open_store(args.db, cap, dry_run=args.dry_run)
    try:
        requeued, no_room, not_kept = store.requeue_dead_letters(since, dry_run=args.dry_run)
    finally:
        store.close()
    verb = "would requeue" if args.dry_run else "requeued"
    then = "" if args.dry_run or not requeued else (
        "; a running `splitdet edge run` sends them within a second, or the next one")  # fmt: skip
    print(f"{args.db}: {verb} {len(requeued)} dead letter(s){then}")
    if no_room:
        print(f"{len(no_room)} left for want of room in the outbox (its caps: "
              f"{cap.max_items} requests, {args.outbox_max_mb:g} MB); requeue again once it "
              "has drained")  # fmt: skip
    if not_kept:
        print(f"{len(not_kept)} without a kept request (dropped by --dead-letter-max-mb, or "
              "refused before splitdet kept them): process their images again "
              f"({_error_rows_command(args.db)} lists them)")  # fmt: skip
    return 0


def _error_rows_command(db: Path) -> str:
    """The command listing the store's error rows, quoted to paste: `splitdet edge results
    --db DB --verdict error`."""
    return f"`splitdet edge results --db {shlex.quote(str(db))} --verdict error`"


ABANDON_EPILOG = """\
examples:
  splitdet edge abandon --db /data/edge.sqlite --fingerprint 3c5823c70655 --dry-run
  splitdet edge abandon --db /data/edge.sqlite --fingerprint 3c5823c70655

Requests made with a model export wait in the outbox until the cloud serves that export (log
event model_refused, the oldest-pending alert). When no cloud will serve it again (retired
for good), abandon turns them into dead letters: their rows become "error" (error_kind
dead_letter, the reason naming the export), the requests are kept within --dead-letter-max-mb,
and `splitdet edge requeue` sends them again should the export be served after all; or process
their images again with the current export. `splitdet edge status` lists the outbox by export.
Safe while the daemon runs.
"""


def _register_abandon(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "abandon",
        help="make the waiting requests of a retired model export dead letters",
        description="Turn the outbox requests made with one model export, which no cloud "
        "serves any more, into dead letters (kept for `splitdet edge requeue`).",
        epilog=ABANDON_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the database")
    p.add_argument(
        "--fingerprint",
        required=True,
        metavar="HEX",
        help="the export's fingerprint, or its first 8 or more hex digits (as `edge status` "
        "shows them)",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be abandoned")
    p.add_argument(
        "--dead-letter-max-mb",
        type=float_in(0.0, MAX_MB),
        default=256.0,
        metavar="MB",
        help="the daemon's --dead-letter-max-mb: the requests kept for requeue, oldest dropped "
        "beyond it (default: %(default)s)",
    )
    p.set_defaults(handler=abandon)


def abandon(args: argparse.Namespace) -> int:
    """Dead-letter one export's waiting requests; see ABANDON_EPILOG."""
    from splitdet.edge.store import OutboxCap
    from splitdet.shared.cli import CommandError

    dropped_counter = "dead_letter_payloads_dropped"  # the store's count of requests dropped

    wanted = args.fingerprint.strip().lower()
    if len(wanted) < 8 or any(c not in "0123456789abcdef" for c in wanted):
        raise CommandError(
            f"--fingerprint {args.fingerprint!r}: give the export's fingerprint or its first 8 "
            "or more hex digits"
        )
    store = _open_store(args.db, dry_run=True)  # (a refused --fingerprint changes nothing)
    try:
        waiting = store.outbox_fingerprints()
        matches = sorted(fp for fp in waiting if fp.startswith(wanted))
        if not matches:
            held = ", ".join(f"{fp[:12]} ({n})" for fp, n in waiting.items()) or "none"
            raise CommandError(
                f"--db {args.db}: no request in the outbox was made with export {wanted}; "
                f"the outbox holds requests of: {held}"
            )
        if len(matches) > 1:
            raise CommandError(
                f"--fingerprint {wanted} names {len(matches)} exports ("
                + ", ".join(fp[:16] for fp in matches)
                + "): give more digits"
            )
        [fingerprint] = matches
        reason = (
            f"abandoned by `splitdet edge abandon`: no cloud serves model export "
            f"{fingerprint[:16]} any more (`splitdet edge requeue` sends it again)"
        )
        if not args.dry_run:
            store.close()
            cap = OutboxCap(dead_letter_max_bytes=int(args.dead_letter_max_mb * 1e6))
            store = _open_store(args.db, cap)
        dropped_before = store.counters().get(dropped_counter, 0)
        n = store.dead_letter_export(fingerprint, reason, dry_run=args.dry_run)
        kept = store.dead_letter_stats().depth
        dropped = store.counters().get(dropped_counter, 0) - dropped_before
    finally:
        store.close()
    verb = "would make" if args.dry_run else "made"
    print(f"{args.db}: {verb} {n} request(s) of export {fingerprint[:16]} dead letters"
          + ("" if args.dry_run else f"; {kept} dead letter(s) kept for requeue"))  # fmt: skip
    if dropped:
        print(
            f"{dropped} kept request(s) dropped, the oldest, to keep the dead letters within "
            f"--dead-letter-max-mb {args.dead_letter_max_mb:g}: their images must be processed "
            f"again ({_error_rows_command(args.db)} lists them)"
        )
    return 0


def _register_prune(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "prune",
        help="delete old final results (edge run --keep-results does it hourly)",
        description="Delete the results (ok, defect, error) that became final more than AGE "
        "ago, with any request kept for their dead letter. Pending results are never deleted, "
        "nor a result whose file still lies where it arrived (--after keep, or a move that "
        "failed: the row is what tells the daemon that file is done; a newer file the camera "
        "wrote under the same name does not keep the older results). Safe while the daemon "
        "runs. A result this boot wrote goes only once the time since boot agrees it is that "
        "old (a clock set forward by NTP after a stale boot); prune says how many it kept so. "
        "The file shrinks by the pages freed (a database made before splitdet gave "
        "pages back keeps its size: SQLite reuses them; see the README to convert one).",
        epilog="example:\n  splitdet edge prune --db /data/edge.sqlite --older-than 90d "
        "--dry-run\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the database")
    p.add_argument(
        "--older-than", required=True, type=_duration, metavar="AGE", help="30d, 12h, 15m, 30s"
    )
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.set_defaults(handler=prune)  # fmt: skip


def prune(args: argparse.Namespace) -> int:
    """Delete old final results; see _register_prune."""
    store = _open_store(args.db, dry_run=args.dry_run)
    try:
        pruned = store.prune(time.time() - args.older_than, dry_run=args.dry_run)
        freed = 0 if args.dry_run else store.reclaim()
    finally:
        store.close()
    gave = f"; {freed / 1e6:.1f} MB given back to the file system" if freed else ""
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{args.db}: {verb} {pruned.deleted} result(s){gave}")
    if pruned.kept_for_clock:
        print(
            f"kept {pruned.kept_for_clock} result(s) stamped older than --older-than that this "
            "boot wrote more recently: the clock was behind when they were written and has "
            "been set forward since"
        )
    return 0


def _open_store(path: Path, cap: OutboxCap | None = None, dry_run: bool = False) -> ResultStore:
    """The ResultStore at `path` for a maintenance command; CommandError when there is none
    (a maintenance command never creates one) or it cannot be used. A dry run opens it read
    only: the store stays as it was, byte for byte (not marked, no column added)."""
    from splitdet.edge.store import ResultStore
    from splitdet.edge.store_file import StoreError
    from splitdet.shared.cli import CommandError

    if not path.is_file():
        raise CommandError(f"--db {path}: no such results database")
    try:
        return ResultStore(path, cap, readonly=dry_run)
    except StoreError as exc:  # its message starts with the database's path
        raise CommandError(f"--db {exc}") from None


def _register_check(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "check",
        help="is this edge ready: the export, one image, the cloud, one round trip",
        description="Check, before going live, what `edge run` needs: the export loads and "
        "matches its manifest; an image (--image, or a mid-grey test image) goes through the "
        "gate and the lazy completion; the cloud is SERVING, serves this export, and answers "
        "one Detect with its features. One line per step; exit status 0 when every step "
        "passed, 1 when one failed.",
        epilog="examples:\n  splitdet edge check --model models/gasket\n"
        "  splitdet edge check --model models/gasket --cloud 10.0.0.5:50051 --token-file t.txt "
        "--image sample.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, metavar="MODEL_DIR",
                   help="exported model directory (from splitdet export)")  # fmt: skip
    p.add_argument("--image", type=Path, metavar="FILE", help="an image from the camera")
    p.add_argument("--json", action="store_true", help="the steps as a JSON array")
    add_codec_argument(p)
    add_cloud_arguments(p, required=False)
    p.set_defaults(handler=check)  # fmt: skip


def check(args: argparse.Namespace) -> int:
    """Run edge.check's steps; see _register_check."""
    from dataclasses import asdict

    from splitdet.edge.check import check_edge

    if args.cloud is not None:
        check_cloud_addresses(args.cloud)
    steps = check_edge(args.model, client_config(args), args.image, args.codec)
    if args.json:
        print(json.dumps([asdict(step) for step in steps], indent=2))
    else:
        for step in steps:
            print(f"{'ok' if step.ok else 'FAIL':4}  {step.name:6}  {step.detail}")
    return 0 if all(step.ok for step in steps) else 1


COLLECT_EPILOG = """\
examples:
  splitdet edge collect --db /data/edge.sqlite --out review/ --since 7d --p-defect 0.2:0.8
      the week's images the gate was least sure of
  splitdet edge collect --db /data/edge.sqlite --out review/ --verdict defect --limit 200

Then review the pre-labels (LabelImg, CVAT and Label Studio open a VOC tree), and
  splitdet data split review/ --add && splitdet data check review/ && splitdet train ...
Running collect again into the same folder adds new results and leaves every image already
there, and its reviewed annotation, as it is. Only final ok/defect results are collected, and
only while their file is still where the daemon left it (--after archive or keep). Images are
copied as the edge read them: one whose EXIF orientation tag (2..8) has viewers turn or mirror
it becomes a PNG of its pixels as decoded, without the tag (the model's boxes are in those
pixels, and `data check` refuses such a tag); the others are copied byte for byte.
"""


def _p_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(":"))
    except ValueError:
        message = f"expected LOW:HIGH such as 0.2:0.8, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not 0.0 <= low <= high <= 1.0:
        raise argparse.ArgumentTypeError(f"expected 0 <= LOW <= HIGH <= 1, got {text!r}")
    return low, high


def _register_collect(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "collect",
        help="copy chosen results' images into a VOC tree, the model's boxes as labels",
        description="Copy the images of chosen results into a PASCAL VOC tree (JPEGImages/, "
        "Annotations/), each annotated with the model's boxes as pre-labels to review, and "
        "list in collected.csv where each came from and what the model said.",
        epilog=COLLECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_db_and_since(p, "results created or changed since")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="the VOC tree")
    p.add_argument("--verdict", choices=["ok", "defect"], help="only results with this verdict")
    p.add_argument(
        "--p-defect",
        type=_p_range,
        metavar="LOW:HIGH",
        help="only results whose p(defect) lies in this range (e.g. 0.2:0.8, where the gate "
        "is least sure)",
    )
    p.add_argument(
        "--limit", type=int_in(1), metavar="N", help="at most N results, spread evenly over them"
    )
    p.add_argument(
        "--score-threshold",
        type=float_in(0.0, 1.0),
        default=0.5,
        metavar="S",
        help="boxes scoring at least S become pre-labels (default: 0.5)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=collect)  # fmt: skip


def collect(args: argparse.Namespace) -> int:
    """Collect results into a VOC tree; see _register_collect."""
    from splitdet.edge.collect import collect_results
    from splitdet.shared.cli import CommandError

    db, since = _read_db(args)
    try:
        summary = collect_results(
            db, args.out, since=since, verdict=args.verdict, p_range=args.p_defect,
            limit=args.limit, min_score=args.score_threshold,
        )  # fmt: skip
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"--out {args.out}: cannot write ({exc})") from None
    finally:
        db.close()
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
        return 0
    print(
        f"{args.out}: {len(summary.collected)} image(s) collected, {summary.already} already "
        f"there, {len(summary.missing)} not available (of {summary.matched} matching results)"
    )
    if summary.renamed:
        print(
            f"  {len(summary.renamed)} collected under a tagged id (another image in --out had "
            f"its id): {', '.join(summary.renamed[:5])}"
            + (" ..." if len(summary.renamed) > 5 else "")
        )
    for line in summary.missing[:20]:
        print(f"  not available: {line}")
    if len(summary.missing) > 20:
        print(f"  ... and {len(summary.missing) - 20} more (--json lists them all)")
    return 0


def _register_status(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "status",
        help="what the database holds: verdicts, the outbox, dead letters",
        description="A summary of the edge daemon's database: whether a `splitdet edge run` "
        "runs on it (its pid; its lock is looked up in /proc/locks, never taken), images by "
        "verdict and by the model export that judged them (the latest result's first), the outbox "
        "(requests, bytes, oldest, next try, by model export, the last error: how long ago, "
        "or past once requests of its export were delivered again), the dead letters "
        "(kept for `splitdet edge requeue` or not) and the durable counters. Safe while the "
        "daemon writes.",
        epilog="examples:\n  splitdet edge status --db /data/edge.sqlite\n"
        "  splitdet edge status --db /data/edge.sqlite --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the database")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=status)  # fmt: skip


def status(args: argparse.Namespace) -> int:
    """Print store_status and whether a daemon runs on --db; see _register_status."""
    from splitdet.edge.lock_holder import writer_state
    from splitdet.edge.store_file import StoreError, open_readonly
    from splitdet.edge.store_reads import store_status
    from splitdet.shared.cli import CommandError

    try:
        db = open_readonly(args.db)
    except StoreError as exc:  # its message starts with the database's path
        raise CommandError(f"--db {exc}") from None
    try:
        summary = store_status(db)
    finally:
        db.close()
    summary["daemon"] = writer_state(args.db).to_json()  # (its lock looked up, never taken)
    text = json.dumps(summary, indent=2) if args.json else "\n".join(
        _status_lines(args.db, summary))  # fmt: skip
    try:
        print(text, flush=True)
    except BrokenPipeError:  # e.g. `| head`: stop quietly
        silence_stdout()
    return 0


def _judged_at(model: dict) -> str:
    """Which gate thresholds judged an export's results (a `results_by_model` entry):
    " at threshold 0.5" when one judged them all; else each one's count, and those without one
    (never judged, e.g. unreadable, or written by an earlier splitdet) as "none":
    " at thresholds 0.3 (2), 0.5 (10), none (1)"; "" when no result has one."""
    from splitdet.edge.daemon_metrics import threshold_text

    thresholds = model["thresholds"]
    unrecorded = model["results"] - sum(t["results"] for t in thresholds)
    if not thresholds:
        return ""
    if len(thresholds) == 1 and not unrecorded:
        return f" at threshold {threshold_text(thresholds[0]['threshold'])}"
    counts = [f"{threshold_text(t['threshold'])} ({t['results']})" for t in thresholds]
    return " at thresholds " + ", ".join(counts + ([f"none ({unrecorded})"] if unrecorded else []))


def _span(seconds: float | None) -> str:
    """A duration for `edge status`: "-", "12 s", "4.5 min", "2.3 h", "1.5 d"."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _status_lines(path: Path, summary: dict) -> list[str]:
    """store_status as lines for people (with "daemon", `lock_holder.writer_state` as JSON,
    when the summary has it)."""

    def when(t: float | None) -> str:
        return "-" if t is None else datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")

    verdicts, outbox, dead = summary["verdicts"], summary["outbox"], summary["dead_letters"]
    errors = ", ".join(f"{kind} {n}" for kind, n in summary["errors"].items())
    by_export = "; ".join(  # the model each result came from, that of the latest first
        f"{fingerprint[:12]} {model['results']}"
        + ("" if i else " (the latest result's)")
        + _judged_at(model)
        for i, (fingerprint, model) in enumerate(summary["results_by_model"].items())
    )
    waits = outbox.get("sender_waits_s")
    next_try = outbox["next_try_in_s"] if waits is None else max(waits, outbox["next_try_in_s"])
    if (summary.get("daemon") or {}).get("state") == "none":  # no sender: nothing is tried
        when_next = "next try once `splitdet edge run` runs on it"
    else:
        when_next = f"next try in {_span(next_try)}" + (
            "" if waits is None else " (the sender pauses after a failed send)"
        )
    lines = [
        f"{path} (schema {summary['schema_version']})",
        *_daemon_lines(summary.get("daemon"), summary["last_arrival"]),
        f"images        {sum(verdicts.values())}: "
        + ", ".join(f"{v} {n}" for v, n in verdicts.items())
        + (f" ({errors})" if errors else ""),
        f"results by export: {by_export or '-'}",
        f"last image    {when(summary['last_arrival'])}, last result "
        f"{when(summary['last_finished'])}",
        f"outbox        {outbox['requests']} requests, {outbox['bytes'] / 1e6:.1f} MB, oldest "
        f"{_span(outbox['oldest_age_s'])} old, {when_next}",
    ]
    for fingerprint, n in outbox["by_model"].items():
        lines.append(f"              {n} made by model {fingerprint[:12]}")
    lines += _error_lines(outbox)
    lines.append(
        f"dead letters  {dead['kept']} kept for `splitdet edge requeue` "
        f"({dead['kept_bytes'] / 1e6:.1f} MB), {dead['not_kept']} without their request"
    )
    counters = ", ".join(f"{name} {n}" for name, n in summary["counters"].items())
    lines.append(f"counters      {counters or '-'}")
    file = summary["file"]
    lines.append(
        f"file          {file['bytes'] / 1e6:.1f} MB, {file['free_bytes'] / 1e6:.1f} MB of it free "
        + ("(given back after a prune or a delivered backlog)" if file["gives_back"] else
           "(kept and reused: an earlier store; the README says how to convert it)")
    )  # fmt: skip
    return lines


def _daemon_lines(daemon: dict | None, last_arrival: float | None) -> list[str]:
    """The `daemon` line of `edge status`: whether a `splitdet edge run` holds --db's writer
    lock (`lock_holder.writer_state` as JSON; None: not asked, no line)."""
    if daemon is None:
        return []
    if daemon["state"] == "running":
        pid = "pid not visible here" if daemon["pid"] is None else f"pid {daemon['pid']}"
        return [f"daemon        running on this --db ({pid})"]
    if daemon["state"] == "none":
        age = None if last_arrival is None else max(0.0, time.time() - last_arrival)
        last = "no image yet" if age is None else f"the last image arrived {_span(age)} ago"
        return [
            f"daemon        none is running on this --db ({last}): nothing is classified or "
            "delivered until `splitdet edge run` starts (as /proc/locks shows it here: a "
            "daemon in another container or on another host is not seen)"
        ]
    return [f"daemon        unknown: {daemon['detail']}; its lock file is {daemon['lock_file']}"]


def _error_lines(outbox: dict) -> list[str]:
    """The outbox's last error for `edge status`, whole (its remedy is at the end; continued
    lines indented): when current, how long ago; once requests of its export were delivered
    after it, said to be past."""
    if not outbox["last_error"]:
        return []
    error = outbox["last_error"].replace("\n", "\n" + " " * 26)
    delivered = outbox.get("delivered_since_error_age_s")
    if delivered is not None:
        return [
            "              last error: none since requests of its export were delivered again "
            f"(the last {_span(delivered)} ago); the one before: {error}"
        ]
    lines = [f"              last error: {error}"]
    if outbox.get("last_error_age_s") is not None:
        lines.append(
            f"{' ' * 26}({_span(outbox['last_error_age_s'])} ago; no request of its export "
            "delivered since)"
        )
    return lines


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
        raise StoppedBeforeStart(f"stopped by {name} before the daemon started (nothing taken)")

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
    from splitdet.edge.daemon_config import DaemonConfig
    from splitdet.edge.store import OutboxCap
    from splitdet.edge.store_file import StoreError, StoreLocked
    from splitdet.shared.cli import CommandError
    from splitdet.shared.manifest import ManifestError

    if not args.watch.is_dir():
        raise CommandError(f"--watch {args.watch}: no such folder")
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
        hint = ("; the image being handled stays in --watch: free space, or bound the database "
                "(--keep-results, --outbox-max-mb)") if "full" in str(exc) else ""  # fmt: skip
        raise CommandError(f"--db {config.db}: {exc}{hint}") from None
    except StoreError as exc:  # e.g. the database deleted while it ran; starts with its path
        raise CommandError(f"--db {exc}") from None
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
                        ("--retry-max", args.retry_max),
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


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """'30s', '15m', '2h', '7d' -> seconds (finite, >= 0); None when `text` is not one."""
    text = text.strip()
    if len(text) > 1 and text[-1] in _UNITS:
        try:
            number = float(text[:-1])
        except ValueError:
            return None
        if math.isfinite(number) and number >= 0:
            return number * _UNITS[text[-1]]
    return None


def _duration(text: str) -> float:
    """argparse type of a duration option (parse_duration)."""
    seconds = parse_duration(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"expected 30s, 15m, 2h or 7d, got {text!r}")
    return seconds


def parse_since(text: str, now: float | None = None) -> float:
    """'30s', '15m', '2h', '7d' (ago), an ISO time, or unix seconds -> unix seconds."""
    from splitdet.shared.cli import CommandError

    now = time.time() if now is None else now
    text = text.strip()
    number = None
    try:
        if len(text) > 1 and text[-1] in _UNITS:
            number = parse_duration(text)
            if number is not None:
                return now - number
        else:
            number = float(text)
            if math.isfinite(number):
                return number
    except ValueError:
        pass
    if number is None:  # not a number: an ISO time?
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError:
            pass
    raise CommandError(f"--since {text!r}: expected 30s/15m/2h/7d ago, an ISO time or unix seconds")


def _read_db(args: argparse.Namespace) -> tuple[sqlite3.Connection, float | None]:
    """--db opened read only, and --since in unix s; CommandError naming either's problem."""
    from splitdet.edge.store_file import StoreError, open_readonly
    from splitdet.shared.cli import CommandError

    since = parse_since(args.since) if args.since is not None else None
    try:
        return open_readonly(args.db), since
    except StoreError as exc:  # its message starts with the database's path
        raise CommandError(f"--db {exc}") from None


def results(args: argparse.Namespace) -> int:
    """Print result rows; see RESULTS_EPILOG."""
    from splitdet.edge.store_reads import iter_results
    from splitdet.edge.store_schema import RESULT_COLUMNS

    db, since = _read_db(args)
    try:
        rows = iter_results(db, since=since, verdict=args.verdict)
        if args.fingerprint:  # (one export's results: which model judged what, in a rollout)
            wanted = args.fingerprint.strip().lower()
            rows = (row for row in rows if (row["fingerprint"] or "").startswith(wanted))
        rows = (_boxes_scoring_at_least(row, args.score_threshold) for row in rows)
        out = sys.stdout
        if args.json:
            out.write("[")
            for i, row in enumerate(rows):
                out.write(("," if i else "") + "\n" + json.dumps(row))
            out.write("\n]\n")
        elif args.csv:
            writer = csv.writer(out)
            writer.writerow(RESULT_COLUMNS)
            for row in rows:
                writer.writerow(
                    json.dumps(v) if isinstance(v, list | dict) else "" if v is None else v
                    for v in row.values()
                )
        else:
            _table(rows, out)
        out.flush()
    except BrokenPipeError:  # e.g. `| head`: stop quietly
        silence_stdout()
    finally:
        db.close()
    return 0


def _table(rows: Iterable[dict], out: TextIO) -> None:
    from splitdet.shared.probability_format import format_probability

    out.write(
        f"{'id':>6}  {'verdict':8} {'p_defect':>8} {'boxes':>5}  {'finished':19}  "
        f"{'export':12}  path\n"
    )
    for row in rows:
        finished = (
            datetime.fromtimestamp(row["finished"]).strftime("%Y-%m-%d %H:%M:%S")
            if row["finished"]
            else "-"
        )
        p = format_probability(row["p_defect"]) if row["p_defect"] is not None else "-"
        boxes = len(row["boxes"]) if row["boxes"] is not None else "-"
        note = f"  ({row['error_kind']}: {row['reason']})" if row["error_kind"] else ""
        out.write(
            f"{row['id']:>6}  {row['verdict']:8} {p:>8} {boxes:>5}  {finished:19}  "
            f"{(row['fingerprint'] or '-')[:12]:12}  {row['path']}{note}\n"
        )
