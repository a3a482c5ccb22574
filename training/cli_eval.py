"""`splitdet eval`: COCO mAP, the defect classifier and the gate of a checkpoint, or of an
export as it is deployed.

    splitdet eval --data data/gaskets --checkpoint runs/cpu/best.pt --json eval.json
    splitdet eval --data data/gaskets --model models/gasket --json eval-export.json
    splitdet eval --data data/merged --checkpoint runs/v2/best.pt --baseline runs/v1/best.pt

This module parses and dispatches; `training.evaluate` measures a checkpoint,
`training.evaluate_export` an export, `training.compare` compares two checkpoints' figures.
Top-level imports are stdlib (and argparse helpers) only: torch loads when the command runs.
The command's paths live beside it, one job a module, their top-level imports as light, and
are re-exported from here (`__all__`): evaluating a checkpoint (`cli_eval_checkpoint`: the
threshold store, --baseline), evaluating an export (`cli_eval_export`), what eval prints
(`cli_eval_report`: the summary, the operating points table, the hints of its errors), the
images the evaluated split shares with the train and calibration splits (`cli_eval_overlap`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from splitdet.edge.cloud_args import add_cloud_arguments, add_codec_argument
from splitdet.shared.cli import add_box_refine_option, int_in
from splitdet.training.cli_eval_checkpoint import kept_threshold, run_checkpoint
from splitdet.training.cli_eval_export import run_model
from splitdet.training.cli_eval_report import (
    THRESHOLD_SOURCES,
    eval_hint,
    operating_points_table,
    summary,
)

#: What callers import from here, wherever it is defined.
__all__ = [
    "BASELINE_DEFAULTS",
    "CHECKPOINT_DEFAULTS",
    "EXAMPLE",
    "MODEL_ONLY",
    "THRESHOLD_SOURCES",
    "eval_hint",
    "kept_threshold",
    "operating_points_table",
    "register",
    "run",
    "run_checkpoint",
    "run_model",
    "summary",
]

EXAMPLE = """examples:
  splitdet eval --data data/gaskets --checkpoint runs/cpu/best.pt --json runs/cpu/test.json
  splitdet eval --data data/gaskets --checkpoint runs/cpu/best.pt --json out.json \\
      --split test --calibrate-split val --target-recall 0.995
  splitdet eval --data data/test_seed1 --calibrate-data data/gaskets --checkpoint ckpt.pt
  splitdet eval --data data/merged --checkpoint runs/v1/best.pt --json v1-on-merged.json
      calibrates on val of data/merged; stores that threshold into runs/v1/best.pt only if
      its own was never calibrated or was calibrated on val of data/merged too (else kept,
      and a line names both: --store replaces it)
  splitdet eval --data data/merged --checkpoint runs/v2/best.pt --baseline runs/v1/best.pt \\
      --json v2-vs-v1.json
      both on test of data/merged, each gate calibrated on its val split; the JSON's
      'baseline' (v1's metrics) and 'comparison' (each figure, the difference, and for mAP@.5
      and mAP a paired bootstrap's 95% interval of it), a table and a verdict line;
      runs/v1/best.pt is only read (--store and --no-store are about runs/v2/best.pt)
  splitdet eval --data data/gaskets --model models/gasket-int8 --json export.json
      the export as deployed: ONNX gate, lazy FPN, codec, cloud heads in this process
  splitdet eval --data data/gaskets --model models/gasket --cloud 10.0.0.5:50051

--model MODEL_DIR runs every image of the split through `splitdet predict`'s path once, with
the gate forced open: 'map', 'map50', 'ar100' are the ungated detector's; 'map_gated',
'map50_gated', 'map_kept' the deployed system's (detections of the images whose p(defect) is at
or above the manifest's threshold, none for the others). The threshold is the export's: it is
not calibrated here. To change it, calibrate the checkpoint (eval --checkpoint
--calibrate-split val) and export again; --threshold P measures the override `predict
--threshold P` and `edge run --threshold P` deploy instead. Also reported: 'gate_threshold',
'manifest_gate_threshold', 'edge_gate' (float32, or int8 from export --quantize-edge),
'codec', 'fingerprint', 'flagged_fraction', 'bytes_per_flagged_image', mean
'stage_seconds'. An image that cannot be read, or whose detection call fails, is named in
'image_errors' and counted with no detections (and p(defect) 0 when unread); the others are
evaluated and the exit status is 1.
"""

#: Options that only mean something for a checkpoint, and their defaults there (None in the
#: parser, so that giving one with --model can be told from not giving it).
CHECKPOINT_DEFAULTS = {
    "calibrate_split": "val",
    "calibrate_data": None,
    "target_recall": 0.995,
    "no_store": False,
    "store": False,
    "batch_size": 1,
    "box_refine_steps": None,
}
#: Options that only mean something with --baseline, and their defaults there (None in the parser).
BASELINE_DEFAULTS = {"bootstrap": 200, "seed": 0}
#: Options that only mean something for an export (--timeout aside: meaningless without --cloud).
MODEL_ONLY = ("threshold", "codec", "cloud", "timeout", "tls", "root_certs", "client_cert",
              "client_key", "server_name", "token_file", "name")  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `eval` subcommand to `subparsers`."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint or an export: mAP, gate accuracy/recall, mAP kept",
        description="COCO mAP@[.5:.95], mAP@.5 and AR@100 (pycocotools), the defect classifier's "
        "accuracy/precision/recall/F1/AUC, the gate threshold calibrated on a validation split "
        "for a target defect recall (written into the checkpoint, unless the checkpoint holds "
        "one calibrated on another dataset or split: --store writes it then), the gated "
        "system's mAP, the best accuracy any threshold reaches at that recall on the evaluated "
        "split (for the gate, and for the detector's top box score as an image score: is "
        "calibration or the model the limit, and would the detector gate better), and "
        "where the errors are: the confident detections by kind of mistake and the recall by "
        "defect length (the JSON's 'errors'); gate operating points (per target recall from "
        "100% to 90%: threshold, recall, accuracy, share flagged, defect-free share flagged, "
        "mAP@.5 kept; the JSON's 'gate_operating_points', and a table on stderr). With --model "
        "instead of --checkpoint: the same of an "
        "export, run as `splitdet predict` runs it, at the export's own gate threshold.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="VOC tree (ImageSets/Main/<split>.txt)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", help="splitdet checkpoint (.pt)")
    what.add_argument(
        "--model",
        metavar="MODEL_DIR",
        help="an export (splitdet export), evaluated as deployed at its manifest's gate "
        "threshold (not calibrated here: to change it, calibrate the checkpoint and re-export; "
        "--threshold measures an override)",
    )
    parser.add_argument(
        "--json",
        metavar="FILE",
        help="write the metrics to this JSON file, and print a summary of them ('-': the JSON "
        "on stdout, as without --json)",
    )
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    checkpoint = parser.add_argument_group("with --checkpoint only")
    checkpoint.add_argument(
        "--calibrate-split",
        help="split the gate threshold is calibrated on (default: val; 'none' keeps the "
        "checkpoint's threshold)",
    )
    checkpoint.add_argument(
        "--calibrate-data",
        help="VOC tree holding the calibration split (default: --data), e.g. when the test "
        "split comes from a dataset generated with another seed",
    )
    checkpoint.add_argument(
        "--target-recall",
        type=float,
        help="defect recall the gate must keep on the calibration split (default: 0.995)",
    )
    storing = checkpoint.add_mutually_exclusive_group()
    storing.add_argument(
        "--no-store",
        action="store_true",
        help="do not write the calibrated threshold into the checkpoint",
    )
    storing.add_argument(
        "--store",
        action="store_true",
        help="write the calibrated threshold into the checkpoint even when the one it holds "
        "was calibrated on another dataset or split (default: stored only into a checkpoint "
        "never calibrated, or calibrated on this --calibrate-data/--data and "
        "--calibrate-split; else kept, and a line says so)",
    )
    checkpoint.add_argument(
        "--batch-size", type=int_in(1), help="images per forward pass (default: 1)"
    )
    add_box_refine_option(checkpoint)
    baseline = parser.add_argument_group("comparing with a baseline (with --checkpoint only)")
    baseline.add_argument(
        "--baseline",
        type=Path,  # (a path: given twice, refused as the others are)
        metavar="CHECKPOINT",
        help="another checkpoint of the same classes (the deployed model, say) to evaluate on "
        "the same split, its gate calibrated on the same calibration split; the JSON gains "
        "'baseline' (its metrics) and 'comparison' (each headline figure of both and the "
        "difference; for mAP@.5 and mAP a paired bootstrap's 95%% interval), the summary a "
        "table and a verdict. Only read: no threshold is stored into it, whatever the options "
        "(--store, --no-store are about --checkpoint); --box-refine-steps applies to both",
    )
    baseline.add_argument(
        "--bootstrap",
        type=int_in(0),
        metavar="N",
        help="resamples of the split's images (with replacement, the same for both models) "
        "for the interval of the mAP@.5 and mAP differences (default: 200; 0: none)",
    )
    baseline.add_argument(
        "--seed",
        type=int_in(0),
        help="seed of the bootstrap's resamples (default: 0): a run repeats",
    )
    model = parser.add_argument_group("with --model only")
    model.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="P",
        help="gate threshold on p(defect) to measure instead of the manifest's, as `predict "
        "--threshold` and `edge run --threshold` override it (above 1 flags nothing; with "
        "--checkpoint, calibrate instead: --calibrate-split)",
    )
    add_codec_argument(model)
    add_cloud_arguments(model, required=False, retried=True)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch on --checkpoint / --model; exit status 0, or 1 when --model met image errors."""
    from splitdet.edge.cli_predict import check_outputs

    check_outputs(args.json)  # before the evaluation, not after it
    _refuse_json_over_inputs(args)
    _check_baseline(args)
    if args.model is not None:
        _refuse(_given(args, CHECKPOINT_DEFAULTS), "--checkpoint")
        return run_model(args)
    _refuse(_given(args, MODEL_ONLY), "--model")
    for name, default in CHECKPOINT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return run_checkpoint(args)


def _refuse_json_over_inputs(args: argparse.Namespace) -> None:
    """CommandError when --json FILE names an input of the evaluation: a checkpoint
    (--checkpoint, --baseline), or a file inside --data, --calibrate-data or --model (a
    manifest, an annotation, an image): written at the end, the JSON would replace it."""
    import os

    from splitdet.shared.cli import CommandError

    if not args.json or args.json == "-":
        return
    target = Path(os.path.realpath(args.json))
    for option in ("checkpoint", "baseline"):
        given = getattr(args, option, None)
        if given is not None and Path(os.path.realpath(given)) == target:
            raise CommandError(
                f"--json {args.json}: is the --{option} file, which the JSON would replace; "
                "give another file"
            )
    for option in ("data", "calibrate_data", "model"):
        given = getattr(args, option, None)
        if given is not None and target.is_relative_to(os.path.realpath(given)):
            raise CommandError(
                f"--json {args.json}: inside --{option.replace('_', '-')} {given}, whose "
                "files the JSON could replace; give a file outside it"
            )


def _check_baseline(args: argparse.Namespace) -> None:
    """CommandError for --baseline with --model, or the same file as --checkpoint; for
    --bootstrap or --seed without --baseline. Else sets their defaults."""
    import os

    from splitdet.shared.cli import CommandError

    if args.baseline is None:
        _refuse_options(_given(args, BASELINE_DEFAULTS), "--baseline")
        return
    if args.model is not None:
        raise CommandError(
            "--baseline compares two checkpoints, not exports: give --checkpoint with it (the "
            "checkpoints the exports were made from), or evaluate each export alone with --model"
        )
    checkpoint, baseline = Path(args.checkpoint), Path(args.baseline)
    try:
        same = os.path.samefile(checkpoint, baseline)
    except OSError:  # one is missing: loading it says so
        same = checkpoint.resolve() == baseline.resolve()
    if same:
        raise CommandError(
            f"--checkpoint {args.checkpoint} and --baseline {args.baseline} are the same file: "
            "give the checkpoint to compare with another (the deployed model's, say)"
        )
    for name, default in BASELINE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _refuse_options(given: list[str], needed: str) -> None:
    """CommandError naming the first option of `given` (argparse dests): it needs `needed`."""
    from splitdet.shared.cli import CommandError

    if given:
        raise CommandError(f"--{given[0].replace('_', '-')} is for {needed} only")


def _given(args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    """The options of `names` (argparse dests whose parser default is None or False) given."""
    # identity, not ==: --target-recall 0 is given (0 == False)
    return [name for name in names if getattr(args, name) is not None
            and getattr(args, name) is not False]  # fmt: skip


def _refuse(given: list[str], mode: str) -> None:
    """CommandError naming the first option of `given` (argparse dests): it needs `mode`."""
    from splitdet.shared.cli import CommandError

    if given:
        option = "--" + given[0].replace("_", "-")
        other = "--model" if mode == "--checkpoint" else "--checkpoint"
        raise CommandError(f"{option} is for {mode} only, not {other}")
