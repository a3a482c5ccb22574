"""`splitdet eval --checkpoint`: a checkpoint evaluated, its gate calibrated on a split
(`run_checkpoint`); whether the calibrated threshold is stored into it (`kept_threshold`: the
store decision); with --baseline, a second checkpoint evaluated on the same split and compared
(`_comparison`); what the JSON says of the run (`_run_figures`), of the images the evaluated
split shares with the train and calibration splits (`_split_overlap`), and what to give when
a split cannot calibrate (`_other_calibration`).

Part of `splitdet.training.cli_eval`, which registers the command and re-exports the public
names. Top-level imports are stdlib (and light splitdet helpers) only: torch loads when the
command runs.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.shared.atomic_file import atomic_write
from splitdet.training.cli_eval_report import (
    _json_on_stdout,
    _show_unwritten,
    _split_path,
    absent_classes,
    eval_hint,
    operating_points_table,
    summary,
)

if TYPE_CHECKING:  # the handlers import these when they run
    from splitdet.shared.config import ModelConfig
    from splitdet.shared.model import MultiTaskRCNN
    from splitdet.training.evaluate_predict import Prediction
    from splitdet.training.voc import VocSample

# the lines of `splitdet eval`, whichever module says them (tests and users filter on this name)
log = logging.getLogger("splitdet.training.cli_eval")


def run_checkpoint(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint (and store the calibrated threshold in it); with --baseline,
    evaluate that one too (never written) and compare them."""

    from splitdet.edge.cli_predict import json_text
    from splitdet.shared.checkpoint import (
        CheckpointError,
        calibration_source,
        load_model,
        save_torch,
    )
    from splitdet.shared.cli import CommandError, refuse_closed_stdout
    from splitdet.shared.probability_format import format_probability
    from splitdet.shared.strict_json import strict_dumps
    from splitdet.training import voc
    from splitdet.training.evaluate import calibration_shortfall
    from splitdet.training.provenance import checkpoint_record

    if args.json is None:  # (`>&-`; --json - is refused as predict's is: `check_outputs`)
        refuse_closed_stdout("eval prints its JSON there without --json (give --json FILE)")
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
        _refuse_too_elongated(args, model.config, samples, calibration)
        provenance = _provenance(args, (model, checkpoint), samples, calibration)
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
    metrics["provenance"] = provenance
    metrics["split_overlap"], overlaps = _split_overlap(args, samples, calibration)
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
    # the checkpoint first, before the bootstrap (tens of seconds on a large split, while a training
    # run may replace the file): the JSON says whether it holds the threshold now, and a
    # failure to write it loses no evaluation (the JSON is still shown or written, then the
    # error said)
    unstored = None
    if replaced:
        log.warning(
            "%s changed while it was evaluated (a training run writing it?): the threshold "
            "was not stored, so as not to put the older model back; evaluate it again once "
            "the run has ended", args.checkpoint,
        )  # fmt: skip
    elif kept is not None:
        log.info("%s: %s", args.checkpoint, kept)
    elif store and _holds_already(checkpoint, metrics["gate_threshold"], args, source):
        log.info(
            "%s holds this gate threshold %s already (calibrated on the same split): left as "
            "it was", args.checkpoint, format_probability(held),
        )  # fmt: skip
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
    if baseline is not None:
        metrics["baseline"], metrics["comparison"] = _comparison(
            args, baseline, evaluated[1], samples, (metrics, predictions), names
        )
        # the same split and calibration: the same overlap, and the same keys as the candidate's
        metrics["baseline"]["split_overlap"] = dict(metrics["split_overlap"])
        metrics["baseline"]["provenance"] = {
            **provenance,
            "checkpoint": checkpoint_record(args.baseline, *baseline),
        }
    text = strict_dumps(json_text(metrics), indent=2)  # (names as `predict --json` writes them)
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
    for overlap in overlaps:  # beside the headline figures they make read better
        log.warning("%s", overlap)
    if metrics.get("gate_operating_points"):
        log.info("%s", operating_points_table(metrics),
                 extra={"fields": {"event": "gate_operating_points"}})  # fmt: skip
    for absent in absent_classes(metrics, args.split, args.data):
        log.warning("%s", absent)
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


