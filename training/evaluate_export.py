"""`splitdet eval --model`: an exported model directory measured as it is deployed.

    pipeline = open_pipeline(model_dir, codec="int8")
    samples = read_samples(data, "test", pipeline.manifest.class_names)
    metrics = evaluate_export(samples, pipeline, detector)   # detector: LocalDetector or Remote

Every image goes through `splitdet predict`'s own path (`edge.predict.predict_paths`): read from
disk, numpy preprocessing, the ONNX gate (float32 or int8), lazy completion, codec encode, and
the cloud heads behind `detector` (in this process or a server), which decode. Each image is run
once with the gate forced open, so every image is detected. A flagged image's detections do not
depend on the gate (the edge encodes the same completed levels, under the same request id,
whatever its threshold), so the deployed system's output is derived from that one pass: the
detections of the images whose p(defect) >= the manifest's threshold, none for the others. The
metrics are `training.evaluate`'s, under the same keys.

An image that cannot be read, or whose detection call fails, does not stop the evaluation: it is
named in "image_errors" and counted with no detections, and with p(defect) 0 when it was not read
(a defective one is a miss at any threshold above 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.predict import Detector, predict_paths
from splitdet.edge.predict import Prediction as EdgePrediction
from splitdet.edge.preprocess import ImageError, load_image
from splitdet.edge.runtime import EdgeRuntime
from splitdet.shared.manifest import edge_gate_kind
from splitdet.training import voc
from splitdet.training.evaluate import DEFAULT_TARGET_RECALL, Prediction, metrics_at_threshold


def open_pipeline(model_dir: Path, codec: str | None = None) -> EdgePipeline:
    """The edge pipeline of `model_dir` with its gate forced open (every image is detected;
    p(defect) is still computed). ManifestError for a missing or altered export."""
    return EdgePipeline(EdgeRuntime(Path(model_dir)), codec=codec, gate=False)


def read_samples(root: Path, split: str, class_names: Sequence[str]) -> list[voc.VocSample]:
    """`voc.read_split`, except that an image whose file cannot be decoded is kept (the
    evaluation reports it) instead of failing the whole split. Annotation problems, unknown
    class names and a readable image of another size than its annotation's are VocErrors, as
    is an unreadable image whose annotation gives no size (<size> 0: nothing else tells it)."""
    samples = []
    for image_id in voc.read_split_ids(Path(root), split):
        try:
            samples.append(voc.read_annotation(Path(root), image_id, class_names))
        except voc.VocError:
            # raises the annotation's own problems; else the image is what was wrong
            sample = voc.read_annotation(Path(root), image_id, class_names, check_image=False)
            if _decodes(sample.image_path):
                raise  # a readable image of another size than its annotation says
            samples.append(sample)
    return samples


def _decodes(path: Path) -> bool:
    try:
        load_image(path)
    except ImageError:
        return False
    return True


def as_eval_prediction(record: EdgePrediction) -> Prediction:
    """A `splitdet predict` record as `training.evaluate`'s Prediction: boxes Float32[K, 4]
    x1y1x2y2 in original image px, scores [K], labels Int64[K] (1-based); p(defect) 0 for an
    image that was not read."""
    return Prediction(
        boxes=torch.tensor(record.boxes, dtype=torch.float32).reshape(-1, 4),
        scores=torch.tensor(record.scores, dtype=torch.float32),
        labels=torch.tensor(record.labels, dtype=torch.int64),
        p_defect=0.0 if record.p_defect is None else float(record.p_defect),
    )


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def stage_means(records: Sequence[EdgePrediction]) -> dict[str, float]:
    """Mean seconds per stage (read, preprocess, gate, complete, encode, round_trip, cloud_*)
    over the images that went through it."""
    stages = dict.fromkeys(name for record in records for name in record.timings)
    return {
        stage: _mean([r.timings[stage] for r in records if stage in r.timings]) for stage in stages
    }


def evaluate_export(
    samples: Sequence[voc.VocSample],
    pipeline: EdgePipeline,
    detector: Detector,
    *,
    threshold: float | None = None,
    on_result: Callable[[EdgePrediction], None] | None = None,
) -> dict:
    """Ungated and gated metrics of the export behind `pipeline` (from `open_pipeline`) on
    `samples`, detections by `detector`.

    `threshold`: the gate threshold to measure instead of the manifest's (an operator's
    `predict --threshold` / `edge run --threshold`); None: the manifest's.

    Returns `training.evaluate.metrics_at_threshold`'s dict at that threshold
    (gate_calibrated_on "manifest", or "--threshold" when given; gate_best_* at the default
    target recall), plus manifest_gate_threshold (the export's own),
    flagged_fraction (share of images the gate flags), bytes_per_flagged_image (mean encoded
    feature bytes of those), codec, model, fingerprint, edge_gate ("float32" | "int8"),
    box_refine_steps, stage_seconds (see `stage_means`) and image_errors ([{"path", "error"}]).
    """
    manifest = pipeline.manifest
    given = threshold is not None
    threshold = float(threshold) if given else manifest.gate_threshold
    records = predict_paths(
        [s.image_path for s in samples], pipeline, lambda: detector, on_result=on_result
    )
    metrics = metrics_at_threshold(
        samples,
        [as_eval_prediction(r) for r in records],
        manifest.class_names,
        threshold,
        calibrated_on="--threshold" if given else "manifest",
        target_recall=DEFAULT_TARGET_RECALL,
    )
    flagged = [r for r in records if r.p_defect is not None and r.p_defect >= threshold]
    metrics.update(
        manifest_gate_threshold=manifest.gate_threshold,
        flagged_fraction=len(flagged) / len(records) if records else None,
        # (a flagged image whose detection call failed sent nothing that arrived: left out)
        bytes_per_flagged_image=_mean([r.bytes_sent for r in flagged if r.verdict != "error"]),
        codec=pipeline.codec,
        model=str(pipeline.runtime.model_dir),
        fingerprint=manifest.fingerprint,
        edge_gate=edge_gate_kind(manifest),
        box_refine_steps=manifest.model_config.box_refine_steps,
        # (an image whose detection call failed still ran the edge's stages: its error is
        # the call's, so its edge timings count; an unreadable image has none)
        stage_seconds=stage_means([r for r in records if r.timings]),
        image_errors=[{"path": r.path, "error": r.error} for r in records if r.error],
    )
    return metrics
