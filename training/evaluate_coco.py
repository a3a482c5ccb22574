"""Detection metrics: pycocotools' own bbox COCOeval, per class too (`coco_metrics`), and the
gated system's (`gated_coco_metrics`: an image's detections kept only when the gate flags it).

The COCO objects are built in memory from the split: all of its images count, defect-free ones
too (a detection there is a false positive). A VOC "difficult" object is ignored
(`_difficult_eval`): matched at standard IoU like any object, a detection matching it at the
IoU threshold (and no free regular object: pycocotools' order, where the VOC devkit takes each
detection's best-overlapping object of either kind) is neither a true nor a false positive,
and missing it is no miss; it is never a COCO crowd region, which any detection inside it would
match. Boxes are x1y1x2y2 in 0-based continuous original-image px.
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from splitdet.training.evaluate_predict import Prediction
    from splitdet.training.voc import VocSample


def _coco_gt(samples: Sequence[VocSample], class_names: Sequence[str]) -> COCO:
    from pycocotools.coco import COCO

    label_of = {name: k + 1 for k, name in enumerate(class_names)}
    images, annotations = [], []
    for image_id, sample in enumerate(samples, start=1):
        images.append({"id": image_id, "width": sample.width, "height": sample.height})
        for obj in sample.objects:
            x1, y1, x2, y2 = obj.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label_of[obj.name],
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    # `_difficult_eval` ignores a difficult object by this flag (standard IoU);
                    # a plain COCOeval would at least ignore it, as a crowd region (the IoU
                    # over the detection's area: any detection inside it, not VOC's)
                    "iscrowd": int(obj.difficult),
                    "difficult": int(obj.difficult),
                }
            )
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(class_names)]
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


@functools.cache
def _difficult_eval() -> type[COCOeval]:
    """pycocotools' COCOeval ignoring the ground truth's VOC "difficult" objects by IoU.

    COCOeval's `_prepare` overwrites every object's `ignore` with `iscrowd`, and a crowd box is
    matched by intersection over the detection's area: any detection inside a difficult box,
    a fragment of it too, would be ignored. Here `_prepare` sets `ignore` from the annotation's
    `difficult` flag instead, and `computeIoU` measures standard IoU with every object. In
    `evaluateImg` (pycocotools' own matching, unchanged) `iscrowd` then only lets an ignored
    object be matched by any number of detections, as VOC ignores each of them: a detection
    takes the free regular object it overlaps most at the IoU threshold, else the difficult
    one it overlaps most (neither TP nor FP), else it is a false positive. Without difficult
    objects, everything is pycocotools' own to the bit.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    class DifficultEval(COCOeval):
        """COCOeval, difficult objects ignored by standard IoU (`_difficult_eval`)."""

        def _prepare(self) -> None:
            super()._prepare()
            for objects in self._gts.values():
                for obj in objects:
                    obj["ignore"] = obj["iscrowd"] = int(obj.get("difficult", 0))

        def computeIoU(self, imgId: int, catId: int) -> np.ndarray | list:
            """IoU [detections by score, up to maxDets, objects] as COCOeval's, no box a crowd."""
            objects, found = self._gts[imgId, catId], self._dts[imgId, catId]
            if not objects and not found:
                return []
            order = np.argsort([-d["score"] for d in found], kind="mergesort")
            found = [found[i] for i in order][: self.params.maxDets[-1]]
            return mask_utils.iou(
                [d["bbox"] for d in found], [g["bbox"] for g in objects], [0] * len(objects)
            )

    return DifficultEval


def _coco_dt(
    gt: COCO,
    boxes_per_image: Sequence,
    scores_per_image: Sequence,
    labels_per_image: Sequence,
) -> COCO:
    """Detections as a COCO object, as `COCO.loadRes` would build it (works for none at all)."""
    from pycocotools.coco import COCO

    annotations = []
    for image_id, (boxes, scores, labels) in enumerate(
        zip(boxes_per_image, scores_per_image, labels_per_image, strict=True), start=1
    ):
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels, strict=True):
            w, h = float(x2 - x1), float(y2 - y1)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": [float(x1), float(y1), w, h],
                    "area": w * h,
                    "score": float(score),
                    "iscrowd": 0,
                }
            )
    dt = COCO()
    dt.dataset = {
        "images": list(gt.dataset["images"]),
        "annotations": annotations,
        "categories": list(gt.dataset["categories"]),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def coco_metrics(
    samples: Sequence[VocSample],
    boxes_per_image: Sequence,
    scores_per_image: Sequence,
    labels_per_image: Sequence,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """pycocotools' bbox COCOeval over all `samples` (images without objects included).

    Args:
        samples: ground truth; object boxes x1y1x2y2 in 0-based continuous original-image px
            (`VocSample`), difficult ones ignored as VOC ignores them (see `_difficult_eval`).
        boxes_per_image: per sample, the detections' boxes (K, 4) x1y1x2y2 in the same frame,
            original-image px (not the model's resized input), any float array-like (Tensor,
            ndarray; read as Python floats), as `Prediction.boxes`.
        scores_per_image: per sample, scores (K,) finite floats (only their order counts).
        labels_per_image: per sample, labels (K,) ints, 1-based indices into `class_names`.
        class_names: the classes; label k + 1 is class_names[k].

    Raises ValueError, naming the image, for a label outside 1..len(class_names) or a score
    that is not finite (NaN, infinity), and when the lists are not one per sample.

    Returns {"map": mAP@[.5:.95], "map50": mAP@.5, "map75", "ar100": AR@100}; None where
    pycocotools has nothing to average (no ground truth at all); and "per_class": per class
    name, {"ap", "ap50", "objects"}: its AP@[.5:.95] and AP@.5 (pycocotools' own precision
    table, averaged as its summary averages it; None for a class without ground truth here)
    and its number of objects, `difficult` ones not counted.
    """
    coco_eval = _matched(samples, boxes_per_image, scores_per_image, labels_per_image, class_names)
    return {**_summary(coco_eval), "per_class": _per_class(coco_eval, samples, class_names)}


def _matched(
    samples: Sequence[VocSample],
    boxes_per_image: Sequence,
    scores_per_image: Sequence,
    labels_per_image: Sequence,
    class_names: Sequence[str],
) -> COCOeval:
    """pycocotools' bbox COCOeval of the detections (arguments as `coco_metrics`'), difficult
    objects ignored by standard IoU (`_difficult_eval`), every image matched (`evaluate`), nothing
    accumulated yet; image ids 1..n in the samples' order."""
    if not len(samples) == len(boxes_per_image) == len(scores_per_image) == len(labels_per_image):
        raise ValueError("one detection list per sample is needed")
    for index, (sample, scores, labels) in enumerate(
        zip(samples, scores_per_image, labels_per_image, strict=True)
    ):
        _check_detections(index, sample.image_id, scores, labels, len(class_names))
    gt = _coco_gt(samples, class_names)
    dt = _coco_dt(gt, boxes_per_image, scores_per_image, labels_per_image)
    coco_eval = _difficult_eval()(gt, dt, iouType="bbox")
    coco_eval.params.imgIds = sorted(gt.getImgIds())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
    return coco_eval


def _check_detections(index: int, image_id: str, scores: Any, labels: Any, n_classes: int) -> None:
    """ValueError naming the image (index into the samples, and id) for a detection whose label
    is not one of 1..`n_classes` (0-based labels scored an mAP of 0.0 without a word) or whose
    score is not finite (a NaN scored as the most confident). `scores` (K,) and `labels` (K,):
    any array-like (Tensor, ndarray)."""
    where = f"image {index} ({image_id})"
    labels, scores = np.asarray(labels).reshape(-1), np.asarray(scores).reshape(-1)
    if labels.size:
        numeric = labels.dtype.kind in "uif"
        bad = (
            ~((labels >= 1) & (labels <= n_classes) & (labels == np.floor(labels)))
            if numeric
            else np.ones(labels.shape, dtype=bool)
        )
        if bad.any():
            value = labels[int(np.argmax(bad))]
            raise ValueError(
                f"{where}: detection label {value} is not one of 1..{n_classes} (labels are "
                "1-based: label k + 1 is class_names[k]; 0 is the background)"
            )
    if scores.size:
        if scores.dtype.kind not in "uif":
            raise ValueError(f"{where}: detection scores must be numbers, got {scores.dtype}")
        bad = ~np.isfinite(scores.astype(np.float64))
        if bad.any():
            raise ValueError(
                f"{where}: detection score {scores[int(np.argmax(bad))]} is not a finite "
                "number (a NaN would be scored as the most confident)"
            )


def _summary(coco_eval: COCOeval) -> dict[str, float | None]:
    """Accumulate the matched `coco_eval` and summarise it: {"map": mAP@[.5:.95], "map50",
    "map75", "ar100"}, None where pycocotools has nothing to average."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = [None if s < 0 else float(s) for s in coco_eval.stats]
    return {"map": stats[0], "map50": stats[1], "map75": stats[2], "ar100": stats[8]}


def _per_class(
    coco_eval: COCOeval, samples: Sequence[VocSample], class_names: Sequence[str]
) -> dict[str, dict[str, float | int | None]]:
    """{class name: {"ap", "ap50", "objects"}} from an accumulated COCOeval: its precision
    table [IoU thresholds, recall points, classes, areas, max detections], read at all areas and
    100 detections, cells of -1 (nothing to measure) left out as pycocotools' summary does."""
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    iou_50 = int(np.argmin(np.abs(coco_eval.params.iouThrs - 0.5)))
    out: dict[str, dict[str, float | int | None]] = {}
    for k, name in enumerate(class_names):

        def mean(cells: np.ndarray) -> float | None:
            cells = cells[cells > -1]
            return float(cells.mean()) if cells.size else None

        objects = sum(1 for s in samples for o in s.objects if o.name == name and not o.difficult)
        out[name] = {
            "ap": mean(precision[:, :, k]),
            "ap50": mean(precision[iou_50, :, k]),
            "objects": objects,
        }
    return out


#: The detector's mAP under which "mAP kept" (gated / alone) is not given, by `eval` and by
#: the benchmark (`splitdet.bench.report`): an untrained or tiny model's mAP of a few 1e-6 is
#: the noise of a stray box or two, and the ratio of two such numbers (7.0e-06 / 4.8e-06:
#: "145.1% kept") says nothing about the gate or the codec. 0.01 is a tenth of the mAP of the
#: demo's 30-minute model; any model worth comparing is well above it.
MAP_KEPT_FLOOR = 0.01


def _kept(gated: float | None, alone: float | None) -> float | None:
    """The share of the detector's metric `alone` the gated system keeps; None without both,
    or when `alone` is under `MAP_KEPT_FLOOR` (a ratio of noise: `kept_absence` says why)."""
    if gated is None or alone is None or alone < MAP_KEPT_FLOOR:
        return None
    return gated / alone


def kept_absence(alone: float | None) -> str | None:
    """Why `_kept` gives no share for the detector's metric `alone` (for the JSON and the
    summary), None when it gives one (or when there is nothing to score: `alone` None)."""
    if alone is None or alone >= MAP_KEPT_FLOOR:
        return None
    return (
        f"not given: the detector's mAP {alone:.2g} is under {MAP_KEPT_FLOOR:g}, where the "
        "ratio is noise"
    )


def gated_coco_metrics(
    samples: Sequence[VocSample],
    predictions: Sequence[Prediction],
    class_names: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """`coco_metrics` of the gated system: an image's detections are kept when its p_defect
    >= `threshold`, and it has none otherwise."""
    # an image under the threshold keeps none of its detections: [:0] of each
    kept = [slice(None) if p.p_defect >= threshold else slice(0) for p in predictions]
    return coco_metrics(
        samples,
        [p.boxes.numpy()[k] for p, k in zip(predictions, kept, strict=True)],
        [p.scores.numpy()[k] for p, k in zip(predictions, kept, strict=True)],
        [p.labels.numpy()[k] for p, k in zip(predictions, kept, strict=True)],
        class_names,
    )


class GatedCoco:
    """pycocotools' bbox evaluation of the detector and of the gated system at any number of
    thresholds, each image matched twice in all (with its detections, and without any: as the
    gate leaves an image under its threshold), not once per threshold. Each image's matching
    depends on its own objects and detections only (as `ResampledCoco` uses), so a threshold's
    figures are re-accumulated from the per-image results of the one or the other: those
    `gated_coco_metrics` gives, to the bit, at the cost of pycocotools' accumulate and summary.
    `evaluate` asks for eight thresholds' figures (its own and the operating points'); on a
    split of thousands of images each matching is minutes of pycocotools' Python.

        coco = GatedCoco(samples, predictions, class_names)
        coco.detector()["map50"], coco.gated(0.3)["map50"]
    """

    def __init__(
        self,
        samples: Sequence[VocSample],
        predictions: Sequence[Prediction],
        class_names: Sequence[str],
    ) -> None:
        """Match every sample's detections (`predictions`, one per sample; boxes in original
        px, as `coco_metrics`'), and none, for the gated figures."""
        self._samples, self._class_names = samples, class_names
        self._p_defect = [p.p_defect for p in predictions]
        self._eval = _matched(
            samples,
            [p.boxes.numpy() for p in predictions],
            [p.scores.numpy() for p in predictions],
            [p.labels.numpy() for p in predictions],
            class_names,
        )
        # evalImgs: one entry per (category, area range, image), images innermost
        self._found = list(self._eval.evalImgs)
        self._unmatched: list | None = None  # the matching without detections, when needed
        self._cache: dict[float | None, dict[str, Any]] = {}

    def _none_found(self) -> list:
        """Every image's matching without any detection (evalImgs as `_found`'s)."""
        if self._unmatched is None:
            n = len(self._samples)
            empty, no_scores = np.zeros((0, 4)), np.zeros((0,))
            self._unmatched = list(
                _matched(
                    self._samples,
                    [empty] * n,
                    [no_scores] * n,
                    [no_scores] * n,
                    self._class_names,
                ).evalImgs
            )
        return self._unmatched

    def _metrics(self, threshold: float | None) -> dict[str, Any]:
        """`coco_metrics`' dict of the detector (`threshold` None) or the gated system."""
        if threshold in self._cache:
            return self._cache[threshold]
        coco_eval = self._eval
        if threshold is None or all(p >= threshold for p in self._p_defect):
            coco_eval.evalImgs = list(self._found)
        else:
            none = self._none_found()
            images = len(self._samples)
            kept = [p >= threshold for p in self._p_defect]
            coco_eval.evalImgs = [
                (self._found if kept[j % images] else none)[j] for j in range(len(self._found))
            ]
        metrics = {
            **_summary(coco_eval),
            "per_class": _per_class(coco_eval, self._samples, self._class_names),
        }
        self._cache[threshold] = metrics
        return metrics

    def detector(self) -> dict[str, Any]:
        """`coco_metrics` of every detection (the detector alone)."""
        return self._metrics(None)

    def gated(self, threshold: float) -> dict[str, Any]:
        """`gated_coco_metrics` at `threshold`: an image's detections kept when its p_defect
        >= `threshold`, none otherwise."""
        return self._metrics(float(threshold))


class ResampledCoco:
    """pycocotools' bbox evaluation of every image once, then `coco_metrics`' mAP figures of
    any draw of the images (repeats counting again) re-accumulated from it: a bootstrap
    resample costs pycocotools' accumulate and summary, not its per-image matching. Each
    image's matching depends on its own objects and detections only, so a draw's figures are
    those `coco_metrics` gives the drawn samples.

        resampled = ResampledCoco(samples, boxes, scores, labels, class_names)
        resampled.metrics([0, 0, 3, 1])["map50"]
    """

    def __init__(
        self,
        samples: Sequence[VocSample],
        boxes_per_image: Sequence,
        scores_per_image: Sequence,
        labels_per_image: Sequence,
        class_names: Sequence[str],
    ) -> None:
        """Match every sample's detections (arguments as `coco_metrics`')."""
        self._eval = _matched(
            samples, boxes_per_image, scores_per_image, labels_per_image, class_names
        )
        # evalImgs: one entry per (category, area range, image), images innermost
        self._matched = list(self._eval.evalImgs)
        self._images = len(samples)

    def metrics(self, drawn: Sequence[int]) -> dict[str, float | None]:
        """{"map", "map50", "map75", "ar100"} of the samples at indices `drawn` (0-based, with
        repeats); None where the draw holds no ground truth to score."""
        coco_eval, images = self._eval, self._images
        areas = len(coco_eval.params.areaRng)
        categories = len(coco_eval.params.catIds)
        coco_eval.evalImgs = [
            self._matched[(k * areas + a) * images + int(i)]
            for k in range(categories)
            for a in range(areas)
            for i in drawn
        ]
        # each drawn position an image of its own to accumulate (a repeat counts again)
        coco_eval.params.imgIds = coco_eval._paramsEval.imgIds = list(range(len(drawn)))
        return _summary(coco_eval)