def _holds_already(
    checkpoint: dict, threshold: float, args: argparse.Namespace, source: dict[str, str]
) -> bool:
    """Whether storing `threshold` (calibrated on `source` for --target-recall) would change
    nothing the checkpoint holds: then it is not written again."""
    from splitdet.shared.checkpoint import recorded_calibration_source

    return (
        float(checkpoint.get("gate_threshold", -1.0)) == float(threshold)
        and checkpoint.get("gate_target_recall") == args.target_recall
        and checkpoint.get("gate_calibrated") is True
        and recorded_calibration_source(checkpoint) == source
    )


def _evaluate_one(
    args: argparse.Namespace,
    loaded: tuple[MultiTaskRCNN, dict],
    samples: list[VocSample],
    calibration: list[VocSample] | None,
) -> tuple[dict, list[Prediction]]:
    """(`evaluate`'s metrics, the predictions) of one checkpoint, `loaded` (model, checkpoint
    dict), on `samples`, its gate calibrated on `calibration` (None: the checkpoint's)."""
    from splitdet.shared.progress import progress_off
    from splitdet.training.evaluate import evaluate, predict

    model, checkpoint = loaded
    progress = not progress_off(args.no_progress)  # (no bar into a log file either)
    predictions = predict(model, samples, batch_size=args.batch_size, progress=progress)
    metrics = evaluate(
        model,
        samples,
        predictions=predictions,
        calibration_samples=calibration,
        gate_threshold=float(checkpoint.get("gate_threshold", 0.5)),
        target_recall=args.target_recall,
        batch_size=args.batch_size,
        progress=progress,
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


def _provenance(
    args: argparse.Namespace,
    loaded: tuple[MultiTaskRCNN, dict],
    samples: list[VocSample],
    calibration: list[VocSample] | None,
) -> dict:
    """The JSON's "provenance": what ties its figures to code and bytes. {"splitdet": the
    version, "checkpoint": `provenance.checkpoint_record` of --checkpoint, `loaded` (model,
    checkpoint dict): absolute path, "weights_sha256" (an export's manifest records the same as
    `extra.weights_sha256`), "epoch"; "data": `provenance.data_record` of the evaluated
    `samples` (absolute path, split, images, "sha256" over their ids, annotations and image
    bytes); "calibrate_data": the same of the `calibration` split (None with --calibrate-split
    none)}. ValueError naming a file that cannot be read."""
    from splitdet.training.provenance import checkpoint_record, data_record, splitdet_version

    data = data_record(args.data, args.split, samples)
    calibrated = None
    if calibration is not None:
        root = args.calibrate_data or args.data
        same = Path(root).resolve() == Path(args.data).resolve()
        calibrated = (
            data  # (the evaluated split itself: not read twice)
            if same and args.calibrate_split == args.split
            else data_record(root, args.calibrate_split, calibration)
        )
    return {
        "splitdet": splitdet_version(),
        "checkpoint": checkpoint_record(args.checkpoint, *loaded),
        "data": data,
        "calibrate_data": calibrated,
    }


def _split_overlap(
    args: argparse.Namespace, samples: list[VocSample], calibration: list[VocSample] | None
) -> tuple[dict[str, dict], list[str]]:
    """(The JSON's "split_overlap", the warnings) for the evaluated `samples`: the images they
    share with the train split of --data and with the `calibration` split (None: none, with
    --calibrate-split none). A calibration split that is the evaluated one is the user's
    choice: said at INFO, not counted."""
    from splitdet.training.cli_eval_overlap import (
        calibrated_on_itself,
        calibration_split,
        split_overlap,
        train_split,
    )

    listings = [train_split(args.data, args.split)]
    if calibration is not None:
        root = args.calibrate_data or args.data
        listings.append(calibration_split(
            args.data, args.split, root, args.calibrate_split, calibration,
            _calibration_name(args),
        ))  # fmt: skip
        if listings[-1] is None:
            log.info("%s", calibrated_on_itself(args.data, args.split))
    return split_overlap(args.data, args.split, samples, listings)


def _comparison(
    args: argparse.Namespace,
    baseline: tuple[MultiTaskRCNN, dict],
    evaluated: tuple[dict, list[Prediction]],
    samples: list[VocSample],
    candidate: tuple[dict, list[Prediction]],
    names: Sequence[str],
) -> tuple[dict, dict]:
    """(the JSON's "baseline", its "comparison") for --baseline: `baseline` (model,
    checkpoint dict) and its `evaluated` (metrics, predictions) against `candidate` (the
    --checkpoint's metrics, predictions, of classes `names`) on `samples`. A baseline of the
    same classes in another order has its labels renumbered to `names`' order for the
    bootstrap (its own metrics are by class name already). The baseline's threshold is never
    stored: its metrics say so as the candidate's do."""
    import sys
    import time

    from tqdm import tqdm

    from splitdet.shared.progress import progress_off
    from splitdet.training.compare import compare, labels

    model, checkpoint = baseline
    metrics, predictions = evaluated
    metrics.update(_run_figures(args, args.baseline, model))
    held = float(checkpoint.get("gate_threshold", 0.5))
    metrics.update({"gate_threshold_stored": False, "checkpoint_gate_threshold": held})
    started = time.monotonic()
    with tqdm(total=args.bootstrap, desc="bootstrap", unit="resample", leave=False,
              disable=progress_off(args.no_progress), file=sys.stderr) as bar:  # fmt: skip
        comparison = compare(
            candidate[0], metrics, samples, candidate[1],
            _in_order_of(predictions, model.config.class_names, names), names,
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
    """CommandError when --baseline's classes are not --checkpoint's (`names`): their mAPs
    would not score the same objects. The same classes in another order (one run trained with
    `--classes scratch,dent,pit`, the next with the sorted list `data check` suggests) are
    compared by name (`_in_order_of`)."""
    from splitdet.shared.cli import CommandError

    if sorted(names) != sorted(baseline_names):
        raise CommandError(
            f"--checkpoint {args.checkpoint} detects classes {','.join(names)}, --baseline "
            f"{args.baseline} classes {','.join(baseline_names)}: a comparison needs "
            "models of the same classes; evaluate each alone"
        )
    if tuple(names) != tuple(baseline_names):
        log.info(
            "--baseline %s numbers its classes %s, --checkpoint %s: compared by class name",
            args.baseline, ",".join(baseline_names), ",".join(names),
        )  # fmt: skip


def _in_order_of(
    predictions: list[Prediction], own: Sequence[str], names: Sequence[str]
) -> list[Prediction]:
    """`predictions` of a model of classes `own` with their labels (1-based) renumbered to the
    same classes' order in `names`; the same list when the orders agree."""
    import dataclasses

    import torch

    if tuple(own) == tuple(names):
        return predictions
    new_label = torch.tensor([0, *(names.index(name) + 1 for name in own)], dtype=torch.int64)
    return [dataclasses.replace(p, labels=new_label[p.labels.long()]) for p in predictions]


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


def _calibration_name(args: argparse.Namespace) -> str:
    """How the JSON names the split the gate is calibrated on: "val", or "val of DIR" when
    --calibrate-data names another dataset than --data."""
    from pathlib import Path

    other = args.calibrate_data is not None and (
        Path(args.calibrate_data).resolve() != Path(args.data).resolve()
    )
    return f"{args.calibrate_split} of {args.calibrate_data}" if other else args.calibrate_split


def _file_identity(path: Path) -> str | None:
    """`path`'s identity as the edge knows a file (`file_identity.file_key`: name, size,
    mtime, inode), None when it cannot be read: a checkpoint replaced meanwhile (training
    writes a new file and renames it over) differs."""
    from splitdet.edge.file_identity import file_key

    try:
        return file_key(path, path.stat())
    except OSError:
        return None


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


def _refuse_too_elongated(
    args: argparse.Namespace, config: ModelConfig, samples: list, calibration: list | None
) -> None:
    """Raise ValueError naming the images of the split evaluated (and the calibration split)
    that the model's input would shrink to under 1 px on a side, before any is predicted
    (torch's traceback met them mid-split)."""
    from splitdet.training.voc_check_boxes import refuse_too_elongated

    for where, split in (
        (_split_path(args.data, args.split), samples),
        (_split_path(args.calibrate_data or args.data, args.calibrate_split), calibration or []),
    ):
        refuse_too_elongated(
            split, config.min_size, config.max_size, where, "the model's input size"
        )
