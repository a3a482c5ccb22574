"""`splitdet bench`: end-to-end latency per defect rate, side by side with the baselines.

Only argparse and the standard library at import time; torch loads when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from splitdet.shared.cli import int_in

EPILOG = """\
example:
  splitdet bench --model models/gasket --checkpoint runs/cpu/best.pt --data data/gaskets \\
      --defect-rates 0.05,0.12,0.5 --images 100 --out bench-report
      writes bench-report/report.json, report.md, outcomes.csv (every image through every
      system), time_vs_defect_rate.png, reduction_vs_defect_rate.png and bytes_vs_map_kept.png

Systems, interleaved image by image on the same images and weights: monolithic (torchvision
Faster R-CNN, eager), monolithic-split-engines (the same detector on splitdet's engines in one
process: ONNX Runtime body and FPN, torch heads, for every image; the "vs same engines" column
is what the gate and the split save, the engine aside), paper (full FPN, gate, heads for
flagged images), splitdet-CODEC (ONNX Runtime edge with the lazy FPN + the cloud server in
another process over gRPC on loopback) and jpegQ-to-cloud (the image as JPEG, the whole
detector in the cloud).
"""


#: --images at most: beyond it a run would take months (and its streams gigabytes to hold).
MAX_IMAGES = 1_000_000


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) + 0.0 for v in text.split(","))  # + 0.0: -0.0 is 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None
    if not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"defect rates must be in [0, 1]: {text!r}")
    keys = [f"{v:g}" for v in values]  # the report's keys: a repeated rate would overwrite one
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise argparse.ArgumentTypeError(f"defect rate {twice} listed twice: {text!r}")
    return values


def _codecs(text: str) -> tuple[str, ...]:
    from splitdet.shared.codec import CODECS

    names = tuple(c.strip() for c in text.split(",") if c.strip())
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one codec of {', '.join(CODECS)}")
    unknown = [c for c in names if c not in CODECS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown codec {unknown[0]!r}; choose from {', '.join(CODECS)}"
        )
    twice = next((c for i, c in enumerate(names) if c in names[:i]), None)
    if twice is not None:  # two systems of one name would mix their outcomes
        raise argparse.ArgumentTypeError(f"codec {twice!r} listed twice: {text!r}")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `bench` subcommand."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark splitdet against the monolithic detector and the paper's model",
        description="End-to-end time per image, bytes on the wire and mAP kept, per defect rate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="from splitdet export")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="the checkpoint MODEL_DIR was exported from (runs the torch baselines)",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="VOC dataset")
    p.add_argument(
        "--split", default="test", help="split the streams are drawn from (default: %(default)s)"
    )
    p.add_argument(
        "--defect-rates",
        type=_floats,
        default=(0.05, 0.12, 0.5),
        metavar="R,R,...",
        help="defect rates, each from 0 to 1: one stream of --images images per rate "
        "(default: 0.05,0.12,0.5)",
    )
    p.add_argument(
        "--images",
        type=int_in(1, MAX_IMAGES),
        default=100,
        metavar="N",
        help="images per stream (a small split's images are repeated; report.md counts the "
        "unique ones; default: %(default)s)",
    )
    p.add_argument(
        "--codecs",
        type=_codecs,
        default=("int8", "fp16", "fp32"),
        metavar="C,C,...",
        help="splitdet codecs to compare (default: int8,fp16,fp32)",
    )
    p.add_argument(
        "--jpeg-quality",
        type=int_in(1, 100),
        default=95,
        metavar="Q",
        help="JPEG quality of jpegQ-to-cloud, 1-100 (default: %(default)s)",
    )
    p.add_argument(
        "--rd-images",
        type=int_in(0),
        default=20,
        metavar="N",
        help="defective images for the bytes-vs-mAP pass (0: skip it; default: %(default)s)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the streams' draws (default: %(default)s)"
    )
    p.add_argument(
        "--oracle-gate",
        action="store_true",
        help="the gate's verdict is the ground truth (the gate still runs and is "
        "timed): for timing untrained weights; labelled in the report",
    )
    p.add_argument(
        "--threads",
        type=int_in(1, 1024),
        default=None,
        help="threads per process, 1-1024 (default: all cores)",
    )
    p.add_argument(
        "--no-engine-baseline",
        action="store_true",
        help="leave out monolithic-split-engines (one more full detection per image)",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder of report.json, report.md, outcomes.csv, the figures and the servers' "
        "logs (cloud.log, jpeg_server.log); an earlier splitdet bench report there is "
        "replaced once this run has its first defect rate (the logs are this run's from its "
        "start), files of those names that bench did not write stop the run",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print report.md."""
    from splitdet.bench.streams import rates_problem
    from splitdet.shared.cli import CommandError

    # before anything loads: a stream that is not of its rate, or two rates of one stream
    problem = rates_problem("--defect-rates", args.defect_rates, "--images", args.images)
    if problem:
        raise CommandError(problem)

    from splitdet.bench.processes import ServiceError
    from splitdet.bench.run import BenchConfig, run_benchmark, written_by
    from splitdet.shared.checkpoint import CheckpointError
    from splitdet.shared.manifest import ManifestError
    from splitdet.training.voc import VocError

    config = BenchConfig(
        model_dir=Path(args.model),
        checkpoint=Path(args.checkpoint),
        data_dir=Path(args.data),
        out_dir=Path(args.out),
        defect_rates=args.defect_rates,
        n_images=args.images,
        codecs=args.codecs,
        jpeg_quality=args.jpeg_quality,
        rd_images=args.rd_images,
        split=args.split,
        seed=args.seed,
        threads=args.threads,
        oracle_gate=args.oracle_gate,
        engine_baseline=not args.no_engine_baseline,
        progress=not args.no_progress,
    )
    try:
        run_benchmark(config)
    except (ManifestError, CheckpointError, VocError, ServiceError, ValueError, OSError) as exc:
        message, done = str(exc), written_by(config)  # not an earlier run's report in --out
        if done:
            message += f"\nthe defect rates finished before it: {done}"
        raise CommandError(message) from None
    except KeyboardInterrupt:
        done = written_by(config)
        if done:
            print(f"splitdet bench: the defect rates finished so far: {done}", file=sys.stderr)
        raise
    print((config.out_dir / "report.md").read_text())
    return 0
