"""Command-line options shared by `splitdet predict` and `splitdet edge run`: how the edge model
runs (threshold, codec, threads, device) and how the cloud is reached.

Only argparse, os and pathlib at import time (the CLI loads this before anything heavy).
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.shared.cli import TOKEN_ENV, address_problem, read_pem, read_token

if TYPE_CHECKING:  # grpc: loaded when a client is configured
    from splitdet.edge.client import ClientConfig

#: The lowest box score `splitdet predict` reports and draws unless told (--score-threshold);
#: `edge run` stores every box the model returns.
PREDICT_SCORE_THRESHOLD = 0.5


def add_edge_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--threshold, --codec, --threads, --device: how the exported edge half runs."""
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="P",
        help="gate threshold on p(defect) (default: the manifest's calibrated one; above 1 "
        "flags nothing)",
    )
    add_codec_argument(parser)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="ONNX Runtime threads, 1-1024 (default: all cores)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="ONNX Runtime device (default: auto: CUDA when available)",
    )


#: Most ONNX Runtime threads --threads accepts (as the cloud's --threads).
MAX_THREADS = 1024


def threshold_problem(threshold: float | None) -> str | None:
    """The message refusing a --threshold that cannot be meant, or None (not given, or a
    p(defect) from 0 up: above 1 flags nothing, on purpose): NaN would pass every image as ok,
    unnoticed, a negative one flags every image as 0 does, and is stored as given, and an
    infinite one would be written as JSON's non-token Infinity (or null: "not gated")."""
    if threshold is None:
        return None
    if math.isnan(threshold):
        return "--threshold nan: must be a number (p(defect) from 0 to 1; above 1 flags nothing)"
    if threshold < 0:
        return (
            f"--threshold {threshold:g}: must be a p(defect) from 0 to 1 (0 flags every image, "
            "above 1 none)"
        )
    if math.isinf(threshold):  # (the records and JSON outputs could not hold it)
        return (
            f"--threshold {threshold:g}: must be a finite number (JSON has no infinity); "
            "any value above 1, such as 2, flags nothing"
        )
    return None


def check_edge_model_options(args: argparse.Namespace) -> None:
    """CommandError naming an `add_edge_model_arguments` value that cannot work: a NaN or
    negative --threshold (`threshold_problem`; above 1 flags nothing, on purpose) or --threads
    below 1."""
    from splitdet.shared.cli import CommandError

    problem = threshold_problem(args.threshold)
    if problem:
        raise CommandError(problem)
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise CommandError(
            f"--threads {args.threads}: must be 1-{MAX_THREADS} (omit it for all cores)"
        )


def add_codec_argument(parser: argparse.ArgumentParser) -> None:
    """--codec: the feature codec the edge encodes with (default: the manifest's)."""
    parser.add_argument(
        "--codec",
        choices=["fp32", "fp16", "int8"],
        default=None,
        help="feature codec (default: the manifest's)",
    )


def add_cloud_arguments(
    parser: argparse.ArgumentParser, required: bool, retried: bool = False
) -> None:
    """--cloud and the connection options (deadline, keepalive, TLS, mutual TLS, token);
    `retried`: the command sends a call again within --timeout (predict and eval), as its help
    says."""
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
        default=None,
        metavar="SECONDS",
        help=(
            f"deadline of each image's detection, seconds (default: {DEFAULT_TIMEOUT_S:g}): a "
            "call the cloud may answer later (unreachable, busy) is sent again within it"
            if retried
            else f"deadline of one Detect call, seconds (default: {DEFAULT_TIMEOUT_S:g})"
        ),
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=None,
        metavar="SECONDS",
        help="ping the cloud after SECONDS without a word from it: keeps a firewall's entry for "
        "an idle connection alive, and a connection it dropped silently is replaced before the "
        "next call; a ping unanswered within --timeout (it may wait behind a request on a slow "
        f"link) closes the connection (default: {DEFAULT_KEEPALIVE_S:g}; "
        f"{MIN_KEEPALIVE_S:g}-{MAX_TIMEOUT_S:g}, or 0: no pings)",
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
        help="bearer token (the file's first line that is not empty or a # comment); "
        f"default: the {TOKEN_ENV} environment variable if set",
    )
    parser.add_argument(
        "--name",
        type=_edge_name,
        default=None,
        metavar="NAME",
        help="this edge's name, sent with every call: the cloud's per-edge metrics and log "
        "lines show it (1-64 letters, digits, . _ - : @ /; default: the host name)",
    )


def _edge_name(text: str) -> str:
    """argparse type of --name."""
    from splitdet.shared.edge_name import check_edge_name

    try:
        return check_edge_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


#: --timeout when not given, seconds.
DEFAULT_TIMEOUT_S = 60.0
#: Longest --timeout accepted, seconds (a day): gRPC turns larger deadlines into nonsense.
MAX_TIMEOUT_S = 86400.0
#: --keepalive when not given, seconds: below the idle timeouts of common firewalls and NATs.
DEFAULT_KEEPALIVE_S = 30.0
#: Shortest --keepalive accepted, seconds: the cloud takes pings no more often than every 10 s
#: on a connection without calls (`grpc.http2.min_recv_ping_interval_without_data_ms`).
MIN_KEEPALIVE_S = 10.0
#: gRPC target schemes whose rest is a path or a name (not host:port).
_PATH_SCHEMES = ("unix:", "unix-abstract:", "xds:")


