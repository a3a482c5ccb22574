"""`splitdet cloud`: serve a model directory's RPN + ROI heads over gRPC.

    splitdet cloud --model runs/model --listen 0.0.0.0:50051 --metrics-port 9464

Top-level imports are stdlib only (see splitdet.shared.cli); torch and grpc load in `run`.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
from pathlib import Path

from splitdet.shared.cli import TOKEN_ENV, read_token

EXAMPLE = """\
example:
  splitdet cloud --model runs/model --listen 0.0.0.0:50051 --metrics-port 9464 \\
      --tls-cert server.pem --tls-key server.key --client-ca edge-ca.pem --token-file token.txt

Stops on SIGTERM/SIGINT: health turns NOT_SERVING, new calls are refused, in-flight calls get
--grace seconds to finish, then the process exits 0.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cloud",
        help="serve the detection heads over gRPC (the cloud side)",
        description=(
            "Serve an exported model directory's RPN + ROI heads as the gRPC service "
            "splitdet.v1.Detection, with grpc.health.v1 health checking and Prometheus metrics."
        ),
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        metavar="MODEL_DIR",
        help="exported model directory (made by `splitdet export`)",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:50051",
        metavar="ADDRESS",
        help="gRPC address host:port; 0.0.0.0:PORT accepts other hosts, port 0 "
        "picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads for the heads (default: all cores)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=2,
        metavar="N",
        help="Detect calls running at once; more are refused with "
        "RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    parser.add_argument(
        "--max-message-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="largest gRPC message accepted, MiB (default: %(default)s; int8 "
        "features of an 800x960 input are ~16 MB, fp32 ~65 MB); larger "
        "messages are refused with RESOURCE_EXHAUSTED",
    )
    parser.add_argument(
        "--max-decoded-mib",
        type=int,
        default=256,
        metavar="MIB",
        help="largest float32 feature size one request may decode to, MiB (default: %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="on shutdown, time in-flight calls get to finish (default: %(default)s)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        metavar="PEM",
        help="server certificate chain; with --tls-key enables TLS",
    )
    parser.add_argument("--tls-key", type=Path, metavar="PEM", help="server private key")
    parser.add_argument(
        "--client-ca",
        type=Path,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS)",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"require this bearer token (file's first line); default: the "
        f"{TOKEN_ENV} environment variable if set, else no token",
    )
    parser.add_argument(
        "--reflection", action="store_true", help="serve gRPC server reflection (off by default)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics "
        "(default: off; 0 picks a free port)",
    )
    parser.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address of the metrics endpoint (default: %(default)s)",
    )
    parser.add_argument(
        "--answers-db",
        type=Path,
        default=Path("splitdet-cloud-answers.sqlite"),
        metavar="FILE",
        help="SQLite file keeping answers by request id, so a repeated request "
        "is answered without recomputing, also after a restart "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--answers-cap",
        type=int,
        default=100_000,
        metavar="N",
        help="answers kept, oldest evicted first; 0 disables (default: %(default)s)",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        metavar="FILE",
        help="once serving, write {pid, port, metrics_port, fingerprint} as "
        "JSON here (for supervisors and tests)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the ready line as JSON on stdout"
    )
    parser.add_argument("--debug-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from splitdet.cloud.server import MIB, ServerConfig, all_cores, serve
    from splitdet.shared.cli import CommandError
    from splitdet.shared.manifest import ManifestError

    try:
        config = ServerConfig(
            model_dir=args.model,
            listen=args.listen,
            threads=args.threads or all_cores(),
            max_concurrent=args.max_concurrent,
            max_message_bytes=args.max_message_mib * MIB,
            max_decoded_bytes=args.max_decoded_mib * MIB,
            grace_s=args.grace,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            client_ca=args.client_ca,
            token=read_token(args.token_file),
            reflection=args.reflection,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            answers_db=args.answers_db,
            answers_capacity=args.answers_cap,
            debug_delay_s=args.debug_delay,
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None

    def on_ready(server) -> None:
        info = {
            "pid": os.getpid(),
            "port": server.port,
            "metrics_port": server.metrics_port,
            "fingerprint": server.core.fingerprint,
            "security": config.security,
        }
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(json.dumps(info) + "\n")
            tmp.replace(args.ready_file)
        if args.json:
            print(json.dumps(info), flush=True)

    try:
        return serve(config, on_ready=on_ready)
    except (ManifestError, OSError) as exc:
        raise CommandError(str(exc)) from None
    except sqlite3.Error as exc:  # e.g. --answers-db names a file that is not SQLite
        raise CommandError(f"--answers-db {args.answers_db}: {exc}") from None
