"""`splitdet synth`: write a synthetic titanium-gasket scratch dataset (PASCAL VOC).

Only argparse and the standard library at import time; numpy and Pillow load when it runs.

Stopped, it leaves no process behind and --out says it is unfinished (dataset.json
``"complete": false``; `splitdet data check` reports it): Ctrl-C exits 130 ("interrupted"),
SIGTERM (systemd, docker stop, a CI cancel) exits 143 with one line, the render workers ended
with it; a SIGKILLed synth's workers end too (`synth._start_worker`).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.shared.cli import int_in
from splitdet.shared.sigterm import SIGTERM_EXIT, Terminated, sigterm_as_interrupt
from splitdet.shared.strict_json import strict_dumps

if TYPE_CHECKING:  # (numpy loads with it: imported when the command runs)
    from splitdet.training.synth import DatasetSummary

EPILOG = """\
examples:
  splitdet synth --out data/gaskets
      the paper's layout at 2448x2048: train 432+160, val 108+40, test 108+40
      (defective + defect-free), written with all cores
  splitdet synth --out data/small --size 640x512 --defective 200 --free 80 --seed 1

The output is a standard VOC tree (JPEGImages/, Annotations/, ImageSets/Main/{train,val,test}.txt)
plus dataset.json with the settings. The same seed and size give the same images.
--defective 0 makes a defect-free set (for false-alarm tests), which cannot train: it warns.
Stopped (Ctrl-C: exit 130, SIGTERM: 143), --out is left unfinished: rerun with --overwrite.
"""


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT such as 2448x2048, got {text!r}"
        ) from None
    if not (256 <= w <= 16384 and 256 <= h <= 16384):
        raise argparse.ArgumentTypeError(f"each side must be 256..16384 px, got {text!r}")
    return w, h


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `synth` subcommand."""
    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic scratch dataset (PASCAL VOC)",
        description=(
            "Render synthetic inspection images of machined titanium gaskets, some with "
            "scratches (annotated with tight boxes, class 'scratch'), the rest defect-free "
            "but with dust, stains and tool marks, and write them as a PASCAL VOC dataset."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--seed", type=int_in(0), default=0, help="dataset seed (default: 0)")
    p.add_argument(
        "--size",
        type=_size,
        default=(2448, 2048),
        metavar="WxH",
        help="image size, width x height, each side 256..16384 px (default: 2448x2048, the "
        "paper's camera)",
    )
    p.add_argument(
        "--defective",
        type=int_in(0),
        default=540,
        metavar="N",
        help="train+val images with scratches (default: 540)",
    )
    p.add_argument(
        "--free",
        type=int_in(0),
        default=200,
        metavar="N",
        help="train+val defect-free images (default: 200)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        metavar="F",
        help="share of each kind that goes to val (default: 0.2, i.e. 432/108 and 160/40)",
    )
    p.add_argument(
        "--test-defective",
        type=int_in(0),
        default=108,
        metavar="N",
        help="held-out test images with scratches (default: 108)",
    )
    p.add_argument(
        "--test-free",
        type=int_in(0),
        default=40,
        metavar="N",
        help="held-out defect-free test images (default: 40)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="processes to render with (default: all cores); output does not depend on it",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier synthetic dataset in --out",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Generate the dataset described by ``args``; 143 when SIGTERM stopped it, 130 Ctrl-C."""
    from splitdet.shared.cli import CommandError, refuse_closed_stdout
    from splitdet.training import synth

    if args.json:  # (`>&-`: the summary it was asked for would be lost after the work)
        refuse_closed_stdout("--json prints the summary there")
    if args.workers < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise CommandError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.defective + args.free + args.test_defective + args.test_free == 0:
        raise CommandError("nothing to generate: every count is 0")
    _check_train_split(args, synth.train_shortfall(args.defective, args.free, args.val_fraction))
    out = Path(args.out)
    try:
        with sigterm_as_interrupt():
            summary = _generate(args, out)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (`Terminated`): the same hint
        return _stopped(exc, out, args.overwrite)
    except synth.SyntheticDatasetExists as exc:
        if exc.unfinished:
            raise CommandError(f"{exc}; rerun with --overwrite, or choose another --out") from None
        raise CommandError(f"{exc}; --overwrite replaces it, or choose another --out") from None
    except FileExistsError as exc:  # a file, or a folder of other data: --overwrite cannot help
        raise CommandError(f"{exc}; choose another --out") from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # the only files synth touches are under --out
        raise CommandError(_write_failure(exc, out, args.overwrite)) from None
    _print_summary(args, out, summary)
    warning = _defect_free_warning(args)
    if warning is not None:  # (after the lines it is about; stderr: --json's stdout stays JSON)
        print(f"splitdet synth: warning: {warning}", file=sys.stderr)
    return 0


def _write_failure(exc: OSError, out: Path, overwrite: bool) -> str:
    """The message of a write under ``out`` that failed (a full disk, a file size limit, no
    permission): the file, the cause, what the run left there and what to do."""
    cause = exc.strerror or str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    left = _left_text(out, overwrite)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = f"free space on the disk of {out} (or choose another --out)"
    else:
        fix = f"make {out} writable (or choose another --out)"
    if left:
        return f"--out {out}: cannot write {where}{cause}{left} once you {fix}"
    return f"--out {out}: cannot write {where}{cause}; {fix}, and run it again"


def _check_train_split(args: argparse.Namespace, shortfall: str | None) -> None:
    """`CommandError` naming --val-fraction when it would leave train without any image, or
    without a defective one, though --defective/--free asked for them (`train_shortfall`):
    such a dataset fails `splitdet data check` and cannot train."""
    from splitdet.shared.cli import CommandError

    if shortfall is None:
        return
    fraction = f"--val-fraction {args.val_fraction:g}"
    if shortfall == "image":
        raise CommandError(
            f"{fraction} sends all {args.defective + args.free} train+val images to val, "
            "leaving train none to train on: lower --val-fraction (or raise --defective/--free)"
        )
    raise CommandError(
        f"{fraction} sends all {args.defective} defective train+val image(s) to val, leaving "
        "train none to learn scratches from: lower --val-fraction (or raise --defective)"
    )


def _defect_free_warning(args: argparse.Namespace) -> str | None:
    """The warning of a dataset whose train split holds no defective image by the counts the
    user chose (--defective 0): allowed, as a defect-free set for false-alarm tests (or, with
    --free 0 too, a test split alone), but `splitdet data check` reports it and `splitdet
    train` cannot learn from it."""
    if args.defective > 0:
        return None
    if args.free == 0:
        return (
            "--defective 0 --free 0: train holds no image, so this dataset cannot train a "
            "detector (`splitdet data check` reports it as a problem); its test split serves "
            "`splitdet eval --split test`; give --defective N to train on it"
        )
    return (
        "--defective 0: train holds no defective image, so this dataset cannot train a "
        "detector (`splitdet data check` reports it as a problem); it serves defect-free tests "
        "(false alarms, with `splitdet predict` or `eval`); give --defective N to train on it"
    )


def _stopped(exc: KeyboardInterrupt, out: Path, overwrite: bool) -> int:
    """Print how synth was stopped, `splitdet synth: stopped on SIGTERM` (exit status 143) or
    `splitdet synth: interrupted` (Ctrl-C, 130), with what it left in ``out`` (`_left_text`),
    and return its exit status."""
    terminated = isinstance(exc, Terminated)
    how = "stopped on SIGTERM" if terminated else "interrupted"
    print(f"splitdet synth: {how}{_left_text(out, overwrite)}", file=sys.stderr)
    return SIGTERM_EXIT if terminated else 130


def _left_text(out: Path, overwrite: bool) -> str:
    """What a stopped synth left in ``out``, as "; ..." ("" when it wrote nothing there);
    `overwrite`: the command had --overwrite already (as `splitdet demo`'s synth has)."""
    from splitdet.training.voc_check_folder import is_unfinished_synth

    if not is_unfinished_synth(out):
        return ""
    again = "the same command" if overwrite else "the same command with --overwrite"
    return f"; {out} holds an unfinished dataset: rerun {again}"


def _generate(args: argparse.Namespace, out: Path) -> DatasetSummary:
    """`synth.generate_dataset` of ``args`` into ``out``, its bar on a terminal only."""
    from splitdet.shared.progress import progress_off
    from splitdet.training import synth

    return synth.generate_dataset(
        out,
        seed=args.seed,
        size=tuple(args.size),
        n_defective=args.defective,
        n_free=args.free,
        val_fraction=args.val_fraction,
        n_test_defective=args.test_defective,
        n_test_free=args.test_free,
        workers=args.workers,
        progress=not progress_off(args.no_progress) and not args.json,
        overwrite=args.overwrite,
    )


def _print_summary(args: argparse.Namespace, out: Path, summary: DatasetSummary) -> None:
    """What was written: JSON with --json, else the lines per split."""
    from splitdet.edge.cli_predict import json_text

    if args.json:  # (a name that is not UTF-8 as \xNN, as `predict --json` writes it)
        print(strict_dumps(json_text(summary.to_json()), indent=2))
        return
    parts = [
        f"{split}: {c['defective']} defective ({c['boxes']} scratches) + {c['free']} defect-free"
        for split, c in summary.counts.items()
    ]
    print(f"wrote {out} in {summary.seconds:.1f} s ({summary.seconds_per_image:.2f} s/image/core)")
    for line in parts:
        print(f"  {line}")
