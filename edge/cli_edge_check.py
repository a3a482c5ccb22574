"""`splitdet edge check`: whether this edge is ready before going live (the export, one image
through the gate, the cloud, one round trip), one line per step or JSON; the steps themselves
are edge.check's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from splitdet.edge.cloud_args import (
    add_cloud_arguments,
    add_codec_argument,
    check_cloud_addresses,
    client_config,
)
from splitdet.shared.strict_json import strict_dumps


def register_check(actions: argparse._SubParsersAction) -> None:
    """Add `check` to the actions of `splitdet edge`."""
    p = actions.add_parser(
        "check",
        help="is this edge ready: the export, one image, the cloud, one round trip",
        description="Check, before going live, what `edge run` needs: the export loads and "
        "matches its manifest; an image (--image, or a mid-grey test image) goes through the "
        "gate and the lazy completion; the cloud is SERVING, serves this export, and answers "
        "one Detect with its features. One line per step; exit status 0 when every step "
        "passed, 1 when one failed.",
        epilog="examples:\n  splitdet edge check --model models/gasket\n"
        "  splitdet edge check --model models/gasket --cloud 10.0.0.5:50051 --token-file t.txt "
        "--image sample.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, metavar="MODEL_DIR",
                   help="exported model directory (from splitdet export)")  # fmt: skip
    p.add_argument("--image", type=Path, metavar="FILE", help="an image from the camera")
    p.add_argument("--json", action="store_true", help="the steps as a JSON array")
    add_codec_argument(p)
    add_cloud_arguments(p, required=False)
    p.set_defaults(handler=check)  # fmt: skip


def check(args: argparse.Namespace) -> int:
    """Run edge.check's steps; see register_check."""
    from splitdet.shared.cli import refuse_closed_stdout

    refuse_closed_stdout("edge check prints its steps there")  # (`>&-`)
    from dataclasses import asdict

    from splitdet.edge.check import check_edge

    if args.cloud is not None:
        check_cloud_addresses(args.cloud)
    steps = check_edge(args.model, client_config(args), args.image, args.codec)
    if args.json:
        print(strict_dumps([asdict(step) for step in steps], indent=2))
    else:
        for step in steps:
            print(f"{'ok' if step.ok else 'FAIL':4}  {step.name:6}  {step.detail}")
    return 0 if all(step.ok for step in steps) else 1
