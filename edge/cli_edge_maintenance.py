"""The maintenance actions of `splitdet edge` on an existing results database: `requeue` (dead
letters back into the outbox), `abandon` (a retired export's waiting requests made dead letters)
and `prune` (old final results deleted, dead letters only when asked), with the store opener
they share, which never creates
a database and opens a dry run's read only. Each is safe beside a running daemon.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.edge.cli_edge_options import (
    MAX_MB,
    add_db_and_since,
    parse_since,
    read_error,
    retention_type,
)
from splitdet.shared.cli import float_in, int_in

if TYPE_CHECKING:  # the handlers import it when they run
    from splitdet.edge.store import OutboxCap, ResultStore
    from splitdet.edge.store_dead_letters import Requeue


REQUEUE_EPILOG = """\
examples:
  splitdet edge requeue --db /data/edge.sqlite --dry-run     # what would be sent again
  splitdet edge requeue --db /data/edge.sqlite --since 2h
  splitdet edge requeue --db /data/edge.sqlite --abandoned --fingerprint 20cbbe61588c

A request the cloud refused for good (a dead letter: INVALID_ARGUMENT, INTERNAL, a message over
the server's --max-message-mib, ...) is kept in the database with its reason. Once the cause is
fixed (the server's bound raised, a cloud bug fixed), requeue puts it back in the outbox, due at
once, and its row turns "pending" again; a running daemon sends it within a second, otherwise
the next `splitdet edge run` does. The cloud answers it once: requests are idempotent. Only as
many as the outbox caps allow are requeued (give the daemon's --outbox-max-items/-mb); run it
again when the outbox has drained. Safe while the daemon runs. It says what it requeues and
what it leaves by export and cause.

The dead letters `splitdet edge abandon` made (a retired export's requests) are left unless
--abandoned: an abandon is a decision; requeue them when that export is served again. A dead
letter whose image (the same content) has a final result in a later row, processed again after
it (e.g. copied back into the hot folder after an abandon), is never requeued, with --abandoned
or not: it would get a second final result. Nor is one whose image has another row pending
(awaiting its answer): of several dead letters of one image, one call requeues the oldest.
Requeue says how many it left so. (An earlier result of the same bytes, judged before the dead
letter, does not stop it.)
"""


def _damage_named(handler: Callable[[argparse.Namespace], int]) -> Callable:
    """`handler` with a damaged --db met while it reads or writes (a page SQLite finds
    malformed, a text column that is not UTF-8) ending in one line saying what to do (exit 2),
    not a traceback; other database errors go on as they are."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from splitdet.edge.store_file import is_damage

        try:
            return handler(args)
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", None) is not None and not is_damage(exc):
                raise
            raise read_error(args.db, exc) from None

    return run


def register_requeue(actions: argparse._SubParsersAction) -> None:
    """Add `requeue` to the actions of `splitdet edge`."""
    p = actions.add_parser(
        "requeue",
        help="send requests the cloud refused again, once the cause is fixed",
        description="Put dead letters (requests the cloud refused for good) back in the outbox.",
        epilog=REQUEUE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_db_and_since(p, "only requests refused since")
    p.add_argument("--dry-run", action="store_true", help="only say what would be requeued")
    p.add_argument(
        "--abandoned",
        action="store_true",
        help="requeue the dead letters `splitdet edge abandon` made too (left without it); those "
        "whose images were processed again are skipped (each would get a second result)",
    )
    p.add_argument(
        "--fingerprint",
        metavar="HEX",
        help="only the dead letters of requests made with this model export: its fingerprint, "
        "or its first 8 or more hex digits (fewer are refused: a prefix that matches by chance "
        "would change another export's requests)",
    )
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


@_damage_named
def requeue(args: argparse.Namespace) -> int:
    """Requeue dead letters; see REQUEUE_EPILOG."""
    from splitdet.edge.store import OutboxCap
    from splitdet.edge.store_dead_letters import ABANDONED

    since = parse_since(args.since) if args.since is not None else None
    fingerprint = None if args.fingerprint is None else _dead_letter_export(args)
    cap = OutboxCap(max_items=args.outbox_max_items, max_bytes=int(args.outbox_max_mb * 1e6))
    store = _open_store(args.db, cap, dry_run=args.dry_run)
    try:
        done = store.requeue(since, args.dry_run, abandoned=args.abandoned,
                             fingerprint=fingerprint)  # fmt: skip
    finally:
        store.close()
    dry = args.dry_run
    verb, leave = ("would requeue", "would leave") if dry else ("requeued", "left")
    then = "" if dry or not done.requeued else (
        "; a running `splitdet edge run` sends them within a second, or the next one")  # fmt: skip
    print(f"{args.db}: {verb} {len(done.requeued)} dead letter(s)"
          f"{_by_export(done, done.requeued)}{then}")  # fmt: skip
    if done.processed_again:
        print(f"{leave} {len(done.processed_again)} whose image has a final result since "
              f"(processed again){_by_export(done, done.processed_again)}: requeued, each would "
              "get a second one")  # fmt: skip
    if done.twin_on_its_way:
        print(f"{leave} {len(done.twin_on_its_way)} whose image is already on its way to the "
              f"cloud (another of its rows pending){_by_export(done, done.twin_on_its_way)}: "
              "requeued, each would get a second result")  # fmt: skip
    if done.abandoned_left:
        print(f"{leave} {len(done.abandoned_left)} {ABANDONED}"
              f"{_by_export(done, done.abandoned_left)}: --abandoned requeues them too (but "
              "never one whose image was processed again)")  # fmt: skip
    if done.no_room:
        print(f"{leave} {len(done.no_room)}{_by_export(done, done.no_room)} for want of room in "
              f"the outbox (its caps: {cap.max_items} requests, {args.outbox_max_mb:g} MB); "
              "requeue again once it has drained")  # fmt: skip
    if done.not_kept:
        print(f"{len(done.not_kept)}{_by_export(done, done.not_kept)} without a kept request "
              "(dropped by --dead-letter-max-mb, or refused before splitdet kept them): process "
              f"their images again ({_error_rows_command(args.db)} lists them)")  # fmt: skip
    return 0


def _dead_letter_export(args: argparse.Namespace) -> str:
    """The export requeue's --fingerprint names among the dead letters' (read only: a refused
    --fingerprint changes nothing); CommandError unless it names one."""
    wanted = _fingerprint_prefix(args.fingerprint)
    store = _open_store(args.db, dry_run=True)
    try:
        held = store.dead_letter_exports()
    finally:
        store.close()
    none = f"--db {args.db}: no dead letter was made with export {wanted}; the dead letters are of"
    return _one_export(wanted, held, none)


def _by_export(done: Requeue, ids: list[int]) -> str:
    """' (export 3c5823c70655: 4 refused INTERNAL, 1 abandoned; export ...)': the dead letters
    `ids` by the export that made their request and by cause, most first; '' for none."""
    by_export: dict[str, Counter[str]] = {}
    for image_id in ids:
        export, cause = done.letters[image_id]
        by_export.setdefault(export, Counter())[cause] += 1
    parts = [
        f"export {export[:12] or 'unknown'}: "
        + ", ".join(f"{n} {cause}" for cause, n in causes.most_common())
        for export, causes in sorted(by_export.items(), key=lambda kv: -kv[1].total())
    ]
    return f" ({'; '.join(parts)})" if parts else ""


def _fingerprint_prefix(given: str) -> str:
    """A --fingerprint as given: lower-case hex digits, 8 or more; CommandError otherwise."""
    from splitdet.shared.cli import CommandError

    wanted = given.strip().lower()
    if len(wanted) < 8 or any(c not in "0123456789abcdef" for c in wanted):
        raise CommandError(
            f"--fingerprint {given!r}: give the export's fingerprint or its first 8 or more "
            "hex digits"
        )
    return wanted


def _held_list(held: dict[str, int]) -> str:
    """The exports an outbox holds requests of, for a message: "3c5823c70655 (2), ..."."""
    return ", ".join(f"{fp[:12]} ({n})" for fp, n in held.items()) or "none"


def _one_export(wanted: str, held: dict[str, int], none: str) -> str:
    """The one export of `held` (count by fingerprint) whose fingerprint starts with `wanted`;
    CommandError when none does (`none`, then what `held` holds) or several do."""
    from splitdet.shared.cli import CommandError

    matches = sorted(fp for fp in held if fp.startswith(wanted))
    if not matches:
        raise CommandError(f"{none}: {_held_list(held)}")
    if len(matches) > 1:
        raise CommandError(
            f"--fingerprint {wanted} names {len(matches)} exports ("
            + ", ".join(fp[:16] for fp in matches)
            + "): give more digits"
        )
    return matches[0]


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
and `splitdet edge requeue --abandoned` sends them again should the export be served after all
(a plain requeue leaves them). Or process their images again with the current export (copy
them back into the hot folder): then never requeue these dead letters, or each image gets a
second final result. `splitdet edge status` lists the outbox by export.
Safe while the daemon runs; the export a running daemon sends with is refused (it keeps making
requests with it) unless --even-if-running.
"""


def register_abandon(actions: argparse._SubParsersAction) -> None:
    """Add `abandon` to the actions of `splitdet edge`."""
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
        "shows them; fewer are refused: a prefix that matches by chance would change another "
        "export's requests)",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be abandoned")
    p.add_argument(
        "--even-if-running",
        action="store_true",
        help="abandon the requests of the export the running `splitdet edge run` sends with "
        "too (refused without it: that daemon keeps making more)",
    )
    p.add_argument(
        "--dead-letter-max-mb",
        type=float_in(0.0, MAX_MB),
        default=256.0,
        metavar="MB",
        help="the daemon's --dead-letter-max-mb: the requests kept for requeue, oldest dropped "
        "beyond it (default: %(default)s)",
    )
    p.set_defaults(handler=abandon)


@_damage_named
def abandon(args: argparse.Namespace) -> int:
    """Dead-letter one export's waiting requests; see ABANDON_EPILOG."""
    from splitdet.edge.store import OutboxCap
    from splitdet.edge.store_dead_letters import ABANDONED

    dropped_counter = "dead_letter_payloads_dropped"  # the store's count of requests dropped

    wanted = _fingerprint_prefix(args.fingerprint)
    store = _open_store(args.db, dry_run=True)  # (a refused --fingerprint changes nothing)
    try:
        held = store.outbox_fingerprints()
        if not any(fp.startswith(wanted) for fp in held):  # (a fleet's edges with none: done)
            print(f"{args.db}: nothing to abandon: no request in the outbox was made with export "
                  f"{wanted}; it holds requests of: {_held_list(held)}")  # fmt: skip
            return 0
        fingerprint = _one_export(wanted, held, "")  # (matched: one, or several to refuse)
        if not args.even_if_running:
            _refuse_the_running_export(args.db, store, fingerprint)
        reason = (
            f"{ABANDONED}: no cloud serves model export {fingerprint[:16]} any more "
            "(`splitdet edge requeue --abandoned` sends it again, unless its image was "
            "processed again)"
        )
        if not args.dry_run:
            store.close()
            cap = OutboxCap(dead_letter_max_bytes=int(args.dead_letter_max_mb * 1e6))
            store = _open_store(args.db, cap)
        dropped_before = store.counters().get(dropped_counter, 0)
        n = store.dead_letter_export(fingerprint, reason, dry_run=args.dry_run)
        # (a dry run leaves a store of an earlier schema as it is: it may have no dead_letters)
        kept = None if args.dry_run else store.dead_letter_stats().depth
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


def _refuse_the_running_export(db: Path, store: ResultStore, fingerprint: str) -> None:
    """CommandError when `fingerprint` is the export a `splitdet edge run` running on `db`
    sends with (its daemon record, `lock_holder.running_record`): its waiting requests are
    real defects it sends once the cloud serves that export again."""
    from splitdet.edge.lock_holder import running_record, writer_state
    from splitdet.shared.cli import CommandError

    state = writer_state(db)
    record = running_record(state, store.daemon())
    if record is None or record["fingerprint"] != fingerprint:
        return
    pid = "pid not visible here" if state.pid is None else f"pid {state.pid}"
    raise CommandError(
        f"--db {db}: export {fingerprint[:16]} is the one the `splitdet edge run` running on "
        f"it ({pid}) sends with: its waiting requests are real defects it delivers once a cloud "
        "serves that export again, and it keeps making more. Deploy that export on the cloud, "
        "or stop the daemon (or restart it with the new export) and abandon then; "
        "--even-if-running abandons them all the same"
    )


PRUNE_EPILOG = """\
examples:
  splitdet edge prune --db /data/edge.sqlite --older-than 90d --dry-run
  splitdet edge prune --db /data/edge.sqlite --older-than 90d --dead-letters

Dead letters are kept unless --dead-letters: flagged images (possibly defective) whose request
the cloud never judged, refused for good or abandoned by `splitdet edge abandon`. Each is
decided by `splitdet edge requeue` (sent again once the cause is fixed; --abandoned for those
abandon made; its --dry-run says which it sends and why it leaves the others) or by processing
its image again; deleted, its kept request goes with it and nothing is left to tell that the
part was never judged (under --after delete the image is gone too). Prune and its --dry-run say
how many older than AGE they kept, and, with --dead-letters, how many of the results deleted
were dead letters (counted in the database's pruned_dead_letters, shown by `splitdet edge
status`). A dead letter whose image was processed again (a final result of the same content in
a later row, or judged since its refusal: requeue never sends it) is decided: it goes as any
result, with its kept request. An ok or defect result stays while a dead letter of its image
(the same content) is in the database: requeue reads it to tell that image was processed
again; prune says how many it kept so. Other error results (unreadable images quarantined,
flagged images rejected by --when-full reject: nothing kept to send) are deleted as any other
result. `splitdet edge run --keep-results` never deletes dead letters (but those whose images
were processed again).
"""


def register_prune(actions: argparse._SubParsersAction) -> None:
    """Add `prune` to the actions of `splitdet edge`."""
    p = actions.add_parser(
        "prune",
        help="delete old final results (edge run --keep-results does it hourly)",
        description="Delete the results (ok, defect, error) that became final more than AGE "
        "ago. Dead letters (flagged images the cloud never judged) are kept unless "
        "--dead-letters, see below. Pending results are never deleted, "
        "nor a result whose file still lies where it arrived (--after keep, or a move that "
        "failed: the row is what tells the daemon that file is done; a newer file the camera "
        "wrote under the same name does not keep the older results). Safe while the daemon "
        "runs. A result goes only once the time since its boot agrees it is that old (a clock "
        "set forward by NTP after a stale boot, also once the box rebooted); prune says how "
        "many it kept so. "
        "The file shrinks by the pages freed (a database made before splitdet gave "
        "pages back keeps its size: SQLite reuses them; see edge/README.md to convert one).",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the database")
    p.add_argument(
        "--older-than",
        required=True,
        type=retention_type,
        metavar="AGE",
        help="30d, 12h, 15m (1m at least)",
    )
    p.add_argument("--dry-run", action="store_true", help="only count what would be deleted")
    p.add_argument(
        "--dead-letters",
        action="store_true",
        help="delete the dead letters older than AGE too, with their kept requests (`edge "
        "requeue` can no longer send them): once you have decided that those images need no "
        "answer (kept without it)",
    )
    p.set_defaults(handler=prune)  # fmt: skip


@_damage_named
def prune(args: argparse.Namespace) -> int:
    """Delete old final results; see register_prune."""
    store = _open_store(args.db, dry_run=args.dry_run)
    try:
        pruned = store.prune(time.time() - args.older_than, dry_run=args.dry_run,
                             dead_letters=args.dead_letters)  # fmt: skip
        freed = 0 if args.dry_run else store.reclaim()
    finally:
        store.close()
    earlier = "" if pruned.deleted else " (free pages left by earlier deletions)"
    gave = f"; {freed / 1e6:.1f} MB given back to the file system{earlier}" if freed else ""
    verb = "would delete" if args.dry_run else "deleted"
    letters = ""
    if pruned.dead_letters_deleted:
        letters = (f", {pruned.dead_letters_deleted} of them dead letter(s) (flagged images the "
                   "cloud never judged) with their kept requests")  # fmt: skip
    print(f"{args.db}: {verb} {pruned.deleted} result(s){letters}{gave}")
    if pruned.kept_dead_letters:
        print(
            f"kept {pruned.kept_dead_letters} dead letter(s) older than --older-than: flagged "
            "images the cloud never judged (refused for good, or abandoned by `splitdet edge "
            "abandon`), kept until decided: "
            f"`splitdet edge requeue --db {shlex.quote(str(args.db))} --dry-run` says which of "
            "them requeue sends again once the cause is fixed and why it leaves the others "
            "(--abandoned: those abandon made too), or --dead-letters deletes them with their "
            "kept requests"
        )
    if pruned.kept_for_dead_letters:
        print(
            f"kept {pruned.kept_for_dead_letters} result(s) older than --older-than whose image "
            "still has a dead letter: `splitdet edge requeue` needs them to tell whether that "
            "image was processed again; they go once the dead letter does"
        )
    if pruned.kept_in_place:
        print(
            f"kept {pruned.kept_in_place} result(s) older than --older-than whose image still "
            "lies where it arrived (--after keep, or a move not done yet): the row is what "
            "tells the daemon that file is done; it goes once the file is removed"
        )
    if pruned.kept_for_clock:
        print(
            f"kept {pruned.kept_for_clock} result(s) stamped older than --older-than that "
            "were written more recently by the time since their boot: the clock was behind "
            "when they were written and has been set forward since"
        )
    return 0


def _open_store(path: Path, cap: OutboxCap | None = None, dry_run: bool = False) -> ResultStore:
    """The ResultStore at `path` for a maintenance command; CommandError when there is none
    (a maintenance command never creates one) or it cannot be used. A dry run opens it read
    only: the store stays as it was, byte for byte (not marked, no column added)."""
    from splitdet.edge.store import ResultStore
    from splitdet.edge.store_file import StoreError, missing_store
    from splitdet.shared.cli import CommandError

    missing = missing_store(path)
    if missing is not None:
        raise CommandError(f"--db {missing}")
    try:
        return ResultStore(path, cap, readonly=dry_run)
    except StoreError as exc:  # its message starts with the database's path
        raise CommandError(f"--db {exc}") from None
