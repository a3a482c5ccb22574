"""A torch Dataset over PASCAL VOC samples, with the training crops that make CPU training work.

    samples = voc.read_split(root, "train", class_names)
    data = VocDetection(samples, class_names, crop=256, object_fraction=0.6, flips=True)
    image, target = data[0]   # Tensor[3, H, W] in [0, 1]; {"boxes", "labels", "iscrowd", ...}

Training crops are taken at the model's input scale: a scratch 1 px wide stays 1 px wide, which a
resized full image would blur away. `input_size` (the model's `min_size`, `max_size`) resizes
each whole image first by the factor the model's transform would apply to it (see `input_scale`),
and the way it applies it (`resize_as_the_model`: no antialiasing), so a crop shows what the
model sees of a full image, up to 8-bit rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from splitdet.edge.preprocess import input_scale
from splitdet.training.voc import VocSample, load_rgb

#: A box clipped by a crop is kept when its longer side keeps at least this many px.
MIN_KEPT_SIDE = 4.0
#: Crop placements tried per training crop in search of one that cuts no object.
CROP_TRIES = 8


def _objects_cut(boxes: np.ndarray, left: int, top: int, size: int) -> int:
    """How many ``boxes`` (N, 4) the square crop at (left, top) overlaps without containing."""
    right, bottom = left + size, top + size
    overlaps = (boxes[:, 0] < right) & (boxes[:, 2] > left) & (boxes[:, 1] < bottom)
    overlaps &= boxes[:, 3] > top
    inside = (boxes[:, 0] >= left) & (boxes[:, 2] <= right) & (boxes[:, 1] >= top)
    inside &= boxes[:, 3] <= bottom
    return int((overlaps & ~inside).sum())


def resize_as_the_model(img: Image.Image, scale: float) -> Image.Image:
    """`img` resized by `scale` as torchvision's GeneralizedRCNNTransform resizes the model's
    input at inference (and the edge's numpy copy of it): bilinear, align_corners=False, no
    antialiasing, the size floor(side * scale). Pillow's own bilinear resize antialiases when
    it shrinks: a 1 px scratch trained as a faint smear would be seen at inference as a sharp
    line or not at all, so training crops must be resized the model's way.

    Args:
        img: an 8-bit RGB image, (W, H) px.
        scale: the factor, as `input_scale` gives it.

    Returns:
        The 8-bit RGB image, (floor(W * scale), floor(H * scale)) px (rounded to 8 bits).
    """
    pixels = pil_to_tensor(img).float()[None]  # [1, 3, H, W], 0..255
    resized = torch.nn.functional.interpolate(
        pixels, scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
        align_corners=False,
    )[0]  # fmt: skip
    array = resized.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def collate(
    batch: Sequence[tuple[Tensor, dict[str, Tensor]]],
) -> tuple[tuple[Tensor, ...], tuple[dict[str, Tensor], ...]]:
    """(images, targets) as tuples, the shape torchvision's detectors take."""
    return tuple(zip(*batch, strict=True))


@dataclass(frozen=True)
class CropSettings:
    """Training crops.

    Attributes:
        size: side of the square crop, px at the model's input scale.
        object_fraction: probability that a crop of a defective image is centred on one of its
            objects (jittered by up to a quarter crop); otherwise the crop is uniform.
    """

    size: int = 256
    object_fraction: float = 0.6


class VocDetection(Dataset):
    """VOC samples as detection training/evaluation pairs.

    Item i is (image Tensor[3, H, W] float32 in [0, 1], target) with target:
        boxes     FloatTensor[K, 4] x1, y1, x2, y2, 0-based continuous px of the returned image
        labels    Int64Tensor[K], 1-based index into class_names (0 is background)
        iscrowd   Int64Tensor[K], 1 for VOC "difficult" objects
        difficult BoolTensor[K]
        image_id  Int64Tensor[1], the index i
        defective BoolTensor[] (0-dim), the image-level label of the defect gate: True when the
                  returned image (the crop, in training) shows any object, difficult ones too
    With `train=True`, difficult objects are dropped from boxes/labels (they are neither
    positives nor negatives in VOC; keeping them out of the detection loss is torchvision's
    reference practice), but they still make the image defective: an image whose only objects
    are difficult is defective to `VocSample.is_defective`, and so to eval and calibration.
    Defect-free images have K = 0 and defective False, and act as negatives.

    Args:
        samples: from `voc.read_split`.
        class_names: foreground classes, in label order.
        train: apply augmentation (crops, flips) and drop difficult objects.
        crop: crop settings (train only): square crops `crop.size` px a side of the image as
            resized by `input_size` (of the file's pixels when that is None); None trains on
            whole images.
        input_size: (min_size, max_size) px of the model (`ModelConfig`): each image is resized
            by `input_scale` (short side to min_size px, long side at most max_size px), as the
            model's transform would resize it, before cropping (train only); None: the file's
            scale.
        flips: random horizontal and vertical flips (train only).
        seed: augmentation seed; item i of epoch e is the same whatever the worker count.
        pixel_bits: the bits 16-bit grayscale images' values use (`ModelConfig.pixel_bits`).
    """

    def __init__(
        self,
        samples: Sequence[VocSample],
        class_names: Sequence[str],
        *,
        train: bool = False,
        crop: CropSettings | None = None,
        input_size: tuple[int, int] | None = None,
        flips: bool = True,
        seed: int = 0,
        pixel_bits: int = 16,
    ) -> None:
        """Arguments: see the class docstring. ValueError for an object whose class is not
        one of `class_names`."""
        self.samples = list(samples)
        self.class_names = tuple(class_names)
        self.label_of = {name: k + 1 for k, name in enumerate(self.class_names)}
        for sample in self.samples:
            for obj in sample.objects:
                if obj.name not in self.label_of:
                    raise ValueError(
                        f"{sample.image_path}: class {obj.name!r} is not one of {self.class_names}"
                    )
        self.train = train
        self.crop = crop if train else None
        self.input_size = input_size if train else None
        self.flips = flips and train
        self.seed = seed
        self.pixel_bits = pixel_bits
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Vary the augmentation per epoch (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        sample = self.samples[index]
        objects = sample.objects
        boxes = np.array([o.box for o in objects], dtype=np.float32).reshape(-1, 4)
        labels = np.array([self.label_of[o.name] for o in objects], dtype=np.int64)
        difficult = np.array([o.difficult for o in objects], dtype=bool)
        img = load_rgb(sample.image_path, self.pixel_bits)
        if self.train:
            # difficult boxes go through the crop too: one inside the crop makes it defective
            rng = np.random.default_rng([self.seed, self.epoch, index])
            img, boxes, keep = self._augment(img, boxes, rng)
            labels, difficult = labels[keep], difficult[keep]
        defective = len(boxes) > 0
        if self.train:  # not detection positives (see the class docstring)
            boxes, labels, difficult = boxes[~difficult], labels[~difficult], difficult[~difficult]
        image = pil_to_tensor(img).float().div_(255.0)
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "iscrowd": torch.from_numpy(difficult.astype(np.int64)),
            "difficult": torch.from_numpy(difficult),
            "image_id": torch.tensor([index]),
            "defective": torch.tensor(defective),
        }
        return image, target

    def _augment(
        self, img: Image.Image, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        keep = np.ones(len(boxes), dtype=bool)
        width, height = img.size
        scale = input_scale(height, width, *self.input_size) if self.input_size else 1.0
        if abs(scale - 1.0) > 1e-6:
            img = resize_as_the_model(img, scale)
            size = img.size
            boxes = boxes * np.array([size[0] / width, size[1] / height] * 2, dtype=np.float32)
        if self.crop is not None:
            img, boxes, keep = self._random_crop(img, boxes, rng)
        width, height = img.size
        if self.flips and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            boxes = boxes[:, [2, 1, 0, 3]] * np.array([-1, 1, -1, 1], np.float32) + np.array(
                [width, 0, width, 0], np.float32
            )
        if self.flips and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_TOP_BOTTOM)
            boxes = boxes[:, [0, 3, 2, 1]] * np.array([1, -1, 1, -1], np.float32) + np.array(
                [0, height, 0, height], np.float32
            )
        return img, boxes, keep

    @staticmethod
    def _crop_origin(
        target: np.ndarray | None, size: int, width: int, height: int, rng: np.random.Generator
    ) -> tuple[int, int]:
        """Top-left corner of a crop: centred on ``target`` (a box) jittered by up to a quarter
        crop, or uniform over the image when ``target`` is None; inside the image if it fits."""
        if target is not None:
            x1, y1, x2, y2 = target
            jitter = rng.uniform(-size / 4, size / 4, 2)
            cx, cy = (x1 + x2) / 2 + jitter[0], (y1 + y2) / 2 + jitter[1]
            left, top = round(cx - size / 2), round(cy - size / 2)
        else:
            left = int(rng.integers(0, max(width - size, 0) + 1))
            top = int(rng.integers(0, max(height - size, 0) + 1))
        return min(max(left, 0), max(width - size, 0)), min(max(top, 0), max(height - size, 0))

    def _random_crop(
        self, img: Image.Image, boxes: np.ndarray, rng: np.random.Generator
    ) -> tuple[Image.Image, np.ndarray, np.ndarray]:
        """A square crop of ``self.crop.size`` px: (crop image, its boxes Float32[K', 4] in crop
        px, keep Bool[K]: which of ``boxes`` (Float32[K, 4] in image px) it holds). A box the
        crop cuts is kept when its longer visible side has `MIN_KEPT_SIDE` px; one wholly
        inside, whatever its size."""
        size = self.crop.size
        width, height = img.size
        centred = len(boxes) > 0 and rng.random() < self.crop.object_fraction
        target = boxes[rng.integers(len(boxes))] if centred else None
        # A crop that cuts an object through teaches a wrong box (the clipped box of a diagonal
        # stroke is not the box of the part inside), so of a few random placements take the
        # first that cuts none, else the one that cuts fewest.
        best, best_cuts = (0, 0), len(boxes) + 1
        for _ in range(CROP_TRIES):
            left, top = self._crop_origin(target, size, width, height, rng)
            cuts = _objects_cut(boxes, left, top, size)
            if cuts < best_cuts:
                best, best_cuts = (left, top), cuts
            if cuts == 0:
                break
        left, top = best
        # PIL pads with black where the crop passes the image edge (images smaller than a crop).
        img = img.crop((left, top, left + size, top + size))
        shifted = boxes - np.array([left, top, left, top], np.float32)
        clipped = shifted.copy()
        clipped[:, [0, 2]] = np.clip(shifted[:, [0, 2]], 0, min(size, width - left))
        clipped[:, [1, 3]] = np.clip(shifted[:, [1, 3]], 0, min(size, height - top))
        w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
        # The size rule is for boxes the crop cuts (a sliver of a stroke is no target); a box
        # wholly inside keeps whatever size it has, else small defects would never train.
        cut = (clipped != shifted).any(axis=1)
        keep = (w > 0) & (h > 0) & (~cut | (np.maximum(w, h) >= MIN_KEPT_SIDE))
        return img, clipped[keep], keep
