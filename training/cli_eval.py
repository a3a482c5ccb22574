"""`splitdet eval`: COCO mAP, the defect classifier and the calibrated gate of a checkpoint.

    splitdet eval --data data/gaskets --checkpoint runs/cpu/best.pt --json eval.json

Top-level imports are stdlib only: torch loads when the command runs.
"""

from __future__ import annotations

import argparse

from splitdet.shared.cli import add_box_refine_option, int_in

EXAMPLE = """example:
  splitdet eval --data data/gaskets --checkpoint runs/cpu/best.pt --json runs/cpu/test.json
  splitdet eval --data data/gaskets --checkpoint runs/cpu/best.pt --json out.json \\
      --split test --calibrate-split val --target-recall 0.995
  splitdet eval --data data/test_seed1 --calibrate-data data/gaskets --checkpoint ckpt.pt
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a checkpoint: mAP, gate accuracy/recall, mAP kept",
        description="COCO mAP@[.5:.95], mAP@.5 and AR@100 (pycocotools), the defect classifier's "
        "accuracy/precision/recall/F1/AUC, the gate threshold calibrated on a validation split "
        "for a target defect recall (written into the checkpoint), the gated system's mAP, the "
        "best accuracy any threshold reaches at that recall on the evaluated split (for the gate, "
        "and for the detector's top box score as an image score: is calibration or the model "
        "the limit, and would the detector gate better), and "
        "where the errors are: the confident detections by kind of mistake and the recall by "
        "defect length (the JSON's 'errors').",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="VOC tree (ImageSets/Main/<split>.txt)")
    parser.add_argument("--checkpoint", required=True, help="splitdet checkpoint (.pt)")
    parser.add_argument("--json", help="write the metrics to this JSON file")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument(
        "--calibrate-split",
        default="val",
        help="split the gate threshold is calibrated on (default: val; 'none' keeps the "
        "checkpoint's threshold)",
    )
    parser.add_argument(
        "--calibrate-data",
        help="VOC tree holding the calibration split (default: --data), e.g. when the test "
        "split comes from a dataset generated with another seed",
    )
    parser.add_argument(
        "--target-recall",
        type=float,
        default=0.995,
        help="defect recall the gate must keep on the calibration split (default: 0.995)",
    )
    parser.add_argument(
        "--no-store",
        action="store_true",
        help="do not write the calibrated threshold into the checkpoint",
    )
    parser.add_argument("--batch-size", type=int_in(1), default=1, help="images per forward pass")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_box_refine_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from splitdet.shared.checkpoint import CheckpointError, load_model
    from splitdet.shared.cli import CommandError
    from splitdet.training import voc
    from splitdet.training.evaluate import evaluate

    # here, not after predicting every image (where calibration found it)
    if not 0.0 < args.target_recall <= 1.0:
        raise CommandError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    try:
        model, checkpoint = load_model(
            Path(args.checkpoint), box_refine_steps=args.box_refine_steps
        )
        names = model.config.class_names
        samples = voc.read_split(Path(args.data), args.split, names)
        if not samples:
            raise CommandError(f"{_split_path(args.data, args.split)}: lists no images")
        calibration = None
        if args.calibrate_split.lower() != "none":
            calibration_root = Path(args.calibrate_data or args.data)
            calibration = voc.read_split(calibration_root, args.calibrate_split, names)
            if not any(s.is_defective for s in calibration):
                raise CommandError(
                    f"{_split_path(calibration_root, args.calibrate_split)}: no defective "
                    "image to calibrate the gate on; give another --calibrate-split, or "
                    "--calibrate-split none to keep the checkpoint's threshold"
                )
        metrics = evaluate(
            model,
            samples,
            calibration_samples=calibration,
            gate_threshold=float(checkpoint.get("gate_threshold", 0.5)),
            target_recall=args.target_recall,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except (CheckpointError, voc.VocError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    metrics.update({"checkpoint": str(args.checkpoint), "data": str(args.data),
                    "split": args.split, "calibrate_split": args.calibrate_split,
                    "calibrate_data": str(args.calibrate_data or args.data),
                    "box_refine_steps": model.config.box_refine_steps})  # fmt: skip
    text = json.dumps(metrics, indent=2)
    print(text)  # first: an unwritable checkpoint or --json must not lose the evaluation
    try:
        if calibration is not None and not args.no_store:
            checkpoint["gate_threshold"] = metrics["gate_threshold"]
            checkpoint["gate_target_recall"] = args.target_recall
            tmp = Path(str(args.checkpoint) + ".tmp")
            torch.save(checkpoint, tmp)
            tmp.replace(args.checkpoint)
        if args.json:
            Path(args.json).write_text(text + "\n")
    except (OSError, RuntimeError) as exc:  # torch.save reports an unwritable file as either
        where = getattr(exc, "filename", None) or args.json or args.checkpoint
        detail = getattr(exc, "strerror", None) or exc
        raise CommandError(f"{where}: cannot write the results ({detail})") from None
    return 0


def _split_path(root, split: str):
    """The file listing `split` in the VOC tree at `root`."""
    from pathlib import Path

    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"
