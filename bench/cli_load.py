"""`splitdet loadtest`: answers per second and latency of a cloud, at 1, 2, 4... edges at once.

    splitdet loadtest defects/ --model models/gasket --cloud 10.0.0.5:50051 --clients 1,2,4,8
    splitdet loadtest defects/ --model models/gasket          # starts a cloud on loopback

Top-level imports are stdlib only (see splitdet.shared.cli); the work loads in the handler.
Torch-free unless it starts the cloud itself (in a child process).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from splitdet.edge.cloud_args import (
    add_cloud_arguments,
    add_codec_argument,
    client_config,
    connection_options_given,
)
from splitdet.shared.cli import float_in, int_in
from splitdet.shared.cores import usable_cores

if TYPE_CHECKING:  # the handler imports these when it runs
    import contextlib

    from splitdet.bench.processes import ServiceProcess
    from splitdet.edge.client import ClientConfig, CloudClient
    from splitdet.shared.wire import detection_pb2 as pb

EPILOG = """\
examples:
  splitdet loadtest defects/ --model models/gasket --cloud 10.0.0.5:50051 --token-file t.txt
      the cloud as deployed: 1, 2, 4 and 8 edges sending at once, 20 s each
  splitdet loadtest defects/ --model models/gasket --max-concurrent 4 --clients 1,2,4,8
      a cloud started here on loopback (same machine: the edges' encoding is not timed, but
      the client threads share its cores)

