"""`splitdet export`: a checkpoint to a model directory (edge ONNX + cloud weights + manifest).

Only argparse and the standard library at import time; torch loads when it runs.
"""

from __future__ import annotations

import argparse
import json

EPILOG = """\
example:
  splitdet export --checkpoint runs/cpu/best.pt --out models/gasket
      writes models/gasket/{manifest.json, edge_gate.onnx, edge_complete.onnx, cloud_heads.pt}
      after checking ONNX Runtime against PyTorch on a sample image

Copy the whole directory to the edge (it needs the .onnx files and manifest.json) and to the
cloud server (it needs cloud_heads.pt and manifest.json); the fingerprint in the manifest ties
the two together, and the cloud refuses requests from any other export.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="export a checkpoint to a model directory for the edge and the cloud",
        description="Export the edge half as ONNX and the cloud half's weights, with a manifest.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="CKPT", help="a splitdet checkpoint")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model directory to write")
    p.add_argument(
        "--gate-threshold",
        type=float,
        default=None,
        metavar="P",
        help="p(defect) threshold (default: the one calibrated into the checkpoint by eval)",
    )
    p.add_argument(
        "--codec",
        default="int8",
        choices=["fp32", "fp16", "int8"],
        help="the edge's default feature codec (default: int8)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Export and print the manifest's summary."""
    from splitdet.shared.checkpoint import CheckpointError, load_model
    from splitdet.shared.cli import CommandError
    from splitdet.training.export import ExportError, export_model

    try:
        model, checkpoint = load_model(args.checkpoint)
        threshold = args.gate_threshold
        if threshold is None:
            threshold = float(checkpoint.get("gate_threshold", 0.5))
        manifest = export_model(
            model,
            args.out,
            gate_threshold=threshold,
            default_codec=args.codec,
            extra={"checkpoint_epoch": checkpoint.get("epoch")},
        )
    except (CheckpointError, ExportError) as exc:
        raise CommandError(str(exc)) from None
    worst = max(manifest.extra["export_check"]["max_relative_error"].values())
    print(
        json.dumps(
            {
                "model_dir": str(args.out),
                "fingerprint": manifest.fingerprint,
                "gate_threshold": manifest.gate_threshold,
                "default_codec": manifest.default_codec,
                "class_names": list(manifest.class_names),
                "onnx_vs_torch_max_relative_error": worst,
            },
            indent=2,
        )
    )
    return 0
