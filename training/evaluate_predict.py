"""The model's outputs on a split, for evaluation: `predict` (detections and p(defect) per
image, one `Prediction` each) and `gate_probabilities` (p(defect) alone, what calibrating the
gate needs). Images are batched only with images of their own size, so any batch size gives
every image its batch-of-1 result, as the edge scores it.

Images are read as the edge reads them (`splitdet.edge.preprocess.load_image`: float32 in
[0, 1], a 12- or 16-bit camera's every level kept), so that the gate threshold `eval
--checkpoint` calibrates, and the figures it gives, are of the inputs the edge and `eval
--model` see. (Training's augmentation reads them through `voc.load_rgb`, rounded to 8 bits:
the same values for 8-bit images, within half a grey level for wider ones.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from splitdet.training.voc import VocError, VocSample

if TYPE_CHECKING:
    from splitdet.shared.model import MultiTaskRCNN


@dataclass
class Prediction:
    """One image's output: boxes FloatTensor[K, 4] x1y1x2y2 in original px, scores [K],
    labels Int64[K] (1-based), p_defect the gate's probability."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    p_defect: float


def _same_shape_batches(samples: Sequence[VocSample], batch_size: int) -> list[list[int]]:
    """Indices of `samples` in batches of at most `batch_size` whose images share one size.

    torchvision's transform pads a batch to its largest image, and the padding is part of what
    the backbone's GroupNorm, the gate's pooling and the dense gate see: an image batched with
    one of another size (a 320x256 beside a 256x320) is scored on other numbers than alone,
    as the edge scores it. Images of one (width, height) px resize and pad alike, so batching
    only those gives every image its batch-of-1 result. The size is the annotation's
    (`VocSample.width`, `height`, the image header's when the split was read with its images
    checked); `_image_batches` splits a batch again by the decoded size should they differ.
    Batches follow the samples' order by their first index."""
    groups: dict[tuple[int, int], list[int]] = {}
    batches: list[list[int]] = []
    for index, sample in enumerate(samples):
        group = groups.setdefault((sample.width, sample.height), [])
        if not group:  # a new batch takes its place in the order here
            batches.append(group)
        group.append(index)
        if len(group) == batch_size:
            del groups[(sample.width, sample.height)]  # full: the next of this size starts anew
    return batches


def _image_batches(
    samples: Sequence[VocSample],
    batch_size: int,
    device: torch.device | str,
    progress: bool,
    desc: str,
    pixel_bits: int,
) -> Iterator[tuple[list[int], list[Tensor]]]:
    """The samples' images in batches of one size each (see `_same_shape_batches`): pairs of
    (indices into `samples`, images Tensor[3, H, W] float32 in [0, 1] of one H, W), every
    index once, read as the edge reads them (`edge_image`; `pixel_bits`: the model's
    `ModelConfig.pixel_bits`)."""
    batches = _same_shape_batches(samples, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch", leave=False)
    for indices in batches:
        by_shape: dict[tuple[int, ...], tuple[list[int], list[Tensor]]] = {}
        for index in indices:
            image = edge_image(samples[index].image_path, pixel_bits).to(device)
            kept, images = by_shape.setdefault(tuple(image.shape), ([], []))
            kept.append(index)
            images.append(image)
        yield from by_shape.values()  # one pair unless an annotation's size was wrong


def edge_image(path: Path, pixel_bits: int) -> Tensor:
    """The image file at `path` as the edge reads it (`splitdet.edge.preprocess.load_image`):
    Tensor[3, H, W] float32 in [0, 1], a 16-bit image's values over 0..2**pixel_bits - 1 with
    every level kept (for an 8-bit image the values `voc.load_rgb` / 255 gives). VocError
    names a file the edge refuses (corrupt, truncated, a pixel past `pixel_bits`)."""
    from splitdet.edge.preprocess import ImageError, load_image

    try:
        return torch.from_numpy(load_image(path, pixel_bits))
    except ImageError as exc:
        raise VocError(str(exc)) from None


@torch.inference_mode()
def gate_probabilities(
    model: MultiTaskRCNN,
    samples: Sequence[VocSample],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = False,
) -> list[float]:
    """p(defect) for every sample (in `samples`' order) from the gate alone (backbone + defect
    head, no RPN or ROI heads): what calibrating the threshold needs. Equals `predict`'s
    p_defect, and the batch-of-1 value at any `batch_size` (images of one size share a batch)."""
    model.eval()
    out: list[float] = [math.nan] * len(samples)
    batches = _image_batches(
        samples, batch_size, device, progress, "calibrate", model.config.pixel_bits
    )
    for indices, images in batches:
        for index, p in zip(indices, model.defect_probability(images).tolist(), strict=True):
            out[index] = p
    return out


@torch.inference_mode()
def predict(
    model: MultiTaskRCNN,
    samples: Sequence[VocSample],
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    progress: bool = False,
) -> list[Prediction]:
    """Detections and p(defect) for every sample (in `samples`' order), with one backbone pass
    per image. Any `batch_size` gives the batch-of-1 result: only images of one size share a
    batch (torchvision pads a batch to its largest image, and the padding would change what
    GroupNorm and the gate compute)."""
    model.eval()
    gate_level = model.config.gate_level
    out: list[Prediction | None] = [None] * len(samples)
    batches = _image_batches(samples, batch_size, device, progress, "eval", model.config.pixel_bits)
    for indices, images in batches:
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        # FasterRCNN.forward, with the defect head reading the same features
        images_t, _ = model.transform(images)
        features = model.backbone(images_t.tensors)
        p_defect = torch.sigmoid(model.defect_head(features[gate_level])[0])
        proposals, _ = model.rpn(images_t, features)
        detections, _ = model.roi_heads(features, proposals, images_t.image_sizes)
        detections = model.transform.postprocess(detections, images_t.image_sizes, original_sizes)
        for index, det, p in zip(indices, detections, p_defect.tolist(), strict=True):
            out[index] = Prediction(det["boxes"].cpu(), det["scores"].cpu(), det["labels"].cpu(), p)
    return out  # type: ignore[return-value]  # every index was filled
