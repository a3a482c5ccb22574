"""`splitdet edge results`: the results database printed for other tools, as a table, JSON or
CSV, filtered by change (a consumer's cursor), id, time, verdict, model export and box score. Safe
beside a running daemon: the database is opened read only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sqlite3
import stat
import sys
from collections.abc import Iterable
from typing import TextIO, cast

from splitdet.edge.arrival_window import add_arrived, parse_arrived, warn_of_a_recent_end
from splitdet.edge.cli_edge_options import (
    add_db_and_since,
    clock_text,
    iso_local,
    read_db,
    read_error,
)
from splitdet.edge.store_schema import RESULT_COLUMNS
from splitdet.shared.cli import float_in, int_in
from splitdet.shared.one_line import one_line
from splitdet.shared.stdout_guard import silence_stdout
from splitdet.shared.strict_json import strict_dumps

RESULTS_EPILOG = """\
examples:
  splitdet edge results --db /data/edge.sqlite                 # a table
  splitdet edge results --db /data/edge.sqlite --since 1h --json
  splitdet edge results --db /data/edge.sqlite --arrived-from 2024-05-01T06:00 \\
      --arrived-until 2024-05-01T14:00 --csv --excel > early-shift.csv   # one shift, for Excel
  splitdet edge results --db /data/edge.sqlite --verdict defect --score-threshold 0.5
  splitdet edge results --db /data/edge.sqlite --changed-after 41234 --json   # a consumer's poll

