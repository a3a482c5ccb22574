"""`splitdet predict`: images or folders in, verdicts and detections out.

Only argparse and the standard library at import time. The edge half never imports torch; the
cloud half runs in this process (torch) unless `--cloud ADDRESS` sends to a running server.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
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
from splitdet.shared.shortage import short_of

if TYPE_CHECKING:
    from splitdet.edge.client import ClientConfig
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.predict import Detector, InputScan, Prediction, RemoteDetector

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

--json FILE writes a list of records, one per image: path, p_defect, verdict (ok | defect |
error), boxes [x1, y1, x2, y2] in original pixels, scores, labels, class_names, per-stage
timings (s), bytes_sent, error, annotated (the file --save wrote), warnings (a blank frame, a
16-bit image of 12-bit values: judged all the same), and the run's fingerprint,
gate_threshold, codec, score_threshold (the boxes kept) and run_complete (false in every
record of a run stopped by Ctrl-C, exit status 130, by SIGTERM, 143, or by a cloud that
refuses the model for good, exit status 2: the images finished by then are written).
Unreadable files (missing, not a regular file, over 256 MiB, not an image) and flagged images
whose detection call failed (the cloud unreachable or busy past --timeout too) get verdict
"error" with the reason (the latter keep p_defect); the others are processed.
Each file is processed once, however often it is named. --save names each annotated image after
its source (a.png -> a.jpg; a second a.* becomes a_2.jpg); it replaces an earlier run's
annotated copies (marked as such in the JPEG), never another file. An unwritable --json or
--save, a --json that would overwrite an input or an image file, a --save where the annotated
copies could overwrite inputs (an input file's own folder, an input folder, or with --recursive
any folder inside one), and a --save where a copy's name is taken by anything but an earlier
annotated copy (a file, a link, a folder) are refused before any image is read.
Exit status: 0 all images processed, 1 some images had errors (unreadable, or their detection
call or annotated copy failed), 2 usage or model errors (a cloud that does not serve the model
or refuses the token too), 130 interrupted (Ctrl-C), 143 stopped on SIGTERM.
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
        help="off sends every image to detection: each is then a defect by verdict, its boxes "
        "saying whether anything was found (default: on)",
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
    add_cloud_arguments(p, required=False, retried=True)
    p.set_defaults(handler=run)


#: The modules whose absence means an install without torch (the edge-only install).
TORCH_MODULES = ("torch", "torchvision")


def local_detector(
    model_dir: str, threads: int | None, fingerprint: str | None = None
) -> Callable[[], Detector]:
    """A factory of the in-process cloud half (`cloud.local.LocalDetector`, torch); calling it
    raises CommandError when torch cannot be imported: the full install's advice only when
    torch or torchvision is not installed (ModuleNotFoundError naming it), else that torch is
    installed but could not be loaded, and why (a memory limit failing its libraries' load).

    `fingerprint`: the export the edge half was loaded from. The cloud half loads later, at the
    first flagged image, from the folder as it is then: one re-exported meanwhile (a normal
    step into the same --model) would pair this edge half with another model's heads, which
    decode its features into wrong boxes (or none) recorded under the edge's fingerprint. Such a
    folder, or one that cannot be served then (an export being written), raises
    `ModelRefused`, as a cloud serving another export does: the run stops, what it judged kept."""

    def make() -> Detector:
        from splitdet.edge.predict import ModelRefused
        from splitdet.shared.manifest import ManifestError

        try:
            from splitdet.cloud.local import LocalDetector
        except (ImportError, OSError) as exc:
            raise torch_unusable(exc) from None
        try:
            detector = LocalDetector(Path(model_dir), threads)
        except ManifestError as exc:
            raise ModelRefused(f"--model {model_dir}: its cloud half: {exc}") from None
        served = detector.core.fingerprint
        if fingerprint is not None and served != fingerprint:
            raise ModelRefused(
                f"--model {model_dir} now holds export {served[:16]}, not {fingerprint[:16]} "
                "whose edge half this run loaded: it was exported into again while the run "
                "went on; run it again on the new export"
            )
        return detector

    return make


def torch_unusable(exc: ImportError | OSError) -> Exception:
    """The CommandError for an import of the in-process cloud half that failed with `exc`."""
    from splitdet.shared.cli import FULL_INSTALL, CommandError

    name = getattr(exc, "name", None) or ""
    if isinstance(exc, ModuleNotFoundError) and name.split(".")[0] in TORCH_MODULES:
        return CommandError(
            f"in-process detection needs the full install with torch ({exc}); "
            f"{FULL_INSTALL}, or pass --cloud ADDRESS"
        )
    hint = (
        ": out of memory? check ulimit -v / the container's memory limit"
        if short_of(exc) == "memory"  # dlopen's "failed to map segment", ENOMEM
        else ""
    )
    return CommandError(
        f"in-process detection needs torch, which is installed but could not be loaded "
        f"({type(exc).__name__}: {exc}){hint}; or pass --cloud ADDRESS"
    )


def remote_detector(config: ClientConfig, fingerprint: str) -> Callable[[], RemoteDetector]:
    """A factory of a `RemoteDetector` for the `ClientConfig` `config`. Nothing is sent yet: the
    detector asks the server whether it serves `fingerprint` at its first call
    (`RemoteDetector.ensure_model`, retried within --timeout), and raises `ModelRefused` for
    good when it does not (`refused` words it)."""

    def make() -> RemoteDetector:
        from splitdet.edge.client import CloudClient
        from splitdet.edge.predict import RemoteDetector

        return RemoteDetector(CloudClient(config), fingerprint)

    return make


def refused(config: ClientConfig, exc: Exception) -> str:
    """The message of a cloud that refuses the model for good (`ModelRefused` `exc`)."""
    return f"cloud {config.addresses}: {exc}"


def check_outputs(json_file: str | None) -> None:
    """Refuse, before any image is processed, a --json FILE that cannot be written, or
    --json - with stdout closed (CommandError naming it): found only at the end, it would lose
    the whole run."""
    from splitdet.shared.cli import CommandError, refuse_closed_stdout

    if json_file == "":  # (an unset shell variable: --json "$OUT")
        raise CommandError("--json '': give a file name, or - for stdout")
    if json_file == "-":  # (`>&-`: found only at the end, it would lose the whole run)
        refuse_closed_stdout("--json - writes the results there (give --json FILE)")
    if json_file and json_file != "-":
        target = Path(json_file)
        folder = target.parent
        if target.is_dir():
            raise CommandError(f"--json {json_file} is a directory; give a file name")
        if not folder.is_dir():
            raise CommandError(f"--json {json_file}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CommandError(f"--json {json_file}: folder {folder} is not writable")


def check_save_outside_inputs(
    save_dir: str | None, inputs: list[str], recursive: bool = False
) -> None:
    """Refuse a --save DIR where the annotated copies could overwrite inputs (CommandError).

    The copies are written as DIR/<stem>.jpg: they could overwrite an input file only in
    the file's own folder (as given, or where a symbolic link leads), and the images of an
    input folder only in that folder itself, or, with `recursive`, in any folder inside it
    (where they would also join the images of the next --recursive run). A missing input
    cannot be overwritten: it is an error of its own when it is read."""
    from splitdet.shared.cli import CommandError

    if not save_dir:
        return
    save = Path(os.path.realpath(save_dir))
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            folder = Path(os.path.realpath(path))
            inside = recursive and folder in save.parents
            if save != folder and not inside:
                continue
        elif path.exists():
            folders = {Path(os.path.realpath(path.parent)), Path(os.path.realpath(path)).parent}
            if save not in folders:
                continue
        else:
            continue
        raise CommandError(
            f"--save {save_dir} is in the input {given}: the annotated copies would "
            "overwrite the images or join them; give a folder outside the inputs"
        )


class _Inputs:
    """The input images by where they lie once links are followed, and by file identity
    (device, inode), looked up in constant time: a check of n outputs against n inputs is
    linear (10,000 images took minutes as pairs)."""

    def __init__(self, images: list[Path]) -> None:
        self.by_place: dict[str, Path] = {}
        self.by_identity: dict[tuple[int, int], Path] = {}
        for image in images:
            self.by_place.setdefault(os.path.realpath(image), image)
            with contextlib.suppress(OSError):
                info = image.stat()
                self.by_identity.setdefault((info.st_dev, info.st_ino), image)

    def at(self, target: Path, hard_links: bool = True) -> Path | None:
        """The input that writing `target` would overwrite: the same place once links are
        followed, or (with `hard_links`) the same file under another name; None for none."""
        image = self.by_place.get(os.path.realpath(target))
        if image is not None or not hard_links:
            return image
        try:
            found = target.stat()
        except OSError:
            return None
        return self.by_identity.get((found.st_dev, found.st_ino))


def check_copies_spare_inputs(save_dir: str, images: list[Path], annotated: list[Path]) -> None:
    """Refuse a --save whose annotated copies (`annotated`, one per image) would be written
    over one of the `images` (CommandError): a link in --save to an input, or a link among the
    inputs into --save (the folder rule of `check_save_outside_inputs` sees neither). A copy's
    name that is a hard link to an input is no risk to the input: the copy would replace the
    name (a rename), never the input's bytes (and `check_copies_spare_others` refuses the name
    anyway, as a file predict did not write)."""
    from splitdet.shared.cli import CommandError

    inputs = _Inputs(images)
    for copy in annotated:
        image = inputs.at(copy, hard_links=False)
        if image is not None:
            raise CommandError(
                f"--save {save_dir}: its annotated copy {copy} would be written over the input "
                f"image {image} (a link joins them); choose another --save"
            )


def check_copies_spare_others(save_dir: str, annotated: list[Path]) -> None:
    """Refuse a --save where a name of the `annotated` copies is taken by something predict
    did not write (CommandError naming the first, and how many more): a file of the user's
    (a dataset's image, --save naming its folder by mistake), a symbolic link, a folder, a
    file that cannot be read (`foreign_file`). An earlier run's annotated copy is no
    obstacle: a re-run into the same folder replaces it, the folder showing the latest run.

    Refused as a whole, before any image is read, rather than written beside under a free
    name: a --save pointed at the wrong folder would fill it with annotated images (which a
    dataset's next training would take as its own), and a re-run's names would drift."""
    from splitdet.edge.annotate import foreign_file
    from splitdet.shared.cli import CommandError

    taken = [(copy, found) for copy in annotated if (found := foreign_file(copy)) is not None]
    if not taken:
        return
    (copy, found), others = taken[0], [other for other, _ in taken[1:]]
    more = f" (and {len(others)} more: {some_names(others)})" if others else ""
    raise CommandError(
        f"--save {save_dir}: {copy}, where an annotated copy would go, is {found}{more}; "
        "predict replaces only the annotated copies it wrote: move it, or choose another --save"
    )


def check_json_target(
    json_file: str | None,
    images: list[Path],
    annotated: list[Path] | None = None,
    save_dir: str | None = None,
) -> None:
    """Refuse a --json FILE that would overwrite one of the `images` to process (the same
    path, or the same file through a link), any other existing image file (named as
    `IMAGE_SUFFIXES` name them), or one of the `annotated` copies --save will write
    (CommandError): the results would replace an image. Refuse too a --json that is, or
    lies above, the `save_dir` folder (--save, made when the run starts): the results could
    not be written at the end, the whole run lost."""
    from splitdet.edge.preprocess import IMAGE_SUFFIXES
    from splitdet.shared.cli import CommandError

    if not json_file or json_file == "-":
        return
    target = Path(json_file)
    where = os.path.realpath(target)
    image = _Inputs(images).at(target)
    if image is not None:
        raise CommandError(
            f"--json {json_file} is the input image {image}: the results would overwrite "
            "it; give another file"
        )
    if target.is_file() and target.suffix.lower() in IMAGE_SUFFIXES:
        raise CommandError(
            f"--json {json_file} is an image file: the results would overwrite it; give "
            "another file (e.g. results.json)"
        )
    if any(os.path.realpath(copy) == where for copy in annotated or []):
        raise CommandError(
            f"--json {json_file} is where --save writes an annotated image; give another file"
        )
    if save_dir and Path(where) in (save := Path(os.path.realpath(save_dir)), *save.parents):
        raise CommandError(
            f"--json {json_file} is where --save {save_dir} makes its folder; give another file"
        )


def check_save_folder(save_dir: str) -> None:
    """Refuse a --save DIR that cannot be made or written (CommandError naming it), without
    making it: a run refused later leaves no folder behind."""
    from splitdet.shared.cli import CommandError

    path = Path(save_dir)
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise CommandError(f"--save {save_dir} is not writable")
        return
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    else:
        return
    raise CommandError(f"--save {save_dir}: cannot make the folder ({problem})")


def make_save_folder(save_dir: str) -> list[Path]:
    """Make --save DIR (and its missing parents); the folders made, outermost first
    (CommandError naming it if it cannot be made)."""
    from splitdet.shared.cli import CommandError

    path = Path(save_dir)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    try:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(f"--save {save_dir}: cannot make the folder ({exc})") from None
    return missing[::-1]


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders `make_save_folder` made, innermost first, as long as they are empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def check_connection_options(args: argparse.Namespace) -> None:
    """Refuse a connection option given without --cloud, whatever its value (`--timeout 0`
    too), naming every one (CommandError): before the inputs are scanned."""
    from splitdet.edge.cloud_args import connection_options_given
    from splitdet.shared.cli import CommandError

    if args.cloud is not None:
        return
    given = connection_options_given(args)
    if given:
        raise CommandError(
            f"{', '.join(given)}: for --cloud only (without it the cloud half runs in this process)"
        )


def write_json(json_file: str, data: object) -> None:
    """Write `data` as indented JSON for a --json option, its names escaped as `json_text`
    says: to stdout for "-", else to `json_file` whole (a temporary file renamed over it);
    CommandError naming the file."""
    from splitdet.shared.cli import CommandError
    from splitdet.shared.strict_json import strict_dumps

    text = strict_dumps(json_text(data), indent=2) + "\n"  # (no NaN/Infinity token)
    if json_file == "-":
        sys.stdout.write(text)
        return
    try:
        atomic_write(json_file, text, parents=False)
    except OSError as exc:
        raise CommandError(f"--json {json_file}: cannot write the results ({exc})") from None


def json_text(data: object) -> object:
    """`data` (what json.dumps takes) with each string in it, dict keys too, as
    `file_identity.path_text` writes a name: the bytes of a name that is not UTF-8 as
    ``\\xNN``, as `predict --json` and `edge results` write them, not as the lone surrogates
    Python reads them as (json.dumps writes ``\\udce9``, which jq turns into U+FFFD and a
    UTF-8 encoder refuses). Valid text is left as it is."""
    from splitdet.edge.file_identity import path_text

    if isinstance(data, str):
        return path_text(data)
    if isinstance(data, dict):
        return {json_text(k): json_text(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_text(v) for v in data]
    return data


def describe_left_out(files: list[Path]) -> str:
    """The files a folder scan left out (`InputScan.left_out`) in one phrase: how many,
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


def describe_skipped(scan: InputScan) -> str:
    """The folder entries a scan skipped (`InputScan.skipped`) in one phrase: by kind, how
    many, a few names."""
    parts = []
    for kind, entries in scan.skipped.items():
        parts.append(f"{kind}: {len(entries)} ({some_names(entries)})")
    return "; ".join(parts)


def some_names(paths: Sequence[Path]) -> str:
    """The first SHOWN_NAMES of `paths` and how many more: "a.jpg, b.jpg and 3 more"."""
    names = ", ".join(str(p) for p in paths[:SHOWN_NAMES])
    return names + (f" and {len(paths) - SHOWN_NAMES} more" if len(paths) > SHOWN_NAMES else "")


def log_scan(scan: InputScan, recursive: bool, recursive_option: bool = True) -> None:
    """Say once per run what the folder scan left alone, and which inputs were repeats (the
    files of other extensions only when there are images: else the error names them);
    `recursive_option`: the command has --recursive (the skipped subfolders' hint names it)."""
    if scan.left_out and scan.paths:  # once per run, for every folder together
        from PIL import Image

        # a warning when Pillow would read some of them (a.webp): images the user meant
        readable = any(p.suffix.lower() in Image.registered_extensions() for p in scan.left_out)
        level = logging.WARNING if readable else logging.INFO
        log.log(level, "folder scan left out %s", describe_left_out(scan.left_out))
    if scan.skipped:
        log.info("folder scan skipped %s", describe_skipped(scan))
    if scan.subfolders and not recursive:
        log.info(
            "folder scan skipped %d subfolder(s) (%s)%s",
            len(scan.subfolders),
            some_names(scan.subfolders),
            ": --recursive takes their images too" if recursive_option else "",
        )
    if scan.duplicates:
        log.info(
            "skipped %d duplicate input(s), the same file as one named before: %s",
            len(scan.duplicates),
            some_names(scan.duplicates),
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
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.predict import ModelRefused, annotated_names, scan_inputs
    from splitdet.edge.runtime import EdgeRuntime, ModelOutputError
    from splitdet.shared.cli import FULL_INSTALL, CommandError, has_full_install
    from splitdet.shared.manifest import ManifestError
    from splitdet.shared.sigterm import Terminated

    check_edge_model_options(args)
    if args.gate == "off" and args.threshold is not None:  # (it was ignored in silence)
        raise CommandError(
            f"--threshold {args.threshold:g} with --gate off: no image is judged by the gate "
            "(every one goes to detection); give one or the other"
        )
    if not (math.isfinite(args.score_threshold) and 0 <= args.score_threshold <= 1):
        raise CommandError(
            f"--score-threshold {args.score_threshold:g}: must be a score from 0 to 1"
        )
    check_connection_options(args)
    scan = scan_inputs([Path(p) for p in args.images], recursive=args.recursive)
    paths = scan.paths
    log_scan(scan, args.recursive)
    if not paths:
        hint = "" if args.recursive else " (--recursive takes those of subfolders too)"
        there = f": left out {describe_left_out(scan.left_out)}" if scan.left_out else ""
        raise CommandError(f"no image files in {' '.join(args.images)}{hint}{there}")
    save_dir = Path(args.save) if args.save else None
    targets = annotated_names(paths, save_dir) if save_dir is not None else None
    check_json_target(args.json, paths, targets, args.save)
    check_save_outside_inputs(args.save, args.images, args.recursive)
    if targets is not None:
        check_copies_spare_inputs(args.save, paths, targets)
    check_outputs(args.json)
    if args.save:
        check_save_folder(args.save)
    if targets is not None:
        check_copies_spare_others(args.save, targets)
    try:
        runtime = EdgeRuntime(Path(args.model), threads=args.threads, device=args.device)
        pipeline = EdgePipeline(
            runtime, codec=args.codec, gate=args.gate == "on", threshold=args.threshold
        )
    except (ManifestError, ValueError, RuntimeError) as exc:
        raise CommandError(str(exc)) from None
    remote = client_config(args, alone="without it the cloud half runs in this process")
    can_flag = args.gate == "off" or pipeline.threshold <= 1  # (p >= 1 is a saturated gate's)
    if remote is None and can_flag and not has_full_install():
        # said now, not at the first flagged image, the gate's work on those before it lost
        raise CommandError(
            "without --cloud the detection of flagged images runs in this process, which needs "
            f"the full install with torch; {FULL_INSTALL}, or pass --cloud ADDRESS"
        )
    if remote is None:
        fingerprint = pipeline.manifest.fingerprint
        detector = _cached(local_detector(args.model, args.threads, fingerprint))
    else:
        detector = _cached(remote_detector(remote, pipeline.manifest.fingerprint))
    made = make_save_folder(args.save) if args.save else []
    done: list[Prediction] = []
    refusal = None  # the cloud refused the model for good: the run stopped, what it judged kept
    interrupt: KeyboardInterrupt | None = None  # Ctrl-C or SIGTERM: the images judged kept
    try:
        interrupt = _predict(args, paths, pipeline, detector, save_dir, done)
        complete = interrupt is None
    except ModelRefused as exc:
        complete, refusal = False, refused(remote, exc) if remote is not None else str(exc)
    except ModelOutputError as exc:  # the export's gate gives no p(defect): no verdict at all
        complete, refusal = False, str(exc)
    except CommandError:  # refused (e.g. torch unusable): leave no folder behind
        remove_if_empty(made)
        raise
    model = {  # which export, at which threshold and codec, said so: each record carries it
        "fingerprint": pipeline.manifest.fingerprint,
        "gate_threshold": pipeline.threshold if args.gate == "on" else None,  # none judged
        "codec": pipeline.codec,
        "score_threshold": args.score_threshold,  # (boxes scoring below it are left out)
        "run_complete": complete,  # false: stopped (Ctrl-C, the cloud's refusal), images missing
    }
    records = [{**p.to_dict(), **model} for p in done]
    if args.json == "-":
        write_json("-", records)
    print(
        summary(
            done,
            len(paths),
            "interrupted"
            if refusal is None and not isinstance(interrupt, Terminated)
            else "stopped",
            sent=remote is not None,
        ),
        file=sys.stderr if args.json == "-" else sys.stdout,
    )
    if args.json and args.json != "-":
        write_json(args.json, records)
    if refusal is not None:
        remove_if_empty(made)
        kept = f"; the {len(done)} image(s) judged before are in --json {args.json}"
        raise CommandError(refusal + (kept if done and args.json else ""))
    if interrupt is not None:  # the CLI's "interrupted" (130) or "stopped on SIGTERM" (143)
        raise interrupt
    return 1 if any(p.error is not None for p in done) else 0


def _predict(
    args: argparse.Namespace,
    paths: list[Path],
    pipeline: EdgePipeline,
    detector: Callable[[], Detector],
    save_dir: Path | None,
    done: list[Prediction],
) -> KeyboardInterrupt | None:
    """Run `predict_paths` over `paths`, each finished image's Prediction appended to `done`;
    None when it ran to the end, else the Ctrl-C or SIGTERM (`Terminated`) that stopped it,
    `done` holding the images finished.
    `ModelRefused` (a cloud that refuses the model for good) propagates, `done` as filled."""
    from tqdm import tqdm

    from splitdet.edge.predict import predict_paths
    from splitdet.shared.progress import progress_off

    off = progress_off(args.no_progress)  # (no bar into a log file either)
    bar = tqdm(total=len(paths), unit="img", disable=off, file=sys.stderr)

    def finished(prediction: Prediction) -> None:
        done.append(prediction)
        bar.update()

    try:
        predict_paths(
            paths,
            pipeline,
            detector,
            args.score_threshold,
            save_dir,
            on_result=finished,
        )
    except KeyboardInterrupt as exc:
        return exc
    finally:
        bar.close()
    return None


def class_counts(predictions: list[Prediction]) -> dict[str, int]:
    """{class name: boxes of it} over the predictions, the most found first (ties by name)."""
    from collections import Counter

    counts = Counter(name for prediction in predictions for name in prediction.class_names)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def summary(
    predictions: list[Prediction], total: int, stopped: str = "interrupted", sent: bool = False
) -> str:
    """The run's one-line summary: images by verdict (ok + defect + error = the images), the
    boxes of the defect ones (by class when there are several: `class_counts`) and how many
    of them have none, the annotated copies that failed,
    and the feature bytes sent (those of answered detection calls; `sent`: to a cloud,
    --cloud, else "would be sent": both halves ran here, nothing was sent); `total`: the
    images there were to process; `stopped`: how a run that did not reach them all ended
    ("interrupted", "stopped")."""
    counts = {v: sum(p.verdict == v for p in predictions) for v in ("ok", "defect", "error")}
    boxes = sum(len(p.boxes) for p in predictions)
    # flagged, detected, nothing found at --score-threshold (all defect-free ones, --gate off)
    boxless = sum(p.verdict == "defect" and not p.boxes for p in predictions)
    none = f"; {boxless} with no box" if boxless else ""
    kinds = class_counts(predictions)
    if len(kinds) > 1:  # several classes found: how many of each (one: the count says it)
        none = f": {', '.join(f'{n} {name}' for name, n in kinds.items())}{none}"
    # a detected image whose annotated copy could not be written: a defect with an error
    unsaved = sum(p.verdict == "defect" and p.error is not None for p in predictions)
    features = sum(p.bytes_sent for p in predictions if p.verdict != "error")
    head = f"{len(predictions)} images"
    if len(predictions) < total:
        head = f"{stopped} after {len(predictions)} of {total} images"
    copies = f", {unsaved} annotated copies not written" if unsaved else ""
    return (
        f"{head}: {counts['ok']} ok, {counts['defect']} defect ({boxes} boxes{none}){copies}, "
        f"{counts['error']} errors; {features / 1e6:.2f} MB of features "
        f"{'sent' if sent else 'would be sent'}"
    )
