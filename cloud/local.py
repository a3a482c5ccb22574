"""The cloud half in the caller's process: `splitdet predict` without a server (torch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from splitdet.cloud.core import DetectCall, DetectionCore, load_cloud
from splitdet.edge.pipeline import EdgeResult
from splitdet.shared.detection import Detection
from splitdet.shared.probability_format import format_probability


class LocalDetector:
    """Runs the same `DetectionCore` the server runs, on the same encoded features."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        """Load `model_dir`'s cloud half (`core.load_cloud`), on `threads` torch threads.

        `threads` sets torch's thread count for the whole process (`torch.set_num_threads` is
        process-wide: every torch computation of the caller runs on as many from then on);
        None or 0 leaves it as it is.

        Raises:
            ManifestError: the export cannot be served (its manifest, a model_config field out
                of its type or range, a model torch cannot build, its weights); the message
                names the file.
        """
        import torch

        if threads:
            torch.set_num_threads(threads)
        cloud, manifest = load_cloud(Path(model_dir))
        self.core = DetectionCore(cloud, manifest)

    def detect(
        self, request_id: str, result: EdgeResult, source: str
    ) -> tuple[Sequence[Detection], dict[str, float]]:
        """(detections, server stage timings) for one flagged image (`result.encoded` set).

        Raises:
            ValueError: `result` is of an image the gate passed: nothing to detect.
        """
        if result.encoded is None:
            raise ValueError(f"{source}: {_not_flagged(result)}: nothing to detect")
        call = DetectCall(
            request_id=request_id,
            fingerprint=self.core.fingerprint,
            image=replace(result.meta, source=source),
            tensors=result.encoded,
        )
        answer = self.core.detect(call)
        return answer.detections, asdict(answer.timings)


def _not_flagged(result: EdgeResult) -> str:
    """Why `result` holds no features: "the image was not flagged (p_defect P < threshold T)"
    (the threshold left out when not recorded, or when a forced verdict passed the image)."""
    p, threshold = format_probability(result.p_defect), result.threshold
    if threshold is None or not result.p_defect < threshold:
        return f"the image was not flagged (p_defect {p})"
    return f"the image was not flagged (p_defect {p} < threshold {format_probability(threshold)})"
