"""The cloud's detection core: a decoded request in, boxes out. Knows nothing of gRPC.

    core = DetectionCore(*load_cloud(model_dir), store=IdempotencyStore(path))
    result = core.detect(DetectCall(request_id, fingerprint, ImageMeta(...), encoded_levels))

Several exports can be served at once (`also=`), each request going to the model its fingerprint
names.

`detect` checks the request up front (fingerprint, id, sizes), answers a repeated request id from
the idempotency store, decodes the five FPN levels against the shapes the split spec implies for
the image's padded size (with an explicit bound on decoded bytes), runs the RPN and ROI heads, and
stores the answer. Every refusal is a `RequestError` subclass whose message names the problem; the
servicer maps those to status codes in one place.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import clip_boxes_to_image

from splitdet.cloud.idempotency import IdempotencyStore, StoredAnswer
from splitdet.cloud.log_limit import LineLimiter, repeats_fields, repeats_note
from splitdet.edge.preprocess import ImageError, resized_size
from splitdet.shared.checkpoint import why_unreadable
from splitdet.shared.codec import (
    DEFAULT_MAX_TOTAL_BYTES,
    CodecError,
    EncodedTensor,
    decode,
    expected_level_shapes,
)
from splitdet.shared.config import MAX_INPUT_SIDE, ModelConfig
from splitdet.shared.detection import Detection, ImageMeta
from splitdet.shared.manifest import (
    CLOUD_WEIGHTS,
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    read_artifact,
    read_manifest,
)
from splitdet.shared.model import CloudHalf, MultiTaskRCNN
from splitdet.shared.spec import LEVEL_NAMES, MAX_ORIGINAL_SIDE, padded_size

log = logging.getLogger(__name__)

#: Longest request id accepted (a UUID is 36 characters).
MAX_REQUEST_ID_CHARS = 128
#: Largest image side accepted after the model's resize, px (before it: MAX_ORIGINAL_SIDE).
#: Sanity bounds only: the model's own input size and the decoded-bytes bound limit the work.
#: A model's min_size and max_size are at most the same (`ModelConfig`).
MAX_RESIZED_SIDE = MAX_INPUT_SIDE
#: State-dict prefixes the cloud's weights file holds, and those it may lack (the edge's part).
CLOUD_PREFIXES = ("rpn.", "roi_heads.")
EDGE_PREFIXES = ("backbone.", "defect_head.")
#: Bytes in a MiB, the unit of --max-decoded-mib.
MIB = 1 << 20


class RequestError(ValueError):
    """A request the core refuses; the message names the problem."""


class InvalidRequest(RequestError):
    """Malformed request: tensors, shapes, codecs, sizes, ids or payload."""


class FingerprintMismatch(RequestError):
    """The request was made for a model this server does not serve."""


class Cancelled(RequestError):
    """The caller went away (cancelled or past its deadline); the work was abandoned."""


class DeadlinePassed(Cancelled):
    """The caller's deadline passed while the work ran; the caller may still be listening."""


@dataclass(frozen=True)
class DetectCall:
    """One detect request, decoded from the wire but not yet validated.

    Attributes:
        request_id: idempotency key.
        fingerprint: fingerprint of the model the edge ran.
        image: the image's sizes.
        tensors: the encoded FPN levels.
    """

    request_id: str
    fingerprint: str
    image: ImageMeta
    tensors: Sequence[EncodedTensor]


@dataclass(frozen=True)
class StageTimings:
    """Server-side wall-clock seconds of one call (all zero but `total_s` for a stored answer)."""

    decode_s: float = 0.0
    rpn_s: float = 0.0
    roi_s: float = 0.0
    total_s: float = 0.0


@dataclass(frozen=True)
class DetectResult:
    """The answer to one DetectCall.

    Attributes:
        request_id: the call's request id.
        fingerprint: the served model's fingerprint.
        detections: boxes by decreasing score.
        timings: this call's stage timings.
        cached: True when answered from the idempotency store (the heads did not run).
    """

    request_id: str
    fingerprint: str
    detections: tuple[Detection, ...]
    timings: StageTimings = field(default_factory=StageTimings)
    cached: bool = False


