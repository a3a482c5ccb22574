"""`splitdet edge check`: is this edge ready to go live? One pass over what the daemon needs,
each step named with what it found (no torch).

    steps = check_edge(Path("models/gasket"), ClientConfig("10.0.0.5:50051"), image=None)
    ok = all(step.ok for step in steps)

Steps, in order; a failed step skips the ones that need it:
    model    the export loads and its files match the manifest's hashes (EdgeRuntime)
    image    an image (given, or a mid-grey one of the model's input size) through the gate and
             the lazy completion, encoded with the codec
    cloud    the cloud's health service says SERVING
    served   the cloud serves this export (GetManifest by fingerprint)
    detect   one Detect round trip with those features, under a fresh request id
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitdet.edge.client import ClientConfig, CloudClient, CloudError
from splitdet.edge.cloud_args import PREDICT_SCORE_THRESHOLD
from splitdet.edge.pipeline import EdgePipeline, EdgeResult
from splitdet.edge.preprocess import ImageError, Pixels
from splitdet.edge.runtime import EdgeRuntime, ModelOutputError
from splitdet.shared.config import pixel_full_scale
from splitdet.shared.manifest import ManifestError, edge_gate_kind
from splitdet.shared.probability_format import format_probability


@dataclass(frozen=True)
class Step:
    """One check: its name, whether it passed, what it found (or why it failed), seconds."""

    name: str
    ok: bool
    detail: str
    seconds: float


class _Failed(Exception):
    """A step's failure, with the line to show."""


def _timed(name: str, run: Callable[[], tuple[Any, str]]) -> tuple[Any, Step]:
    """(value, Step) of `run`, which returns (value, detail) or raises _Failed."""
    start = time.perf_counter()
    try:
        value, detail = run()
        ok = True
    except _Failed as exc:
        value, detail, ok = None, str(exc), False
    return value, Step(name, ok, detail, time.perf_counter() - start)


def check_edge(
    model_dir: Path,
    client_config: ClientConfig | None,
    image: Path | None = None,
    codec: str | None = None,
) -> list[Step]:
    """The steps of the module docstring; without `client_config`, model and image only."""
    steps: list[Step] = []
    pipeline, step = _timed("model", lambda: _load(model_dir, codec))
    steps.append(step)
    if pipeline is None:
        return steps
    result, step = _timed("image", lambda: _process(pipeline, image))
    steps.append(step)
    if client_config is None:
        return steps
    client = CloudClient(client_config)
    try:
        alive, step = _timed("cloud", lambda: _health(client))
        steps.append(step)
        if not alive:
            return steps
        served, step = _timed("served", lambda: _served(client, pipeline.manifest.fingerprint))
        steps.append(step)
        if served and result is not None:
            steps.append(_timed("detect", lambda: _detect(client, pipeline, result))[1])
    finally:
        client.close()
    return steps


def _load(model_dir: Path, codec: str | None) -> tuple[EdgePipeline, str]:
    try:
        pipeline = EdgePipeline(EdgeRuntime(Path(model_dir), threads=None), codec=codec, gate=False)
    except (ManifestError, ValueError, OSError) as exc:  # (its message may name the folder)
        named = str(exc).startswith(str(model_dir))
        raise _Failed(str(exc) if named else f"{model_dir}: {exc}") from None
    manifest = pipeline.manifest
    bits = manifest.model_config.pixel_bits
    return pipeline, (
        f"{model_dir}: fingerprint {manifest.fingerprint[:12]}, classes "
        f"{', '.join(manifest.class_names)}, threshold "
        f"{format_probability(manifest.gate_threshold)}, codec {pipeline.codec}, gate "
        f"{edge_gate_kind(manifest)}, 16-bit images read as {bits}-bit values "
        f"(0..{pixel_full_scale(bits)})"
    )


def _process(pipeline: EdgePipeline, image: Path | None) -> tuple[EdgeResult, str]:
    array: np.ndarray | Pixels
    if image is None:
        config = pipeline.manifest.model_config
        height, width = config.min_size, config.max_size
        array = np.full((3, height, width), 0.5, np.float32)
        name = f"a mid-grey {width}x{height} test image"
    else:
        try:
            array = pipeline.load(image)  # (its integer pixels, as the daemon reads them)
        except ImageError as exc:  # (its message names the file)
            raise _Failed(str(exc) if str(image) in str(exc) else f"{image}: {exc}") from None
        height, width = array.hw
        name = f"{image} ({width}x{height})"
    try:
        result = pipeline.process_array(array)
    except ImageError as exc:  # e.g. too elongated for the model's input size
        raise _Failed(f"{name}: {exc}") from None
    except ModelOutputError as exc:  # the export's, not the image's (its message names it)
        raise _Failed(str(exc)) from None
    t = result.timings
    return result, (
        f"{name}: p(defect) {format_probability(result.p_defect)}; gate {t['gate']:.3f} s, "
        f"completion {t['complete']:.3f} s, encoding {t['encode']:.3f} s; "
        f"{result.bytes_sent / 1e6:.2f} MB of {pipeline.codec} features"
    )


def _health(client: CloudClient) -> tuple[bool, str]:
    """The first call, so the one a TLS handshake fails: its likely cause is named (an edge
    without the client certificate mutual TLS needs gets only UNAVAILABLE "Socket closed")."""
    address = client.config.addresses
    try:
        status = client.health()
    except CloudError as exc:
        detail = f"{address}: {exc.code.name}: {exc.message}"
        cause = exc.likely_cause
        raise _Failed(detail + (f"; likely cause: {cause}" if cause else "")) from None
    if status != "SERVING":
        raise _Failed(f"{address}: health {status}")
    return True, f"{address}: SERVING"


def _served(client: CloudClient, fingerprint: str) -> tuple[bool, str]:
    try:
        served = client.manifest(fingerprint)
    except CloudError as exc:
        raise _Failed(f"{exc.code.name}: {exc.message}") from None
    if served.fingerprint != fingerprint:  # a server too old to choose by model
        raise _Failed(f"the cloud serves {served.fingerprint[:12]}, not this export")
    others = len(served.served) - 1
    return True, "the cloud serves this export" + (f" (and {others} more)" if others > 0 else "")


def _detect(client: CloudClient, pipeline: EdgePipeline, result: EdgeResult) -> tuple[None, str]:
    start = time.perf_counter()
    try:
        answer = client.detect(
            result.encoded, result.meta, f"check-{uuid.uuid4()}", pipeline.manifest.fingerprint
        )
    except CloudError as exc:
        raise _Failed(f"{exc.code.name}: {exc.message}") from None
    round_trip = time.perf_counter() - start
    confident = int((answer.scores >= PREDICT_SCORE_THRESHOLD).sum())
    return None, (
        f"{len(answer.scores)} boxes ({confident} scoring {PREDICT_SCORE_THRESHOLD:g} or more, "
        f"what predict shows by default); round trip {round_trip:.3f} s, of it the cloud "
        f"{answer.timings['total_s']:.3f} s"
    )