The images (files or folders) are run through the edge half once (every one, whatever the
gate says) and their requests sent round-robin; each call carries a new request id, so the
server computes every answer (its answers store keeps them, up to its --answers-cap). An edge
whose call fails backs off as the edge daemon does (0.5 s doubling) before it tries again;
latency is from a request's first try to its answer, over every request sent: one still
unanswered when the level ends counts at the time it waited ("no answer"; a percentile that
falls on one shows as ">N ms", at least). Latencies show to 3 significant digits. A
percentile needs enough requests to be more than the slowest one (p50 2, p90 10, p99 100):
with fewer it shows "-" (null in the JSON) and a note gives the slowest ("max of N").
"per edge" is the fewest and most answers one edge got (far apart: the server is unfair to
some edges). A level with calls failed other than as
busy (the server died, hung past --timeout, or the network failed) is not the server's
capacity: the table warns under it, the JSON lists it in "failed_levels", and the exit status
is 1 (0: every level measured without one; 2: a usage error, an edge's first call failing, or
the cloud started here dying, the end of its log quoted; 130: interrupted (Ctrl-C); 143:
stopped on SIGTERM). --json FILE is
written at the start, after each level and at the end: "complete" false
and "error" the message when the run failed or was stopped (null when it finished). Sizing:
a cloud answering A images/s serves A / (F x R) cameras taking F images/s each, of which it
flags a fraction R (`splitdet eval --model` reports flagged_fraction; on the line, `edge status`
gives the verdict counts it follows from).
"""


#: The limits of the cloud loadtest starts without --cloud, when not given: option dest -> value.
#: Its threads are the usable cores (not `os.cpu_count()`, every core of the host: a cloud
#: pinned to 2 of 64 ran 64 torch threads on 2 cores, and measured far below its capacity).
STARTED_CLOUD = {"max_concurrent": 2, "max_queued": 8, "cloud_threads": usable_cores()}


def _levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts such as 1,2,4, got {text!r}") from None
    if not levels or any(not 1 <= n <= 256 for n in levels):
        raise argparse.ArgumentTypeError(f"each count must be 1..256, got {text!r}")
    return levels


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `loadtest` subcommand."""
    p = subparsers.add_parser(
        "loadtest",
        help="answers per second and latency of a cloud, at 1, 2, 4... edges at once",
        description="Send real detection requests to a cloud server from several edges at "
        "once and report, per number of edges, the answers per second, the latency an edge "
        "sees (p50/p90/p99) and the calls refused because the server was busy.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="from splitdet export")
    add_cloud_arguments(p, required=False)
    add_codec_argument(p)
    p.add_argument(
        "--clients",
        type=_levels,
        default=[1, 2, 4, 8],
        metavar="N,N,...",
        help="numbers of edges sending at once, one measurement each (default: 1,2,4,8)",
    )
    p.add_argument(
        "--seconds",
        type=float_in(0.5, 3600.0),
        default=20.0,
        metavar="S",
        help="how long each measurement sends (default: 20)",
    )
    p.add_argument(
        "--distinct",
        type=int_in(1, 1000),
        default=8,
        metavar="N",
        help="at most N images made into requests (default: 8)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int_in(1, 1024),
        metavar="N",
        help=f"without --cloud: the started cloud's --max-concurrent (default: "
        f"{STARTED_CLOUD['max_concurrent']})",
    )
    p.add_argument(
        "--max-queued",
        type=int_in(0, 256),
        metavar="N",
        help=f"without --cloud: the started cloud's --max-queued (default: "
        f"{STARTED_CLOUD['max_queued']})",
    )
    p.add_argument(
        "--cloud-threads",
        type=int_in(1, 1024),
        metavar="N",
        help="without --cloud: the started cloud's torch threads (default: the cores this "
        "process may run on, its CPU affinity)",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    p.set_defaults(handler=run)


def _naming(path: Path, exc: Exception) -> str:
    """An image's problem `exc` as "PATH: what", the path once: an ImageError names its file
    already (its message starts with it)."""
    text = str(exc)
    return text if text.startswith(f"{path}: ") else f"{path}: {text}"


def _requests(args: argparse.Namespace) -> tuple[list[pb.DetectRequest], str, list[str], str]:
    """(DetectRequests, the model fingerprint, problems with images, the codec they were
    encoded with: --codec or the manifest's) from the edge half."""
    from splitdet.edge.cli_predict import log_scan
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.predict import scan_inputs
    from splitdet.edge.preprocess import ImageError
    from splitdet.edge.runtime import EdgeRuntime
    from splitdet.shared.cli import CommandError
    from splitdet.shared.manifest import ManifestError
    from splitdet.shared.messages import build_request

    try:
        pipeline = EdgePipeline(EdgeRuntime(Path(args.model)), codec=args.codec, gate=False)
    except (ManifestError, ValueError, RuntimeError) as exc:
        raise CommandError(f"--model {args.model}: {exc}") from None
    fingerprint = pipeline.manifest.fingerprint
    requests, problems = [], []
    scan = scan_inputs([Path(p) for p in args.images])  # (as predict's: what it skips, said)
    log_scan(scan, recursive=False, recursive_option=False)
    for path in scan.paths:
        if len(requests) == args.distinct:
            break
        try:
            result = pipeline.process_file(path)
        except ImageError as exc:
            problems.append(_naming(path, exc))
            continue
        requests.append(build_request(result.encoded, result.meta, "base", fingerprint))
    if not requests:
        detail = f" ({problems[0]})" if problems else ""
        raise CommandError(f"no usable image among {' '.join(args.images)}{detail}")
    return requests, fingerprint, problems, pipeline.codec


#: The JSON's "error" while the run goes on: what a file left by a run killed outright says.
NOT_FINISHED = "the run did not finish: it is still running, or was killed before it could say why"


def run(args: argparse.Namespace) -> int:
    """Measure each level of ``args.clients``; see EPILOG. 0: every level measured without a
    failed call; 1: every level measured, but some had calls failed other than as busy.

    Past the option checks, --json FILE is always written: at the start (``"complete":
    false`` with NOT_FINISHED, so no earlier run's file is left looking like this one's), after
    each level, and at the end, with ``"error"`` the message of a run that failed or was
    stopped (None when it ran to its end)."""
    from splitdet.edge.cli_predict import check_outputs
    from splitdet.shared.cli import CommandError, refuse_closed_stdout

    _check_json_folder(args.json)
    check_outputs(args.json)
    if args.json in (None, "-"):  # (`>&-`: the results go there)
        refuse_closed_stdout("--json - writes the results there" if args.json else
                             "loadtest prints its table there (give --json FILE)")  # fmt: skip
    config = client_config(args)  # a malformed --cloud or unreadable TLS file: refused first
    if config is None:
        given = connection_options_given(args, CLIENT_ONLY)  # (an empty value counts too)
        if given:
            raise CommandError(f"{', '.join(given)}: for --cloud only (the cloud started here "
                               "is plaintext on loopback)")  # fmt: skip
        for name, default in STARTED_CLOUD.items():  # (the options' defaults are None)
            if getattr(args, name) is None:
                setattr(args, name, default)
    else:
        given = connection_options_given(args, tuple(STARTED_CLOUD))
        if given:  # a cloud given by --cloud keeps its own limits: they would be ignored
            raise CommandError(f"{', '.join(given)}: for the cloud started here only, without "
                               f"--cloud (the cloud at {args.cloud} keeps its own)")  # fmt: skip
    report = {
        "cloud": args.cloud,
        "model_fingerprint": None,  # known once the model is loaded
        "request_mb": None,
        "seconds": args.seconds,
        "settings": _settings(args, args.codec),
        "levels": [],
        "failed_levels": [],  # the levels (edges) with calls failed other than as busy
        "complete": False,  # True once every level of --clients is measured
        "error": NOT_FINISHED,
    }
    _save(args.json, report, final=False)
    try:
        _run(args, config, report)
    except BaseException as exc:  # Ctrl-C and bugs too: the file says the run did not finish
        report["error"] = _describe(exc)
        try:
            _save(args.json, report, final=True)
        except CommandError as write_error:  # keep the run's own error; say this one too
            print(f"splitdet loadtest: error: {write_error}", file=sys.stderr)
        raise
    report["complete"], report["error"] = True, None
    _save(args.json, report, final=True)
    if report["failed_levels"]:
        counts = ", ".join(str(n) for n in report["failed_levels"])
        print(f"splitdet loadtest: calls failed at {counts} edge(s), other than busy refusals: "
              "those levels measured a failing server or network, not its capacity",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _run(args: argparse.Namespace, config: ClientConfig | None, report: dict) -> None:
    """The run past the option checks: the requests, the cloud (started here without
    --cloud), every level; fills ``report`` as it goes."""
    import contextlib
    import tempfile

    from splitdet.edge.client import ClientConfig

    requests, fingerprint, problems, codec = _requests(args)
    for line in problems:
        print(f"splitdet loadtest: skipped {line}", file=sys.stderr)
    size_mb = sum(r.ByteSize() for r in requests) / len(requests) / 1e6
    report["model_fingerprint"] = fingerprint
    report["request_mb"] = round(size_mb, 3)
    report["settings"]["codec"] = codec
    cloud = None
    with contextlib.ExitStack() as stack:
        if config is None:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            cloud = _start_cloud(args, scratch, stack)
            config = ClientConfig(f"127.0.0.1:{cloud.ready['port']}", edge_name=args.name)
            report["cloud"] = (
                f"a cloud started here (--max-concurrent {args.max_concurrent}, "
                f"--max-queued {args.max_queued})"
            )
        _measure(args, config, requests, size_mb, report, cloud)


def _describe(exc: BaseException) -> str:
    """The "error" of the JSON for a run ended by ``exc``: the line the console shows."""
    from splitdet.shared.cli import CommandError
    from splitdet.shared.sigterm import Terminated

    if isinstance(exc, CommandError):
        return str(exc)
    if isinstance(exc, Terminated):
        return "stopped on SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {exc}"


def _save(json_file: str | None, report: dict, final: bool) -> None:
    """Write ``report`` to --json: a file at any time, stdout ("-") only at the end."""
    from splitdet.edge.cli_predict import write_json

    if json_file and (final or json_file != "-"):
        write_json(json_file, report)


def _check_json_folder(json_file: str | None) -> None:
    """Refuse a --json FILE under a path that is a file, not a folder (check_outputs would
    say the folder "does not exist"): CommandError naming the file in the way."""
    from splitdet.shared.cli import CommandError

    if not json_file or json_file == "-":
        return
    for folder in Path(json_file).parents:
        if folder.exists():
            if not folder.is_dir():
                raise CommandError(f"--json {json_file}: {folder} is a file, not a folder")
            return


def _settings(args: argparse.Namespace, codec: str) -> dict:
    """The options the measurement ran with; the cloud's limits when it was started here (a
    cloud given by --cloud keeps its own, unknown here: None)."""
    started = args.cloud is None
    return {
        "codec": codec,
        "clients": list(args.clients),
        "distinct": args.distinct,
        "seconds": args.seconds,
        "max_concurrent": args.max_concurrent if started else None,
        "max_queued": args.max_queued if started else None,
        "cloud_threads": args.cloud_threads if started else None,
    }


#: Client options that only mean something with --cloud.
CLIENT_ONLY = ("tls", "root_certs", "client_cert", "client_key", "server_name", "token_file")


def _measure(
    args: argparse.Namespace,
    config: ClientConfig,
    requests: list[pb.DetectRequest],
    size_mb: float,
    report: dict,
    cloud: ServiceProcess | None,
) -> None:
    """Run every level of ``args.clients``: print each row, append it to ``report["levels"]``
    (and its edge count to ``report["failed_levels"]`` when calls failed other than as busy)
    and save the report to --json."""
    import dataclasses

    from splitdet.bench.load import measure_level
    from splitdet.edge.client import CloudClient, CloudError
    from splitdet.shared.cli import CommandError

    out = sys.stderr if args.json == "-" else sys.stdout  # stdout then holds the JSON
    print(f"{len(requests)} request(s) of {size_mb:.2f} MB on average to {report['cloud']}",
          file=out)  # fmt: skip
    print(f"{'edges':>5} {'answered':>8} {'no answer':>9} {'answers/s':>9} {'p50 ms':>8} "
          f"{'p90 ms':>8} {'p99 ms':>8} {'busy':>6} {'per edge':>9}  failed", file=out)  # fmt: skip
    base_name = (config.edge_name or "loadtest")[:54]
    for clients in args.clients:

        def make_client(k: int) -> CloudClient:
            name = f"{base_name}-load{k}"  # the k-th edge keeps its name across levels
            return CloudClient(dataclasses.replace(config, edge_name=name, own_connection=True))

        try:
            level = measure_level(make_client, requests, clients, args.seconds)
        except CloudError as exc:
            if cloud is not None and cloud.process.poll() is not None:
                raise CommandError(_cloud_died(cloud, str(exc))) from None
            raise CommandError(f"the first call of an edge failed: {exc}") from None
        if cloud is not None and cloud.process.poll() is not None:
            raise CommandError(_cloud_died(cloud, f"measuring {clients} edge(s)"))
        row = level.to_json()
        report["levels"].append(row)
        if row["failed"]:
            report["failed_levels"].append(clients)
        _print_row(row, out)
        _save(args.json, report, final=False)


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, in plain notation: 0.0123, 45.7, 128, 1230
    (what a latency measured to the microsecond but varying by the millisecond supports)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if abs(rounded) >= 10 ** (digits - decimals):  # rounded up a digit: 99.96 is 100, not 100.0
        decimals -= 1
        rounded = round(value, decimals)
    return f"{rounded:.{max(decimals, 0)}f}"


def _print_row(row: dict, out: TextIO) -> None:
    """One level's line of the table, and its warnings below it.

    Latencies in ms to 3 significant digits (the JSON keeps them to 0.1 ms). A percentile that
    fell on a request never answered is shown as ">N": it waited at least that long. One the
    level had too few requests for (`load.MIN_SAMPLES`) is "-", and a note under the row gives
    the slowest request instead."""
    from splitdet.bench.load import MIN_SAMPLES

    clients, lat, per_edge = row["clients"], row["latency_ms"], row["answered_per_edge"]
    at_least = row["latency_at_least"]
    cells = [
        f"{'>' if q in at_least else ''}{significant(lat[q])}" if lat[q] is not None else "-"
        for q in lat
    ]
    failed = ", ".join(f"{k} {v}" for k, v in row["failed"].items()) or "0"
    spread = f"{per_edge['min']}-{per_edge['max']}"
    print(f"{clients:>5} {row['answered']:>8} {row['unanswered']:>9} "
          f"{row['answers_per_second']:>9.2f} {' '.join(f'{c:>8}' for c in cells)} "
          f"{row['busy']:>6} {spread:>9}  {failed}", file=out)  # fmt: skip
    if row["failed"]:
        print(f"      warning: at {clients} edge(s) calls failed ({failed}), not refused as busy: "
              "this level measured a failing server or network, not its capacity",
              file=out)  # fmt: skip
    if row["edges_unanswered"]:
        print(f"      warning: {row['edges_unanswered']} of {clients} edges got no answer",
              file=out)  # fmt: skip
    if row["latency_at_least"]:
        print(f"      note: {row['unanswered']} request(s) still unanswered at the end count in "
              "the latency at the time they waited (>: at least)", file=out)  # fmt: skip
    n, slowest = row.get("latency_samples"), row.get("latency_max_ms")
    short = [f"p{q} {MIN_SAMPLES[q]}" for q in MIN_SAMPLES if n is not None and n < MIN_SAMPLES[q]]
    if short and n:
        bound = ">" if "max" in at_least else ""
        print(f"      note: {n} request(s), too few for {', '.join(q.split()[0] for q in short)} "
              f"(-: they need {', '.join(short)}); max of {n}: {bound}{significant(slowest)} ms",
              file=out)  # fmt: skip


def _cloud_died(cloud: ServiceProcess, during: str) -> str:
    """The error for the cloud started here ending mid-run: its exit status and the end of its
    log, quoted (the log itself goes with the run's scratch folder)."""
    return (
        f"the {cloud.name} started here exited with status {cloud.process.returncode} mid-run "
        f"({during}). The end of its log:\n{cloud.tail(10)}"
    )


def _start_cloud(
    args: argparse.Namespace, scratch: Path, stack: contextlib.ExitStack
) -> ServiceProcess:
    """A cloud server on loopback for the run (a ServiceProcess), stopped when ``stack``
    closes; it keeps answers in a store as a deployed one does."""
    from splitdet.bench.processes import ServiceError, ServiceProcess, splitdet_command
    from splitdet.shared.cli import CommandError

    command = splitdet_command(
        "cloud", "--model", str(args.model), "--listen", "127.0.0.1:0",
        "--threads", str(args.cloud_threads), "--max-concurrent", str(args.max_concurrent),
        "--max-queued", str(args.max_queued),
        "--answers-db", str(scratch / "answers.sqlite"),
        "--ready-file", str(scratch / "ready.json"),
    )  # fmt: skip
    cloud = ServiceProcess(
        command,
        log_path=scratch / "cloud.log",
        name="cloud server",
        ready_file=scratch / "ready.json",
    )
    try:
        stack.enter_context(cloud)
    except ServiceError as exc:
        raise CommandError(str(exc)) from None
    return cloud
