"""Where a detector's errors are: confident detections by kind of mistake, recall by object size.

    errors = error_breakdown(samples, boxes, scores, labels, class_names)
    errors["background"], errors["duplicates"], errors["recall_by_length"]["<20"]

mAP says how good a detector is; this says what to fix. Every detection scoring at least
`score_threshold` (the ones a user acts on) is, in this order of tests:

    true positive   IoU >= iou_threshold with a ground-truth object of its class not yet taken
                    by a higher-scoring detection (COCO's greedy matching, by score)
    ignored         IoU >= iou_threshold with a "difficult" object of its class, any number of
                    detections per object (neither right nor wrong: exactly the detections
                    `evaluate_coco`'s mAP ignores at this IoU)
    duplicate       IoU >= iou_threshold with an object of its class already taken: a second box
                    on the same defect that NMS left
    wrong class     IoU >= iou_threshold with an object of another class
    localisation    0.1 <= IoU < iou_threshold with some object: a loose box or a fragment
    background      IoU < 0.1 with every object: clutter taken for a defect; counted apart on
                    defect-free images too ("background_on_defect_free")

Objects (difficult ones aside) are counted found when a true positive took them; recall is also
given by the object's longer side in image px (`length_edges`), since small defects are where
detectors usually fail first.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch
from torchvision.ops import box_iou

from splitdet.training.voc import VocSample

#: IoU under which a wrong detection does not touch any object at all.
BACKGROUND_IOU = 0.1
#: Default buckets of an object's longer side, px.
LENGTH_EDGES = (20.0, 40.0, 80.0)
KINDS = ("true_positives", "duplicates", "ignored", "wrong_class", "localisation", "background")


def _length_buckets(edges: Sequence[float]) -> list[str]:
    middle = [f"{lo:g}-{hi:g}" for lo, hi in pairwise(edges)]
    return [f"<{edges[0]:g}", *middle, f">={edges[-1]:g}"]


def _iou(boxes: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU matrix [len(boxes), len(others)] of x1y1x2y2 boxes (zeros for an empty side)."""
    if len(boxes) == 0 or len(others) == 0:
        return np.zeros((len(boxes), len(others)), dtype=np.float64)
    return box_iou(torch.as_tensor(boxes, dtype=torch.float64),
                   torch.as_tensor(others, dtype=torch.float64)).numpy()  # fmt: skip


def error_breakdown(
    samples: Sequence[VocSample],
    boxes_per_image: Sequence,
    scores_per_image: Sequence,
    labels_per_image: Sequence,
    class_names: Sequence[str],
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    length_edges: Sequence[float] = LENGTH_EDGES,
) -> dict:
    """Confident detections by kind of error and recall by object length (module docstring).

    Args:
        samples: ground truth; object boxes x1y1x2y2 in 0-based continuous original-image px
            (`VocSample`).
        boxes_per_image: per sample, the detections' boxes (K, 4) x1y1x2y2 in the same frame,
            original-image px, any array-like (Tensor, ndarray; read as float64).
        scores_per_image: per sample, scores (K,) (read as float64), compared with
            `score_threshold`.
        labels_per_image: per sample, labels (K,) (read as int64), 1-based indices into
            `class_names`.
        class_names: the classes; label k + 1 is class_names[k].
        score_threshold: detections scoring below it are not counted.
        iou_threshold: IoU that makes a detection match an object.
        length_edges: increasing bucket edges of an object's longer side, px.

    Returns a JSON-able dict: score_threshold, iou_threshold, detections (confident ones),
    one count per kind (true_positives, duplicates, ignored, wrong_class, localisation,
    background), background_on_defect_free, objects, missed, and recall_by_length
    {bucket: {"found", "objects", "recall"}} (recall None for an empty bucket).
    """
    if not len(samples) == len(boxes_per_image) == len(scores_per_image) == len(labels_per_image):
        raise ValueError("one detection list per sample is needed")
    if list(length_edges) != sorted(length_edges) or not length_edges:
        raise ValueError(f"length_edges must be increasing and not empty, got {length_edges}")
    label_of = {name: k + 1 for k, name in enumerate(class_names)}
    counts = dict.fromkeys(KINDS, 0)
    counts["background_on_defect_free"] = 0
    buckets = _length_buckets(length_edges)
    found_by_bucket = dict.fromkeys(buckets, 0)
    objects_by_bucket = dict.fromkeys(buckets, 0)
    detections = 0

    for sample, boxes, scores, labels in zip(
        samples, boxes_per_image, scores_per_image, labels_per_image, strict=True
    ):
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        keep = np.flatnonzero(scores >= score_threshold)
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        detections += len(keep)
        gt_boxes = np.array([o.box for o in sample.objects], dtype=np.float64).reshape(-1, 4)
        gt_labels = np.array([label_of[o.name] for o in sample.objects], dtype=np.int64)
        difficult = np.array([o.difficult for o in sample.objects], dtype=bool)
        iou = _iou(boxes[keep], gt_boxes)
        taken = np.zeros(len(gt_boxes), dtype=bool)
        for row, det in enumerate(keep):
            same = gt_labels == labels[det]
            overlaps = iou[row]
            hit = overlaps >= iou_threshold
            free = same & ~difficult & ~taken & hit
            if free.any():
                taken[np.flatnonzero(free)[np.argmax(overlaps[free])]] = True
                counts["true_positives"] += 1
            elif (same & difficult & hit).any():  # before duplicates, as pycocotools matches
                counts["ignored"] += 1
            elif (same & ~difficult & taken & hit).any():
                counts["duplicates"] += 1
            elif (~same & hit).any():
                counts["wrong_class"] += 1
            elif (overlaps >= BACKGROUND_IOU).any():
                counts["localisation"] += 1
            else:
                counts["background"] += 1
                if not sample.is_defective:
                    counts["background_on_defect_free"] += 1
        lengths = np.maximum(gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1])
        for length, was_found, hard in zip(lengths, taken, difficult, strict=True):
            if hard:
                continue
            bucket = buckets[int(np.searchsorted(length_edges, length, side="right"))]
            objects_by_bucket[bucket] += 1
            found_by_bucket[bucket] += int(was_found)

    objects = sum(objects_by_bucket.values())
    return {
        "score_threshold": score_threshold,
        "iou_threshold": iou_threshold,
        "detections": detections,
        **counts,
        "objects": objects,
        "missed": objects - sum(found_by_bucket.values()),
        "recall_by_length": {
            bucket: {
                "found": found_by_bucket[bucket],
                "objects": objects_by_bucket[bucket],
                "recall": found_by_bucket[bucket] / objects_by_bucket[bucket]
                if objects_by_bucket[bucket]
                else None,
            }
            for bucket in buckets
        },
    }
