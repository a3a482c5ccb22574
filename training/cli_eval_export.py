"""`splitdet eval --model`: an export evaluated as deployed (`run_model`), every image of the
split through `splitdet predict`'s path with the gate forced open, at the export's own gate
threshold (or --threshold's); `_open_model` opens the pipeline, the split and the detector (in
this process, or --cloud's). What it measures and reports: `cli_eval.EXAMPLE`; and, as a
checkpoint's evaluation does, the images the split shares with train.txt (`cli_eval_overlap`).

Part of `splitdet.training.cli_eval`, which registers the command and re-exports the public
names. Top-level imports are stdlib (and light splitdet helpers) only: onnxruntime (and torch,
for the cloud heads in this process) load when the command runs.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from splitdet.shared.atomic_file import atomic_write
from splitdet.training.cli_eval_report import (
    _json_on_stdout,
    _split_path,
    absent_classes,
    eval_hint,
    summary,
)

if TYPE_CHECKING:  # the handlers import these when they run
    from splitdet.edge.client import ClientConfig
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.predict import Detector, RemoteDetector
    from splitdet.training.voc import VocSample

# the lines of `splitdet eval`, whichever module says them (tests and users filter on this name)
log = logging.getLogger("splitdet.training.cli_eval")


def run_model(args: argparse.Namespace) -> int:
    """Evaluate an export as deployed; see EXAMPLE."""
    import sys

    from tqdm import tqdm

    from splitdet.edge.cli_predict import json_text
    from splitdet.edge.cloud_args import threshold_problem
    from splitdet.shared.cli import CommandError, refuse_closed_stdout
    from splitdet.shared.progress import progress_off
    from splitdet.shared.strict_json import strict_dumps
    from splitdet.training.cli_eval_overlap import split_overlap, train_split
    from splitdet.training.evaluate_export import evaluate_export

    problem = threshold_problem(args.threshold)  # (as predict refuses it)
    if problem:
        raise CommandError(problem)
    if args.json is None:  # (`>&-`; --json - is refused as predict's is: `check_outputs`)
        refuse_closed_stdout("eval prints its JSON there without --json (give --json FILE)")
    pipeline, samples, detector = _open_model(args)
    try:  # (before the images are evaluated: a file it cannot read fails it early)
        provenance = _provenance(args, pipeline, samples)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    off = progress_off(args.no_progress)
    with tqdm(total=len(samples), unit="img", disable=off, file=sys.stderr) as bar:
        metrics = evaluate_export(
            samples, pipeline, detector, threshold=args.threshold,
            on_result=lambda _: bar.update(),
        )  # fmt: skip
    metrics.update({"data": str(args.data), "split": args.split, "provenance": provenance})
    # the export's threshold is calibrated nowhere eval knows: only train.txt is compared with
    metrics["split_overlap"], overlaps = split_overlap(
        args.data, args.split, samples, [train_split(args.data, args.split)]
    )
    text = strict_dumps(json_text(metrics), indent=2)  # (names as `predict --json` writes them)
    shown = _json_on_stdout(args.json)
    if shown:
        print(text)
    for overlap in overlaps:
        log.warning("%s", overlap)
    for absent in absent_classes(metrics, args.split, args.data):
        log.warning("%s", absent)
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
    from splitdet.edge.predict import ModelRefused
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
        if remote is None:  # (its heads of the export whose edge half was opened, or refused)
            detector = local_detector(args.model, None, pipeline.manifest.fingerprint)()
        else:
            detector = remote_detector(remote, pipeline.manifest.fingerprint)()
            _check_cloud(detector, remote)
    except voc.VocError as exc:
        names = pipeline.manifest.class_names if pipeline is not None else ()
        raise CommandError(eval_hint(exc, args.data, names)) from None
    except (ManifestError, ModelRefused, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    return pipeline, samples, detector


def _provenance(args: argparse.Namespace, pipeline: EdgePipeline, samples: list[VocSample]) -> dict:
    """The JSON's "provenance": what ties its figures to code and bytes. {"splitdet": the
    version, "model": the export (absolute path, "fingerprint", and from its manifest
    "weights_sha256", the checkpoint it was exported from and that one's epoch: an evaluation
    of that checkpoint records the same "weights_sha256"), "data": `provenance.data_record` of
    the evaluated `samples` (absolute path, split, images, "sha256" over their ids,
    annotations and image bytes)}. ValueError naming a file that cannot be read."""
    from pathlib import Path

    from splitdet.training.provenance import data_record, splitdet_version

    manifest = pipeline.manifest
    return {
        "splitdet": splitdet_version(),
        "model": {
            "path": str(Path(args.model).resolve()),
            "fingerprint": manifest.fingerprint,
            "weights_sha256": manifest.extra.get("weights_sha256"),
            "checkpoint": manifest.extra.get("checkpoint"),
            "checkpoint_epoch": manifest.extra.get("checkpoint_epoch"),
            "exported_by": manifest.extra.get("splitdet"),
        },
        "data": data_record(args.data, args.split, samples),
    }


def _check_cloud(detector: RemoteDetector, config: ClientConfig) -> None:
    """Ask --cloud whether it serves the export, before any image is evaluated: a call it may
    answer later (unreachable, restarting, busy) sent again within --timeout, as a detection
    call is. CommandError naming the address when it refuses the export for good (another
    model, a bad token), or has not answered by then (nothing evaluated yet, nothing lost)."""
    from splitdet.edge.cli_predict import refused
    from splitdet.edge.client import RetryLater
    from splitdet.edge.predict import ModelRefused
    from splitdet.shared.cli import CommandError

    try:
        detector.ensure_model(f"--cloud {config.addresses}")
    except ModelRefused as exc:
        raise CommandError(refused(config, exc)) from None
    except RetryLater as exc:
        raise CommandError(
            f"cloud {config.addresses}: did not answer within --timeout {config.timeout_s:g} s "
            f"({exc}); nothing evaluated: start the cloud or check the address, or give a "
            "longer --timeout"
        ) from None
