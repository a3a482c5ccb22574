"""Command-line options shared by `splitdet predict` and `splitdet edge run`: how the edge model
runs (threshold, codec, threads, device) and how the cloud is reached.

Only argparse, os and pathlib at import time (the CLI loads this before anything heavy).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from splitdet.shared.cli import TOKEN_ENV, read_token


def add_edge_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--threshold, --codec, --threads, --device: how the exported edge half runs."""
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="P",
        help="gate threshold on p(defect) (default: the manifest's calibrated one)",
    )
    parser.add_argument(
        "--codec",
        choices=["fp32", "fp16", "int8"],
        default=None,
        help="feature codec (default: the manifest's)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="ONNX Runtime threads (default: all cores)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="ONNX Runtime device (default: auto: CUDA when available)",
    )


def add_cloud_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    """--cloud and the connection options (deadline, TLS, mutual TLS, token)."""
    parser.add_argument(
        "--cloud",
        required=required,
        default=None,
        metavar="ADDRESS[,ADDRESS...]",
        help="cloud detection server(s): host:port, several ip:port balanced round-robin, "
        "or a dns:/// name resolving to every replica",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="deadline of one Detect call (default: %(default)s)",
    )
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's roots")
    parser.add_argument(
        "--root-certs",
        type=Path,
        metavar="PEM",
        help="CA bundle to verify the cloud with (implies TLS)",
    )
    parser.add_argument(
        "--client-cert", type=Path, metavar="PEM", help="client certificate chain for mutual TLS"
    )
    parser.add_argument("--client-key", type=Path, metavar="PEM", help="client private key")
    parser.add_argument(
        "--server-name", metavar="NAME", help="TLS name to expect instead of the address's host"
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"bearer token (the file's first line); default: the {TOKEN_ENV} environment "
        "variable if set",
    )


def client_config(args: argparse.Namespace):
    """The ClientConfig the options describe (None when --cloud was not given)."""
    from splitdet.edge.client import ClientConfig
    from splitdet.shared.cli import CommandError

    if not args.cloud:
        return None
    for option, path in (("--root-certs", args.root_certs), ("--client-cert", args.client_cert),
                         ("--client-key", args.client_key)):  # fmt: skip
        # read now, not when the first flagged image is sent (the channel is built lazily)
        if path is not None:
            try:
                Path(path).read_bytes()
            except OSError as exc:
                raise CommandError(
                    f"{option} {path}: cannot read ({exc.strerror or exc})"
                ) from None
    try:
        return ClientConfig(
            args.cloud,
            timeout_s=args.timeout,
            tls=args.tls,
            root_certs=args.root_certs,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
            token=read_token(args.token_file),
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None
