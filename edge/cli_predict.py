"""`splitdet predict`: images or folders in, verdicts and detections out.

Only argparse and the standard library at import time. The edge half never imports torch; the
cloud half runs in this process (torch) unless `--cloud ADDRESS` sends to a running server.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from splitdet.edge.cloud_args import (
    PREDICT_SCORE_THRESHOLD,
    add_cloud_arguments,
    add_edge_model_arguments,
    check_edge_model_options,
    client_config,
)
from splitdet.shared.atomic_file import atomic_write

if TYPE_CHECKING:
    from splitdet.edge.client import ClientConfig
    from splitdet.edge.predict import Detector

log = logging.getLogger(__name__)

#: How many names of left-out files a message shows.
SHOWN_NAMES = 5

EPILOG = """\
examples:
  splitdet predict data/gaskets/JPEGImages --model models/gasket --save annotated/
      edge and cloud halves in this process; annotated defect images in annotated/
  splitdet predict img1.jpg img2.png --model models/gasket --json results.json --codec fp16
  splitdet predict archive/ --recursive --model models/gasket --json results.json
  splitdet predict frames/ --model models/gasket --cloud 10.0.0.5:50051 --gate off

--json FILE writes, per image: path, p_defect, verdict (ok | defect | error), boxes
[x1, y1, x2, y2] in original pixels, scores, labels, class_names, per-stage timings (s),
bytes_sent and annotated (the file --save wrote). Unreadable files get verdict "error" with the
reason; the others are processed. --save names each annotated image after its source
(a.png -> a.jpg; a second a.* becomes a_2.jpg). An unwritable --json or --save is refused
before any image is read.
Exit status: 0 all images processed, 1 some images had errors (unreadable, or their detection
call or annotated copy failed), 2 usage or model errors.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `predict` subcommand."""
    p = subparsers.add_parser(
        "predict",
        help="run the edge (and cloud) halves on image files",
        description="Classify images on the edge; detect scratches on the flagged ones.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files or folders")
    p.add_argument(
        "-r", "--recursive", action="store_true", help="take the images of subfolders too"
    )
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="from splitdet export")
    p.add_argument("--json", metavar="FILE", help="write per-image results as JSON ('-': stdout)")
    p.add_argument("--save", metavar="DIR", help="write annotated images of flagged images here")
    p.add_argument(
        "--gate",
        choices=["on", "off"],
        default="on",
        help="off sends every image to detection (default: on)",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=PREDICT_SCORE_THRESHOLD,
        metavar="S",
        help="report and draw boxes scoring at least S (default: 0.5)",
    )
    add_edge_model_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_cloud_arguments(p, required=False)
    p.set_defaults(handler=run)


def local_detector(model_dir: str, threads: int | None) -> Callable[[], Detector]:
    """A factory of the in-process cloud half (`cloud.local.LocalDetector`, torch); calling it
    raises CommandError on an install without torch."""

    def make() -> Detector:
        try:
            from splitdet.cloud.local import LocalDetector
        except ImportError as exc:
            from splitdet.shared.cli import CommandError

            raise CommandError(
                f"in-process detection needs the full install with torch ({exc}); "
                "install splitdet[full] or pass --cloud ADDRESS"
            ) from None
        return LocalDetector(Path(model_dir), threads)

    return make


def remote_detector(config: ClientConfig, fingerprint: str) -> Callable[[], Detector]:
    """A factory of a `RemoteDetector` for the `ClientConfig` `config`; calling it asks the
    server whether it serves `fingerprint` (CommandError naming the address if not, or if it
    cannot be reached)."""

    def make() -> Detector:
        from splitdet.edge.client import CloudClient, CloudError
        from splitdet.edge.predict import RemoteDetector
        from splitdet.shared.cli import CommandError

        detector = RemoteDetector(CloudClient(config), fingerprint)
        try:
            detector.check_model()
        except (CloudError, ValueError) as exc:
            raise CommandError(f"cloud {config.addresses}: {exc}") from None
        return detector

    return make


def check_outputs(json_file: str | None, save_dir: str | None) -> None:
    """Refuse, before any image is processed, a --json FILE or --save DIR that cannot be
    written (CommandError naming it): found only at the end, it would lose the whole run."""
    from splitdet.shared.cli import CommandError

    if json_file and json_file != "-":
        target = Path(json_file)
        folder = target.parent
        if target.is_dir():
            raise CommandError(f"--json {json_file} is a directory; give a file name")
        if not folder.is_dir():
            raise CommandError(f"--json {json_file}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CommandError(f"--json {json_file}: folder {folder} is not writable")
    if save_dir:
        try:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--save {save_dir}: cannot make the folder ({exc})") from None
        if not os.access(save_dir, os.W_OK | os.X_OK):
            raise CommandError(f"--save {save_dir} is not writable")


def check_save_outside_inputs(save_dir: str | None, inputs: list[str]) -> None:
    """Refuse a --save DIR that is an input folder, or a folder of an input file, or lies
    inside an input folder: the annotated copies (named as their images) would overwrite the
    originals, or be taken as new images by a later --recursive run (CommandError)."""
    from splitdet.shared.cli import CommandError

    if not save_dir:
        return
    save = Path(save_dir).resolve()
    for given in inputs:
        path = Path(given).resolve()
        folder = path if path.is_dir() else path.parent
        if save == folder or folder in save.parents:
            raise CommandError(
                f"--save {save_dir} is in the input {given}: the annotated copies would "
                "overwrite the images or join them; give a folder outside the inputs"
            )


def write_json(json_file: str, data: object) -> None:
    """Write `data` as indented JSON for a --json option: to stdout for "-", else to
    `json_file` whole (a temporary file renamed over it); CommandError naming the file."""
    from splitdet.shared.cli import CommandError

    text = json.dumps(data, indent=2) + "\n"
    if json_file == "-":
        sys.stdout.write(text)
        return
    try:
        atomic_write(json_file, text, parents=False)
    except OSError as exc:
        raise CommandError(f"--json {json_file}: cannot write the results ({exc})") from None


def describe_left_out(files: list[Path]) -> str:
    """The files a folder scan left out (`list_images`'s `left_out`) in one phrase: how many,
    of which extensions, a few names, and which extensions a folder scan takes."""
    from collections import Counter

    from splitdet.edge.preprocess import IMAGE_SUFFIXES

    kinds = Counter(p.suffix.lower() or "no extension" for p in files)
    names = ", ".join(str(p) for p in files[:SHOWN_NAMES])
    more = f" and {len(files) - SHOWN_NAMES} more" if len(files) > SHOWN_NAMES else ""
    return (
        f"{len(files)} file(s) of an extension a folder scan does not take "
        f"({', '.join(f'{kind} {n}' for kind, n in kinds.most_common())}: {names}{more}); "
        f"it takes {' '.join(IMAGE_SUFFIXES)} in any case; name a file itself to read it "
        "anyway (e.g. a .webp or .jpe Pillow decodes)"
    )


_T = TypeVar("_T")


def _cached(factory: Callable[[], _T]) -> Callable[[], _T]:
    made: list[_T] = []

    def get() -> _T:
        if not made:
            made.append(factory())
        return made[0]

    return get


def run(args: argparse.Namespace) -> int:
    """Predict and report; see EPILOG for the exit status."""
    from tqdm import tqdm

    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.predict import predict_paths
    from splitdet.edge.preprocess import list_images
    from splitdet.edge.runtime import EdgeRuntime
    from splitdet.shared.cli import CommandError
    from splitdet.shared.manifest import ManifestError

    check_edge_model_options(args)
    if not (math.isfinite(args.score_threshold) and 0 <= args.score_threshold <= 1):
        raise CommandError(
            f"--score-threshold {args.score_threshold:g}: must be a score from 0 to 1"
        )
    inputs = [Path(p) for p in args.images]
    left_out: list[Path] = []
    paths = list_images(inputs, recursive=args.recursive, left_out=left_out)
    if not paths:
        hint = "" if args.recursive else " (--recursive takes those of subfolders too)"
        there = f": left out {describe_left_out(left_out)}" if left_out else ""
        raise CommandError(f"no image files in {' '.join(args.images)}{hint}{there}")
    if left_out:  # once per run, for every folder together
        from PIL import Image

        # a warning when Pillow would read some of them (a.webp): images the user meant
        readable = any(p.suffix.lower() in Image.registered_extensions() for p in left_out)
        level = logging.WARNING if readable else logging.INFO
        log.log(level, "folder scan left out %s", describe_left_out(left_out))
    check_outputs(args.json, args.save)
    check_save_outside_inputs(args.save, args.images)
    try:
        runtime = EdgeRuntime(Path(args.model), threads=args.threads, device=args.device)
        pipeline = EdgePipeline(
            runtime, codec=args.codec, gate=args.gate == "on", threshold=args.threshold
        )
    except (ManifestError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    remote = client_config(args, alone="without it the cloud half runs in this process")
    if remote is None:
        detector = _cached(local_detector(args.model, args.threads))
    else:
        detector = _cached(remote_detector(remote, pipeline.manifest.fingerprint))
    bar = tqdm(total=len(paths), unit="img", disable=args.no_progress, file=sys.stderr)
    predictions = predict_paths(
        paths,
        pipeline,
        detector,
        args.score_threshold,
        Path(args.save) if args.save else None,
        on_result=lambda _: bar.update(),
    )
    bar.close()

    model = {  # which export, at which threshold and codec, said so: each record carries it
        "fingerprint": pipeline.manifest.fingerprint,
        "gate_threshold": pipeline.threshold if args.gate == "on" else None,  # none judged
        "codec": pipeline.codec,
    }
    records = [{**p.to_dict(), **model} for p in predictions]
    if args.json == "-":
        write_json("-", records)
    counts = {v: sum(p.verdict == v for p in predictions) for v in ("ok", "defect")}
    # an image can be flagged and still fail (detection call, annotated copy): count images
    failed = sum(p.error is not None for p in predictions)
    boxes = sum(len(p.boxes) for p in predictions)
    sent = sum(p.bytes_sent for p in predictions)
    print(
        f"{len(predictions)} images: {counts['ok']} ok, {counts['defect']} defect "
        f"({boxes} boxes), {failed} with errors; {sent / 1e6:.2f} MB of features sent",
        file=sys.stderr if args.json == "-" else sys.stdout,
    )
    if args.json and args.json != "-":
        write_json(args.json, records)
    return 1 if failed else 0
