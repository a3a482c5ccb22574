"""`splitdet data`: check a VOC dataset whole, write its split files, merge several into one.

    splitdet data check data/mine [--decode] [--classes scratch,dent] [--json report.json]
    splitdet data split data/mine --val 0.2 --test 0.1 [--write-empty] [--overwrite]
    splitdet data merge data/gaskets review/ --out data/gaskets-v2 [--prefix]

Top-level imports are stdlib only (see splitdet.shared.cli); the work loads in the handlers.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.shared.cli import add_pixel_bits_option, class_names, float_in, int_in
from splitdet.shared.progress import progress_off

if TYPE_CHECKING:  # the handlers import them when they run
    from splitdet.training.voc_check import DatasetReport
    from splitdet.training.voc_merge import MergePlan

EPILOG = """\
actions:
  splitdet data check DIR   every problem in the dataset at once, and what each split holds
  splitdet data split DIR   write ImageSets/Main/{train,val,test}.txt (stratified, by seed)
  splitdet data merge SRC SRC... --out DIR
                            one dataset holding every image, annotation and split line of each

A dataset exported from an annotation tool usually needs both, in this order:
  splitdet data split data/mine --write-empty     # annotations for images with no box, splits
  splitdet data check data/mine --decode          # then train on it
"""

#: Problem lines printed before "... and N more" (``--json`` lists all).
SHOWN_PROBLEMS = 50
#: Image sizes printed, the most common first, before "and N more sizes" (``--json`` lists all).
SHOWN_SIZES = 5


def _classes(text: str) -> tuple[str, ...]:
    try:
        names = class_names(text)  # as train reads its --classes
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    if not names:
        raise argparse.ArgumentTypeError(f"expected class names separated by commas, got {text!r}")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `data` subcommand and its actions."""
    p = subparsers.add_parser(
        "data",
        help="check a VOC dataset whole, write its train/val/test splits",
        description="Tools for a PASCAL VOC dataset of your own, before `splitdet train`.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    c = actions.add_parser(
        "check",
        help="every problem in the dataset at once, and what each split holds",
        description=(
            "Read every annotation, image header and split file of a VOC dataset and report "
            "all problems together, each naming its file (train and eval stop at the first), "
            "then what each split holds. Exit status 1 when it finds a problem: what would "
            "stop train or eval, leave an image out unseen or let one split leak into another; "
            "0 when only warnings remain."
        ),
        epilog="examples:\n  splitdet data check data/mine\n"
        "  splitdet data check data/mine --classes 'scratch,dent,Pit mark' --json report.json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("data", metavar="DIR", help="the VOC dataset (JPEGImages/, Annotations/)")
    c.add_argument(
        "--classes",
        type=_classes,
        metavar="A,B",
        help="the classes you will train (other classes are problems); default: any",
    )
    c.add_argument(
        "--decode",
        action="store_true",
        help="decode every image too, finding truncated or corrupt bodies a header read misses "
        "(about 50 ms per 2448x2048 JPEG per worker)",
    )
    add_pixel_bits_option(c, default=16)
    c.add_argument(
        "--workers",
        type=int_in(1, 256),
        default=os.cpu_count() or 1,
        metavar="N",
        help="threads reading images (default: all cores)",
    )
    c.add_argument("--json", metavar="FILE", help="write the whole report as JSON ('-': stdout)")
    c.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    c.set_defaults(handler=run_check)

    s = actions.add_parser(
        "split",
        help="write ImageSets/Main/{train,val,test}.txt",
        description=(
            "Divide every annotated image at random (the same seed gives the same split) into "
            "train, val and test, each getting its share of defect-free images and of every "
            "class (a defective image counts under its rarest class)."
        ),
        epilog="examples:\n  splitdet data split data/mine --val 0.2 --test 0.1\n"
        "  splitdet data split data/mine --val 0.2 --overwrite   # redo existing splits\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("data", metavar="DIR", help="the VOC dataset (JPEGImages/, Annotations/)")
    s.add_argument(
        "--val",
        type=float_in(0.0, 1.0),
        default=0.2,
        metavar="F",
        help="share for validation: the gate is calibrated on it (default: 0.2)",
    )
    s.add_argument(
        "--test",
        type=float_in(0.0, 1.0),
        default=0.1,
        metavar="F",
        help="share held out for `splitdet eval --split test` (default: 0.1)",
    )
    s.add_argument(
        "--seed",
        type=int_in(0),
        default=0,
        help="shuffle seed (default: 0, fixed: the same annotations give the same split); "
        "recorded with the shares and options in ImageSets/Main/split.json",
    )
    s.add_argument(
        "--classes",
        type=_classes,
        metavar="A,B",
        help="the classes you will train (other classes are refused); default: any",
    )
    s.add_argument(
        "--write-empty",
        action="store_true",
        help="first write an annotation with no object for every image that has none (tools "
        "such as LabelImg write nothing for an image without a box: a defect-free part); "
        "refused, writing nothing, when an image's own .xml lies where splitdet does not read "
        "it (beside the image, in a sub-folder of Annotations, as ID.XML)",
    )
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", action="store_true", help="replace existing split files")
    mode.add_argument(
        "--add",
        action="store_true",
        help="keep the images existing split files list where they are and divide only the "
        "annotated images in no split (after `splitdet edge collect` added some): a test "
        "image never moves to train",
    )
    s.add_argument("--json", action="store_true", help="print the split as JSON on stdout")
    s.set_defaults(handler=run_split)

    m = actions.add_parser(
        "merge",
        help="one dataset holding every image, annotation and split line of several",
        description=(
            "Write a new VOC dataset holding every image, annotation and split-file line of "
            "the sources (synthetic images and the line's own, say), to train on them together: "
            "`splitdet train` reads one dataset. Each source is read whole first, as train reads "
            "it, and nothing is written when one has a problem. Ids are kept; an id in two "
            "sources is refused unless --prefix. Images are hard-linked where the file system "
            "allows it (editing one in place then changes both datasets), else copied; "
            "annotations are kept as written (pose, truncated, a tool's own tags), their "
            "<folder> and <filename> naming their merged image."
        ),
        epilog="examples:\n"
        "  splitdet data merge data/gaskets review/ --out data/gaskets-v2\n"
        "  splitdet data merge line1/ line2/ --out data/lines --prefix   # line1_img_000, ...\n"
        "  splitdet data check data/gaskets-v2 && splitdet train --data data/gaskets-v2 ...\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "sources",
        nargs="+",
        metavar="SRC",
        help="VOC datasets with split files (`data split` writes them), two or more",
    )
    m.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="the merged dataset: a new folder (or an empty one); never written into otherwise",
    )
    m.add_argument(
        "--prefix",
        action="store_true",
        help="prefix every id by its source folder's name (review/a.xml: review_a), so that "
        "ids in several sources do not collide (default: ids kept, a collision refused)",
    )
    m.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    m.set_defaults(handler=run_merge)


def _sizes_text(report: DatasetReport) -> str:
    """The most common image sizes, "320x240 (12), 256x256 (11)", at most `SHOWN_SIZES` of
    them, then how many others there are."""
    counts = report.image_sizes.most_common()
    shown = SHOWN_SIZES if len(counts) > SHOWN_SIZES + 1 else len(counts)  # never "1 more"
    text = ", ".join(f"{w}x{h} ({n})" for (w, h), n in counts[:shown])
    if len(counts) > shown:
        others = sum(n for _, n in counts[shown:])
        text += f", and {len(counts) - shown} more sizes ({others} images; --json FILE lists all)"
    return text


def _print_report(report: DatasetReport) -> None:
    print(
        f"{report.root}: {report.annotations} annotations, {report.images} images, "
        f"classes: {', '.join(f'{k} {v}' for k, v in sorted(report.classes.items())) or 'none'}"
    )
    for name, stats in report.splits.items():
        objects = ", ".join(f"{k} {v}" for k, v in sorted(stats.objects.items())) or "no objects"
        difficult = f", {stats.difficult} difficult" if stats.difficult else ""
        unreadable = f", and {stats.unreadable} more with a problem" if stats.unreadable else ""
        print(
            f"  {name}: {stats.images} images ({stats.defective} defective + "
            f"{stats.defect_free} defect-free){unreadable}; {objects}{difficult}"
        )
    if report.box_px:
        w, h = report.box_px["width"], report.box_px["height"]
        print(f"  boxes (px, min / median / max): width {w[0]:g} / {w[1]:g} / {w[2]:g}, height "
              f"{h[0]:g} / {h[1]:g} / {h[2]:g}")  # fmt: skip
    if report.image_sizes:
        print(f"  image sizes: {_sizes_text(report)}")
    if report.split_record is not None:
        from splitdet.training.voc_split_record import record_line

        print(f"  {record_line(report.split_record)}")
    for line in report.warnings[:SHOWN_PROBLEMS]:
        print(f"warning: {line}")
    for line in report.problems[:SHOWN_PROBLEMS]:
        print(f"problem: {line}")
    hidden = max(0, len(report.problems) - SHOWN_PROBLEMS)
    hidden += max(0, len(report.warnings) - SHOWN_PROBLEMS)
    if hidden:
        print(f"... and {hidden} more lines (--json FILE lists them all)")
    verdict = "ok" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{verdict}, {len(report.warnings)} warning(s)")


def run_check(args: argparse.Namespace) -> int:
    """Check the dataset at ``args.data``; exit status 1 when it has problems."""
    from tqdm import tqdm

    from splitdet.edge.cli_predict import check_outputs, write_json
    from splitdet.shared.cli import CommandError, refuse_closed_stdout
    from splitdet.training.voc_check import annotated_ids, check_dataset

    root = Path(args.data)
    if not root.is_dir():
        raise CommandError(f"{root}: not a folder")
    check_outputs(args.json)  # before the reading, not after it
    if not args.json:  # (`>&-`: the report is the command's output)
        refuse_closed_stdout("data check prints its report there (or give --json FILE)")
    to_stdout = args.json == "-"
    total = len(annotated_ids(root))
    hidden = progress_off(args.no_progress) or total == 0
    with tqdm(total=total, unit="file", file=sys.stderr, disable=hidden) as bar:
        report = check_dataset(
            root, args.classes, decode=args.decode, pixel_bits=args.pixel_bits,
            workers=args.workers, progress=bar.update,
        )  # fmt: skip
    if args.json:
        write_json(args.json, report.to_json())
    if not to_stdout:
        _print_report(report)
    return 0 if report.ok else 1


def run_split(args: argparse.Namespace) -> int:
    """Write the split files of ``args.data``."""
    from splitdet.edge.cli_predict import write_json
    from splitdet.shared.cli import CommandError, refuse_closed_stdout
    from splitdet.training import voc
    from splitdet.training.voc_check_folder import datasets_below_hint, unfinished_synth_problem
    from splitdet.training.voc_layout import missing_folder_hint

    if args.json:  # (`>&-`)
        refuse_closed_stdout("--json prints the split there")
    from splitdet.training.voc_split import split_dataset

    root = Path(args.data)
    unfinished = unfinished_synth_problem(root)  # (before its folders: it may have none yet)
    if unfinished is not None:
        raise CommandError(unfinished)
    if not (root / "Annotations").is_dir() and not (root / "JPEGImages").is_dir():
        hints = datasets_below_hint(root, "split") or (
            missing_folder_hint(root, "JPEGImages") + missing_folder_hint(root, "Annotations")
        )
        raise CommandError(
            f"{root}: no Annotations/ or JPEGImages/ folder (not a VOC dataset){hints}"
        )
    if args.val + args.test >= 1:
        raise CommandError(f"--val {args.val} + --test {args.test} leave nothing to train on")
    try:
        result = split_dataset(
            root, val=args.val, test=args.test, seed=args.seed, class_names=args.classes,
            overwrite=args.overwrite, write_empty=args.write_empty, add=args.add,
        )  # fmt: skip
    except FileExistsError as exc:
        raise CommandError(f"{exc} (--overwrite replaces them, --add adds to them)") from None
    except (voc.VocError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{root}: cannot write ({exc})") from None
    written = result.empty_annotations
    if args.json:
        summary = {
            "empty_annotations_written": [str(p) for p in written],
            "splits": {name: ids for name, ids in result.ids.items()},
            "added": result.added,
            "seed": result.seed,
            "record": str(result.record) if result.record is not None else None,
        }
        write_json("-", summary)
        return 0
    if written:
        print(f"wrote {len(written)} empty annotation(s) (defect-free images)")
    for name, ids in result.ids.items():
        new = f" ({result.added[name]} new)" if args.add else ""
        print(f"{result.paths[name]}: {len(ids)} images{new}")
    if result.record is not None:
        print(f"{result.record}: seed {result.seed} and options recorded (`data check` shows them)")
    return 0


def _merged_split_text(split: str, count: int, plan: MergePlan) -> str:
    """A merged split as the summary counts it, "train 16", naming the sources it comes from
    when not every source has it ("free 3 (ds alone)"): its lines are theirs only."""
    having = [str(s.root) for s in plan.sources if split in s.splits]
    alone = f" ({', '.join(having)} alone)" if len(having) < len(plan.sources) else ""
    return f"{split} {count}{alone}"


def run_merge(args: argparse.Namespace) -> int:
    """Merge ``args.sources`` into the new dataset ``args.out``, and say what it holds."""
    import shlex

    from tqdm import tqdm

    from splitdet.shared.cli import CommandError
    from splitdet.training import voc
    from splitdet.training.voc_check import annotated_ids
    from splitdet.training.voc_merge import MergeError, check_out, merge, plan_merge

    out = Path(args.out)
    sources = [Path(s) for s in args.sources]
    try:
        check_out(out, sources)  # before the reading, not after it
        try:
            total = sum(len(annotated_ids(s)) for s in sources if (s / "Annotations").is_dir())
            with tqdm(total=total, unit="file", desc="reading", file=sys.stderr,
                      disable=progress_off(args.no_progress) or total == 0) as bar:  # fmt: skip
                plan = plan_merge(sources, prefix=args.prefix, progress=bar.update)
        except OSError as exc:  # (a source's folder or file that cannot be read)
            where = exc.filename or "a source"
            raise CommandError(
                f"{where}: cannot read ({exc.strerror or exc}); nothing was written"
            ) from None
        with tqdm(total=plan.files, unit="file", desc="writing", file=sys.stderr,
                  disable=progress_off(args.no_progress)) as bar:  # fmt: skip
            result = merge(plan, out, progress=bar.update)
    except MergeError as exc:
        raise CommandError(str(exc)) from None
    except voc.VocError as exc:
        root = next((s for s in sources if str(exc).startswith(str(s) + os.sep)), None)
        raise CommandError(voc.check_hint(exc, root) if root else str(exc)) from None
    except OSError as exc:
        raise CommandError(f"--out {out}: cannot write ({exc}); nothing was left there") from None

    images = sum(len(s.samples) + len(s.other_images) for s in plan.sources)
    how = (
        "hard-linked" if not result.copied
        else "copied (no hard link here: another file system?)" if not result.linked
        else f"{result.linked} hard-linked, {result.copied} copied"
    )  # fmt: skip
    print(f"{out}: {images} images ({how}), {sum(len(s.samples) for s in plan.sources)} "
          f"annotations from {len(plan.sources)} sources"
          + (", ids prefixed by their source folder's name" if args.prefix else ""))  # fmt: skip
    for source in plan.sources:
        parts = [f"{split} {len(ids)}" for split, ids in source.splits.items()]
        if source.unlisted:
            parts.append(f"in no split {source.unlisted}")
        if source.other_images:
            parts.append(f"without annotation {len(source.other_images)}")
        prefix = f" (ids {source.prefix}...)" if source.prefix else ""
        print(f"  {source.root}{prefix}: {', '.join(parts)}")
    merged = ", ".join(_merged_split_text(split, n, plan) for split, n in result.splits.items())
    print(f"  merged: {merged}")
    classes = ", ".join(f"{k} {v}" for k, v in sorted(plan.classes.items())) or "none"
    print(f"  classes (boxes): {classes}")
    if result.collected:
        print(f"  collected.csv: {result.collected} rows from the sources' listings (ids as "
              "merged), for `data check` to keep checking needs_boxes")  # fmt: skip
    for warning in plan.warnings:
        print(f"warning: {warning}")
    if any(s.unlisted for s in plan.sources):
        print(f"images in no split stay so: `splitdet data split {shlex.quote(str(out))} --add` "
              "divides them")  # fmt: skip
    print(f"next: splitdet data check {shlex.quote(str(out))}")
    return 0
