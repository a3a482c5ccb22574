"""The edge pipeline for one image: read, preprocess, gate, and for flagged images complete the FPN
and encode it for the cloud (no torch).

    pipeline = EdgePipeline(EdgeRuntime(model_dir), codec="int8")
    result = pipeline.process_file(path)
    if result.flagged:
        send(result.encoded, result.metadata)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitdet.edge.preprocess import Pixels, decode_pixels, load_pixels, prepare
from splitdet.edge.runtime import EdgeGate, EdgeRuntime
from splitdet.shared.codec import CODECS, EncodedTensor, encode, encoded_size
from splitdet.shared.detection import ImageMeta


@dataclass
class EdgeResult:
    """The edge's verdict on one image.

    Attributes:
        p_defect: the gate's probability that the image is defective.
        flagged: p_defect >= threshold (or the gate is off): the image needs detection.
        encoded: the encoded FPN levels for the cloud when flagged, else None.
        bytes_sent: bytes of encoded feature data that would cross the wire (0 if not flagged).
        timings: seconds per stage: read, preprocess, gate, complete, encode.
        threshold: the p(defect) threshold the verdict was taken at (None: gate off or not
            recorded).
    """

    p_defect: float
    flagged: bool
    meta: ImageMeta
    encoded: list[EncodedTensor] | None = None
    bytes_sent: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None


class EdgePipeline:
    """Gate, lazy completion and encoding of single images with one `EdgeRuntime`."""

    def __init__(
        self,
        runtime: EdgeRuntime,
        codec: str | None = None,
        zstd_level: int = 3,
        gate: bool = True,
        threshold: float | None = None,
    ) -> None:
        """
        Args:
            runtime: the ONNX sessions of an exported model.
            codec: feature codec (default: the manifest's).
            zstd_level: zstd compression level of the encoded features.
            gate: False sends every image to detection (for comparisons).
            threshold: p(defect) threshold (default: the manifest's calibrated one).
        """
        self.runtime = runtime
        self.manifest = runtime.manifest
        self.codec = codec or self.manifest.default_codec
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {CODECS}")
        self.zstd_level = zstd_level
        self.gate_enabled = gate
        self.threshold = self.manifest.gate_threshold if threshold is None else threshold

    def process_file(self, path: Path) -> EdgeResult:
        """Read and process one image file; raises ImageError for an unusable file."""
        start = time.perf_counter()
        image = self.load(path)
        result = self.process_array(image)
        result.timings = {
            "read": time.perf_counter() - start - sum(result.timings.values()),
            **result.timings,
        }
        return result

    def load(self, path: Path) -> Pixels:
        """An image file's integer pixels (`preprocess.Pixels`: what `process_array` takes
        fastest), its 16-bit values scaled as the model was trained (the manifest's
        `pixel_bits`); ImageError names a file that cannot be. Its float image, Float32[3, H,
        W] in [0, 1], is `Pixels.to_unit_float()`."""
        return load_pixels(path, self.manifest.model_config.pixel_bits)

    def decode(self, data: bytes, source: str) -> Pixels:
        """`load` for a file's bytes already read (`source` names it in an ImageError)."""
        return decode_pixels(data, source, self.manifest.model_config.pixel_bits)

    def process_array(self, image: np.ndarray | Pixels, decision: bool | None = None) -> EdgeResult:
        """Process one image: a decoded image's integer pixels (`Pixels`: `load`, `decode`;
        only the pixels the resize reads are converted to float), or Float32[3, H, W] in
        [0, 1] (any floating dtype; ValueError for anything else: 8-bit values, NaN, values
        out of range, `preprocess.check_unit_image`). Both give the same verdict and features
        for one image, bit for bit.

        `decision` overrides the gate's verdict (the gate still runs and costs what it costs):
        the benchmark's oracle-gate mode, which times a perfect gate on untrained weights.
        """
        timings: dict[str, float] = {}
        gate, meta = self._gate(image, timings)
        flagged = (not self.gate_enabled) or gate.p_defect >= self.threshold
        if decision is not None:
            flagged = decision
        result = EdgeResult(
            p_defect=gate.p_defect,
            flagged=flagged,
            meta=meta,
            timings=timings,
            threshold=self.threshold if self.gate_enabled else None,
        )
        if not flagged:
            return result
        start = time.perf_counter()
        levels = self.runtime.complete(gate)
        timings["complete"] = time.perf_counter() - start
        start = time.perf_counter()
        result.encoded = encode(levels, codec=self.codec, level=self.zstd_level)
        timings["encode"] = time.perf_counter() - start
        result.bytes_sent = encoded_size(result.encoded)
        return result

    def levels(self, image: np.ndarray | Pixels) -> tuple[dict[str, np.ndarray], ImageMeta]:
        """Every FPN level of one image (name -> Float32[C, h, w], not encoded), whatever the
        gate says, and the image's sizes: what the monolithic detector computes before its
        heads. `image`: as `process_array` takes (`Pixels`, or Float32[3, H, W] in [0, 1])."""
        gate, meta = self._gate(image, {})
        return self.runtime.complete(gate), meta

    def _gate(
        self, image: np.ndarray | Pixels, timings: dict[str, float]
    ) -> tuple[EdgeGate, ImageMeta]:
        """Preprocess (`preprocess.prepare`) and gate one image (`Pixels`, or Float32[3, H, W]
        in [0, 1]), its stages' seconds into `timings`."""
        config = self.manifest.model_config
        start = time.perf_counter()
        prepared = prepare(
            image, config.min_size, config.max_size, config.image_mean, config.image_std
        )
        timings["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        gate = self.runtime.gate(prepared.batch)
        timings["gate"] = time.perf_counter() - start
        return gate, ImageMeta(original_hw=prepared.original_hw, resized_hw=prepared.resized_hw)
