"""`splitdet eval`: COCO mAP, the defect classifier and the gate of a checkpoint, or of an
export as it is deployed.

    splitdet eval --data data/gaskets --checkpoint runs/cpu/best.pt --json eval.json
    splitdet eval --data data/gaskets --model models/gasket --json eval-export.json
    splitdet eval --data data/merged --checkpoint runs/v2/best.pt --baseline runs/v1/best.pt

This module parses and dispatches; `training.evaluate` measures a checkpoint,
`training.evaluate_export` an export, `training.compare` compares two checkpoints' figures.
Top-level imports are stdlib (and argparse helpers) only: torch loads when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.edge.cloud_args import add_cloud_arguments, add_codec_argument
from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.cli import add_box_refine_option, int_in

if TYPE_CHECKING:  # the handlers import these when they run
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.predict import Detector
    from splitdet.shared.model import MultiTaskRCNN
    from splitdet.training.evaluate_predict import Prediction
    from splitdet.training.voc import VocSample

log = logging.getLogger(__name__)

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
        "--seed", type=int, help="seed of the bootstrap's resamples (default: 0): a run repeats"
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

    check_outputs(args.json, None)  # before the evaluation, not after it
    _check_baseline(args)
    if args.model is not None:
        _refuse(_given(args, CHECKPOINT_DEFAULTS), "--checkpoint")
        return run_model(args)
    _refuse(_given(args, MODEL_ONLY), "--model")
    for name, default in CHECKPOINT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return run_checkpoint(args)


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


def run_checkpoint(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (and store the calibrated threshold in it); with --baseline,
    evaluate that one too (never written) and compare them."""
    import json

    from splitdet.shared.checkpoint import (
        CheckpointError,
        calibration_source,
        load_model,
        save_torch,
    )
    from splitdet.shared.cli import CommandError
    from splitdet.shared.probability_format import format_probability
    from splitdet.training import voc
    from splitdet.training.evaluate import calibration_shortfall

    # here, not after predicting every image (where calibration found it)
    if not 0.0 < args.target_recall <= 1.0:
        raise CommandError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.store and args.calibrate_split.lower() == "none":
        raise CommandError(
            "--store writes the threshold eval calibrates into the checkpoint, and "
            "--calibrate-split none calibrates none: give one or the other"
        )
    names: tuple[str, ...] = ()  # the model's classes, once loaded
    read_as = _file_identity(Path(args.checkpoint))  # to store only into the file evaluated
    baseline = None  # (model, checkpoint dict) of --baseline
    try:
        model, checkpoint = load_model(
            Path(args.checkpoint), box_refine_steps=args.box_refine_steps
        )
        names = model.config.class_names
        if args.baseline is not None:  # before any image is read: refused early
            baseline = load_model(args.baseline, box_refine_steps=args.box_refine_steps)
            _refuse_other_classes(args, names, baseline[0].config.class_names)
        samples = voc.read_split(Path(args.data), args.split, names)
        if not samples:
            raise CommandError(f"{_split_path(args.data, args.split)}: lists no images")
        calibration = source = None
        if args.calibrate_split.lower() != "none":
            calibration_root = Path(args.calibrate_data or args.data)
            source = calibration_source(calibration_root, args.calibrate_split)
            split_file = _split_path(calibration_root, args.calibrate_split)
            if not split_file.is_file():
                raise CommandError(
                    f"{split_file}: split file not found, so the gate threshold cannot be "
                    f"calibrated on split {args.calibrate_split!r}; "
                    + _other_calibration(args.calibrate_split, checkpoint)
                )
            calibration = voc.read_split(calibration_root, args.calibrate_split, names)
            if not any(s.is_defective for s in calibration):
                what = "lists no images" if not calibration else "no defective image"
                raise CommandError(
                    f"{split_file}: {what} to calibrate the gate threshold on; "
                    + _other_calibration(args.calibrate_split, checkpoint)
                )
        evaluated = [
            _evaluate_one(args, one, samples, calibration)
            for one in ((model, checkpoint), *([baseline] if baseline else []))
        ]
        metrics, predictions = evaluated[0]
    except voc.VocError as exc:
        calibrating = args.calibrate_data and str(exc).startswith(str(Path(args.calibrate_data)))
        root = args.calibrate_data if calibrating else args.data
        raise CommandError(eval_hint(exc, root, names)) from exc
    except (CheckpointError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    metrics.update(_run_figures(args, args.checkpoint, model))
    # decided before the JSON is shown, which says whether the checkpoint holds its threshold
    store = calibration is not None and not args.no_store
    kept = None if not store or args.store else kept_threshold(checkpoint, source, metrics)
    store = store and kept is None
    replaced = store and _file_identity(Path(args.checkpoint)) != read_as
    store = store and not replaced
    held = float(checkpoint.get("gate_threshold", 0.5))
    metrics.update({
        "gate_threshold_stored": store,  # gate_threshold written into the checkpoint
        "checkpoint_gate_threshold": metrics["gate_threshold"] if store else held,
    })  # fmt: skip
    if baseline is not None:
        metrics["baseline"], metrics["comparison"] = _comparison(
            args, baseline, evaluated[1], samples, (metrics, predictions)
        )
    # the checkpoint first: the JSON says whether it holds the threshold now, and a failure to
    # write it loses no evaluation (the JSON is still shown or written, then the error said)
    unstored = None
    if replaced:
        log.warning(
            "%s changed while it was evaluated (a training run writing it?): the threshold "
            "was not stored, so as not to put the older model back; evaluate it again once "
            "the run has ended", args.checkpoint,
        )  # fmt: skip
    elif kept is not None:
        log.info("%s: %s", args.checkpoint, kept)
    elif store:
        checkpoint["gate_threshold"] = metrics["gate_threshold"]
        checkpoint["gate_target_recall"] = args.target_recall
        checkpoint["gate_calibrated"] = True  # as `splitdet train` records its own
        checkpoint.update(source)  # where: a later eval on other data keeps it
        try:
            save_torch(checkpoint, args.checkpoint)  # whole, or the file as it was
        except OSError as exc:  # (WriteError: named, with why: "no space left on device")
            why = getattr(exc, "reason", None) or exc.strerror or exc
            unstored = f"{exc.filename or args.checkpoint}: cannot store the threshold ({why})"
            metrics.update({"gate_threshold_stored": False, "checkpoint_gate_threshold": held})
        else:
            log.info(
                "stored gate threshold %s in %s (was %s); --no-store leaves it as it was",
                format_probability(metrics["gate_threshold"]), args.checkpoint,
                format_probability(held),
            )  # fmt: skip
    text = json.dumps(metrics, indent=2)
    shown = _json_on_stdout(args.json)
    if shown:
        print(text)
    for prefix, which in (("", metrics), ("baseline: ", metrics.get("baseline"))):
        if which is not None and which["gate_calibration_defective"] is not None:
            shortfall = calibration_shortfall(
                which["gate_calibration_defective"], args.target_recall
            )
            if shortfall:
                log.warning("%s%s", prefix, shortfall)
    if metrics.get("gate_operating_points"):
        log.info("%s", operating_points_table(metrics))
    for name, figures in metrics["per_class"].items():
        if not figures["objects"]:
            log.warning(
                "class %r has no object in split %r of %s: its AP cannot be measured here",
                name, args.split, args.data,
            )  # fmt: skip
    try:
        if not shown:
            atomic_write(args.json, text + "\n", parents=False)
    except OSError as exc:  # (WriteError: named, with why)
        _show_unwritten(text, shown)
        where = exc.filename or args.json
        detail = getattr(exc, "reason", None) or exc.strerror or exc
        raise CommandError(f"{where}: cannot write the results ({detail})") from None
    if not shown:
        print(summary(metrics, args.json))
    if "comparison" in metrics:
        if shown:  # the JSON on stdout: the verdict for people on stderr
            log.info("%s", metrics["comparison"]["verdict"])
        else:
            from splitdet.training.compare import comparison_table

            print(comparison_table(metrics["comparison"]))
    if unstored is not None:
        raise CommandError(unstored)
    return 0


def _evaluate_one(
    args: argparse.Namespace,
    loaded: tuple[MultiTaskRCNN, dict],
    samples: list[VocSample],
    calibration: list[VocSample] | None,
) -> tuple[dict, list[Prediction]]:
    """(`evaluate`'s metrics, the predictions) of one checkpoint, `loaded` (model, checkpoint
    dict), on `samples`, its gate calibrated on `calibration` (None: the checkpoint's)."""
    from splitdet.training.evaluate import evaluate, predict

    model, checkpoint = loaded
    predictions = predict(model, samples, batch_size=args.batch_size, progress=not args.no_progress)
    metrics = evaluate(
        model,
        samples,
        predictions=predictions,
        calibration_samples=calibration,
        gate_threshold=float(checkpoint.get("gate_threshold", 0.5)),
        target_recall=args.target_recall,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        split_name=args.split,
        calibration_name=_calibration_name(args),
    )
    return metrics, predictions


def _run_figures(args: argparse.Namespace, path: str | Path, model: MultiTaskRCNN) -> dict:
    """What the JSON says of the run besides the metrics: the checkpoint `path`, data, splits,
    the box refinement `model` ran with."""
    return {"checkpoint": str(path), "data": str(args.data), "split": args.split,
            "calibrate_split": args.calibrate_split,
            "calibrate_data": str(args.calibrate_data or args.data),
            "box_refine_steps": model.config.box_refine_steps}  # fmt: skip


def _comparison(
    args: argparse.Namespace,
    baseline: tuple[MultiTaskRCNN, dict],
    evaluated: tuple[dict, list[Prediction]],
    samples: list[VocSample],
    candidate: tuple[dict, list[Prediction]],
) -> tuple[dict, dict]:
    """(the JSON's "baseline", its "comparison") for --baseline: `baseline` (model,
    checkpoint dict) and its `evaluated` (metrics, predictions) against `candidate` (the
    --checkpoint's metrics, predictions) on `samples`. The baseline's threshold is never
    stored: its metrics say so as the candidate's do."""
    import sys
    import time

    from tqdm import tqdm

    from splitdet.training.compare import compare, labels

    model, checkpoint = baseline
    metrics, predictions = evaluated
    metrics.update(_run_figures(args, args.baseline, model))
    held = float(checkpoint.get("gate_threshold", 0.5))
    metrics.update({"gate_threshold_stored": False, "checkpoint_gate_threshold": held})
    started = time.monotonic()
    with tqdm(total=args.bootstrap, desc="bootstrap", unit="resample", leave=False,
              disable=args.no_progress, file=sys.stderr) as bar:  # fmt: skip
        comparison = compare(
            candidate[0], metrics, samples, candidate[1], predictions, model.config.class_names,
            resamples=args.bootstrap, seed=args.seed,
            names=labels(args.checkpoint, args.baseline), split=args.split,
            on_resample=bar.update,
        )  # fmt: skip
    if args.bootstrap:
        log.info(
            "bootstrap: %d resamples of %d images in %.1f s",
            args.bootstrap, len(samples), time.monotonic() - started,
        )  # fmt: skip
    return metrics, comparison


def _refuse_other_classes(
    args: argparse.Namespace, names: Sequence[str], baseline_names: Sequence[str]
) -> None:
    """CommandError when --baseline's classes are not --checkpoint's (`names`), in order:
    their mAPs would not score the same objects."""
    from splitdet.shared.cli import CommandError

    if tuple(names) != tuple(baseline_names):
        order = " (the same, in another order)" if sorted(names) == sorted(baseline_names) else ""
        raise CommandError(
            f"--checkpoint {args.checkpoint} detects classes {','.join(names)}, --baseline "
            f"{args.baseline} classes {','.join(baseline_names)}{order}: a comparison needs "
            "models of the same classes; evaluate each alone"
        )


def kept_threshold(checkpoint: dict, source: dict[str, str], metrics: dict) -> str | None:
    """Why eval keeps the checkpoint's gate threshold rather than store the one it calibrated
    (`metrics["gate_threshold"]`, on `source`: `checkpoint.calibration_source`), in words
    following the checkpoint's name; None when it stores it by default: the checkpoint's was
    never calibrated, or was on the same data and split (re-evaluated, after adding images
    say). A threshold calibrated on other data stays: the checkpoint may have been exported
    and deployed with it, and storing another would change the export it rebuilds. One that an
    older splitdet calibrated, recording no source, stays too: it may have been calibrated on
    any data (the safe side; --store replaces it)."""
    from splitdet.shared.checkpoint import (
        describe_calibration_source,
        recorded_calibration_source,
        threshold_calibration,
    )
    from splitdet.shared.probability_format import format_probability

    kind = threshold_calibration(checkpoint)
    recorded = recorded_calibration_source(checkpoint)
    if kind is None or recorded == source:
        return None
    if recorded is not None:
        where = f"calibrated on {describe_calibration_source(recorded)}"
    else:
        who = "an earlier `splitdet eval`" if kind == "eval" else "training's validation"
        where = f"calibrated by {who} of an older splitdet, which did not record on what data"
    held = format_probability(float(checkpoint.get("gate_threshold", 0.5)))
    new = format_probability(metrics["gate_threshold"])
    return (
        f"kept its gate threshold {held} ({where}), not this evaluation's {new} (calibrated on "
        f"{describe_calibration_source(source)}, the threshold its gate figures are at); "
        "--store replaces the checkpoint's with it"
    )


def _json_on_stdout(json_file: str | None) -> bool:
    """Whether eval prints its JSON on stdout: without --json, and with ``--json -``; with
    ``--json FILE`` it writes the JSON there and prints a `summary`."""
    return json_file is None or json_file == "-"


def _show_unwritten(text: str, shown: bool) -> None:
    """Print the JSON ``text`` on stdout when a write failed before --json FILE held it (and
    it was not printed already): the evaluation is not lost."""
    if not shown:
        print(text)


def _calibration_name(args: argparse.Namespace) -> str:
    """How the JSON names the split the gate is calibrated on: "val", or "val of DIR" when
    --calibrate-data names another dataset than --data."""
    from pathlib import Path

    other = args.calibrate_data is not None and (
        Path(args.calibrate_data).resolve() != Path(args.data).resolve()
    )
    return f"{args.calibrate_split} of {args.calibrate_data}" if other else args.calibrate_split


#: How `summary` says where a threshold it was not told a calibration split of came from.
THRESHOLD_SOURCES = {
    "given": "the checkpoint's",
    "manifest": "the export's",
    "--threshold": "from --threshold",
}


def summary(metrics: dict, json_file: str) -> str:
    """A few lines of `metrics` (a checkpoint's or an export's) for people, printed when the
    JSON goes to ``json_file``: mAP, mAP@.5, AR@100; the gate threshold, where it comes from
    (and, for a threshold a checkpoint evaluation calibrated, whether the checkpoint now holds
    it), its recall and accuracy; the mAP the gated system keeps."""
    from splitdet.shared.probability_format import format_probability

    def figure(key: str, percent: bool = False) -> str:
        value = metrics.get(key)
        if value is None:
            return "n/a"
        return f"{value:.1%}" if percent else f"{value:.3f}"

    on = metrics["gate_calibrated_on"]
    source = THRESHOLD_SOURCES.get(on) or (
        f"calibrated on {on} for {metrics['gate_target_recall']:.1%} recall"
    )
    if on not in THRESHOLD_SOURCES and "gate_threshold_stored" in metrics:
        held = metrics["checkpoint_gate_threshold"]
        source += (
            ", stored in the checkpoint"
            if metrics["gate_threshold_stored"]
            else f"; not stored, the checkpoint keeps {format_probability(held)}"
            if held != metrics["gate_threshold"]
            else "; not stored, the checkpoint holds the same"
        )
    return "\n".join([
        f"split {metrics['split']} of {metrics['data']}: {metrics['images']} images "
        f"({metrics['defective_images']} defective)",
        f"  detector: mAP {figure('map')}, mAP@.5 {figure('map50')}, AR@100 {figure('ar100')}",
        f"  gate: threshold {format_probability(metrics['gate_threshold'])} ({source}): recall "
        f"{figure('gate_recall', True)}, accuracy {figure('gate_accuracy', True)}, flagged "
        f"{figure('gate_pass_rate', True)}",
        f"  gated system: mAP kept {figure('map_kept', True)}, mAP@.5 kept "
        f"{figure('map50_kept', True)}",
        f"every metric in {json_file}",
    ])  # fmt: skip


def operating_points_table(metrics: dict) -> str:
    """`evaluate`'s gate_operating_points as a table for people: per target recall, the
    threshold to give `edge run --threshold` and what it does on the evaluated split."""
    from splitdet.shared.probability_format import format_probability

    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    on, split = metrics["gate_operating_points_calibrated_on"], metrics["split"]
    itself = " itself, the evaluated one: optimistic" if on == split else ""
    lines = [
        f"gate operating points (thresholds calibrated on split {on}{itself}; on split "
        f"{split}: flagged images go on to the cloud heads, the others end at the edge):",
        f"  {'target recall':>13}  {'threshold':>11}  {'recall':>7}  {'accuracy':>8}  "
        f"{'flagged':>7}  {'defect-free flagged':>19}  {'mAP@.5 kept':>11}",
    ]
    for point in metrics["gate_operating_points"]:
        lines.append(
            f"  {percent(point['target_recall']):>13}  "
            f"{format_probability(point['threshold']):>11}  {percent(point['recall']):>7}  "
            f"{percent(point['accuracy']):>8}  {percent(point['flagged']):>7}  "
            f"{percent(point['free_flagged']):>19}  {percent(point['map50_kept']):>11}"
        )
    return "\n".join(lines)


def _file_identity(path: Path) -> str | None:
    """`path`'s identity as the edge knows a file (`file_identity.file_key`: name, size,
    mtime, inode), None when it cannot be read: a checkpoint replaced meanwhile (training
    writes a new file and renames it over) differs."""
    from splitdet.edge.file_identity import file_key

    try:
        return file_key(path, path.stat())
    except OSError:
        return None


def run_model(args: argparse.Namespace) -> int:
    """Evaluate an export as deployed; see EXAMPLE."""
    import json
    import math
    import sys

    from tqdm import tqdm

    from splitdet.shared.cli import CommandError
    from splitdet.training.evaluate_export import evaluate_export

    if args.threshold is not None and math.isnan(args.threshold):  # as predict refuses it
        raise CommandError(
            "--threshold nan: must be a number (p(defect) from 0 to 1; above 1 flags nothing)"
        )
    pipeline, samples, detector = _open_model(args)
    with tqdm(total=len(samples), unit="img", disable=args.no_progress, file=sys.stderr) as bar:
        metrics = evaluate_export(
            samples, pipeline, detector, threshold=args.threshold,
            on_result=lambda _: bar.update(),
        )  # fmt: skip
    metrics.update({"data": str(args.data), "split": args.split})
    text = json.dumps(metrics, indent=2)
    shown = _json_on_stdout(args.json)
    if shown:
        print(text)
    if metrics["image_errors"]:
        print(
            f"{len(metrics['image_errors'])} of {len(samples)} images could not be evaluated "
            "(the JSON's image_errors names them): counted with no detections",
            file=sys.stderr,
        )
    if not shown:
        try:
            atomic_write(args.json, text + "\n", parents=False)
        except OSError as exc:
            print(text)  # an unwritable --json must not lose the evaluation
            detail = exc.strerror or exc
            raise CommandError(f"{args.json}: cannot write the results ({detail})") from None
        print(summary(metrics, args.json))
    return 1 if metrics["image_errors"] else 0


def _open_model(args: argparse.Namespace) -> tuple[EdgePipeline, list[VocSample], Detector]:
    """(edge pipeline with the gate open, samples, detector) for --model; CommandError for a
    bad --cloud, export or dataset, a dead or wrong server, or a missing torch."""
    from pathlib import Path

    from splitdet.edge.cli_predict import local_detector, remote_detector
    from splitdet.edge.cloud_args import client_config
    from splitdet.shared.cli import CommandError
    from splitdet.shared.manifest import ManifestError
    from splitdet.training import voc
    from splitdet.training.evaluate_export import open_pipeline, read_samples

    # a malformed --cloud or unreadable TLS file: refused first
    remote = client_config(args, alone="without it the cloud half runs in this process")
    pipeline = None
    try:
        pipeline = open_pipeline(Path(args.model), args.codec)
        samples = read_samples(Path(args.data), args.split, pipeline.manifest.class_names)
        if not samples:
            raise CommandError(f"{_split_path(args.data, args.split)}: lists no images")
        # made now, not at the first image: a dead or wrong server fails before any work
        if remote is None:
            detector = local_detector(args.model, None)()
        else:
            detector = remote_detector(remote, pipeline.manifest.fingerprint)()
    except voc.VocError as exc:
        names = pipeline.manifest.class_names if pipeline is not None else ()
        raise CommandError(eval_hint(exc, args.data, names)) from None
    except (ManifestError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    return pipeline, samples, detector


def eval_hint(exc: Exception, root: Path | str, class_names: Sequence[str]) -> str:
    """`exc`'s message (a VocError reading `root`) with what to do about it in eval.

    An object of a class the model does not know (`class_names`, the checkpoint's or the
    export's) cannot be scored: eval takes the model's classes, it has no --classes to give
    (train's advice, `voc.check_hint`'s). Other problems get `voc.check_hint`'s advice."""
    import shlex

    from splitdet.training import voc

    message = str(exc)
    if "unknown class" in message and class_names:
        known = ",".join(class_names)
        return (
            f"{message}; eval scores the model's classes only ({known}): relabel or remove the "
            f"objects of other classes in {root} (`splitdet data check {shlex.quote(str(root))} "
            f"--classes {shlex.quote(known)}` lists them all), or evaluate a model trained with "
            f"them (`splitdet train --classes {shlex.quote(known + ',...')}`)"
        )
    return voc.check_hint(exc, root)


def _other_calibration(split: str, checkpoint: dict) -> str:
    """What to give instead of the calibration split `split`, which cannot calibrate; the
    checkpoint's current threshold named for --calibrate-split none."""
    from splitdet.shared.checkpoint import threshold_calibration

    threshold = float(checkpoint.get("gate_threshold", 0.5))
    state = "calibrated" if threshold_calibration(checkpoint) else "never calibrated"
    other = "train" if split != "train" else "val"
    return (
        f"give --calibrate-split {other} (or another split holding defective images; train's "
        "images give an optimistic threshold, as the model has seen them), or --calibrate-split "
        f"none to keep the checkpoint's threshold ({threshold:g}, {state})"
    )


def _split_path(root: Path | str, split: str) -> Path:
    """The file listing `split` in the VOC tree at `root`."""
    from pathlib import Path

    return Path(root) / "ImageSets" / "Main" / f"{split}.txt"
