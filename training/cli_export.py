"""`splitdet export`: a checkpoint to a model directory (edge ONNX + cloud weights + manifest).

Only argparse and the standard library at import time; torch loads when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.shared.cli import add_box_refine_option, float_in, int_in

if TYPE_CHECKING:
    from splitdet.shared.config import ModelConfig

log = logging.getLogger(__name__)

#: What the export summary's `onnx_vs_torch_max_relative_error` measured, for an int8 edge.
INT8_CHECK_NOTE = (
    "on the float32 graphs, before the gate was quantised; the int8 gate's own errors are "
    "under edge_quantization"
)
#: Images calibrating `--quantize-edge` when `--calibration-images` is not given.
CALIBRATION_IMAGES = 16

EPILOG = """\
example:
  splitdet export --checkpoint runs/cpu/best.pt --out models/gasket
      writes models/gasket/{manifest.json, edge_gate.onnx, edge_complete.onnx, cloud_heads.pt}
      after checking ONNX Runtime against PyTorch on a sample image

Copy the whole directory, every file, to the edge and to the cloud server: each side checks
every file against the manifest's hashes before it starts. The fingerprint in the manifest ties
the two together, and the cloud refuses requests of an export it does not serve (it can serve
several: `splitdet cloud --model OLD --model NEW` while edges move to the new one).

An export into a folder holding an earlier export of another fingerprint replaces it, with a
WARNING naming both fingerprints (and the checkpoint and classes each was exported from): a
cloud serving that folder drops the earlier one at its next reload. To keep serving both while
the edges move, export the new model into another folder.
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
    p.add_argument(
        "--out",
        required=True,
        metavar="MODEL_DIR",
        help="model directory to write: new, empty or holding an earlier export, which it "
        "replaces (a WARNING names the replaced fingerprint and the new one; the same "
        "fingerprint again: unchanged); another program's manifest.json, or other files, are "
        "refused (hidden files do not count)",
    )
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
    p.add_argument(
        "--quantize-edge",
        metavar="DATA",
        default=None,
        help="make the edge gate int8 (ONNX Runtime static quantisation), calibrated on images "
        "of this VOC dataset's train split; lossy: measure its mAP before deploying it",
    )
    p.add_argument(
        "--calibration-images",
        type=int_in(1),
        default=None,
        metavar="N",
        help="images calibrating --quantize-edge, evenly spaced over the split (default: "
        f"{CALIBRATION_IMAGES}); only with --quantize-edge",
    )
    p.add_argument(
        "--tolerance",
        type=float_in(1e-7, 1.0),
        default=None,
        metavar="REL",
        help="largest relative error of ONNX Runtime against PyTorch the self-check accepts "
        "(default 1e-4; recorded in the manifest). Untrained weights amplify float "
        "differences: loosen it only for an export that is timed, never for one deployed",
    )
    add_box_refine_option(p)
    p.set_defaults(handler=run)


def uncalibrated_warning(checkpoint_path: str, threshold: float) -> str:
    """The one-line warning for an export at a gate threshold nothing calibrated."""
    return (
        f"{checkpoint_path}: its gate threshold {threshold:g} was never calibrated (training "
        "had no usable val split, and no `splitdet eval --checkpoint` stored one since), so "
        "the edge will gate at a p(defect) that keeps no known defect recall; calibrate it "
        f"with `splitdet eval --data DATA --checkpoint {shlex.quote(str(checkpoint_path))} "
        "--calibrate-split "
        "val` (or `--calibrate-split train` when there is no val split; optimistic) and export "
        "again, or give --gate-threshold P"
    )


def calibration_batches(data: Path, config: ModelConfig, count: int) -> list:
    """`count` train-split images of `data` (all of them when it has fewer), evenly spaced,
    preprocessed as the edge does (`edge.preprocess.prepare` at `config`'s input size): one
    numpy Float32[1, 3, Hp, Wp] per image, normalised, padded with zeros to multiples of 32
    (sizes may differ from image to image). ValueError when `count` < 1 or there are none."""
    from splitdet.edge.preprocess import load_image, prepare
    from splitdet.training import voc

    samples = voc.read_split(Path(data), "train", config.class_names)
    if count < 1 or not samples:
        raise ValueError(f"{data}: no train images to calibrate on (asked for {count})")
    return [
        prepare(
            load_image(s.image_path, config.pixel_bits), config.min_size, config.max_size,
            config.image_mean, config.image_std,
        ).batch
        for s in voc.evenly_spaced(samples, count)
    ]  # fmt: skip


