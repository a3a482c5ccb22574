"""The option types and helpers the `splitdet edge` actions share: AGE durations (--older-than,
--keep-results) and WHEN times (--since) parsed, --db with --since added to a parser and opened
read only, MAX_MB, the largest megabyte cap an option takes, `clock_text`, how the actions
print a time for people, and `read_error`, what a read-only action says when --db fails while
it is read (damaged, locked, a failing disk); the arrival window (--arrived-from,
--arrived-until) is edge.arrival_window's. Top-level imports are stdlib only; the store
modules load when a handler calls in.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

#: The largest megabyte cap an option takes (a petabyte): caps are kept as bytes.
MAX_MB = 1e9


#: What a WHEN (`parse_since`) may be, ending an option's help.
WHEN_FORMS = (
    "an age, 30s, 15m, 2h or 7d, with or without ' ago' (2h or '2h ago'), an ISO time "
    "(2024-05-01T08:00, local unless it has an offset: 2024-05-01T08:00+02:00, or Z for UTC; "
    "a local time the clocks skip or pass twice at a daylight saving change is refused) or "
    "unix seconds; by the wall clock"
)


def add_db_and_since(p: argparse.ArgumentParser, since: str) -> None:
    """--db FILE and --since WHEN (parse_since), `since` starting the latter's help."""
    p.add_argument("--db", required=True, type=Path, metavar="FILE", help="the database")
    p.add_argument("--since", metavar="WHEN", help=f"{since}: {WHEN_FORMS}")


def clock_text(t: float, date: bool = True) -> str:
    """Unix seconds `t` as a local time for people, with its UTC offset: "2026-11-01 01:30:05
    -0400" ("01:30:05 -0400" without the `date`), so that the two 01:30 of the night the clocks
    go back (or a time zone other than the reader's) cannot be confused."""
    shown = datetime.fromtimestamp(t, UTC).astimezone()
    return shown.strftime("%Y-%m-%d %H:%M:%S %z" if date else "%H:%M:%S %z")


def iso_local(t: float) -> str:
    """Unix seconds `t` as local ISO 8601 text to the millisecond, with its UTC offset
    ("2026-12-07T14:03:11.062+01:00"): a time a spreadsheet shows as text, not as 1.79663E+09,
    and whose offset tells the two hours of the night the clocks go back apart."""
    return datetime.fromtimestamp(t, UTC).astimezone().isoformat(timespec="milliseconds")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float | None:
    """'30s', '15m', '2h', '7d' -> seconds (finite, >= 0); None when `text` is not one."""
    text = text.strip()
    if len(text) > 1 and text[-1] in _UNITS:
        try:
            number = float(text[:-1])
        except ValueError:
            return None
        seconds = number * _UNITS[text[-1]]  # ("1e308d" overflows to inf here)
        if number >= 0 and math.isfinite(seconds):
            return seconds
    return None


#: The shortest retention `edge run --keep-results` and `edge prune --older-than` take: a
#: shorter one deletes the results written moments ago (0s: every final result).
MIN_RETENTION_S = 60.0


