"""Mutant audit, second round: `training.dataset`'s training crops keep their boxes.

The dataset's docstring: boxes are "0-based continuous px of the returned image" (after the
crop and the flips), and of the boxes a crop holds, "one wholly inside [is kept], whatever its
size". An image of white rectangles on black shows both: each box returned must frame white
pixels exactly (black just outside it, inside the image), and a 2 px defect wholly inside a
crop is kept, and of a box the crop cuts, its "longer side" decides. A crop lies "inside the
image if it fits": no black padding. Each test names the one-line mutants it kills.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from splitdet.training.dataset import CropSettings, VocDetection
from splitdet.training.voc import VocObject, VocSample

WIDTH, HEIGHT, CROP = 160, 128, 64


def _sample(tmp_path: Path, boxes: list[tuple[int, int, int, int]]) -> VocSample:
    """A grey 160x128 image with a white rectangle at each box (continuous px, integers)."""
    pixels = np.full((HEIGHT, WIDTH, 3), 128, np.uint8)
    for x1, y1, x2, y2 in boxes:
        pixels[y1:y2, x1:x2] = 255
    path = tmp_path / "JPEGImages" / "img.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    objects = tuple(VocObject("scratch", tuple(float(v) for v in box)) for box in boxes)
    return VocSample("img", path, WIDTH, HEIGHT, objects)


def _frames_white(image: np.ndarray, box: list[float]) -> bool:
    """Whether `box` (integral px of `image`, H x W) covers white pixels only, with grey
    just outside each of its sides that lies inside the image."""
    height, width = image.shape
    x1, y1, x2, y2 = (round(v) for v in box)
    assert [x1, y1, x2, y2] == box, box  # (whole-pixel boxes stay whole without a resize)
    if not (image[y1:y2, x1:x2] > 0.75).all():
        return False
    rings = [
        image[y1:y2, x1 - 1] if x1 > 0 else None,
        image[y1:y2, x2] if x2 < width else None,
        image[y1 - 1, x1:x2] if y1 > 0 else None,
        image[y2, x1:x2] if y2 < height else None,
    ]
    return all(ring is None or (ring < 0.75).all() for ring in rings)


def test_cropped_and_flipped_boxes_frame_their_pixels(tmp_path):
    """Kills: the clamp of the crop's origin into the image dropped from `_crop_origin` (a
    crop centred on an object near the edge reaching past the image: black padding trained
    as if it were the part). Also fails under a flip's mirror made `width - 1 - x` /
    `height - 1 - y`, and the crop's shift of the wrong axis (killed by test_train too)."""
    sample = _sample(tmp_path, [(40, 30, 60, 50), (130, 100, 150, 120)])
    for fraction in (1.0, 0.0):  # centred on an object; uniform
        data = VocDetection(
            [sample], ["scratch"], train=True, crop=CropSettings(CROP, fraction), flips=True
        )
        kept = 0
        for epoch in range(30):
            data.set_epoch(epoch)
            image, target = data[0]
            assert tuple(image.shape) == (3, CROP, CROP)
            gray = image[0].numpy()
            assert gray.min() > 0.25, (fraction, epoch)  # no padding: the crop fits the image
            for box in target["boxes"].tolist():
                kept += 1
                assert _frames_white(gray, box), (fraction, epoch, box)
        assert kept >= (30 if fraction else 1), kept  # (centred: its target, at least)


def test_a_cut_box_is_kept_by_its_longer_side_and_a_small_whole_one_kept(tmp_path):
    """Kills: `np.maximum(w, h)` made `np.minimum` in the crop's keep rule (a long thin
    scratch the crop cuts, 64 x 2 px in the crop, dropped: thin scratches would never train).
    Also pins a 2 px defect wholly inside a crop kept (`~cut |` dropped: killed by
    test_voc_faults too)."""
    scratch = _sample(tmp_path / "thin", [(0, 60, 160, 62)])  # across the image, 2 px tall
    data = VocDetection([scratch], ["scratch"], train=True, crop=CropSettings(CROP, 1.0))
    for epoch in range(10):
        data.set_epoch(epoch)
        image, target = data[0]  # every crop holding it cuts it (it spans the image)
        [box] = target["boxes"].tolist()
        assert (box[2] - box[0], box[3] - box[1]) == (64.0, 2.0)
        assert _frames_white(image[0].numpy(), box)

    speck = _sample(tmp_path / "speck", [(100, 80, 102, 82)])  # 2x2 px, under MIN_KEPT_SIDE
    data = VocDetection([speck], ["scratch"], train=True, crop=CropSettings(CROP, 1.0))
    for epoch in range(10):
        data.set_epoch(epoch)
        image, target = data[0]  # centred on it (jitter <= a quarter crop): wholly inside
        [box] = target["boxes"].tolist()
        assert (box[2] - box[0], box[3] - box[1]) == (2.0, 2.0)
        assert _frames_white(image[0].numpy(), box)
        assert bool(target["defective"])