def foreign_out(out_dir: Path) -> str | None:
    """Why `splitdet export` may not write into `out_dir`, or None: it may when it is missing or
    empty, or holds a splitdet export (or what an interrupted one left). Otherwise its files
    are another program's (its manifest.json, a folder of images) and the export's files would
    replace or mix with them."""
    from splitdet.shared.manifest import ALL_ARTIFACTS, MANIFEST_NAME, PUBLISHING_MARKER
    from splitdet.training.export import EXPORT_LOCK, STAGING_PREFIX

    if not out_dir.is_dir():
        return None  # (missing: made; not a folder: export_model names it)
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists() or manifest.is_symlink():
        try:
            data = json.loads(manifest.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        if isinstance(data, dict) and {"format", "fingerprint", "artifacts"} <= data.keys():
            return None  # a splitdet export's (read_manifest judges the rest)
        if data is None and any((out_dir / name).exists() for name in ALL_ARTIFACTS):
            return None  # (a damaged manifest beside our artifacts: an export mends it)
        return (
            f"--out {out_dir}: its {MANIFEST_NAME} is not a splitdet export's, and the export "
            "would replace it; choose another --out (a new or empty folder, or one holding an "
            "earlier export)"
        )
    ours = {*ALL_ARTIFACTS, PUBLISHING_MARKER, EXPORT_LOCK}
    try:  # (hidden files, .gitkeep or .DS_Store, leave a folder as good as empty)
        others = sorted(
            p.name for p in out_dir.iterdir()
            if p.name not in ours and not p.name.startswith((STAGING_PREFIX, "."))
        )  # fmt: skip
    except OSError:
        return None  # (export_model names a folder it cannot use)
    if not others:
        return None
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (
        f"--out {out_dir}: holds {len(others)} file(s) of no splitdet export ({shown}), which "
        "the model's files would mix with; export into a new or empty folder, or one holding "
        "an earlier export"
    )


def run(args: argparse.Namespace) -> int:
    """Export and print the manifest's summary."""
    from splitdet.shared.checkpoint import CheckpointError, load_model, threshold_calibration
    from splitdet.shared.cli import CommandError
    from splitdet.training.export import ExportError, export_model

    if args.calibration_images is not None and args.quantize_edge is None:
        raise CommandError(  # (it was ignored without a word: a float edge was exported)
            "--calibration-images calibrates --quantize-edge, which was not given: add "
            "--quantize-edge DATA for an int8 edge, or leave it out for the float one"
        )
    refused = foreign_out(Path(args.out))
    if refused is not None:  # (before the checkpoint loads: nothing is written)
        raise CommandError(refused)
    try:
        model, checkpoint = load_model(args.checkpoint, box_refine_steps=args.box_refine_steps)
        threshold = args.gate_threshold
        if threshold is None:
            threshold = float(checkpoint.get("gate_threshold", 0.5))
        # "given", what calibrated the checkpoint's threshold, or None: nothing did
        source = "given" if args.gate_threshold is not None else threshold_calibration(checkpoint)
        calibration = None
        if args.quantize_edge is not None:
            calibration = calibration_batches(
                Path(args.quantize_edge), model.config,
                args.calibration_images or CALIBRATION_IMAGES,
            )  # fmt: skip
        manifest = export_model(
            model,
            args.out,
            gate_threshold=threshold,
            default_codec=args.codec,
            # (not in the fingerprint: an export re-made elsewhere keeps it); named by the
            # warning of a later export replacing this one
            extra={
                "checkpoint": str(Path(args.checkpoint).resolve()),
                "checkpoint_epoch": checkpoint.get("epoch"),
            },
            calibration=calibration,
            **({} if args.tolerance is None else {"tolerance": args.tolerance}),
        )
    except (CheckpointError, ExportError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # the checkpoint and data are read through the errors above
        raise CommandError(f"--out {args.out}: cannot write ({exc})") from None
    if source is None:  # after the export, which it does not stop
        log.warning(uncalibrated_warning(args.checkpoint, threshold))
    worst = max(manifest.extra["export_check"]["max_relative_error"].values())
    int8 = manifest.extra.get("edge_quantization")
    print(
        json.dumps(
            {
                "model_dir": str(args.out),
                "fingerprint": manifest.fingerprint,
                "gate_threshold": manifest.gate_threshold,
                "gate_threshold_from": source or "uncalibrated checkpoint",
                "default_codec": manifest.default_codec,
                "class_names": list(manifest.class_names),
                "box_refine_steps": model.config.box_refine_steps,
                "onnx_vs_torch_max_relative_error": worst,
                # (an int8 edge's error was not that: said beside it, not only further down)
                **({"onnx_vs_torch_checked": INT8_CHECK_NOTE} if int8 else {}),
                "edge_quantization": int8,
            },
            indent=2,
        )
    )
    return 0
