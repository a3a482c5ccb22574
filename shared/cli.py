"""The one `splitdet` command.

Each subcommand lives beside the code it drives, in a module whose top level imports nothing
heavy (no torch, no onnxruntime) and exposes `register(subparsers)`. That module adds its parser
and sets `handler` to a function `(args) -> int` that imports what it needs when it runs. So
`splitdet --help` works on an edge-only install, and an edge command never pulls in torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from splitdet.shared import __version__

#: Modules that register subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "splitdet.training.cli_synth",
    "splitdet.training.cli_train",
    "splitdet.training.cli_eval",
    "splitdet.training.cli_export",
    "splitdet.edge.cli_predict",
    "splitdet.cloud.cli_cloud",
    "splitdet.edge.cli_edge",
    "splitdet.bench.cli_bench",
    "splitdet.bench.cli_demo",
)


#: Modules only the full install has (training, export, the cloud server, the benchmark).
FULL_INSTALL_MODULES = ("torch", "torchvision", "onnx", "onnxscript", "pycocotools", "matplotlib")


def int_in(low: int, high: int | None = None):
    """An argparse `type` for whole numbers in [low, high] (no upper bound when `high` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}-{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand this install provides."""
    parser = argparse.ArgumentParser(
        prog="splitdet",
        description=(
            "Split edge/cloud surface-defect detection: a gate on the edge lets defect-free "
            "images skip detection; flagged images' FPN features go to a cloud detection server."
        ),
    )
    parser.add_argument("--version", action="version", version=f"splitdet {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging verbosity (default: INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the module exists but something it imports is missing
                raise
            continue  # this command is not part of this install
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `splitdet` console script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except CommandError as exc:
        print(f"splitdet {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in FULL_INSTALL_MODULES:
            print(
                f"splitdet {args.command}: error: this command needs {exc.name}, which the "
                "edge-only install leaves out; install splitdet[full]",
                file=sys.stderr,
            )
            return 2
        raise
    except KeyboardInterrupt:
        print(f"splitdet {args.command}: interrupted", file=sys.stderr)
        return 130


#: Environment variable read for the bearer token when --token-file is not given (edge and cloud).
TOKEN_ENV = "SPLITDET_CLOUD_TOKEN"


def read_token(token_file: Path | None) -> str | None:
    """The bearer token: `token_file`'s first line (a UTF-8 byte-order mark and surrounding
    whitespace dropped), else the SPLITDET_CLOUD_TOKEN environment variable, else None.

    CommandError if the file cannot be read, is empty, or the token holds anything but
    printable ASCII: gRPC refuses such metadata on every call, so the edge would otherwise
    find out only when its first flagged image fails.
    """
    if token_file is None:
        token, source = os.environ.get(TOKEN_ENV) or None, f"${TOKEN_ENV}"
        if token is None:
            return None
    else:
        try:
            lines = Path(token_file).read_text(encoding="utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read --token-file {token_file}: {exc}") from None
        token, source = (lines[0].strip() if lines else ""), f"--token-file {token_file}"
        if not token:
            raise CommandError(f"{source} is empty")
    bad = sorted({c for c in token if not " " <= c <= "~"})
    if bad:
        shown = ", ".join(f"U+{ord(c):04X}" for c in bad)
        raise CommandError(f"{source}: a token must be printable ASCII; it holds {shown}")
    return token


def add_box_refine_option(parser: argparse.ArgumentParser) -> None:
    """`--box-refine-steps N`: the checkpoint's box refinement replaced at inference."""
    parser.add_argument(
        "--box-refine-steps",
        type=int,
        default=None,
        metavar="N",
        help="extra passes of the box head over its own boxes at inference, 0-4 (default: the "
        "checkpoint's; the 'cpu' preset's is 2). Gives a checkpoint trained before box "
        "refinement existed the refinement, or takes it away; the checkpoint file is unchanged",
    )


if __name__ == "__main__":
    sys.exit(main())