Columns: id, path, stored_path, content_hash, size_bytes, arrived, finished, updated (unix s;
with --excel local ISO 8601 text), verdict (ok | defect | pending | error), p_defect,
request_id, fingerprint, boxes [[x1, y1, x2, y2], ...] in original px, scores, labels,
class_names, timings (s per stage), bytes_sent, attempts, error_kind (quarantine |
dead_letter | outbox_full), reason, threshold (the gate threshold the image was judged at),
changed (the number of the row's last change: --changed-after), warnings (what the image's
pixels say of the camera, comma-separated: blank_frame (black, white or flat: a lens cap, the
lamp off), dim_wide_frame (16-bit values of 12 bits: a camera set to Mono12); empty/null: none;
the verdict is the model's all the same, and means little for such a frame), n_boxes (how
many boxes are listed; empty/null for a row with no detection result, as the table's "-"),
edge (the name of the edge that judged the image: its `edge run --name`, default the host
name, as it names itself to the cloud; empty/null in rows an earlier splitdet wrote): merged
exports of several edges, whose ids collide, are told apart by (edge, id). The table shows
warnings before the path, "[blank_frame]", and not the edge (--csv and --json do). The daemon
stores every box the model returns (from score 0.05); --score-threshold 0.5 shows the boxes
`splitdet predict` reports. CSV is UTF-8 whatever the locale, its list columns' names too;
the table shows what the locale cannot encode as backslash escapes (\\xfc, \\u65e5); JSON is
ASCII.

Polling for new results: keep a cursor by change, not by id or time. --changed-after SEQ lists
the rows changed after SEQ, in the order of their change, each once in its current state: the
store numbers every new row and every change of what is listed (verdict, answer, where the
file is, error), store-wide, in its `changed` column. Start from 0, keep the largest `changed`
listed as the next SEQ (SEQ again when nothing is listed), and key the rows you keep by id: a
pending row is listed when made and again when final (defect when the cloud answers, or
error); a dead letter `splitdet edge requeue` sends again is listed again as pending, then as
final. No rule about pending rows is needed. Poll without --verdict or --fingerprint and
filter on your side: a filtered poll moves its cursor only to rows it listed, so with rare
matches each poll reads again every row changed since the last match.

--after-id N lists the rows with an id above N; ids only grow, in arrival order, whatever the
clock does, but a row changed after it was listed is not listed again: a poll by --after-id
misses the final verdict of a requeued dead letter (an "error" already taken) below N.
A cursor past what the store ever numbered (--changed-after past its last change, --after-id
past the largest id it gave) is refused (exit 2): the database was replaced or restored from a
backup and numbers its rows again; read it again from 0 and de-duplicate by content_hash.

A shift's export: --arrived-from START --arrived-until END lists the rows whose image arrived
in [START, END) (their `arrived`: when the daemon took the file, whole and settled, which no
verdict, retry or move changes; after a stop or in a backlog, later than the camera wrote it):
the exports of consecutive shifts, END of one the START of the next, hold each image exactly
once. A row is written once its image is judged (a flagged one once the outbox has room): an
export made right at END misses the images still being judged, so export a shift a few minutes
after it ends (an END less than a minute ago is warned of). A pending row (the cloud's answer
not back yet) is listed in the shift its image arrived in, as pending: export again later for
its final verdict.

--since keeps rows whose `updated` is at or after WHEN: rows created, or changed since (the
cloud's answer, a dead letter or its requeue, a file renumbered by a remount, and every failed
send tried again: during a cloud outage every pending row, whenever it arrived, is updated at
each retry and listed by every --since). It is no shift (use --arrived-from/--arrived-until).
A poll by --since misses the rows written after the clock steps back (NTP correcting a clock
that ran ahead), and lists those stamped while it ran ahead until it passes them again.

For Excel: --csv --excel writes a UTF-8 byte order mark first (not when appending to a file
that has content: `>>`; one file a shift is what Excel opens best) (Excel, opening the file by a
double-click, reads it as UTF-8, not Windows-1252) and arrived, finished and updated as local
ISO 8601 text with the UTC offset (2026-12-07T14:03:11.062+01:00) instead of unix seconds,
and the edge name as ="NAME" (text, whatever it looks like: Excel read -A1 as a formula and 3-7
as a date), the columns and header as --csv's. Plain --csv stays as it is, for programs.

Safe to run while the daemon writes. The table's `finished` is local time with its UTC offset.
It names a file that --after archive or the quarantine moves by where it arrived, then "(to
STORED_PATH)" (where it is once moved: a move that failed is retried, and logged as "cannot
move file").
"""


def register_results(actions: argparse._SubParsersAction) -> None:
    """Add `results` to the actions of `splitdet edge`."""
    p = actions.add_parser(
        "results",
        help="print the results database (--json, --csv)",
        description="Read the edge daemon's results database.",
        epilog=RESULTS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_db_and_since(p, "only rows whose `updated` is at or after WHEN: created or changed "
                     "since, a failed send tried again included (no shift: --arrived-from; a "
                     "consumer polls by --changed-after)")  # fmt: skip
    add_arrived(p)
    cursor = p.add_mutually_exclusive_group()
    cursor.add_argument(
        "--changed-after",
        type=int_in(0, 2**63 - 1),
        metavar="SEQ",
        help="only rows changed after SEQ (their `changed`), in that order: the cursor for a "
        "consumer (keep the largest `changed` listed; see below)",
    )
    cursor.add_argument(
        "--after-id",
        type=int_in(0, 2**63 - 1),
        default=0,
        metavar="N",
        help="only rows with an id above N, in arrival order (a row changed after it was "
        "listed is not listed again: consumers poll by --changed-after)",
    )
    p.add_argument(
        "--verdict",
        choices=["ok", "defect", "pending", "error"],
        help="only rows with this verdict",
    )
    p.add_argument(
        "--fingerprint",
        metavar="HEX",
        help="only rows of the model export whose fingerprint starts with HEX: any prefix, "
        "even a digit (a read changes nothing; requeue and abandon, which do, take 8 or more) "
        "(the table's export column; `edge status` counts results by export)",
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
    p.add_argument(
        "--excel",
        action="store_true",
        help="with --csv: for Excel, a UTF-8 byte order mark first and the times (arrived, "
        "finished, updated) as local ISO 8601 text with their UTC offset, not unix seconds, "
        'and the edge name as ="NAME" (text)',
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


def results(args: argparse.Namespace) -> int:
    """Print result rows; see RESULTS_EPILOG."""
    from splitdet.edge.store_reads import iter_results
    from splitdet.shared.cli import CommandError, refuse_closed_stdout

    if args.excel and not args.csv:
        raise CommandError(
            "--excel is a form of --csv (a byte order mark, local times as text): give "
            "--csv --excel"
        )
    refuse_closed_stdout("edge results prints the results there")  # (`>&-`)
    arrived = parse_arrived(args)
    warn_of_a_recent_end(
        "results", args, arrived[1], "are not listed; export the shift again once it is over"
    )
    db, since = read_db(args)
    try:
        _check_cursor(args, db)
        rows = iter_results(
            db,
            since=since,
            verdict=args.verdict,
            after_id=args.after_id,
            changed_after=args.changed_after,
            arrived=arrived,
        )
        if args.fingerprint:  # (one export's results: which model judged what, in a rollout)
            wanted = args.fingerprint.strip().lower()
            rows = (row for row in rows if (row["fingerprint"] or "").startswith(wanted))
        rows = (_listed(row, args.score_threshold) for row in rows)
        if args.json:  # (ASCII: json.dumps escapes every other character, whatever the locale)
            out = sys.stdout
            out.write("[")
            for i, row in enumerate(rows):
                out.write(("," if i else "") + "\n" + strict_dumps(row))  # (inf: null)
            out.write("\n]\n")
        elif args.csv:  # UTF-8 whatever the locale's encoding (a file name any)
            bom = args.excel and not _appending(sys.stdout)
            _write_csv(rows, _stdout_encoded("utf-8", "strict"), args.excel, bom)
        else:  # for people: what the locale's encoding cannot show, as \\u escapes
            _table(rows, _stdout_encoded(sys.stdout.encoding or "utf-8", "backslashreplace"))
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. `| head`: stop quietly
        silence_stdout()
    except sqlite3.DatabaseError as exc:  # (a damaged page: found only when read)
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()  # (the rows listed before it, then the one error line)
        raise read_error(args.db, exc) from None
    finally:
        db.close()
    return 0


def _listed(row: dict, score: float) -> dict:
    """A result row as listed (LISTED_COLUMNS, in their order): only its boxes scoring at least
    `score` (`_boxes_scoring_at_least`), and their count, "n_boxes" (None: no detection
    result)."""
    row = _boxes_scoring_at_least(row, score)
    listed = {**row, "n_boxes": None if row["boxes"] is None else len(row["boxes"])}
    return {k: listed[k] for k in LISTED_COLUMNS}  # (--json's keys in --csv's order)


#: The store's columns listed before n_boxes: those it had when n_boxes came. The store's
#: columns added since (edge) come after n_boxes, so that CSV readers by position keep every
#: earlier column's place.
_BEFORE_N_BOXES = RESULT_COLUMNS[: RESULT_COLUMNS.index("warnings") + 1]
#: The columns `edge results` lists (--csv's header, --json's keys): the store's, n_boxes
#: (made from them) after its columns of then, then its columns added since.
LISTED_COLUMNS = (
    *_BEFORE_N_BOXES,
    "n_boxes",
    *RESULT_COLUMNS[len(_BEFORE_N_BOXES) :],
)
#: The columns --excel writes as local ISO 8601 text (`iso_local`), not unix seconds.
TIME_COLUMNS = ("arrived", "finished", "updated")


def _write_csv(rows: Iterable[dict], out: TextIO, excel: bool, bom: bool = False) -> None:
    """`rows` (`_listed`) as CSV with a header of LISTED_COLUMNS on `out`; `excel`:
    TIME_COLUMNS as local ISO 8601 text (the same columns), and the edge name as a formula of
    its text, `="-A1"`: Excel read a name like -A1 as a formula, 3-7 as a date; `bom`: a UTF-8
    byte order mark first."""
    writer = csv.writer(out)
    if bom:
        out.write("\ufeff")
    writer.writerow(LISTED_COLUMNS)
    for row in rows:
        if excel:
            row = {**row, **{k: iso_local(row[k]) for k in TIME_COLUMNS if row[k] is not None}}
            if row["edge"] is not None:  # (names hold no quote: `shared.edge_name`)
                row["edge"] = f'="{row["edge"]}"'
        writer.writerow(_csv_cell(row[k]) for k in LISTED_COLUMNS)


def _appending(out: TextIO) -> bool:
    """Whether `out` writes at the end of a regular file that has content already (`>>`): a
    second byte order mark would land mid-file, in front of the second header."""
    try:
        out.flush()
        fd = out.fileno()
        return stat.S_ISREG(os.fstat(fd).st_mode) and os.lseek(fd, 0, os.SEEK_CUR) > 0
    except (OSError, ValueError, AttributeError):  # (no file descriptor: a stream in memory)
        return False


def _csv_cell(value: object) -> object:
    """A CSV cell: a list column (boxes, class_names...) as JSON text, its names as they are
    (UTF-8, like the path column: ``["pit défaut"]``, not ``\\u00e9`` escapes a spreadsheet
    shows as such); "" for None; anything else as it is."""
    if isinstance(value, list | dict):
        return json.dumps(value, ensure_ascii=False)
    return "" if value is None else value


#: Why a cursor past the store's numbers is refused: it read another file before.
RENUMBERED = (
    "the database was replaced or restored from a backup, and its rows are numbered again; "
    "read it again from 0 (and de-duplicate by content_hash)"
)


def _check_cursor(args: argparse.Namespace, db: sqlite3.Connection) -> None:
    """CommandError (exit 2, one line) for a cursor no poll of this store can have given:
    --changed-after past its last change, or --after-id past the largest id it ever gave (the
    file was restored from an older backup or made anew, and numbers its rows again: what the
    consumer has not seen would lie below its cursor, never listed); or --changed-after on a
    store that numbers no changes (an earlier splitdet's, not yet opened by this one's
    writers)."""
    from splitdet.edge.store_reads import last_change, last_id
    from splitdet.shared.cli import CommandError

    if args.changed_after is not None:
        last = last_change(db)
        if last is None:
            raise CommandError(
                f"--changed-after: --db {args.db} numbers no changes yet (an earlier splitdet "
                "wrote it, and no command of this one has written to it since): poll it with "
                "--after-id until this splitdet's `edge run` has started on it"
            )
        if args.changed_after > last:
            raise CommandError(
                f"--changed-after {args.changed_after} is past this store's last change "
                f"{last}: {RENUMBERED}"
            )
    elif args.after_id > 0:
        last = last_id(db)
        if args.after_id > last:
            raise CommandError(
                f"--after-id {args.after_id} is past the last id this store gave, {last}: "
                f"{RENUMBERED}"
            )


class _Encoded:
    """A text stream over sys.stdout's bytes (its `buffer`) in an encoding of our choosing,
    writing text as it is given (no newline translation: csv writes its own \\r\\n). Not an
    io.TextIOWrapper: one over sys.stdout.buffer closes it when collected, and its detach
    flushes into a pipe a reader closed (`| head`). sys.stdout's own text is flushed first;
    `sys.stdout.flush()` flushes what this wrote."""

    def __init__(self, encoding: str, errors: str) -> None:
        sys.stdout.flush()
        self._bytes = sys.stdout.buffer
        self._encoding, self._errors = encoding, errors

    def write(self, text: str) -> int:
        """Write `text`, encoded; returns its length in characters."""
        self._bytes.write(text.encode(self._encoding, self._errors))
        return len(text)


def _stdout_encoded(encoding: str, errors: str) -> TextIO:
    """sys.stdout in `encoding` (`_Encoded`), its unencodable characters handled by `errors`;
    sys.stdout itself when it has no bytes beneath (a text-only stream put in its place)."""
    if getattr(sys.stdout, "buffer", None) is None:
        return sys.stdout
    return cast(TextIO, _Encoded(encoding, errors))


def _table(rows: Iterable[dict], out: TextIO) -> None:
    from splitdet.shared.probability_format import format_probability

    out.write(
        f"{'id':>6}  {'verdict':8} {'p_defect':>8} {'boxes':>5}  {'finished':25}  "
        f"{'export':12}  path\n"
    )
    for row in rows:
        finished = clock_text(row["finished"]) if row["finished"] else "-"
        p = format_probability(row["p_defect"]) if row["p_defect"] is not None else "-"
        boxes = "-" if row["n_boxes"] is None else row["n_boxes"]
        note = f"  ({row['error_kind']}: {row['reason']})" if row["error_kind"] else ""
        warned = f"[{row['warnings']}]  " if row["warnings"] else ""  # (the path stays last)
        stored = row["stored_path"]
        moved = f"  (to {one_line(stored)})" if stored and stored != row["path"] else ""
        out.write(
            f"{row['id']:>6}  {row['verdict']:8} {p:>8} {boxes:>5}  {finished:25}  "
            f"{(row['fingerprint'] or '-')[:12]:12}  {warned}{one_line(row['path'])}{moved}{note}\n"
        )
