"""`splitdet predict`'s engine: images in, verdicts and detections out (no torch here).

Each image goes through the edge pipeline; flagged ones go to a `Detector` — the cloud heads in
this process, or a remote server through the gRPC client. A file that cannot be read gets an
error entry and the next image is processed.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from splitdet.edge.annotate import save_annotated
from splitdet.edge.file_names import fit_name
from splitdet.edge.pipeline import EdgePipeline, EdgeResult
from splitdet.edge.preprocess import ImageError
from splitdet.shared.detection import Detection

if TYPE_CHECKING:
    from splitdet.edge.client import CloudClient

log = logging.getLogger(__name__)


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
        verdict: "ok" (the gate passed it), "defect" (flagged and sent to detection) or
            "error" (unreadable; see `error`).
        boxes: (x1, y1, x2, y2) in original image px, scores and labels alike ordered.
        timings: seconds per stage, edge ("read", "preprocess", "gate", "complete", "encode")
            and cloud ("cloud_decode", "cloud_rpn", "cloud_roi", "cloud_total", "round_trip").
        bytes_sent: encoded feature bytes sent (or that would be sent) for this image.
        annotated: the annotated image written for it under `--save`, if any.
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

    def to_dict(self) -> dict:
        """JSON-able dict."""
        return asdict(self)


class RemoteDetector:
    """Sends flagged images' features to a cloud server through the gRPC client."""

    def __init__(self, client: CloudClient, fingerprint: str) -> None:
        """`client`: a `splitdet.edge.client.CloudClient`; `fingerprint`: the edge's model's."""
        self.client = client
        self.fingerprint = fingerprint

    def check_model(self) -> None:
        """Refuse early when the server does not serve this edge's model (ValueError naming
        both; NeverRetry with the server's words from a server that serves several)."""
        served = self.client.manifest(self.fingerprint).fingerprint
        if served != self.fingerprint:  # a server that predates choosing: its only model
            raise ValueError(
                f"the cloud serves model {served[:16]}, this edge runs {self.fingerprint[:16]}; "
                "deploy the same export on both sides"
            )

    def detect(
        self, request_id: str, result: EdgeResult, source: str
    ) -> tuple[Sequence[Detection], dict[str, float]]:
        """(detections, server stage timings) for one flagged image."""
        meta = replace(result.meta, source=Path(source).name)
        answer = self.client.detect(result.encoded, meta, request_id, self.fingerprint)
        detections = [
            Detection(tuple(map(float, box)), float(score), int(label), name)
            for box, score, label, name in zip(
                answer.boxes, answer.scores, answer.labels, answer.class_names, strict=True
            )
        ]
        return detections, answer.timings


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
    """Process one image file; never raises for a bad image (the Prediction says why).

    `save_as`: where to write the annotated image if the image is flagged (None: nowhere). A
    failure to write it is the prediction's error; its detections are kept.
    """
    start = time.perf_counter()
    try:
        data = Path(path).read_bytes()
        image = pipeline.decode(data, str(path))  # the bytes its request id hashes
    except (ImageError, OSError) as exc:
        message = str(exc) if isinstance(exc, ImageError) else f"{path}: cannot read ({exc})"
        return Prediction(path=str(path), verdict="error", error=message)
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
    if result.flagged:
        request_id = request_id_for(data, pipeline.manifest.fingerprint, pipeline.codec)
        cloud = detector()  # a misconfigured cloud stops the run: CommandError propagates
        sent = time.perf_counter()
        try:
            detections, server = cloud.detect(request_id, result, str(path))
        except Exception as exc:  # one image's failed call must not lose the others' results
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
                save_annotated(
                    image,
                    prediction.boxes,
                    prediction.scores,
                    prediction.class_names,
                    save_as,
                    result.p_defect,
                )
            except OSError as exc:
                prediction.error = f"{path}: cannot write the annotated image {save_as}: {exc}"
            else:
                prediction.annotated = str(save_as)
    return prediction


def annotated_names(paths: Sequence[Path], save_dir: Path) -> list[Path]:
    """Where each image's annotated copy goes: `save_dir/<stem>.jpg`, and `<stem>_2.jpg`,
    `<stem>_3.jpg`, ... for later images of the same stem (a.png and a.jpg, or two folders
    holding a.jpg), so that no annotated image overwrites another."""
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
    Annotated images go to `save_dir` under the names `annotated_names` gives."""
    paths = list(paths)
    targets = annotated_names(paths, save_dir) if save_dir is not None else [None] * len(paths)
    predictions = []
    for path, save_as in zip(paths, targets, strict=True):
        prediction = predict_one(path, pipeline, detector, score_threshold, save_as)
        if prediction.error:
            log.warning("%s", prediction.error)
        predictions.append(prediction)
        if on_result is not None:
            on_result(prediction)
    return predictions