def load_cloud(model_dir: Path) -> tuple[CloudHalf, Manifest]:
    """Load the cloud's half of an exported model directory.

    The manifest is read once and verified (artifact hashes, fingerprint); the weights file is
    read once into memory, its bytes checked against that manifest's hash and loaded from
    those bytes: the heads served are those the fingerprint covers, even when the folder is
    renamed or its files replaced meanwhile (a SIGHUP reload while exports are swapped by
    rename is refused, never served another export's heads). The weights must hold exactly
    the RPN and ROI heads' parameters: anything missing from them, or any key outside them, is
    refused rather than half-loaded.

    Whatever goes wrong (the manifest, building the model its configuration describes, the
    weights) is a ManifestError naming the file: the caller skips this directory, not the
    others, and shows one line, not a traceback.

    Raises:
        ManifestError: the directory, its manifest or its weights cannot be served.
    """
    model_dir = Path(model_dir)
    manifest = read_manifest(model_dir, verify=True, read_later=(CLOUD_WEIGHTS,))
    weights_path = model_dir / CLOUD_WEIGHTS
    state = _load_weights(weights_path, read_artifact(model_dir, manifest, CLOUD_WEIGHTS))
    if not isinstance(state, dict):
        raise ManifestError(f"{weights_path}: expected a state dict, got {type(state).__name__}")
    foreign = sorted(k for k in state if not str(k).startswith(CLOUD_PREFIXES))
    if foreign:
        raise ManifestError(f"{weights_path}: unexpected keys outside {CLOUD_PREFIXES}: {foreign}")
    try:
        model = MultiTaskRCNN(manifest.model_config)
    except Exception as exc:  # a configuration torch cannot build (what its checks let through)
        raise ManifestError(
            f"{model_dir / MANIFEST_NAME}: its model_config cannot be built ({_one_line(exc)})"
        ) from None
    try:
        result = model.load_state_dict(state, strict=False)
    except Exception as exc:  # shape mismatches, tensors of the wrong kind
        raise ManifestError(
            f"{weights_path}: does not fit the manifest's model ({_one_line(exc)})"
        ) from None
    missing = sorted(k for k in result.missing_keys if not k.startswith(EDGE_PREFIXES))
    if missing or result.unexpected_keys:
        raise ManifestError(
            f"{weights_path}: missing keys {missing}, unexpected keys {result.unexpected_keys}"
        )
    try:
        return CloudHalf(model.eval()).eval(), manifest
    except Exception as exc:  # (what the model's split could not take)
        raise ManifestError(f"{model_dir}: cannot be served ({_one_line(exc)})") from None


