"""`splitdet edge results`: the results database printed for other tools, as a table, JSON or
CSV, filtered by id (a consumer's cursor), time, verdict, model export and box score. Safe
beside a running daemon: the database is opened read only.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sqlite3
import sys
from collections.abc import Iterable
from typing import TextIO

from splitdet.edge.cli_edge_options import add_db_and_since, clock_text, read_db, read_error
from splitdet.shared.cli import float_in, int_in, silence_stdout

RESULTS_EPILOG = """\
examples:
  splitdet edge results --db /data/edge.sqlite                 # a table
  splitdet edge results --db /data/edge.sqlite --since 1h --json
  splitdet edge results --db /data/edge.sqlite --since 2024-05-01T08:00 --csv > day.csv
  splitdet edge results --db /data/edge.sqlite --verdict defect --score-threshold 0.5
  splitdet edge results --db /data/edge.sqlite --after-id 41234 --json   # a consumer's poll

Columns: id, path, stored_path, content_hash, size_bytes, arrived, finished, updated (unix s),
verdict (ok | defect | pending | error), p_defect, request_id, fingerprint, boxes
[[x1, y1, x2, y2], ...] in original px, scores, labels, class_names, timings (s per stage),
bytes_sent, attempts, error_kind (quarantine | dead_letter | outbox_full), reason, threshold
(the gate threshold the image was judged at). The daemon stores every box the model returns
(from score 0.05); --score-threshold 0.5 shows the boxes `splitdet predict` reports.

Polling for new results: keep a cursor by id, not by time. --after-id N lists the rows with an
id above N; ids only grow, in arrival order, whatever the clock does. A pending row becomes
final later (defect when the cloud answers, or error): poll without --verdict, take the next N
as the id before the first pending row listed (the last id listed when none is pending, N again
when nothing is), and key the rows you keep by id (final rows listed after a pending one come
again). A dead letter `splitdet edge requeue` sends again turns pending below N. --since
keeps rows created or changed since then by the wall clock (their `updated`): a poll by
--since misses the rows written after the clock steps back (NTP correcting a clock that ran
ahead), and lists those stamped while it ran ahead until it passes them again.

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
    add_db_and_since(p, "rows created or changed since (by the wall clock: a consumer polls by "
                     "--after-id)")  # fmt: skip
    p.add_argument(
        "--after-id",
        type=int_in(0, 2**63 - 1),
        default=0,
        metavar="N",
        help="only rows with an id above N: a consumer's cursor that no clock step moves (ids "
        "only grow, in arrival order; see below for pending rows)",
    )
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


def results(args: argparse.Namespace) -> int:
    """Print result rows; see RESULTS_EPILOG."""
    from splitdet.edge.store_reads import iter_results
    from splitdet.edge.store_schema import RESULT_COLUMNS

    db, since = read_db(args)
    try:
        rows = iter_results(db, since=since, verdict=args.verdict, after_id=args.after_id)
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
    except sqlite3.DatabaseError as exc:  # (a damaged page: found only when read)
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.flush()  # (the rows listed before it, then the one error line)
        raise read_error(args.db, exc) from None
    finally:
        db.close()
    return 0


def _table(rows: Iterable[dict], out: TextIO) -> None:
    from splitdet.shared.probability_format import format_probability

    out.write(
        f"{'id':>6}  {'verdict':8} {'p_defect':>8} {'boxes':>5}  {'finished':25}  "
        f"{'export':12}  path\n"
    )
    for row in rows:
        finished = clock_text(row["finished"]) if row["finished"] else "-"
        p = format_probability(row["p_defect"]) if row["p_defect"] is not None else "-"
        boxes = len(row["boxes"]) if row["boxes"] is not None else "-"
        note = f"  ({row['error_kind']}: {row['reason']})" if row["error_kind"] else ""
        stored = row["stored_path"]
        moved = f"  (to {_one_line(stored)})" if stored and stored != row["path"] else ""
        out.write(
            f"{row['id']:>6}  {row['verdict']:8} {p:>8} {boxes:>5}  {finished:25}  "
            f"{(row['fingerprint'] or '-')[:12]:12}  {_one_line(row['path'])}{moved}{note}\n"
        )


def _one_line(text: str) -> str:
    """`text` for one row of the table: control characters (a newline, a tab, ESC in a file
    name) written as escapes (\\n, \\t, \\x1b), so a name cannot break or forge a row."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
