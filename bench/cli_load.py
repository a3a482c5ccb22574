"""`splitdet loadtest`: answers per second and latency of a cloud, at 1, 2, 4... edges at once.

    splitdet loadtest defects/ --model models/gasket --cloud 10.0.0.5:50051 --clients 1,2,4,8
    splitdet loadtest defects/ --model models/gasket          # starts a cloud on loopback

Top-level imports are stdlib only (see splitdet.shared.cli); the work loads in the handler.
Torch-free unless it starts the cloud itself (in a child process).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.edge.cloud_args import add_cloud_arguments, add_codec_argument, client_config
from splitdet.shared.cli import float_in, int_in

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
latency is from a request's first try to its answer, and "per edge" the fewest and most
answers one edge got (far apart: the server is unfair to some edges). Sizing:
a cloud answering A images/s serves A / (F x R) cameras taking F images/s each, of which it
flags a fraction R (`splitdet eval --model` reports flagged_fraction; on the line, `edge status`
gives the verdict counts it follows from).
"""


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
        default=2,
        metavar="N",
        help="without --cloud: the started cloud's --max-concurrent (default: 2)",
    )
    p.add_argument(
        "--max-queued",
        type=int_in(0, 256),
        default=8,
        metavar="N",
        help="without --cloud: the started cloud's --max-queued (default: 8)",
    )
    p.add_argument(
        "--cloud-threads",
        type=int_in(1, 1024),
        default=os.cpu_count() or 1,
        metavar="N",
        help="without --cloud: the started cloud's torch threads (default: all cores)",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    p.set_defaults(handler=run)


def _requests(args: argparse.Namespace) -> tuple[list[pb.DetectRequest], str, list[str], str]:
    """(DetectRequests, the model fingerprint, problems with images, the codec they were
    encoded with: --codec or the manifest's) from the edge half."""
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.preprocess import ImageError, list_images
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
    for path in list_images([Path(p) for p in args.images]):
        if len(requests) == args.distinct:
            break
        try:
            result = pipeline.process_file(path)
        except ImageError as exc:
            problems.append(f"{path}: {exc}")
            continue
        requests.append(build_request(result.encoded, result.meta, "base", fingerprint))
    if not requests:
        detail = f" ({problems[0]})" if problems else ""
        raise CommandError(f"no usable image among {' '.join(args.images)}{detail}")
    return requests, fingerprint, problems, pipeline.codec


def run(args: argparse.Namespace) -> int:
    """Measure each level of ``args.clients``; see EPILOG."""
    import contextlib
    import tempfile

    from splitdet.edge.cli_predict import check_outputs, write_json
    from splitdet.edge.client import ClientConfig
    from splitdet.shared.cli import CommandError

    check_outputs(args.json, None)
    config = client_config(args)  # a malformed --cloud or unreadable TLS file: refused first
    if config is None:
        given = [f"--{n.replace('_', '-')}" for n in CLIENT_ONLY if getattr(args, n, None)]
        if given:
            raise CommandError(f"{', '.join(given)}: for --cloud only (the cloud started here "
                               "is plaintext on loopback)")  # fmt: skip
    requests, fingerprint, problems, codec = _requests(args)
    for line in problems:
        print(f"skipped: {line}", file=sys.stderr)
    size_mb = sum(r.ByteSize() for r in requests) / len(requests) / 1e6
    levels: list[dict] = []
    report = {
        "cloud": args.cloud,
        "model_fingerprint": fingerprint,
        "request_mb": round(size_mb, 3),
        "seconds": args.seconds,
        "settings": _settings(args, codec),
        "levels": levels,
        "complete": False,  # True once every level of --clients is measured
    }
    cloud = None
    try:
        with contextlib.ExitStack() as stack:
            if config is None:
                scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                cloud = _start_cloud(args, scratch, stack)
                config = ClientConfig(f"127.0.0.1:{cloud.ready['port']}", edge_name=args.name)
                report["cloud"] = (
                    f"a cloud started here (--max-concurrent {args.max_concurrent}, "
                    f"--max-queued {args.max_queued})"
                )
            _measure(args, config, requests, size_mb, levels, report["cloud"], cloud)
            report["complete"] = True
    finally:  # also after a failure mid-run: the levels measured so far are kept
        if args.json and levels:
            write_json(args.json, report)
    return 0


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
    levels: list[dict],
    where: str,
    cloud: ServiceProcess | None,
) -> None:
    """Run every level of ``args.clients``, appending each row to ``levels`` and printing it."""
    import dataclasses

    from splitdet.bench.load import measure_level
    from splitdet.edge.client import CloudClient, CloudError
    from splitdet.shared.cli import CommandError

    out = sys.stderr if args.json == "-" else sys.stdout  # stdout then holds the JSON
    print(f"{len(requests)} request(s) of {size_mb:.2f} MB on average to {where}", file=out)
    print(f"{'edges':>5} {'answered':>8} {'answers/s':>9} {'p50 ms':>8} {'p90 ms':>8} "
          f"{'p99 ms':>8} {'busy':>6} {'per edge':>9}  failed", file=out)  # fmt: skip
    base_name = (config.edge_name or "loadtest")[:54]
    for clients in args.clients:

        def make_client(k: int) -> CloudClient:
            name = f"{base_name}-load{k}"  # the k-th edge keeps its name across levels
            return CloudClient(dataclasses.replace(config, edge_name=name, own_connection=True))

        try:
            level = measure_level(make_client, requests, clients, args.seconds)
        except CloudError as exc:
            if cloud is not None and cloud.process.poll() is not None:
                raise CommandError(str(cloud.failed_mid_run(str(exc)))) from None
            raise CommandError(f"the first call of an edge failed: {exc}") from None
        if cloud is not None and cloud.process.poll() is not None:
            raise CommandError(str(cloud.failed_mid_run(f"{clients} edges")))
        row = level.to_json()
        levels.append(row)
        lat, per_edge = row["latency_ms"], row["answered_per_edge"]
        cells = [f"{lat[q]:8.1f}" if lat[q] is not None else f"{'-':>8}" for q in lat]
        failed = ", ".join(f"{k} {v}" for k, v in row["failed"].items()) or "0"
        spread = f"{per_edge['min']}-{per_edge['max']}"
        print(f"{clients:>5} {row['answered']:>8} {row['answers_per_second']:>9.2f} "
              f"{' '.join(cells)} {row['busy']:>6} {spread:>9}  {failed}", file=out)  # fmt: skip
        if row["edges_unanswered"]:
            print(f"      warning: {row['edges_unanswered']} of {clients} edges got no answer: "
                  "latency describes the answered calls only", file=out)  # fmt: skip


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
