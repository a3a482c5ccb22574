"""`splitdet predict`'s engine: images in, verdicts and detections out (no torch here).

Each image goes through the edge pipeline; flagged ones go to a `Detector` — the cloud heads in
this process, or a remote server through the gRPC client. A file that cannot be read (missing,
not a regular file, over `MAX_FILE_BYTES`, not decodable), or whose detection call fails, gets an
error entry and the next image is processed; a cloud that refuses the model for good
(`ModelRefused`) stops the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from splitdet.edge.annotate import save_annotated_copy
from splitdet.edge.file_identity import path_text
from splitdet.edge.file_names import fit_name
from splitdet.edge.pipeline import EdgePipeline, EdgeResult
from splitdet.edge.preprocess import (
    IMAGE_SUFFIXES,
    ImageError,
    Pixels,
    frame_warning,
    read_image_file,
)
from splitdet.shared.detection import Detection

if TYPE_CHECKING:
    from splitdet.edge.client import CloudClient, CloudDetections

log = logging.getLogger(__name__)

_R = TypeVar("_R")


class Detector(Protocol):
    """Runs the cloud half on one flagged image's encoded features."""

    def detect(
        self, request_id: str, result: EdgeResult, source: str
    ) -> tuple[Sequence[Detection], dict[str, float]]:
        """(detections by decreasing score, server stage timings in seconds)."""
        ...


@dataclass
class Prediction:
    """One image's outcome, as `--json` writes it.

    Attributes:
        path: the image file.
        verdict: "ok" (the gate passed it), "defect" (flagged, and its detection call
            answered) or "error" (unreadable, or flagged and its detection call failed: then
            `p_defect` is kept; see `error`). A "defect" image whose annotated copy could not be
            written keeps its verdict and boxes, with the reason in `error`.
        boxes: (x1, y1, x2, y2) in original image px, scores and labels alike ordered.
        timings: seconds per stage, edge ("read", "preprocess", "gate", "complete", "encode")
            and cloud ("cloud_decode", "cloud_rpn", "cloud_roi", "cloud_total", "round_trip";
            "cloud_retry_wait": the part of the round trip spent retrying, when it was).
        bytes_sent: encoded feature bytes sent (or, detected in this process, that would be
            sent) for this image; 0 when none were, or its detection call failed.
        annotated: the annotated image written for it under `--save`, if any.
        warnings: what is amiss with an image judged all the same, each naming it
            (`preprocess.frame_warning`: a blank frame, a 16-bit one of 12-bit values); empty
            for nearly every image.
    """

    path: str
    verdict: str
    p_defect: float | None = None
    boxes: list[list[float]] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    bytes_sent: int = 0
    error: str | None = None
    annotated: str | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-able dict; a name that is not UTF-8 written with its bytes as \\xNN
        (`file_identity.path_text`, as `edge results` writes it), not as lone surrogates,
        which JSON readers turn into U+FFFD or refuse to write back."""
        record = asdict(self)
        for key in ("path", "error", "annotated"):
            if record[key] is not None:
                record[key] = path_text(record[key])
        record["warnings"] = [path_text(text) for text in record["warnings"]]
        return record


#: Seconds before a detection call the cloud may answer later is sent again, then doubled up to
#: RETRY_MAX_S (`RemoteDetector.detect`), within --timeout.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 5.0
#: Seconds of --timeout a retry must leave its call at least (one with less would end in
#: DEADLINE_EXCEEDED, hiding why the cloud did not answer).
RETRY_MIN_CALL_S = 1.0


class ModelRefused(Exception):
    """The cloud refuses this edge's model for good: it does not serve it (another export, a
    server of another model), or refuses the call itself (a bad token, no TLS where it wants
    it). No flagged image of the run can be detected, so the run stops: `predict_one` lets it
    through, where any other failure of a detection call is that image's error."""


