"""The systems the benchmark compares, each timing one image end to end.

    monolithic      torchvision Faster R-CNN, PyTorch eager, every stage for every image
    monolithic-split-engines
                    the same detector on splitdet's engines, in one process: the edge's
                    preprocessing and ONNX Runtime body + FPN for every image, then the
                    cloud's torch heads (no gate, codec or wire): splitdet against it is what
                    the gate and the split save, the engine aside
    paper           the paper's multi-task model: full FPN for every image, the gate on its level,
                    RPN + ROI heads only for flagged images (same engine as monolithic)
    splitdet-CODEC  our edge (ONNX Runtime, lazy FPN) here, the cloud server in another process
                    over real gRPC on loopback, the features encoded with CODEC
    jpegQ-to-cloud  the edge sends every image as a JPEG (quality Q) and the cloud runs the
                    monolithic detector (the split-computing literature's baseline)

`run(image, decision)`: `decision` (the benchmark's oracle-gate mode) replaces the gate's verdict
with the ground truth; the gate still runs, so its cost is measured. Systems without a gate
ignore it.

Every system starts from the same decoded image (Float32[3, H, W] in [0, 1]) and ends with boxes
in original pixels. `edge_s` is compute on the camera side, `cloud_s` compute on the server as the
server measured it; the rest of `total_s` is serialisation and loopback transport.
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from splitdet.bench.jpeg_server import JpegClient
from splitdet.edge.client import CloudClient
from splitdet.edge.pipeline import EdgePipeline
from splitdet.shared.messages import build_request
from splitdet.shared.model import CloudHalf, MultiTaskRCNN

#: The name of the engine baseline (`SameEngines`) in the report.
SAME_ENGINES = "monolithic-split-engines"


@dataclass
class Outcome:
    """One image through one system.

    Attributes:
        total_s: wall-clock seconds from decoded image to boxes.
        edge_s: camera-side compute seconds (the whole thing for the single-process systems).
        cloud_s: server-side compute seconds, as the server reported them.
        bytes_sent: bytes that crossed the edge/cloud boundary for this image: the serialized
            request (splitdet: the DetectRequest protobuf; JPEG: the file), gRPC's and
            HTTP/2's framing aside.
        flagged: the image went to detection.
        p_defect: the gate's probability (None for systems without a gate).
        boxes, scores, labels: detections, [K, 4] x1y1x2y2 original px, [K], [K].
    """

    total_s: float
    edge_s: float
    cloud_s: float
    bytes_sent: int
    flagged: bool
    p_defect: float | None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))


def _from_torch(output: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {
        "boxes": output["boxes"].numpy(),
        "scores": output["scores"].numpy(),
        "labels": output["labels"].numpy(),
    }


class Monolithic:
    """torchvision Faster R-CNN, eager, every image through every stage."""

    name = "monolithic"

    def __init__(self, model: MultiTaskRCNN) -> None:
        self.model = model.eval()

    @torch.inference_mode()
    def run(self, image: np.ndarray, decision: bool | None = None) -> Outcome:
        """Detect on one image (numpy Float32[3, H, W] in [0, 1], as decoded; `decision` is
        ignored: there is no gate): an Outcome with boxes Float32[K, 4] x1y1x2y2 in original
        px, scores Float32[K], labels Int64[K]."""
        start = time.perf_counter()
        output = self.model([torch.from_numpy(image)])[0]
        total = time.perf_counter() - start
        return Outcome(total, total, 0.0, 0, True, None, **_from_torch(output))


class SameEngines:
    """The monolithic detector on splitdet's engines (see the module docstring)."""

    name = SAME_ENGINES

    def __init__(self, pipeline: EdgePipeline, heads: CloudHalf) -> None:
        """`pipeline`: the edge's (its gate unused); `heads`: the torch RPN + ROI heads of the
        same weights."""
        self.pipeline = pipeline
        self.heads = heads

    @torch.inference_mode()
    def run(self, image: np.ndarray, decision: bool | None = None) -> Outcome:
        """Detect on one image (numpy Float32[3, H, W] in [0, 1], as decoded; `decision` is
        ignored: there is no gate): an Outcome with boxes Float32[K, 4] x1y1x2y2 in original
        px, scores Float32[K], labels Int64[K]."""
        start = time.perf_counter()
        levels, meta = self.pipeline.levels(image)
        edge_s = time.perf_counter() - start
        found = self.heads.detect(
            {name: torch.from_numpy(level)[None] for name, level in levels.items()},
            [meta.resized_hw],
            [meta.original_hw],
        )[0]
        total = time.perf_counter() - start
        return Outcome(total, edge_s, total - edge_s, 0, True, None, **_from_torch(found))


