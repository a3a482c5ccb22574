"""`prepare` normalises only the pixels the bilinear kernel reads (a downscale by 4 reads about
a quarter of them): a performance review measured 37-55 ms of CPU cut to 15-26 ms per
2448x2048 frame for the `cpu` preset's input. The batch must stay bit for bit the one of
normalising every pixel and resizing the whole channel (`resize_bilinear`), which the
export's self-check and the equality with the monolithic detector were measured on."""

from __future__ import annotations

import numpy as np
import pytest

from splitdet.edge.preprocess import padded_size, prepare, resize_bilinear, resized_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _whole_channel_batch(image: np.ndarray, min_size: int, max_size: int) -> np.ndarray:
    """The batch as `prepare` made it before: every pixel normalised, then resized."""
    hw = resized_size(image.shape[1], image.shape[2], min_size, max_size)
    batch = np.zeros((1, 3, *padded_size(*hw)), dtype=np.float32)
    for c in range(3):
        normalised = image[c] - np.float32(MEAN[c])
        np.divide(normalised, np.float32(STD[c]), out=normalised)
        batch[0, c, : hw[0], : hw[1]] = resize_bilinear(normalised[None], hw)[0]
    return batch


@pytest.mark.parametrize(
    ("height", "width", "min_size", "max_size"),
    [
        (2048, 2448, 512, 640),  # the cpu preset: a downscale by 4, whole steps
        (2048, 2448, 1024, 1224),  # cpu-r50: by 2
        (2048, 2448, 800, 1333),  # torchvision's default: no whole factor
        (231, 173, 224, 288),  # an upscale on one side: every pixel read
        (97, 517, 128, 160),  # elongated, odd sizes
        (61, 45, 224, 320),  # a small image upscaled
    ],
)
def test_the_batch_is_the_one_of_normalising_every_pixel(height, width, min_size, max_size):
    rng = np.random.default_rng(height * width)
    image = rng.random((3, height, width), dtype=np.float32)
    kept = image.copy()
    prepared = prepare(image, min_size, max_size, MEAN, STD)
    assert np.array_equal(prepared.batch, _whole_channel_batch(image, min_size, max_size))
    assert np.array_equal(image, kept)  # (the caller's image is not changed)


def test_a_float64_and_a_strided_image_give_the_same_batch():
    rng = np.random.default_rng(7)
    image = rng.random((3, 410, 530), dtype=np.float32)
    expected = prepare(image, 128, 160, MEAN, STD).batch
    assert np.array_equal(prepare(image.astype(np.float64), 128, 160, MEAN, STD).batch,
                          _whole_channel_batch(image.astype(np.float64), 128, 160))  # fmt: skip
    wide = np.zeros((3, 410, 1060), dtype=np.float32)
    wide[:, :, ::2] = image
    assert np.array_equal(prepare(wide[:, :, ::2], 128, 160, MEAN, STD).batch, expected)