class RemoteDetector:
    """Sends flagged images' features to a cloud server through the gRPC client."""

    def __init__(self, client: CloudClient, fingerprint: str) -> None:
        """`client`: a `splitdet.edge.client.CloudClient`; `fingerprint`: the edge's model's."""
        self.client = client
        self.fingerprint = fingerprint
        #: an image spent its whole --timeout on tries: the next get one each, until answered
        self.gone = False
        #: the cloud said it serves this edge's model (`check_model`, asked once)
        self.model_checked = False

    def check_model(self, timeout: float | None = None) -> None:
        """Refuse early when the server does not serve this edge's model (ValueError naming
        both; NeverRetry with the server's words from a server that serves several);
        `timeout`: the call's deadline, seconds (default: the client's for small calls)."""
        served = self.client.manifest(self.fingerprint, timeout).fingerprint
        if served != self.fingerprint:  # a server that predates choosing: its only model
            raise ValueError(
                f"the cloud serves model {served[:16]}, this edge runs {self.fingerprint[:16]}; "
                "deploy the same export on both sides"
            )

    def ensure_model(self, source: str = "the model check") -> None:
        """Ask the cloud once whether it serves this edge's model (`check_model`), a call it may
        answer later (unreachable, restarting, busy) sent again within the client's timeout
        (--timeout) as `detect` sends a detection call; `source` names the call in the log line
        of its first retry. Nothing once the cloud said yes.

        Raises:
            RetryLater: the cloud did not answer in time (asked again at the next call).
            ModelRefused: the cloud refuses the model for good (see `ModelRefused`).
        """
        deadline = time.monotonic() + self.client.config.timeout_s
        self._retried(self._check_once, deadline, source)

    def _check_once(self, left: float) -> None:
        """`check_model` unless the cloud said yes already, within `left` seconds; its refusal
        (NeverRetry, or ValueError: another model) as ModelRefused."""
        from splitdet.edge.client import NeverRetry

        if self.model_checked:
            return
        try:
            self.check_model(timeout=min(left, self.client.config.manifest_timeout_s))
        except (NeverRetry, ValueError) as exc:
            raise ModelRefused(str(exc)) from None
        self.model_checked = True

    def detect(
        self, request_id: str, result: EdgeResult, source: str
    ) -> tuple[Sequence[Detection], dict[str, float]]:
        """(detections, server stage timings) for one flagged image.

        The first image asks the cloud whether it serves this edge's model first
        (`ensure_model`'s check, within the image's own timeout): ModelRefused when it does not.
        A call the cloud may answer later (`RetryLater`: unreachable, restarting, busy), the
        model check's or the detection's, is sent again with the same request id, after pauses
        of RETRY_FIRST_S doubling to RETRY_MAX_S, while at least RETRY_MIN_CALL_S of the
        client's timeout (--timeout, counted from the first try) is left for the next call: a
        cloud that restarts mid-run costs the images waiting for it time, not their results.
        Each image's first retry is logged (WARNING). Once an image has spent its whole timeout
        so, the cloud is taken for gone: the next images get one try each, until one is answered
        (a cloud lost for good must not cost every image its --timeout). The error of the last
        try is raised. An image answered after retries has "retry_wait_s" among its timings: the
        seconds from its first try to its last (a round trip's time that was the cloud's
        absence, not its work)."""
        # (a name that is not UTF-8 as \xNN: a protobuf string refuses its lone surrogates)
        meta = replace(result.meta, source=path_text(Path(source).name))

        def attempt(left: float) -> CloudDetections:
            self._check_once(left)
            return self.client.detect(
                result.encoded, meta, request_id, self.fingerprint, timeout=left
            )

        deadline = time.monotonic() + self.client.config.timeout_s
        answer, waited = self._retried(attempt, deadline, source)
        detections = [
            Detection(tuple(map(float, box)), float(score), int(label), name)
            for box, score, label, name in zip(
                answer.boxes, answer.scores, answer.labels, answer.class_names, strict=True
            )
        ]
        retried = {"retry_wait_s": waited} if waited > 0 else {}
        return detections, {**answer.timings, **retried}

    def _retried(
        self, call: Callable[[float], _R], deadline: float, source: str
    ) -> tuple[_R, float]:
        """(`call(seconds left)`'s result, seconds from its first try to its last), a call
        failing with RetryLater tried again until `deadline` (monotonic) as `detect` describes
        (one try when the cloud is gone); `source` names the call in the WARNING of its first
        retry."""
        from splitdet.edge.client import RetryLater

        pause = RETRY_FIRST_S
        first = last = time.monotonic()  # (the first try's start, and the last's)
        while True:
            try:
                answer = call(max(deadline - time.monotonic(), 0.001))
                self.gone = False
                return answer, last - first
            except RetryLater as exc:
                if self.gone or deadline - time.monotonic() < pause + RETRY_MIN_CALL_S:
                    self.gone = True
                    raise
                if pause == RETRY_FIRST_S:
                    log.warning(
                        "%s: the cloud did not answer (%s); trying again for up to %.0f s "
                        "(--timeout)", source, exc, deadline - time.monotonic(),
                    )  # fmt: skip
                time.sleep(pause)
                pause = min(2 * pause, RETRY_MAX_S)
                last = time.monotonic()