def retention_type(text: str) -> float:
    """argparse type of a retention (parse_duration), at least MIN_RETENTION_S; the examples
    of its errors are retentions it takes (not 30s, which it refuses)."""
    seconds = parse_duration(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(
            f"expected an age of 1m or more with its unit (s, m, h or d), e.g. 15m, 12h or "
            f"30d, got {text!r}"
        )
    if seconds < MIN_RETENTION_S:
        raise argparse.ArgumentTypeError(
            f"{text!r} would delete the results written moments ago ({text.strip()} keeps "
            "none of them); give 1m or more (e.g. 30d, 12h, 15m)"
        )
    return seconds


def _duration_ago(text: str) -> float | None:
    """The seconds of a duration with a trailing " ago" ("2h ago" -> 7200, as the --since help
    writes it); None for any other text ("3600 ago" too: unix seconds take no " ago")."""
    head, _, last = text.rpartition(" ")
    return parse_duration(head) if head.strip() and last.lower() == "ago" else None


def parse_since(text: str, now: float | None = None, option: str = "--since") -> float:
    """'30s', '15m', '2h', '7d', each with an optional trailing ' ago' ('2h ago'), an ISO
    time, or unix seconds -> unix seconds; a CommandError naming `option` when `text` is none
    of them (or a local time a daylight saving change makes unclear)."""
    from splitdet.shared.cli import CommandError

    now = time.time() if now is None else now
    text = text.strip()
    when = _parse_when(text, now, option)
    if when is None:
        raise CommandError(
            f"{option} {text!r}: expected 30s, 15m, 2h or 7d (optionally with ' ago': '2h "
            "ago'), an ISO time (2024-05-01T08:00) or unix seconds"
        )
    return _on_the_calendar(when, text, option)


def _parse_when(text: str, now: float, option: str) -> float | None:
    """`parse_since`'s reading of the stripped `text` into unix seconds, None when it is no
    WHEN; a CommandError for a local time a daylight saving change makes unclear."""
    ago = _duration_ago(text)
    if ago is not None:
        return now - ago
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
            when = datetime.fromisoformat(text)
            if when.tzinfo is None:
                _refuse_unclear_local_time(text, when, option)
            return when.timestamp()
        except (ValueError, OverflowError, OSError):  # (e.g. year 1 or 9999: out of range)
            pass
    return None


def _on_the_calendar(when: float, text: str, option: str) -> float:
    """`when` (unix s) when a clock can show it (`clock_text`: the years 1 to 9999); else a
    CommandError naming `option`. A script's milliseconds (JavaScript's Date.now()) taken as
    seconds fall in the year 58000: `edge status` and `edge collect` failed with a traceback
    printing such a window, and `edge results` silently matched no row against it."""
    from splitdet.shared.cli import CommandError

    if _clock_shows(when):
        return when
    hint = ""
    with contextlib.suppress(ValueError):
        if _clock_shows(float(text) / 1000):
            hint = f"; as milliseconds it is {clock_text(float(text) / 1000)}: give unix seconds"
    raise CommandError(f"{option} {text!r}: a time outside the years 1 to 9999{hint}")


def _clock_shows(when: float) -> bool:
    """Whether `clock_text` can write the unix seconds `when` (a local time in 1..9999)."""
    try:
        clock_text(when)
    except (ValueError, OverflowError, OSError):
        return False
    return True


def _refuse_unclear_local_time(text: str, when: datetime, option: str = "--since") -> None:
    """CommandError when the local time `when` (no offset) names no instant or two: one the
    clocks skip when they go forward (nonexistent: converted to UTC and back it is another
    time), or one they pass twice when they go back (ambiguous: fold 0 and 1 have different
    UTC offsets). Either way an offset makes it one instant; the error offers it."""
    from splitdet.shared.cli import CommandError

    first, second = when.replace(fold=0), when.replace(fold=1)
    before, after = (_utc_offset(t) for t in (first, second))  # (in a gap too: PEP 495)
    shown = when.isoformat(sep=" ")
    if datetime.fromtimestamp(first.timestamp()) != when:  # (naive: compared without fold)
        raise CommandError(
            f"{option} {text!r}: {shown} does not exist in the local time zone (the clocks "
            f"skipped it, going from UTC{before} to UTC{after}): give the time with an offset, "
            f"e.g. {when.isoformat()}{before}, or in UTC with a Z"
        )
    if before != after:
        raise CommandError(
            f"{option} {text!r}: {shown} occurs twice in the local time zone (the clocks went "
            f"back from UTC{before} to UTC{after}), and a script's {option} needs one instant: "
            f"give its offset, {when.isoformat()}{before} for the first or "
            f"{when.isoformat()}{after} for the second, or a time in UTC with a Z"
        )


def _utc_offset(local: datetime) -> str:
    """The UTC offset ("+01:00") the naive local time `local` is taken at (its `fold` choosing
    between the two of a daylight saving change)."""
    seconds = round(local.replace(tzinfo=UTC).timestamp() - local.timestamp())
    hours, minutes = divmod(abs(seconds) // 60, 60)
    return f"{'-' if seconds < 0 else '+'}{hours:02d}:{minutes:02d}"


def read_db(args: argparse.Namespace) -> tuple[sqlite3.Connection, float | None]:
    """--db opened read only, and --since in unix s; CommandError naming either's problem."""
    from splitdet.edge.store_file import StoreError, open_readonly
    from splitdet.shared.cli import CommandError

    since = parse_since(args.since) if args.since is not None else None
    try:
        return open_readonly(args.db), since
    except StoreError as exc:  # its message starts with the database's path
        raise CommandError(f"--db {exc}") from None


def read_error(db: Path, exc: sqlite3.DatabaseError) -> Exception:
    """The CommandError (exit 2, one line) for --db `db` failing while a read-only action
    reads it (`store_file.read_failure`: "--db FILE is damaged (database disk image is
    malformed): restore it from a backup ..." for a damaged file); to raise `from None`.
    `exc` itself for a misuse of the connection here (a ProgrammingError), not the file's."""
    from splitdet.edge.store_file import read_failure
    from splitdet.shared.cli import CommandError

    try:
        return CommandError(f"--db {read_failure(db, exc)}")
    except sqlite3.DatabaseError:
        return exc
