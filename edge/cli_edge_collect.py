"""`splitdet edge collect`: chosen results' images copied into a PASCAL VOC tree with the
model's boxes as pre-labels to review, and the summary printed; the copying itself is
edge.collect's.
"""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from splitdet.edge.arrival_window import (
    add_arrived,
    parse_arrived,
    warn_of_a_recent_end,
    window_text,
    windowed,
)
from splitdet.edge.cli_edge_options import add_db_and_since, read_db, read_error
from splitdet.shared.cli import float_in, int_in
from splitdet.shared.strict_json import strict_dumps

COLLECT_EPILOG = """\
examples:
  splitdet edge collect --db /data/edge.sqlite --out review/ --since 7d --p-defect 0.2:0.8
      the week's images the gate was least sure of
  splitdet edge collect --db /data/edge.sqlite --out review/ --verdict defect --limit 200
  splitdet edge collect --db /data/edge.sqlite --out review/ --arrived-from 2024-05-01T06:00 \\
      --arrived-until 2024-05-01T14:00      # one shift's images, as `edge results` lists it

A shift: --arrived-from START --arrived-until END collects only results whose image arrived in
[START, END) (their `arrived`, as `edge results` selects them), with the other filters; the
summary names the window (--json: "window", its bounds in unix s, null where open). A row is
written once its image is judged, and pending results are not collected: an END less than a
minute ago, or to come, is warned of; collecting the shift again later adds what was missing.

Then review the pre-labels (LabelImg, CVAT and Label Studio open a VOC tree), and
  splitdet data split review/ --add && splitdet data check review/ && splitdet train ...
Running collect again into the same folder adds new results and leaves every image already
there, and its reviewed annotation, as it is; an image collected.csv lists whose files were
removed from the folder (a reviewer's decision) is not collected again unless
--recollect-removed. Only final ok/defect results are collected, and
only while their file is still where the daemon left it (--after archive or keep). Images are
copied as the edge read them: one whose EXIF orientation tag (2..8) has viewers turn or mirror
it becomes a PNG of its pixels as decoded, without the tag (the model's boxes are in those
pixels, and `data check` refuses such a tag); the others are copied byte for byte.
An image the edge judged defect whose annotation holds no box (none scored --score-threshold)
would train as a defect-free image: collect counts them, in a WARNING and its summary, and marks
them needs_boxes=yes in collected.csv. Draw their boxes (or remove the image and its annotation)
before `data split --add`.
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


def register_collect(actions: argparse._SubParsersAction) -> None:
    """Add `collect` to the actions of `splitdet edge`."""
    p = actions.add_parser(
        "collect",
        help="copy chosen results' images into a VOC tree, the model's boxes as labels",
        description="Copy the images of chosen results into a PASCAL VOC tree (JPEGImages/, "
        "Annotations/), each annotated with the model's boxes as pre-labels to review, and "
        "list in collected.csv where each came from and what the model said.",
        epilog=COLLECT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_db_and_since(p, "results created or changed since")
    add_arrived(p)
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
    p.add_argument(
        "--recollect-removed",
        action="store_true",
        help="collect again the images collected.csv lists whose files were removed from --out "
        "since (left out otherwise: a reviewer removed them)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=collect)  # fmt: skip


def collect(args: argparse.Namespace) -> int:
    """Collect results into a VOC tree; see register_collect."""
    from splitdet.edge.collect import collect_results
    from splitdet.shared.cli import CommandError, refuse_closed_stdout

    if args.json:  # (`>&-`)
        refuse_closed_stdout("--json prints the summary there")

    arrived = parse_arrived(args)
    warn_of_a_recent_end(
        "collect", args, arrived[1], "are not collected; collect again once the shift is over"
    )
    db, since = read_db(args)
    try:
        summary = collect_results(
            db, args.out, since=since, verdict=args.verdict, p_range=args.p_defect,
            limit=args.limit, min_score=args.score_threshold,
            recollect_removed=args.recollect_removed, arrived=arrived,
        )  # fmt: skip
    except sqlite3.DatabaseError as exc:  # (a damaged page: found only when read)
        raise read_error(args.db, exc) from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"--out {args.out}: cannot write ({exc})") from None
    finally:
        db.close()
    if args.json:
        print(strict_dumps(summary.to_json(), indent=2))
        return 0
    print(
        f"{args.out}: {len(summary.collected)} image(s) collected, {summary.already} already "
        f"there, {len(summary.missing)} not available (of {summary.matched} matching results"
        + (f" whose image arrived {window_text(arrived)}" if windowed(arrived) else "")
        + f"); {len(summary.needs_boxes)} defect verdict(s) collected without a box"
    )
    if summary.needs_boxes:
        print(
            f"  {len(summary.needs_boxes)} would train as defect-free images until someone draws "
            f"their boxes (needs_boxes=yes in {args.out / 'collected.csv'}): "
            + ", ".join(summary.needs_boxes[:5])
            + (" ..." if len(summary.needs_boxes) > 5 else "")
        )
    if summary.removed:
        print(
            f"  {summary.removed} listed in collected.csv but removed from {args.out} since "
            "(a reviewer's decision) left out: --recollect-removed collects them again"
        )
    if summary.relisted:
        print(
            f"  {len(summary.relisted)} of those already there listed in collected.csv only now "
            f"(a run cut short had not listed them): {', '.join(summary.relisted[:5])}"
            + (" ..." if len(summary.relisted) > 5 else "")
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