def request_id_for(data: bytes, fingerprint: str, codec: str) -> str:
    """Idempotency key: the same image bytes, model and codec always give the same id."""
    digest = hashlib.sha256()
    for part in (fingerprint.encode(), codec.encode(), data):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    return digest.hexdigest()


def predict_one(
    path: Path,
    pipeline: EdgePipeline,
    detector: Callable[[], Detector],
    score_threshold: float = 0.0,
    save_as: Path | None = None,
) -> Prediction:
    """Process one image file; never raises for a bad image, nor for a failed detection call
    (the Prediction says why): only for a cloud that refuses the model for good
    (`ModelRefused`), and for a `detector` that cannot be made (its own exception).

    `save_as`: where to write the annotated image if the image is flagged (None: nowhere): a
    new file there, or over an earlier run's annotated copy, never over another file
    (`save_annotated_copy`). A failure to write it is the prediction's error; its detections
    are kept.
    """
    start = time.perf_counter()
    try:
        data = read_image_file(path)
        # its integer pixels (`preprocess.Pixels`): gated, and drawn from if flagged (`--save`)
        image = pipeline.decode(data, str(path))  # the bytes its request id hashes
    except ImageError as exc:
        return Prediction(path=str(path), verdict="error", error=str(exc))
    read_s = time.perf_counter() - start
    try:
        result = pipeline.process_array(image)
    except ImageError as exc:
        return Prediction(path=str(path), verdict="error", error=f"{path}: {exc}")
    prediction = Prediction(
        path=str(path),
        verdict="defect" if result.flagged else "ok",
        p_defect=result.p_defect,
        timings={"read": read_s, **result.timings},
        bytes_sent=result.bytes_sent,
    )
    warning = frame_warning(image, str(path)) if isinstance(image, Pixels) else None
    if warning is not None:  # judged all the same: the verdict is the model's
        prediction.warnings.append(warning.message)
    if result.flagged:
        request_id = request_id_for(data, pipeline.manifest.fingerprint, pipeline.codec)
        cloud = detector()  # a misconfigured cloud stops the run: CommandError propagates
        sent = time.perf_counter()
        try:
            detections, server = cloud.detect(request_id, result, str(path))
        except ModelRefused:  # no image of the run can be detected: the caller stops it
            raise
        except Exception as exc:  # one image's failed call must not lose the others' results
            # no detections to report: an error, not a defect with no boxes; nothing delivered
            prediction.verdict, prediction.bytes_sent = "error", 0
            prediction.error = f"{path}: detection failed: {exc}"
            return prediction
        prediction.timings["round_trip"] = time.perf_counter() - sent
        prediction.timings.update({f"cloud_{k.removesuffix('_s')}": v for k, v in server.items()})
        kept = [d for d in detections if d.score >= score_threshold]
        prediction.boxes = [list(map(float, d.box)) for d in kept]
        prediction.scores = [float(d.score) for d in kept]
        prediction.labels = [int(d.label) for d in kept]
        prediction.class_names = [d.class_name for d in kept]
        if save_as is not None:
            try:
                save_annotated_copy(
                    image,
                    prediction.boxes,
                    prediction.scores,
                    prediction.class_names,
                    save_as,
                    result.p_defect,
                    prediction.labels,
                )
            except OSError as exc:
                prediction.error = f"{path}: cannot write the annotated image {save_as}: {exc}"
            else:
                prediction.annotated = str(save_as)
    return prediction


#: Kinds of folder entries `scan_inputs` skips (`InputScan.skipped`'s keys, in this order), as
#: a log line names them.
SKIP_HIDDEN = "hidden, named .*"
SKIP_FOLDER_LINK = "symbolic links to folders, not followed"
SKIP_DANGLING_LINK = "dangling symbolic links"
SKIP_SPECIAL = "FIFOs, devices or sockets"
SKIP_UNREADABLE = "folders that cannot be listed"
SKIP_KINDS = (SKIP_HIDDEN, SKIP_FOLDER_LINK, SKIP_DANGLING_LINK, SKIP_SPECIAL, SKIP_UNREADABLE)


@dataclass
class InputScan:
    """What `scan_inputs` made of the files and folders given.

    Attributes:
        paths: the images to process, each file once: the files given as given (missing
            ones too: each is an error of its own), then each folder's image files by name
            (`IMAGE_SUFFIXES`, any case), sorted, in the order the inputs were given.
        left_out: the folders' regular files of other extensions, sorted.
        skipped: entries of the folders left alone by kind (`SKIP_*`), each list sorted.
        subfolders: subfolders not entered (without `recursive`), sorted.
        duplicates: inputs dropped as the same file (by resolved path) as an earlier one.
    """

    paths: list[Path] = field(default_factory=list)
    left_out: list[Path] = field(default_factory=list)
    skipped: dict[str, list[Path]] = field(default_factory=dict)
    subfolders: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)


