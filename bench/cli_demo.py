"""`splitdet demo`: data, training, export, a live cloud + edge daemon + camera, a summary.

Only argparse and the standard library at import time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from splitdet.shared.cli import float_in, int_in

EPILOG = """\
example:
  splitdet demo                      # everything on built-in defaults, cached in the workdir
  splitdet demo --workdir /tmp/demo --images 200

First run: a synthetic dataset, the CPU training preset (about 30 minutes on 2 cores, with a
progress bar and the time left), gate calibration, export. Later runs reuse them and take a few
minutes: a cloud server and an edge daemon start as separate processes, a camera drops images
at a 5% defect rate into the daemon's hot folder, and the summary (images/s, defects with
boxes, bytes sent, mAP on the stream) is read back from the daemon's results database.
Annotated defect images, the results database and a short benchmark report stay in the
workdir. Ctrl-C stops every process the demo started.
"""


def default_workdir() -> Path:
    """$XDG_CACHE_HOME/splitdet/demo (or ~/.cache/splitdet/demo)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "splitdet" / "demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `demo` subcommand."""
    p = subparsers.add_parser(
        "demo",
        help="run the whole system end to end on built-in defaults",
        description="Synthetic data, training, export, then a live cloud server, edge daemon "
        "and camera, and a summary.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help=f"cache and outputs (default: {default_workdir()})",
    )
    p.add_argument(
        "--images", type=int_in(1, 1_000_000), default=100, help="images the camera sends (100)"
    )
    p.add_argument(
        "--defect-rate", type=float_in(0.0, 1.0), default=0.05, help="of the stream (0.05)"
    )
    p.add_argument(
        "--preset",
        default="cpu",
        choices=["cpu", "tiny"],
        help="training preset (cpu; tiny trains in seconds and detects little)",
    )
    p.add_argument(
        "--train-minutes",
        type=float_in(0.1),  # (0 would be train's "no budget": the preset's 1000 epochs)
        default=None,
        help="training budget, minutes, at least 0.1 (default: the preset's, 30 for cpu)",
    )
    p.add_argument(
        "--bench-images",
        type=int_in(0, 1_000_000),
        default=20,
        help="images per stream of the short benchmark (0: skip it)",
    )
    p.add_argument(
        "--threads",
        type=int_in(1, 1024),
        default=None,
        help="threads per process, 1-1024: training, evaluation, the benchmark, the live cloud "
        "and edge (default: torch's own count, its physical cores, to train and evaluate; "
        "all the cores the demo may run on for the benchmark, as `splitdet bench`; 2 each "
        "for the live cloud and edge, which share the machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo."""
    from splitdet.bench.demo import DemoConfig, run_demo
    from splitdet.bench.processes import ServiceError
    from splitdet.shared.cli import FULL_INSTALL, CommandError, has_full_install

    if not has_full_install():  # said at once, not after rendering its dataset
        raise CommandError(f"the demo trains, serves and benchmarks with torch; {FULL_INSTALL}")
    config = DemoConfig(
        workdir=args.workdir or default_workdir(),
        preset=args.preset,
        train_minutes=args.train_minutes,
        stream_images=args.images,
        defect_rate=args.defect_rate,
        bench_images=args.bench_images,
        threads=args.threads,
        progress=not args.no_progress,
    )
    try:
        run_demo(config)
    except (ServiceError, RuntimeError, TimeoutError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    return 0
