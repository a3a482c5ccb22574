"""`splitdet edge status`: what a results database holds (verdicts, results by model export,
the outbox, dead letters, processed images still waiting in --watch, counters, the file) and
whether a daemon runs on it, as JSON or as lines for people, which the formatting helpers here
write. Safe beside a running daemon.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path

from splitdet.edge.arrival_window import (
    add_arrived,
    parse_arrived,
    warn_of_a_recent_end,
    window_text,
    windowed,
)
from splitdet.edge.cli_edge_options import clock_text, read_error
from splitdet.shared.one_line import one_line
from splitdet.shared.stdout_guard import silence_stdout
from splitdet.shared.strict_json import strict_dumps

STATUS_EPILOG = """\
examples:
  splitdet edge status --db /data/edge.sqlite
  splitdet edge status --db /data/edge.sqlite --json
  splitdet edge status --db /data/edge.sqlite --arrived-from 2024-05-01T06:00 \\
      --arrived-until 2024-05-01T14:00      # one shift: its images by verdict, pending too

A shift: --arrived-from START --arrived-until END counts only the images that arrived in
[START, END) (their `arrived`, as `edge results` selects them): images by verdict, their
errors and frame warnings, results by export, the last image and result. The rest (the daemon,
the outbox, dead letters, images waiting in --watch, counters, the file, results stamped ahead
of the clock) is the whole store's, under a line that says so (--json: "window" holds the
bounds, in unix s, null where open, and which keys the window restricts; "store" the whole
store's image count and last arrival). A row is written once its image is judged: an END less
than a minute ago, or to come (a shift under way), is warned of on stderr.
"""


def register_status(actions: argparse._SubParsersAction) -> None:
    """Add `status` to the actions of `splitdet edge`."""
    p = actions.add_parser(
        "status",
        help="what the database holds: verdicts, the outbox, dead letters",
        description="A summary of the edge daemon's database: whether a `splitdet edge run` "
        "runs on it (its pid; its lock is looked up in /proc/locks, never taken), images by "
        "verdict and by the model export that judged them (the latest result's first), those "
        "judged with a frame warning (blank_frame, dim_wide_frame), the outbox "
        "(requests, bytes, oldest, next try, by model export, the last error: how long ago, "
        "or past once requests of its export were delivered again), the dead letters "
        "(kept for `splitdet edge requeue` or not), the processed images whose file still waits "
        "in --watch to be archived, quarantined or deleted (a move that fails: see the daemon "
        "log's `cannot move file` lines; the newest 20000 results are looked at) and the "
        "durable counters; of a running "
        "daemon, the export it sends with and, while its intake waits for a full outbox, since "
        "when; and how many results are stamped ahead of the clock (written while it ran "
        "ahead, then set back). Times are local, with their UTC offset. Safe while the daemon "
        "writes.",
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the database")
    add_arrived(p)
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(handler=status)  # fmt: skip


def status(args: argparse.Namespace) -> int:
    """Print store_status and whether a daemon runs on --db; see register_status."""
    from splitdet.edge.lock_holder import running_record, writer_state
    from splitdet.edge.store_file import StoreError, open_readonly
    from splitdet.edge.store_reads import daemon_record, store_status
    from splitdet.shared.cli import CommandError, refuse_closed_stdout

    refuse_closed_stdout("edge status prints the summary there")  # (`>&-`)
    arrived = parse_arrived(args)
    warn_of_a_recent_end(
        "status", args, arrived[1], "are not counted; ask again once the shift is over"
    )
    try:
        db = open_readonly(args.db)
    except StoreError as exc:  # its message starts with the database's path
        raise CommandError(f"--db {exc}") from None
    try:
        summary, record = store_status(db, arrived=arrived), daemon_record(db)
    except sqlite3.DatabaseError as exc:  # (a damaged page: found only when read)
        raise read_error(args.db, exc) from None
    finally:
        db.close()
    state = writer_state(args.db)  # (its lock looked up, never taken)
    summary["daemon"] = {**state.to_json(), **_record_json(running_record(state, record))}
    text = strict_dumps(summary, indent=2) if args.json else "\n".join(
        _status_lines(args.db, summary))  # fmt: skip
    try:
        print(text, flush=True)
    except BrokenPipeError:  # e.g. `| head`: stop quietly
        silence_stdout()
    return 0


def _record_json(record: dict | None) -> dict:
    """The running daemon's record for status's "daemon": "export" (its fingerprint),
    "started", "outbox_caps" {"requests", "bytes"}, "outbox_full_since" (unix s its intake
    stopped for a full outbox; None: it takes images); each None when none is known (no
    daemon runs, or one of an earlier splitdet): a script reads the same keys in every state."""
    if record is None:
        return dict.fromkeys(("export", "started", "outbox_caps", "outbox_full_since"))
    return {
        "export": record["fingerprint"],
        "started": record["started"],
        "outbox_caps": {"requests": record["max_items"], "bytes": record["max_bytes"]},
        "outbox_full_since": record["full_since"],
    }


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
    from splitdet.edge.sender import RECLAIM_ABOVE_BYTES  # (loaded already: _judged_at)

    def when(t: float | None) -> str:
        return "-" if t is None else clock_text(t)

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
    ahead = outbox.get("next_try_ahead_s")  # (absent from an earlier splitdet's JSON)
    if (summary.get("daemon") or {}).get("state") == "none":  # no sender: nothing is tried
        when_next = "next try once `splitdet edge run` runs on it"
    elif ahead is not None:  # (stamped before the clock was set back: not waited out)
        when_next = (
            f"next try due (its stamp is {_span(ahead)} ahead of the clock: the clock was set "
            "back; the sender waits at most its --retry-max)"
        )
    else:
        when_next = f"next try in {_span(next_try)}" + (
            "" if waits is None else " (the sender pauses after a failed send)"
        )
    images = [
        f"images        {sum(verdicts.values())}: "
        + ", ".join(f"{v} {n}" for v, n in verdicts.items())
        + (f" ({errors})" if errors else ""),
        *_warning_lines(summary.get("warnings")),
        f"results by export: {by_export or '-'}",
        f"last image    {when(summary['last_arrival'])}, last result "
        f"{when(summary['last_finished'])}",
    ]
    # (the daemon's line says whether the line still sends images: the whole store's last)
    daemon = _daemon_lines(summary.get("daemon"), summary["store"]["last_arrival"])
    lines = [
        f"{path} (schema {summary['schema_version']})",
        *(_windowed_lines(summary, images, daemon) or [*daemon, *images]),
        *_ahead_lines(summary.get("stamped_ahead")),
        _outbox_line(outbox, when_next),
    ]
    lines += _stall_lines(summary.get("daemon"), outbox)
    for fingerprint, n in outbox["by_model"].items():
        lines.append(f"              {n} made by model {fingerprint[:12]}")
    lines += _error_lines(outbox)
    lines += _in_watch_lines(summary.get("in_watch"), summary.get("daemon"))
    lines.append(
        f"dead letters  {dead['kept']} kept for `splitdet edge requeue` "
        f"({dead['kept_bytes'] / 1e6:.1f} MB), {dead['not_kept']} without their request"
    )
    counters = ", ".join(f"{name} {n}" for name, n in summary["counters"].items())
    lines.append(f"counters      {counters or '-'}")
    file = summary["file"]
    lines.append(
        f"file          {file['bytes'] / 1e6:.1f} MB, {file['free_bytes'] / 1e6:.1f} MB of it free "
        + ("pages, reused for new results (given back to the file system after a prune, and "
           f"after a delivered backlog once over {RECLAIM_ABOVE_BYTES >> 20} MB)"
           if file["gives_back"] else
           "(kept and reused: an earlier store; edge/README.md says how to convert it)")
    )  # fmt: skip
    return lines


def _windowed_lines(summary: dict, images: list[str], daemon: list[str]) -> list[str]:
    """With an arrival window (`store_reads._status`'s "window"): a line naming it, the
    `images` lines it restricts, then a line saying that what follows (the `daemon` lines, the
    outbox, dead letters...) is the whole store's; none without one (the summary as before)."""
    window = summary.get("window") or {}
    bounds = (window.get("arrived_from"), window.get("arrived_until"))
    if not windowed(bounds):
        return []
    return [
        f"window        only the images that arrived {window_text(bounds)}, by --arrived-from"
        "/--arrived-until: the lines from `images` to `last image`",
        *images,
        f"whole store   not windowed: the lines below are the whole store's "
        f"({summary['store']['images']} images), whatever --arrived-from/--arrived-until",
        *daemon,
    ]


def _warning_lines(warnings: dict | None) -> list[str]:
    """The `warnings` line of `edge status` (`store_reads._status`'s "warnings" {kind: n}): the
    images judged whose pixels say the camera may not see the part; none when there is none
    (or an earlier splitdet's JSON has no such counts)."""
    seen = {kind: n for kind, n in (warnings or {}).items() if n}
    if not seen:
        return []
    counts = ", ".join(f"{kind} {n}" for kind, n in seen.items())
    return [
        f"warnings      {counts} (images judged whose frame may not show the part: their "
        "verdicts mean little; `edge results` lists them in its warnings column)"
    ]


def _ahead_lines(stamped_ahead: dict | None) -> list[str]:
    """The line of `edge status` for results stamped ahead of the clock (`store_reads._status`'s
    "stamped_ahead"): written while it ran ahead, then set back (a bad time source, NTP
    correcting it); none when there is none."""
    n = (stamped_ahead or {}).get("results") or 0
    if not n:
        return []
    return [
        f"              {n} result{'s' if n != 1 else ''} stamped ahead of the clock (written "
        f"while it ran ahead; the furthest {_span(stamped_ahead['furthest_s'])} ahead): "
        "--since (`edge results`, `edge collect`) takes them as new until the clock passes "
        "their stamps"
    ]


def _outbox_line(outbox: dict, when_next: str) -> str:
    """The `outbox` line of `edge status`: its requests, bytes, oldest and next try; only
    "0 requests (empty)" when it holds none."""
    if not outbox["requests"]:
        return "outbox        0 requests (empty)"
    return (
        f"outbox        {outbox['requests']} requests, {outbox['bytes'] / 1e6:.1f} MB, oldest "
        f"{_span(outbox['oldest_age_s'])} old, {when_next}"
    )


def _daemon_lines(daemon: dict | None, last_arrival: float | None) -> list[str]:
    """The `daemon` line of `edge status`: whether a `splitdet edge run` holds --db's writer
    lock (`lock_holder.writer_state` as JSON; None: not asked, no line)."""
    if daemon is None:
        return []
    if daemon["state"] == "running":
        pid = "pid not visible here" if daemon["pid"] is None else f"pid {daemon['pid']}"
        export = daemon.get("export")
        export = "" if not export else f", sending with export {export[:12]}"
        return [f"daemon        running on this --db ({pid}){export}"]
    if daemon["state"] == "none":
        age = None if last_arrival is None else max(0.0, time.time() - last_arrival)
        last = "no image yet" if age is None else f"the last image arrived {_span(age)} ago"
        return [
            f"daemon        none is running on this --db ({last}): nothing is classified or "
            "delivered until `splitdet edge run` starts (as /proc/locks shows it here: a "
            "daemon in another container or on another host is not seen)"
        ]
    detail, lock_file = one_line(str(daemon["detail"])), one_line(str(daemon["lock_file"]))
    return [f"daemon        unknown: {detail}; its lock file is {lock_file}"]


def _stall_lines(daemon: dict | None, outbox: dict) -> list[str]:
    """While the running daemon's intake waits for room in the outbox: "outbox full: 5 of 5
    requests, ..., intake stopped since HH:MM:SS (...); images wait in --watch"."""
    since = (daemon or {}).get("outbox_full_since")
    if since is None:
        return []
    caps = daemon["outbox_caps"]
    stopped = clock_text(since, date=False)
    return [
        f"              outbox full: {outbox['requests']} of {caps['requests']} requests, "
        f"{outbox['bytes'] / 1e6:.1f} of {caps['bytes'] / 1e6:g} MB; intake stopped since "
        f"{stopped} ({_span(max(0.0, time.time() - since))} ago); images wait in --watch "
        "until the cloud takes requests (nothing is lost)"
    ]


def _in_watch_lines(in_watch: dict | None, daemon: dict | None) -> list[str]:
    """The `in --watch` line of `edge status`: recorded images whose file still waits in
    --watch to be archived, quarantined or deleted (`store_reads.in_watch`), the oldest's age
    and where to look (its control characters escaped, as the results table writes a path:
    a newline or ESC in a file name neither splits the line nor reaches the terminal); or
    that none does (of the rows looked at); and how many could not be looked at
    (`_unreadable_lines`: then never "none")."""
    if in_watch is None:
        return []
    unchecked = in_watch["rows_not_checked"]
    looked = (
        f" (the newest {in_watch['rows_checked']} results looked at, {unchecked} older not)"
        if unchecked
        else ""
    )
    n = in_watch["images"]
    unreadable = _unreadable_lines(in_watch)
    if not n and unreadable:  # (not an all-clear: some could not be looked at)
        return unreadable
    if not n:
        return [f"in --watch    no processed image waiting to be moved or deleted{looked}"]
    retry = (
        "the next `splitdet edge run` tries again at its start, under its own --after, "
        "--archive and --quarantine"
        if (daemon or {}).get("state") == "none"
        else "the daemon tries again (5 s doubling to 5 min)"
    )
    return [
        f"in --watch    {n} processed image{'s' if n != 1 else ''} not yet archived, "
        f"quarantined or deleted{looked}; the oldest arrived "
        f"{_span(in_watch['oldest_age_s'])} ago: {one_line(in_watch['oldest_path'])}",
        "              their move failed (or a kill cut it short): the daemon log's `cannot move "
        "file` lines (ERROR) say why (a full, read-only or gone --archive or --quarantine, a "
        f"read-only --watch); {retry}",
        *unreadable,
    ]


def _unreadable_lines(in_watch: dict) -> list[str]:
    """The line of `edge status` for the processed images whose path in --watch could not be
    looked at (`store_reads.in_watch`'s "rows_unreadable": EACCES for a user who may read --db
    but not --watch): not known whether they wait there; none when every path was looked at."""
    n = in_watch.get("rows_unreadable") or 0  # (absent from an earlier splitdet's JSON)
    if not n:
        return []
    return [
        f"in --watch    could not be looked into for {n} processed image{'s' if n != 1 else ''}"
        f" ({one_line(in_watch['unreadable_error'])}: {one_line(in_watch['unreadable_path'])})"
        ": whether they still "
        "wait there to be moved or deleted is not known; run `splitdet edge status` as a user "
        "who may read --watch (the daemon's)"
    ]


def _error_lines(outbox: dict) -> list[str]:
    """The outbox's last error for `edge status`, whole (its remedy is at the end; continued
    lines indented): when current, how long ago; once requests of its export were delivered
    after it, said to be past."""
    if not outbox["last_error"]:
        return []
    # (its own lines kept, indented; control characters in each escaped: a cloud's message may
    # quote a name the camera's account chose)
    error = ("\n" + " " * 26).join(one_line(line) for line in outbox["last_error"].split("\n"))
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