def scan_inputs(inputs: Iterable[Path], recursive: bool = False) -> InputScan:
    """Expand the folders among `inputs` into their image files (with `recursive`, those of
    every subfolder too), keep files as given, and drop repeats of the same file.

    Hidden entries (".x.jpg", ".trash/") are skipped, so are symbolic links to folders (never
    followed: no loops, no leaving the tree), dangling links, FIFOs, devices and sockets; a
    symbolic link to a regular file is taken. Every entry left out is in the result, for the
    caller to report."""
    scan = InputScan()
    found: list[Path] = []
    for given in map(Path, inputs):
        if not given.is_dir():
            found.append(given)
            continue
        files: list[Path] = []
        _scan_folder(given, recursive, scan, files)
        found.extend(sorted(files))
    seen: set[str] = set()
    for path in found:
        key = os.path.realpath(path)
        if key in seen:
            scan.duplicates.append(path)
        else:
            seen.add(key)
            scan.paths.append(path)
    scan.left_out.sort()
    scan.subfolders.sort()
    scan.skipped = {kind: sorted(scan.skipped[kind]) for kind in SKIP_KINDS if kind in scan.skipped}
    return scan


def _scan_folder(folder: Path, recursive: bool, scan: InputScan, files: list[Path]) -> None:
    """Add `folder`'s image files to `files` (and its subfolders' with `recursive`), and what it
    leaves out to `scan`."""
    try:
        with os.scandir(folder) as listing:
            entries = list(listing)
    except OSError:
        scan.skipped.setdefault(SKIP_UNREADABLE, []).append(folder)
        return
    for entry in entries:
        path = folder / entry.name
        kind = None
        try:
            if entry.name.startswith("."):
                kind = SKIP_HIDDEN
            elif entry.is_dir(follow_symlinks=False):
                if recursive:
                    _scan_folder(path, recursive, scan, files)
                else:
                    scan.subfolders.append(path)
                continue
            elif entry.is_symlink():
                try:
                    mode = os.stat(path).st_mode
                except OSError:  # no target (or a loop of links)
                    kind = SKIP_DANGLING_LINK
                else:
                    kind = SKIP_FOLDER_LINK if stat.S_ISDIR(mode) else None
            else:
                mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:  # gone since the listing
            continue
        if kind is None and not stat.S_ISREG(mode):
            kind = SKIP_SPECIAL
        if kind is not None:
            scan.skipped.setdefault(kind, []).append(path)
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(path)
        else:
            scan.left_out.append(path)


def annotated_names(paths: Sequence[Path], save_dir: Path) -> list[Path]:
    """Where each image's annotated copy goes: `save_dir/<stem>.jpg`, and `<stem>_2.jpg`,
    `<stem>_3.jpg`, ... for later images of the same stem (a.png and a.jpg, or two folders
    holding a.jpg), so that no annotated image of the run overwrites another. A name already
    taken by a file predict did not write is never written over (`save_annotated_copy`)."""
    taken: set[str] = set()
    names = []
    for path in paths:
        stem, n = Path(path).stem, 1
        name = fit_name(stem, ".jpg")
        while name.lower() in taken:
            n += 1
            name = fit_name(stem, f"_{n}.jpg")
        taken.add(name.lower())
        names.append(Path(save_dir) / name)
    return names


def predict_paths(
    paths: Iterable[Path],
    pipeline: EdgePipeline,
    detector: Callable[[], Detector],
    score_threshold: float = 0.0,
    save_dir: Path | None = None,
    on_result: Callable[[Prediction], None] | None = None,
) -> list[Prediction]:
    """`predict_one` over many files; `detector` is called lazily (only if an image is flagged).
    Annotated images go to `save_dir` under the names `annotated_names` gives. Each image's
    warnings (`Prediction.warnings`) and error are logged as WARNINGs."""
    paths = list(paths)
    targets = annotated_names(paths, save_dir) if save_dir is not None else [None] * len(paths)
    predictions = []
    for path, save_as in zip(paths, targets, strict=True):
        prediction = predict_one(path, pipeline, detector, score_threshold, save_as)
        for text in prediction.warnings:
            log.warning("%s", text)
        if prediction.error:
            log.warning("%s", prediction.error)
        predictions.append(prediction)
        if on_result is not None:
            on_result(prediction)
    return predictions