class PaperGated:
    """The paper's multi-task inference: full FPN always, heads only when the gate fires."""

    name = "paper"

    def __init__(self, model: MultiTaskRCNN, threshold: float) -> None:
        self.model = model.eval()
        self.threshold = threshold

    def run(self, image: np.ndarray, decision: bool | None = None) -> Outcome:
        """Gate (and maybe detect) one image (numpy Float32[3, H, W] in [0, 1], as decoded;
        `decision`, when given, replaces the gate's verdict): an Outcome with p(defect) and,
        when flagged, boxes Float32[K, 4] x1y1x2y2 in original px, scores Float32[K], labels
        Int64[K]."""
        start = time.perf_counter()
        threshold = self.threshold if decision is None else (0.0 if decision else 2.0)
        p_defect, output = self.model.paper_forward(torch.from_numpy(image), threshold)
        total = time.perf_counter() - start
        detections = _from_torch(output) if output is not None else {}
        return Outcome(total, total, 0.0, 0, output is not None, p_defect, **detections)


class Splitdet:
    """Our edge in this process, the cloud detection server in another, gRPC in between."""

    def __init__(self, pipeline: EdgePipeline, client: CloudClient) -> None:
        self.pipeline = pipeline
        self.client = client
        self.name = f"splitdet-{pipeline.codec}"

    def run(self, image: np.ndarray, decision: bool | None = None) -> Outcome:
        """Gate one image (numpy Float32[3, H, W] in [0, 1], as decoded; `decision`, when given,
        replaces the gate's verdict); send the flagged one's features and wait for the boxes:
        an Outcome with p(defect) and, when flagged, boxes Float32[K, 4] x1y1x2y2 in original
        px, scores Float32[K], labels Int64[K]."""
        start = time.perf_counter()
        result = self.pipeline.process_array(image, decision)
        edge_s = time.perf_counter() - start
        if not result.flagged:
            return Outcome(edge_s, edge_s, 0.0, 0, False, result.p_defect)
        # a fresh id per call: the server's idempotency store must not answer from memory;
        # built here (as `CloudClient.detect` does) to count the request's bytes on the wire
        request = build_request(
            result.encoded, result.meta, uuid.uuid4().hex, self.pipeline.manifest.fingerprint
        )
        answer = self.client.send_request(request)
        total = time.perf_counter() - start
        return Outcome(
            total,
            edge_s,
            answer.timings["total_s"],
            request.ByteSize(),  # not result.bytes_sent: the tensors' data only
            True,
            result.p_defect,
            answer.boxes,
            answer.scores,
            answer.labels,
        )


def camera_pixels(image: np.ndarray) -> np.ndarray:
    """Float32[3, H, W] in [0, 1] (as decoded) back to the camera's UInt8[H, W, 3]."""
    return (np.clip(image.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    """Float32[3, H, W] in [0, 1], or a camera's UInt8[H, W, 3], as JPEG bytes (4:2:0,
    Pillow's default encoder)."""
    pixels = image if image.dtype == np.uint8 else camera_pixels(image)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


class JpegToCloud:
    """The edge compresses every image to JPEG; the cloud runs the monolithic detector."""

    def __init__(self, client: JpegClient, quality: int = 95) -> None:
        self.client = client
        self.quality = quality
        self.name = f"jpeg{quality}-to-cloud"

    def run(self, image: np.ndarray, decision: bool | None = None) -> Outcome:
        """Compress one image (numpy Float32[3, H, W] in [0, 1], as decoded; `decision` is
        ignored: there is no gate), send it, wait for the boxes: an Outcome with boxes
        Float32[K, 4] x1y1x2y2 in original px, scores Float32[K], labels Int64[K]. The edge's
        time starts from the camera's 8-bit pixels: turning the decoded floats back into them
        is the benchmark's doing, not the edge's (~1.5% of its time at 2448x2048)."""
        pixels = camera_pixels(image)
        start = time.perf_counter()
        data = jpeg_bytes(pixels, self.quality)
        edge_s = time.perf_counter() - start
        answer = self.client.detect(data)
        total = time.perf_counter() - start
        return Outcome(
            total,
            edge_s,
            answer["timings"]["total_s"],
            len(data),
            True,
            None,
            np.asarray(answer["boxes"], np.float32).reshape(-1, 4),
            np.asarray(answer["scores"], np.float32),
            np.asarray(answer["labels"], np.int64),
        )
