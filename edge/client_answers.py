"""The cloud's answers as the edge client takes them (torch-free): the answer types, the checks
every answer passes before anyone sees it (`checked_detections`), and the rules of each model
they are checked by (`AnswerRules`), kept for the process (`remember_rules`, `known_rules`)."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np

from splitdet.edge.client_channel import ANSWER_BOXES_ALLOWED, CLASS_NAME_BYTES_ALLOWED
from splitdet.edge.client_errors import BadAnswer
from splitdet.shared.config import ModelConfig
from splitdet.shared.manifest import Manifest, compute_fingerprint
from splitdet.shared.wire import detection_pb2 as pb

#: How far (px) a box corner may lie outside its original image and still be taken (then
#: clamped onto the image). torchvision clips every box to the resized image, then scales it
#: by original / resized in float32 (`resize_boxes`): a corner on the image's edge may come out
#: a few float32 steps past it, at most ~0.01 px at the largest side a request may have (65536
#: px). Our cloud clamps onto the original image before it answers (so in-process detections
#: equal a server's, box for box); an older or another server may not. 1 px allows that a
#: hundredfold; a box further out was not mapped onto this image, and clamping would turn it
#: into a plausible box on the image's border (which `edge collect` would write as a label): it
#: is refused.
BOX_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class CloudDetections:
    """The cloud's answer for one image.

    Attributes:
        request_id: the request's id.
        fingerprint: the fingerprint of the model that answered.
        boxes: float32 [K, 4], x1y1x2y2 in original-image px, by decreasing score.
        scores: float32 [K].
        labels: int64 [K], 1-based class indices.
        class_names: per box, the class name of its label.
        timings: server-side seconds: "decode_s", "rpn_s", "roi_s", "total_s".
        cached: the server answered from its idempotency store (heads not run again).
    """

    request_id: str
    fingerprint: str
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    timings: dict[str, float]
    cached: bool


@dataclass(frozen=True)
class ServedManifest:
    """The manifest of a model the cloud serves.

    Attributes:
        fingerprint: that model's fingerprint.
        data: its manifest.json's contents.
        served: every model the server serves, its default first (a server older than this
            field reports only `fingerprint`).
    """

    fingerprint: str
    data: dict[str, Any]
    served: tuple[str, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        """The model's foreground class names (label k is class_names[k - 1])."""
        return tuple(self.data.get("class_names", ()))


