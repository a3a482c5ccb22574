"""`splitdet edge`: the camera-side daemon (`edge run`) and its results (`edge results`).

    splitdet edge run --model models/gasket --watch /data/camera --cloud 10.0.0.5:50051 \\
        --db /data/edge.sqlite --after archive --metrics-port 9465
    splitdet edge results --db /data/edge.sqlite --since 1h --json

This module builds the `edge` parser; each action is registered by the module that holds it:
cli_edge_run (run), cli_edge_results (results), cli_edge_maintenance (requeue, abandon, prune),
cli_edge_status (status), cli_edge_check (check) and cli_edge_collect (collect), with the
option helpers they share in cli_edge_options (the shift window, --arrived-from/--arrived-until, in
arrival_window). Top-level imports are stdlib only (see
splitdet.shared.cli); the daemon loads in the handler.
"""

from __future__ import annotations

import argparse

from splitdet.edge.cli_edge_check import register_check
from splitdet.edge.cli_edge_collect import register_collect
from splitdet.edge.cli_edge_maintenance import register_abandon, register_prune, register_requeue
from splitdet.edge.cli_edge_results import register_results
from splitdet.edge.cli_edge_run import register_run
from splitdet.edge.cli_edge_status import register_status

EDGE_EPILOG = """\
actions:
  splitdet edge run      watch a hot folder, classify, deliver defects to the cloud (the daemon)
  splitdet edge results  print the results database for other tools (--json, --csv)
  splitdet edge requeue  send requests the cloud refused (dead letters) again, once fixed
  splitdet edge abandon  make the waiting requests of a retired model export dead letters
  splitdet edge status   what the database holds: verdicts, the outbox, dead letters
  splitdet edge prune    delete old final results (edge run --keep-results does it hourly)
  splitdet edge check    is this edge ready: the export, one image, the cloud, one round trip
  splitdet edge collect  copy chosen results' images into a VOC tree, the model's boxes as labels

examples:
  splitdet edge check --model models/gasket --cloud 10.0.0.5:50051 --image sample.png
  splitdet edge run --model models/gasket --watch /data/camera --cloud 10.0.0.5:50051 \\
      --db /data/edge.sqlite --after archive
  splitdet edge status --db /data/edge.sqlite
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `edge` with its actions, each registered by the module that holds it."""
    edge = subparsers.add_parser(
        "edge",
        help="the camera-side daemon: hot folder in, durable results out",
        description="The camera-side edge: a daemon and its results database.",
        epilog=EDGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = edge.add_subparsers(dest="edge_action", metavar="ACTION")
    register_run(actions)
    register_results(actions)
    register_requeue(actions)
    register_abandon(actions)
    register_status(actions)
    register_prune(actions)
    register_check(actions)
    register_collect(actions)
