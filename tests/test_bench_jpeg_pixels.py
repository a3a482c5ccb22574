"""The JPEG baseline's edge starts from the camera's 8-bit pixels (bench/systems.py)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from splitdet.bench.systems import camera_pixels, jpeg_bytes


def test_the_camera_pixels_give_the_same_jpeg_as_the_decoded_image():
    """`JpegToCloud` times the encoding of UInt8[H, W, 3] pixels, made outside its clock:
    the file sent is the one the decoded Float32[3, H, W] image gave before."""
    rng = np.random.default_rng(0)
    camera = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    decoded = camera.transpose(2, 0, 1).astype(np.float32) / 255.0
    pixels = camera_pixels(decoded)
    assert pixels.dtype == np.uint8 and pixels.shape == (48, 64, 3)
    assert np.array_equal(pixels, camera)
    data = jpeg_bytes(pixels, 95)
    assert data == jpeg_bytes(decoded, 95)
    assert Image.open(io.BytesIO(data)).size == (64, 48)