def _load_weights(path: Path, data: bytes) -> object:
    """torch.load of the weights file `path`'s bytes `data` (already checked against the
    manifest), tensors and plain data only; ManifestError in one line when they cannot be."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, foreign formats
        # one line, as for a checkpoint: torch's own message runs to a dozen lines and advises
        # weights_only=False, which would run whatever code the file holds
        raise ManifestError(f"{path}: cannot be loaded ({why_unreadable(data, exc)})") from None


def _one_line(exc: BaseException, limit: int = 1000) -> str:
    """`exc` as one line of at most `limit` characters: its type and its message's lines
    joined (torch's messages run over several lines, and long)."""
    text = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def request_digest(call: DetectCall) -> str:
    """SHA-256 hex over everything in the call that determines its answer."""
    digest = hashlib.sha256()
    meta = {
        "fingerprint": call.fingerprint,
        "original_hw": list(call.image.original_hw),
        "resized_hw": list(call.image.resized_hw),
        "tensors": [
            [t.name, list(t.shape), t.codec, t.dtype, list(t.scale), list(t.zero_point)]
            for t in call.tensors
        ],
    }
    digest.update(json.dumps(meta, sort_keys=True, allow_nan=True).encode())
    for tensor in call.tensors:
        digest.update(len(tensor.data).to_bytes(8, "little"))
        digest.update(tensor.data)
    return digest.hexdigest()


@dataclass(frozen=True)
class ServedModel:
    """One model directory's cloud half, as the core serves it.

    Attributes:
        cloud: the model's cloud half (eval mode).
        manifest: its manifest.
    """

    cloud: CloudHalf
    manifest: Manifest

    @property
    def fingerprint(self) -> str:
        """The model's fingerprint, as its manifest records it."""
        return self.manifest.fingerprint


#: How a server started with `--model` comes to serve one more export.
SERVE_SEVERAL = "a server can serve several: `splitdet cloud --model OLD --model NEW`"


class DetectionCore:
    """RPN + ROI heads of one or more exports behind request validation and an idempotency store.

    Args:
        cloud: the default model's cloud half (eval mode).
        manifest: the default model directory's manifest.
        store: where answers are kept for repeated request ids; None disables idempotency.
        max_decoded_bytes: bound on the float32 bytes one request may decode to.
        also: more (cloud half, manifest) pairs served beside the default, each request going
            to the model its fingerprint names: edges on an older and a newer export are both
            answered while they are upgraded one by one.

    Raises:
        ValueError: two of the models have the same fingerprint.

    Thread-safe: concurrent `detect` calls share the (read-only) models; `serve` swaps the set
    of models in one assignment, so a call finds either the old set or the new one.
    """

    def __init__(
        self,
        cloud: CloudHalf,
        manifest: Manifest,
        store: IdempotencyStore | None = None,
        max_decoded_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        also: Sequence[tuple[CloudHalf, Manifest]] = (),
    ) -> None:
        self.models: dict[str, ServedModel] = {}
        self.serve([ServedModel(half, its) for half, its in ((cloud, manifest), *also)])
        self.store = store
        self.max_decoded_bytes = int(max_decoded_bytes)
        #: called once per answer the store could not keep (the server counts them)
        self.on_store_error: Callable[[], None] | None = None
        #: called once per call computed whose request id names another request, stored or
        #: running (the server counts them)
        self.on_id_conflict: Callable[[], None] | None = None
        #: which of those are logged: at most one `request_id_conflict` line per minute
        self.id_conflict_lines = LineLimiter()
        #: which of those are logged: at most one `answers_store_failed` line per minute
        self.store_failure_lines = LineLimiter()
        #: answers not kept since the store last kept one (`_store_resumed` says when it does)
        self._store_failures = 0
        self._store_failures_lock = threading.Lock()
        #: how this server comes to serve another export, said when a request names one
        self.serve_hint = SERVE_SEVERAL

    def serve(self, models: Sequence[ServedModel]) -> None:
        """Serve exactly `models` from now on, the first the default (a reload: calls running
        keep the model they found).

        Raises:
            ValueError: none given, or two of them have the same fingerprint.
        """
        served: dict[str, ServedModel] = {}
        for model in models:
            if model.fingerprint in served:
                raise ValueError(f"model {_short(model.fingerprint)} is given twice")
            served[model.fingerprint] = model
        if not served:
            raise ValueError("a detection core needs at least one model")
        self.models = served

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the default model (the first given)."""
        return next(iter(self.models))

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """Fingerprints of every served model, the default first."""
        return tuple(self.models)

    def detect(
        self,
        call: DetectCall,
        is_cancelled: Callable[[], bool] | None = None,
        before_compute: Callable[[], None] | None = None,
        model: ServedModel | None = None,
        digest: str | None = None,
        conflict: bool = False,
    ) -> DetectResult:
        """Answer one request.

        Args:
            call: the request.
            is_cancelled: polled between stages; when it returns True the work is abandoned
                with `Cancelled`.
            before_compute: called once the cheap checks passed and no stored answer was
                found, before the features are decoded and the heads run (the server waits
                for a slot there: a malformed call or a repeat is answered without one).
                Whatever it raises ends the call.
            model: the served model `served_model` gave for this call (it must be the one
                the call names), used even if a reload dropped it since; None: looked up now.
            digest: the call's `request_digest`, when the caller computed it already (the
                servicer joins identical calls by it); None: computed here when needed.
            conflict: another request of the call's id was running when it came (`InFlight`):
                computed, its answer not stored (see `_stored`).

        Raises:
            FingerprintMismatch: the call is for another model.
            InvalidRequest: anything malformed (the codec's CodecError included).
            Cancelled: `is_cancelled` said so.
        """
        start = time.perf_counter()
        model = self.check_call(call, model)
        stored, conflict = self._stored(model, call, digest, conflict)
        if stored is not None:
            timings = StageTimings(total_s=time.perf_counter() - start)
            return DetectResult(call.request_id, model.fingerprint, stored, timings, cached=True)
        if before_compute is not None:
            before_compute()
            start = time.perf_counter()  # the wait is not the server's work

        features = self._decode(model, call.image, call.tensors)
        decoded = time.perf_counter()
        if is_cancelled is not None and is_cancelled():
            raise Cancelled(f"request {call.request_id!r}: caller went away after decoding")
        head_timings: dict[str, float] = {}
        with torch.inference_mode():
            tensors = {name: torch.from_numpy(features[name])[None] for name in LEVEL_NAMES}
            output = model.cloud.detect(
                tensors, [call.image.resized_hw], [call.image.original_hw], head_timings
            )[0]
        detections = self._detections(model, output, call.image.original_hw)
        timings = StageTimings(
            decode_s=decoded - start,
            rpn_s=head_timings.get("rpn_s", 0.0),
            roi_s=head_timings.get("roi_s", 0.0),
            total_s=time.perf_counter() - start,
        )
        if self.store is not None and not conflict:  # (the first request's answer is kept)
            payload = json.dumps([[*d.box, d.score, d.label] for d in detections]).encode()
            answer = StoredAnswer(model.fingerprint, digest or request_digest(call), payload)
            try:
                stored = self.store.put(call.request_id, answer)
            except sqlite3.Error as exc:  # e.g. its disk is full: the answer is still good
                self._store_failed(call.request_id, exc)
            else:
                if stored:  # (not kept, quietly: the store closed as the server stops)
                    self._store_resumed()
        return DetectResult(call.request_id, model.fingerprint, detections, timings)

    def _id_conflict(self, request_id: str, fingerprint: str) -> None:
        """A call whose id names another request, stored or running: counted
        (`on_id_conflict`) each time, logged at most once a minute."""
        every_s = self.id_conflict_lines.every_s

        def line(repeats: int, _names: list[str], at_stop: bool) -> None:
            fields = {"event": "request_id_conflict", "request_id": request_id,
                      "fingerprint": fingerprint,
                      **repeats_fields(repeats, None, at_stop)}  # fmt: skip
            log.warning(
                "request %r: other contents under this id are answered or being answered; "
                "computed on its own, its answer not stored (the same image's features differ "
                "between machines or library builds, or an edge reuses ids)%s", request_id,
                repeats_note(repeats, every_s, None, at_stop),
                extra={"fields": fields},
            )  # fmt: skip

        self.id_conflict_lines.write_from(("request_id_conflict",), None, line)
        if self.on_id_conflict is not None:
            self.on_id_conflict()

    def _store_resumed(self) -> None:
        """After answers the store could not keep, the first it kept: said once (INFO
        `answers_store_resumed`, with how many were not kept), so that the log shows the fault
        is over (its WARNINGs come at most once a minute)."""
        # (at most once per `store_failure_lines.every_s`, as the failures: a disk at its edge
        # may fail and keep by turns; the count goes on until a line says it)
        with self._store_failures_lock:
            failed = self._store_failures
            if not failed or self.store_failure_lines.admit(("answers_store_resumed",)) is None:
                return
            self._store_failures = 0
        log.info("answers store: keeping answers again, after %d it could not keep", failed,
                 extra={"fields": {"event": "answers_store_resumed",
                                   "not_kept": failed}})  # fmt: skip

    def _store_failed(self, request_id: str, exc: Exception, doing: str = "keep") -> None:
        """An answer the store could not keep, or (`doing` "read") one it could not read (a
        damaged page or row: the request is computed afresh, never failed for the store):
        counted (`on_store_error`) each time, logged at most once per
        `store_failure_lines.every_s` per error (a full disk fails every answer), the line
        saying how many were left out since the last."""
        if doing == "keep":  # (`_store_resumed` tells of answers not kept)
            with self._store_failures_lock:
                self._store_failures += 1
        every_s = self.store_failure_lines.every_s
        error = f"{type(exc).__name__}: {exc}"
        if doing == "keep":
            what = (
                "cannot keep the answer to %r (%s); answered without it (a repeat of this "
                "request is computed again)"
            )
        elif isinstance(exc, sqlite3.OperationalError):  # (locked, an I/O error)
            what = "cannot read the answer to %r (%s); computed afresh"
        else:
            what = (
                "cannot read the answer to %r (%s); computed afresh (--answers-db "
                "damaged: stop the server, move it aside and start with a new one)"
            )
        shown = str(exc)  # (the line keeps no exception: no traceback held until the stop)

        def line(repeats: int, _names: list[str], at_stop: bool) -> None:
            fields = {"event": "answers_store_failed", "request_id": request_id,
                      "error": error, "doing": doing,
                      **repeats_fields(repeats, None, at_stop)}  # fmt: skip
            log.warning(
                what + "%s", request_id, shown,
                repeats_note(repeats, every_s, None, at_stop),
                extra={"fields": fields},
            )  # fmt: skip

        self.store_failure_lines.write_from(("answers_store_failed", shown), None, line)
        if self.on_store_error is not None:
            self.on_store_error()

    # ------------------------------------------------------------------------------ the stages

    def model(self, fingerprint: str) -> ServedModel:
        """The served model of that fingerprint.

        Raises:
            FingerprintMismatch: no served model has it (the message lists those served).
        """
        model = self.models.get(fingerprint) if isinstance(fingerprint, str) else None
        if model is None:
            # shortened, unless a served one shortens the same: then both are shown whole
            whole = any(_short(fp) == _short(fingerprint) for fp in self.models)
            show = repr if whole else _short
            served = ", ".join(show(fp) for fp in self.models)
            raise FingerprintMismatch(
                f"model fingerprint {show(fingerprint)} is not served here; this server "
                f"serves {served}: deploy the same export on both sides ({self.serve_hint})"
            )
        return model

    def served_model(self, request_id: str, fingerprint: str) -> ServedModel:
        """Check a request's id and model before it is parsed whole: the served model it
        names, which the call holds to its end (`detect`'s `model`), so that a reload that
        drops the export while the call waits for a slot refuses no call already admitted.

        Raises:
            FingerprintMismatch: no served model has `fingerprint`.
            InvalidRequest: no fingerprint, or an id that is empty, too long or not printable.
        """
        return self._checked_model(request_id, fingerprint)

    def is_repeat(self, model: ServedModel, request_id: str, digest: str) -> bool:
        """True when an answer to `request_id` by `model` for the request of `digest`
        (`request_digest`) is stored: the request is then answered without the heads."""
        stored = self._answer_of(model, request_id, quiet=True)
        return stored is not None and stored.digest == digest

    def _answer_of(
        self, model: ServedModel | None, request_id: str, quiet: bool = False
    ) -> StoredAnswer | None:
        """The stored answer to `request_id` by `model` (None: none stored, no store, one
        computed by another model, or one that cannot be read: compute afresh); by any model
        when `model` is None. `quiet`: a read that fails is not told (`is_repeat`: the call's
        own lookup, `_stored`, tells it, once)."""
        if self.store is None:
            return None
        try:
            stored = self.store.get(request_id)
        except (sqlite3.Error, ValueError, TypeError, OverflowError) as exc:  # damaged
            if not quiet:
                self._store_failed(request_id, exc, "read")
            return None
        if stored is None or model is None:
            return stored
        return stored if stored.fingerprint == model.fingerprint else None

    def _checked_model(self, request_id: str, fingerprint: str) -> ServedModel:
        """The model to use, once the id and the fingerprint passed their checks."""
        if not fingerprint:  # not "a model not served": no edge of ours sends none
            raise InvalidRequest(
                "request has no model_fingerprint (not a splitdet DetectRequest, or one with "
                "no field this server knows)"
            )
        model = self.model(fingerprint)
        rid = request_id
        if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_REQUEST_ID_CHARS:
            raise InvalidRequest(f"request_id must be 1..{MAX_REQUEST_ID_CHARS} characters")
        if not rid.isprintable():
            raise InvalidRequest("request_id must be printable text")
        return model

    def check_call(self, call: DetectCall, model: ServedModel | None) -> ServedModel:
        """Cheap checks before anything is hashed, looked up or decoded; the model to use
        (`model`, held by the call since `served_model`, or the one it names now). The image's
        sizes are bounded, and its resized size must be the one its original size resizes to
        for that model (`_check_resize`)."""
        if model is None or model.fingerprint != call.fingerprint:
            model = self._checked_model(call.request_id, call.fingerprint)
        for what, (h, w), bound in (
            ("original", call.image.original_hw, MAX_ORIGINAL_SIDE),
            ("resized", call.image.resized_hw, MAX_RESIZED_SIDE),
        ):
            if not (0 < h <= bound and 0 < w <= bound):
                raise InvalidRequest(f"{what} image size {h}x{w} is outside 1..{bound} px")
        config = model.manifest.model_config
        h, w = call.image.resized_hw
        if min(h, w) > config.min_size or max(h, w) > config.max_size:
            # the heads' work grows with it, and a few kB of constant features can claim it
            raise InvalidRequest(
                f"resized image size {h}x{w} is larger than model {model.fingerprint}'s input "
                f"(short side at most {config.min_size}, long side at most {config.max_size} "
                "px): no edge of that export sends it"
            )
        _check_resize(model, call.image)
        return model

    def _stored(
        self, model: ServedModel, call: DetectCall, digest: str | None, conflict: bool
    ) -> tuple[tuple[Detection, ...] | None, bool]:
        """(the stored answer for a repeated request id, if one is valid for this call (its
        `digest`, or the request hashed only then: a request is hashed once), else None;
        whether the call is a conflict).

        A conflict is a call whose id names another request: one whose answer is stored, or
        one running when this call started (`conflict` given, `InFlight`). It is computed on
        its own, its answer not stored (the first request's is, or will be), and counted and
        logged (`_id_conflict`). The edge names a request by its image file's bytes, model and
        codec, and the features of one image can differ in their last bits between machines
        and library builds (a line's image checked again with `predict --cloud` elsewhere, two
        edges without tokens given the same reference image): such a call is answered, not
        refused (it would be a dead letter for good). An id whose stored answer is another
        export's is a conflict too (a client of its own reusing ids across exports: it was
        computed afresh at every call, uncounted)."""
        stored = self._answer_of(None, call.request_id)
        if (
            stored is None
            or stored.fingerprint != model.fingerprint
            or stored.digest != (digest or request_digest(call))
        ):
            conflict = conflict or stored is not None
            if conflict:
                self._id_conflict(call.request_id, call.fingerprint)
            return None, conflict
        try:
            answer = tuple(
                Detection((x1, y1, x2, y2), score, int(label), _class_name(model, int(label)))
                for x1, y1, x2, y2, score, label in json.loads(stored.payload)
            )
        except (ValueError, TypeError) as exc:  # a damaged row: computed afresh, not kept
            self._store_failed(call.request_id, exc, "read")
            return None, True
        return answer, conflict

    def _decode(
        self, model: ServedModel, image: ImageMeta, tensors: Sequence[EncodedTensor]
    ) -> dict[str, np.ndarray]:
        """The five levels as float32 [C, h, w], each checked against the model's split spec."""
        expected = level_shapes(model.manifest.model_config, image.resized_hw)
        needed = _float32_bytes(expected)
        if needed > self.max_decoded_bytes:
            raise InvalidRequest(
                f"resized size {image.resized_hw[0]}x{image.resized_hw[1]} implies {needed} "
                f"bytes of features, beyond this server's {self.max_decoded_bytes}-byte bound "
                f"(--max-decoded-mib {self.max_decoded_bytes / MIB:g})"
            )
        try:
            return decode(tensors, expected, max_total_bytes=self.max_decoded_bytes)
        except CodecError as exc:
            raise InvalidRequest(str(exc)) from exc

    def _detections(
        self, model: ServedModel, output: dict[str, torch.Tensor], original_hw: tuple[int, int]
    ) -> tuple[Detection, ...]:
        """The output's boxes ([N, 4] x1 y1 x2 y2, original px) clamped onto the original
        image: mapped back from the resized one in float32, a corner on its edge may land a
        float32 step past it (400.00003 on a 400 px image). The edge clamps what it receives the
        same way, so in-process detections equal a server's."""
        boxes = clip_boxes_to_image(output["boxes"], original_hw).tolist()
        scores = output["scores"].tolist()
        labels = output["labels"].tolist()
        return tuple(
            Detection(tuple(box), score, int(label), _class_name(model, int(label)))
            for box, score, label in zip(boxes, scores, labels, strict=True)
        )


def _check_resize(model: ServedModel, image: ImageMeta) -> None:
    """Refuse an image whose resized size is not the one its original size resizes to for
    `model` (torchvision's eval resize, sizes truncated: `edge.preprocess.resized_size`, what
    splitdet's edge sends): the heads would map the boxes back by the wrong scale, answering
    shifted or stretched boxes with OK.

    Raises:
        InvalidRequest: naming both sizes, the model's min_size and max_size and the size
            expected (all height x width).
    """
    config = model.manifest.model_config
    (oh, ow), (h, w) = image.original_hw, image.resized_hw
    sizes = f"min_size {config.min_size}, max_size {config.max_size}"
    try:
        expected = resized_size(oh, ow, config.min_size, config.max_size)
    except ImageError:  # (a side below 1 px: the edge refuses such an image itself)
        raise InvalidRequest(
            f"original image size {oh}x{ow} is too elongated for model {model.fingerprint}'s "
            f"input ({sizes}): a side would resize to 0 px; no edge of that export sends it"
        ) from None
    if (h, w) != expected:
        raise InvalidRequest(
            f"resized image size {h}x{w} does not follow from original image size {oh}x{ow} "
            f"for model {model.fingerprint} ({sizes}): expected {expected[0]}x{expected[1]} "
            "(height x width, torchvision's resize, sizes truncated); send the size "
            "the edge's resize gives"
        )


def level_shapes(config: ModelConfig, resized_hw: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    """The (C, h, w) of each level a request of an image resized to `resized_hw` carries, by
    the split spec of a model of `config` (the image is padded as torchvision pads it)."""
    return expected_level_shapes(config.split_spec, padded_size(*resized_hw))


def _float32_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """The bytes levels of these shapes take decoded (float32): what --max-decoded-mib bounds."""
    return sum(math.prod(shape) for shape in shapes.values()) * 4


def largest_input(config: ModelConfig) -> tuple[int, int]:
    """The largest resized size (h, w) a request for a model of `config` may claim, as
    `DetectionCore.check_call` bounds it: short side min_size, long side max_size (each at
    most MAX_RESIZED_SIDE); of the two orientations, the one whose features take more bytes."""
    long = min(config.max_size, MAX_RESIZED_SIDE)
    short = min(config.min_size, long)
    sizes = ((short, long), (long, short))
    return max(sizes, key=lambda hw: _float32_bytes(level_shapes(config, hw)))


def largest_feature_bytes(config: ModelConfig) -> int:
    """Float32 bytes the features of the largest input a model of `config` takes decode to
    (`largest_input`): a server whose --max-decoded-mib is below it refuses every request of
    that size, so it refuses to serve the export instead (`check_decoded_bound`)."""
    return _float32_bytes(level_shapes(config, largest_input(config)))


def check_decoded_bound(model: ServedModel, model_dir: Path, max_decoded_bytes: int) -> None:
    """Refuse to serve `model` (from `model_dir`) when the features of its largest input decode
    to more than `max_decoded_bytes`: every request of an image that large would be refused
    (INVALID_ARGUMENT, a dead letter on its edge), so the export is refused at start or
    reload instead, saying what --max-decoded-mib it needs.

    Raises:
        ManifestError: naming --max-decoded-mib, the export and the MiB it needs.
    """
    config = model.manifest.model_config
    needed = largest_feature_bytes(config)
    if needed <= max_decoded_bytes:
        return
    h, w = largest_input(config)
    raise ManifestError(
        f"{model_dir} (export {model.fingerprint[:16]}): its largest input ({h}x{w} px after "
        f"resizing: min_size {config.min_size}, max_size {config.max_size}) decodes to "
        f"{needed / MIB:.1f} MiB of features, beyond --max-decoded-mib "
        f"{max_decoded_bytes / MIB:g}: give --max-decoded-mib {math.ceil(needed / MIB)} or "
        "more, or every such request would be refused"
    )


def _class_name(model: ServedModel, label: int) -> str:
    names = model.manifest.class_names
    return names[label - 1] if 1 <= label <= len(names) else ""


def _short(fingerprint: str) -> str:
    text = str(fingerprint)
    return repr(text[:16] + "…") if len(text) > 16 else repr(text)
