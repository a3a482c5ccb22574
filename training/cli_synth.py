"""`splitdet synth`: write a synthetic titanium-gasket scratch dataset (PASCAL VOC).

Only argparse and the standard library at import time; numpy and Pillow load when it runs.
"""

from __future__ import annotations

import argparse
import json
import os

from splitdet.shared.cli import int_in

EPILOG = """\
examples:
  splitdet synth --out data/gaskets
      the paper's layout at 2448x2048: train 432+160, val 108+40, test 108+40
      (defective + defect-free), written with all cores
  splitdet synth --out data/small --size 640x512 --defective 200 --free 80 --seed 1

The output is a standard VOC tree (JPEGImages/, Annotations/, ImageSets/Main/{train,val,test}.txt)
plus dataset.json with the settings. The same seed and size give the same images.
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
    """Generate the dataset described by ``args``."""
    from pathlib import Path

    from splitdet.shared.cli import CommandError
    from splitdet.training import synth

    if args.workers < 1:
        raise CommandError(f"--workers must be >= 1, got {args.workers}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise CommandError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.defective + args.free + args.test_defective + args.test_free == 0:
        raise CommandError("nothing to generate: every count is 0")
    out = Path(args.out)
    try:
        summary = synth.generate_dataset(
            out,
            seed=args.seed,
            size=tuple(args.size),
            n_defective=args.defective,
            n_free=args.free,
            val_fraction=args.val_fraction,
            n_test_defective=args.test_defective,
            n_test_free=args.test_free,
            workers=args.workers,
            progress=not args.no_progress and not args.json,
            overwrite=args.overwrite,
        )
    except synth.SyntheticDatasetExists as exc:
        raise CommandError(f"{exc}; --overwrite replaces it, or choose another --out") from None
    except FileExistsError as exc:  # a file, or a folder of other data: --overwrite cannot help
        raise CommandError(f"{exc}; choose another --out") from None
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # the only files synth touches are under --out
        raise CommandError(f"--out {args.out}: cannot write ({exc})") from None

    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        parts = [
            f"{split}: {c['defective']} defective ({c['boxes']} scratches) "
            f"+ {c['free']} defect-free"
            for split, c in summary.counts.items()
        ]
        print(
            f"wrote {out} in {summary.seconds:.1f} s ({summary.seconds_per_image:.2f} s/image/core)"
        )
        for line in parts:
            print(f"  {line}")
    return 0