@dataclass(frozen=True)
class AnswerRules:
    """What an answer of one model export may hold, from that export's manifest.

    Attributes:
        fingerprint: the export's fingerprint.
        class_names: its foreground classes; label k (1-based) is class_names[k - 1].
        max_boxes: its `box_detections_per_img`, the most boxes one answer holds.
    """

    fingerprint: str
    class_names: tuple[str, ...]
    max_boxes: int

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> AnswerRules:
        """The rules of a manifest read (and verified) from a model directory."""
        config = manifest.model_config
        return cls(manifest.fingerprint, config.class_names, config.box_detections_per_img)

    @classmethod
    def from_served(cls, fingerprint: str, data: Any) -> AnswerRules:
        """The rules of a manifest the cloud sent as the one of `fingerprint`, believed only
        when its contents hash to that fingerprint (artifact digests, model settings, gate
        threshold and spec version, as `splitdet export` hashed them).

        Raises:
            ValueError: not a manifest, or one of another model.
        """
        try:
            config = ModelConfig.from_dict(data["model_config"])
            artifacts = {str(k): str(v) for k, v in data["artifacts"].items()}
            recomputed = compute_fingerprint(
                artifacts, config, float(data["gate_threshold"]), str(data["spec_version"])
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a manifest this edge reads ({exc!r})") from None
        if recomputed != fingerprint:
            raise ValueError(
                f"its contents hash to {_short(recomputed)}, not to the model's fingerprint "
                f"{_short(fingerprint)}"
            )
        return cls(fingerprint, config.class_names, config.box_detections_per_img)


def checked_detections(
    response: pb.DetectResponse, request: pb.DetectRequest, rules: AnswerRules | None
) -> CloudDetections:
    """The answer to `request` as numpy arrays, once it passed every check; corners within
    BOX_TOLERANCE_PX of the image are clamped onto it.

    Args:
        response: the cloud's answer.
        request: the request it answers (its id, model and original image size).
        rules: the rules of the request's model (its labels, class names and box cap); None
            when unknown (a request of an earlier export whose manifest this process never
            read): then any label from 1, a class name of at most CLASS_NAME_BYTES_ALLOWED
            characters, at most ANSWER_BOXES_ALLOWED boxes.

    Raises:
        BadAnswer: the answer is not one a splitdet cloud of this model gives; the message
            names what is wrong.
    """
    check_identity(response, request)
    n = len(response.boxes)  # (counted before the boxes are read into arrays)
    if rules is not None and n > rules.max_boxes:
        _bad(f"holds {n} boxes, beyond the model's box_detections_per_img ({rules.max_boxes})")
    if n > ANSWER_BOXES_ALLOWED:
        _bad(f"holds {n} boxes, beyond the {ANSWER_BOXES_ALLOWED} any answer may hold")
    result = detections_from_proto(response)
    _check_timings(result.timings)
    if n == 0:
        return result
    boxes, scores, labels = result.boxes, result.scores, result.labels
    for i in range(n):
        if not (np.isfinite(boxes[i]).all() and np.isfinite(scores[i])):
            _bad(f"holds a box with a non-finite corner or score (box {i + 1} of {n}: "
                 f"({_corners(boxes[i])}), score {scores[i]:g})")  # fmt: skip
        if not 0.0 <= scores[i] <= 1.0:
            _bad(f"holds score {scores[i]:g} (box {i + 1} of {n}), outside [0, 1]")
        label, name = int(labels[i]), result.class_names[i]
        if label < 1:
            _bad(f"holds label {label} (box {i + 1} of {n}), not a class index (labels are "
                 f"1-based; 0 is the background)")  # fmt: skip
        if rules is None:
            if not name or len(name) > CLASS_NAME_BYTES_ALLOWED:
                _bad(f"names label {label} {_shown(name)} (box {i + 1} of {n}), not a class "
                     f"name (1 to {CLASS_NAME_BYTES_ALLOWED} characters)")  # fmt: skip
            continue
        known = len(rules.class_names)
        if label > known:
            _bad(f"holds label {label}, beyond the model's {known} class(es)")
        if name != rules.class_names[label - 1]:
            _bad(f"names label {label} {_shown(name)} (box {i + 1} of {n}), "
                 f"not the model's {_shown(rules.class_names[label - 1])}")  # fmt: skip
    height, width = request.image.original_height, request.image.original_width
    bound = np.array([width, height, width, height], dtype=np.float64)
    tol = BOX_TOLERANCE_PX
    outside = ((boxes < -tol) | (boxes > bound + tol)).any(axis=1)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        _bad(f"holds box {i + 1} of {n} ({_corners(boxes[i])}) outside the {width}x{height} "
             f"px image (by more than {tol:g} px)")  # fmt: skip
    clamped = np.clip(boxes, 0.0, bound.astype(np.float32))
    inverted = (clamped[:, 0] >= clamped[:, 2]) | (clamped[:, 1] >= clamped[:, 3])
    if inverted.any():
        i = int(np.flatnonzero(inverted)[0])
        _bad(f"holds box {i + 1} of {n} ({_corners(boxes[i])}) that is empty or inverted "
             "(x1 < x2 and y1 < y2 is the contract)")  # fmt: skip
    return replace(result, boxes=clamped.astype(np.float32))


def check_identity(response: pb.DetectResponse, request: pb.DetectRequest) -> None:
    """The answer is to this request, by this request's model.

    A mismatch is permanent (BadAnswer), not RetryLater: an answer travels on the call's own
    HTTP/2 stream, so one for another request or model is the cloud's bug or a proxy's (an
    HTTP cache, a gateway mixing calls), and a splitdet cloud never answers with a model other
    than the one asked for (it refuses FAILED_PRECONDITION). Sending again would most likely
    get the same answer; as RetryLater it would pause the whole outbox at the backoff cap
    behind a fault only the operator can fix. As a dead letter the request is kept, counted
    (`splitdet_edge_dead_letters_total`), named in `edge status`, and `edge requeue` sends it
    again once the cloud or proxy is fixed.
    """
    if response.request_id != request.request_id:
        _bad(f"is for request_id {_shown(response.request_id)}, not this request's "
             f"{_shown(request.request_id)}")  # fmt: skip
    if response.model_fingerprint != request.model_fingerprint:
        _bad(f"comes from model {_short(response.model_fingerprint)}, not this request's "
             f"{_short(request.model_fingerprint)}")  # fmt: skip


def _check_timings(timings: dict[str, float]) -> None:
    for name, value in timings.items():
        if not (math.isfinite(value) and value >= 0):
            _bad(f"holds timing {name} = {value:g}, not a number of seconds >= 0")


def _corners(box: np.ndarray) -> str:
    """A box's corners, Float32[4] (x1, y1, x2, y2, px), as a message shows them."""
    return ", ".join(f"{v:g}" for v in box)


def _bad(what: str) -> None:
    raise BadAnswer(grpc.StatusCode.INTERNAL, f"the cloud's answer {what}")


def _shown(text: str, limit: int = 40) -> str:
    """`text` quoted, cut to `limit` characters (its length then given)."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}… ({len(text)} characters)"


def _short(fingerprint: str) -> str:
    return repr(fingerprint[:16] + "…") if len(fingerprint) > 16 else repr(fingerprint)


def detections_from_proto(response: pb.DetectResponse) -> CloudDetections:
    """A DetectResponse as numpy arrays, unchecked (`checked_detections` checks it)."""
    boxes = response.boxes
    t = response.timings
    return CloudDetections(
        request_id=response.request_id,
        fingerprint=response.model_fingerprint,
        boxes=np.array([[b.x1, b.y1, b.x2, b.y2] for b in boxes], dtype=np.float32).reshape(-1, 4),
        scores=np.array([b.score for b in boxes], dtype=np.float32),
        labels=np.array([b.label for b in boxes], dtype=np.int64),
        class_names=tuple(b.class_name for b in boxes),
        timings={"decode_s": t.decode_s, "rpn_s": t.rpn_s, "roi_s": t.roi_s, "total_s": t.total_s},
        cached=response.cached,
    )


#: The rules of every model this process has a manifest of that hashes to its fingerprint,
#: for every client: a fact about the fingerprint, whichever cloud sent it (the daemon's
#: start-up probe then spares its sender a GetManifest call). A few exports at a time; bounded.
_RULES: dict[str, AnswerRules] = {}
_RULES_LOCK = threading.Lock()
MAX_KEPT_RULES = 256


def remember_rules(rules: AnswerRules) -> None:
    """Keep `rules` for the answers of its model (the oldest dropped past MAX_KEPT_RULES)."""
    with _RULES_LOCK:
        _RULES.pop(rules.fingerprint, None)
        _RULES[rules.fingerprint] = rules
        while len(_RULES) > MAX_KEPT_RULES:
            del _RULES[next(iter(_RULES))]


def known_rules(fingerprint: str) -> AnswerRules | None:
    """The kept rules of model `fingerprint`, or None."""
    with _RULES_LOCK:
        return _RULES.get(fingerprint)


def forget_rules() -> None:
    """Drop every kept rule (tests: each fake cloud fetched afresh)."""
    with _RULES_LOCK:
        _RULES.clear()