def check_cloud_addresses(text: str) -> str:
    """`--cloud` stripped, or CommandError naming what gRPC would misread: a missing or bad port
    (99999 wraps to another port), an IPv6 address without brackets, an empty dns: name, an
    unknown scheme. gRPC finds these only when the first flagged image is sent."""
    from splitdet.shared.cli import CommandError

    value = text.strip()
    problem = None
    if not value:
        problem = "no address given"
    elif value.startswith("dns:"):
        name = value[4:]
        if name.startswith("//"):  # dns://[authority]/host[:port]
            authority, _, name = name[2:].partition("/")
            if authority:
                problem = "a DNS server in dns://SERVER/ is not supported; use dns:///name:port"
        problem = problem or _endpoint_problem(name, port_required=False)
    elif value.startswith(("ipv4:", "ipv6:")):
        problem = _list_problem(value[5:].split(","), port_required=False)  # default 443
    elif value.startswith(_PATH_SCHEMES):
        if not value.partition(":")[2].strip("/"):
            problem = "no path or name after the scheme"
    elif re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", value):
        problem = "unknown scheme: use host:port, ip:port,ip:port or dns:///name:port"
    else:
        problem = _list_problem(value.split(","))
    if problem:
        raise CommandError(f"--cloud {text!r}: {problem}")
    return value


def _list_problem(endpoints: list[str], port_required: bool = True) -> str | None:
    for endpoint in endpoints:
        problem = _endpoint_problem(endpoint, port_required)
        if problem:  # name the bad one of several
            return f"{endpoint.strip()!r}: {problem}" if len(endpoints) > 1 else problem
    return None


def _endpoint_problem(endpoint: str, port_required: bool = True) -> str | None:
    """What is wrong with one "host:port" or "[v6]:port" to connect to, or None."""
    if not endpoint.strip():
        return "an empty address (expected host:port)"
    return address_problem(endpoint, port_required=port_required, port_zero=False)


#: Connection options that mean nothing without --cloud (argparse dests).
CONNECTION_OPTIONS = (
    "timeout",
    "keepalive",
    "tls",
    "root_certs",
    "client_cert",
    "client_key",
    "server_name",
    "token_file",
    "name",
)


def connection_options_given(
    args: argparse.Namespace, names: Sequence[str] = CONNECTION_OPTIONS
) -> list[str]:
    """The connection options `names` (dests) given on the command line, as "--name",
    whatever their value (`--timeout 0` too): their defaults are None, or False for flags."""
    return [
        f"--{name.replace('_', '-')}"
        for name in names
        if getattr(args, name, None) is not None and getattr(args, name) is not False
    ]


def client_config(args: argparse.Namespace, alone: str | None = None) -> ClientConfig | None:
    """The ClientConfig the options describe (None when --cloud was not given). `alone`:
    what runs without --cloud (e.g. "the cloud half runs in this process"); when given, a
    connection option given without --cloud is refused, saying so (it would be ignored)."""
    from splitdet.edge.client import ClientConfig
    from splitdet.shared.cli import CommandError
    from splitdet.shared.edge_name import default_edge_name

    if args.cloud is None:  # ("" is an address given empty: refused below)
        given = connection_options_given(args)
        if alone is not None and given:
            raise CommandError(f"{', '.join(given)}: for --cloud only ({alone})")
        return None
    addresses = check_cloud_addresses(args.cloud)
    timeout = DEFAULT_TIMEOUT_S if args.timeout is None else args.timeout
    if not (math.isfinite(timeout) and 0 < timeout <= MAX_TIMEOUT_S):
        raise CommandError(
            f"--timeout {timeout:g}: must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]"
        )
    keepalive = DEFAULT_KEEPALIVE_S if args.keepalive is None else args.keepalive
    if not (keepalive == 0 or MIN_KEEPALIVE_S <= keepalive <= MAX_TIMEOUT_S):  # (NaN too)
        raise CommandError(
            f"--keepalive {keepalive:g}: must be 0 (no pings) or a number of seconds in "
            f"[{MIN_KEEPALIVE_S:g}, {MAX_TIMEOUT_S:g}]"
        )
    for option, path, kind in (("--root-certs", args.root_certs, "certificate"),
                               ("--client-cert", args.client_cert, "certificate"),
                               ("--client-key", args.client_key, "private key")):  # fmt: skip
        # read now, not when the first flagged image is sent (the channel is built lazily)
        if path is not None:
            read_pem(option, path, kind)
    if args.client_cert is not None and args.client_key is not None:
        check_client_pair(args.client_cert, args.client_key)
    try:
        return ClientConfig(
            addresses,
            timeout_s=timeout,
            keepalive_time_s=keepalive,
            tls=args.tls,
            root_certs=args.root_certs,
            client_cert=args.client_cert,
            client_key=args.client_key,
            server_name=args.server_name,
            token=read_token(args.token_file),
            edge_name=args.name or default_edge_name(),
        )
    except ValueError as exc:
        raise CommandError(str(exc)) from None


def check_client_pair(cert: Path, key: Path) -> None:
    """CommandError naming --client-key and --client-cert when the key is not the
    certificate's, is encrypted, or cannot be read as a key: gRPC would say only "Invalid
    private key" and "Failed to create security handshaker" at the first call. Checked as
    `splitdet cloud` checks its own pair (cli_cloud.check_tls_files), with stdlib ssl (no
    torch, no grpc)."""
    import ssl

    from splitdet.shared.cli import CommandError

    def no_password() -> bytes:
        raise CommandError(
            f"--client-key {key}: encrypted; gRPC needs the unencrypted key of --client-cert "
            + str(cert)
        )

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # judge the files, not this OpenSSL's key policy
    try:
        context.load_cert_chain(cert, key, password=no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CommandError(
                f"--client-key {key}: not the key of --client-cert {cert} (give the key the "
                "certificate was issued for)"
            ) from None
        raise CommandError(
            f"--client-cert {cert} / --client-key {key}: a damaged or unsupported certificate "
            "or private key"
        ) from None
