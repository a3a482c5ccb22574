"""The arrival window `edge results`, `edge status` and `edge collect` share: --arrived-from
WHEN and --arrived-until WHEN added to a parser, read into unix seconds (half-open [from,
until), so that consecutive shifts share no image), told for people and for JSON, and the
warning for a window that ended a moment ago or has yet to end (its last images may still be
judged, so not in the store yet). One definition, so that the three actions take and mean the
same window. Top-level imports are stdlib only.
"""

from __future__ import annotations

import argparse
import sys
import time

from splitdet.edge.cli_edge_options import WHEN_FORMS, clock_text, parse_since

#: (from, until) in unix s, either None when not given (open on that side).
Window = tuple[float | None, float | None]

#: An --arrived-until this close to now (s) or later may miss images still being judged.
RECENT_END_S = 60.0


def add_arrived(p: argparse.ArgumentParser) -> None:
    """--arrived-from WHEN and --arrived-until WHEN (parse_since; `parse_arrived`): rows by
    their arrival time, half-open, so that consecutive shifts share no row."""
    p.add_argument(
        "--arrived-from",
        metavar="WHEN",
        help="only rows whose image arrived at or after WHEN (their `arrived`, which no retry "
        f"or later change moves): {WHEN_FORMS}",
    )
    p.add_argument(
        "--arrived-until",
        metavar="WHEN",
        help="only rows whose image arrived before WHEN (not at it: a shift's export from "
        "--arrived-from START --arrived-until END and the next one's from END share no row); "
        "as --arrived-from",
    )


def parse_arrived(args: argparse.Namespace) -> Window:
    """(--arrived-from, --arrived-until) in unix s (None: not given), ages taken from one
    `now`; CommandError for one `parse_since` refuses, or for an until not after the from."""
    from splitdet.shared.cli import CommandError

    now = time.time()
    start, end = (
        None if text is None else parse_since(text, now, option)
        for text, option in ((args.arrived_from, "--arrived-from"),
                             (args.arrived_until, "--arrived-until"))
    )  # fmt: skip
    if start is not None and end is not None and end <= start:
        raise CommandError(
            f"--arrived-until {args.arrived_until!r} is not after --arrived-from "
            f"{args.arrived_from!r}: no image arrived in between"
        )
    return start, end


def warn_of_a_recent_end(command: str, args: argparse.Namespace, end: float | None,
                         missed: str) -> None:  # fmt: skip
    """A line on stderr, from `splitdet edge COMMAND`, when --arrived-until (`end`, unix s) is
    less than RECENT_END_S before now, or to come: a row is written once its image is judged
    (a flagged one once the outbox has room), so images that arrived before `end` may not be
    in the store yet. `missed` ends the line: what the action does not do with them, and what
    to do ("are not listed; export the shift again once it is over")."""
    if end is None or end < time.time() - RECENT_END_S:
        return
    print(
        f"splitdet edge {command}: warning: --arrived-until {args.arrived_until} is less than "
        f"{RECENT_END_S:.0f} s ago, or to come: images that arrived before it and are still "
        f"being judged (or wait for room in the outbox) {missed}",
        file=sys.stderr,
    )


def windowed(window: Window) -> bool:
    """Whether either end of `window` was given (else it is the whole store)."""
    return window != (None, None)


def window_json(window: Window) -> dict:
    """`window` for a JSON summary: {"arrived_from", "arrived_until"} in unix s, null where
    open (both null: the whole store), [from, until) as --arrived-from/--arrived-until say."""
    return {"arrived_from": window[0], "arrived_until": window[1]}


def window_text(window: Window) -> str:
    """`window` for people, after "arrived": "from 2024-05-01 06:00:00 +0200 until
    2024-05-01 14:00:00 +0200 (not at it)", "from ... on", "before ..." (local times with
    their UTC offset: the two 02:30 of the night the clocks go back stay apart); "at any
    time" for an open one."""
    start, end = window
    if start is not None and end is not None:
        return f"from {clock_text(start)} until {clock_text(end)} (not at it)"
    if start is not None:
        return f"from {clock_text(start)} on"
    if end is not None:
        return f"before {clock_text(end)}"
    return "at any time"
