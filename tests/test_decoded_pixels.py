"""The edge decodes to the integer pixels (`preprocess.Pixels`) and `prepare` converts to float
only the pixels its resize reads: a performance change (decode + preprocess of a 2448x2048 JPEG
measured 92 -> 73 ms of CPU for the `cpu` preset, a 16-bit PNG 110 -> 83 ms; peak memory about
halved). The batch must stay bit for bit the one of the whole float image `decode_image` still
returns, for every kind of image the edge takes; real files written with Pillow, decoded by
both."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.annotate import draw_detections
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.preprocess import (
    ImageError,
    Pixels,
    decode_image,
    decode_pixels,
    load_image,
    load_pixels,
    prepare,
)
from splitdet.edge.runtime import EdgeRuntime
from splitdet.edge.watcher import HotFolder

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: (min_size, max_size): the `cpu` preset's and the R50 presets' (torchvision's default).
SIZES = [(512, 640), (800, 1333)]
#: ... and `cpu-r50`'s, for the large images.
ALL_SIZES = [*SIZES, (1024, 1224)]


def _encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind, **options)
    return buffer.getvalue()


def _pgm(values: np.ndarray, maxval: int) -> bytes:
    height, width = values.shape
    dtype = np.uint8 if maxval < 256 else np.dtype(">u2")
    return b"P5\n%d %d\n%d\n" % (width, height, maxval) + values.astype(dtype).tobytes()


def _make(mode: str, height: int, width: int) -> tuple[bytes, int]:
    """(encoded bytes, pixel_bits) of a random image of `mode` (a name of ours, below)."""
    rng = np.random.default_rng([height, width, len(mode), ord(mode[-1])])

    def u8(*channels: int) -> np.ndarray:
        return rng.integers(0, 256, (height, width, *channels), dtype=np.uint8)

    if mode == "gray8":
        return _encoded(Image.fromarray(u8()), "PNG", compress_level=1), 16
    if mode == "gray-jpeg":
        return _encoded(Image.fromarray(u8()), "JPEG", quality=90), 16
    if mode == "1-bit":
        return _encoded(Image.fromarray(u8() > 127), "PNG", compress_level=1), 16
    if mode == "gray+alpha":
        return _encoded(Image.fromarray(u8(2), "LA"), "PNG", compress_level=1), 16
    if mode == "palette":
        image = Image.fromarray(rng.integers(0, 16, (height, width), dtype=np.uint8), "P")
        image.putpalette(rng.integers(0, 256, 48, dtype=np.uint8).tobytes())
        return _encoded(image, "PNG", compress_level=1), 16
    if mode == "rgb":
        return _encoded(Image.fromarray(u8(3)), "PNG", compress_level=1), 16
    if mode == "rgb-jpeg":
        return _encoded(Image.fromarray(u8(3)), "JPEG", quality=90), 16
    if mode == "rgba":
        return _encoded(Image.fromarray(u8(4), "RGBA"), "PNG", compress_level=1), 16
    if mode == "cmyk":
        return _encoded(Image.fromarray(u8(4), "CMYK"), "TIFF"), 16
    if mode in ("gray16@12", "gray16@16"):
        bits = int(mode[-2:])
        values = rng.integers(0, 2**bits, (height, width)).astype(np.uint16)
        return _encoded(Image.fromarray(values), "PNG", compress_level=1), bits
    if mode == "I-tiff":
        values = rng.integers(0, 65536, (height, width)).astype(np.int32)
        return _encoded(Image.fromarray(values, "I"), "TIFF"), 16
    if mode == "pgm1000":  # an odd maxval, 16-bit samples
        return _pgm(rng.integers(0, 1001, (height, width)), 1000), 12
    if mode == "pgm100":  # an odd maxval, 8-bit samples
        return _pgm(rng.integers(0, 101, (height, width)), 100), 16
    raise AssertionError(mode)


MODES = [
    "gray8", "gray-jpeg", "1-bit", "gray+alpha", "palette", "rgb", "rgb-jpeg", "rgba", "cmyk",
    "gray16@12", "gray16@16", "I-tiff", "pgm1000", "pgm100",
]  # fmt: skip
#: (height, width): tiny ones, an upscale, a downscale for the `cpu` preset (an upscale for
#: the R50 presets).
SMALL_HW = [(1, 1), (1, 9), (9, 1), (37, 53), (613, 1021)]
#: A downscale for every preset, by no whole factor: for some modes only (time).
LARGE_MODES = ["gray8", "rgb-jpeg", "gray16@12", "I-tiff"]


def _outcome(image, min_size: int, max_size: int):
    """prepare's Prepared, or the ImageError's message it raised."""
    try:
        return prepare(image, min_size, max_size, MEAN, STD)
    except ImageError as exc:
        return str(exc)


def _assert_same_batches(data: bytes, bits: int, sizes: list[tuple[int, int]]) -> None:
    pixels = decode_pixels(data, "x", bits)
    image = decode_image(data, "x", bits)
    assert isinstance(pixels, Pixels)
    assert np.array_equal(pixels.to_unit_float(), image)
    for min_size, max_size in sizes:
        expected = _outcome(image, min_size, max_size)
        found = _outcome(pixels, min_size, max_size)
        if isinstance(expected, str):
            assert found == expected
            continue
        assert found.batch.dtype == np.float32
        assert np.array_equal(found.batch, expected.batch), (min_size, max_size)
        assert found.resized_hw == expected.resized_hw
        assert found.original_hw == expected.original_hw == pixels.hw


@pytest.mark.parametrize("hw", SMALL_HW, ids=lambda hw: f"{hw[0]}x{hw[1]}")
@pytest.mark.parametrize("mode", MODES)
def test_the_batch_of_the_pixels_is_that_of_the_float_image(mode, hw):
    _assert_same_batches(*_make(mode, *hw), SIZES)


@pytest.mark.parametrize("mode", MODES)
def test_the_batch_of_a_downscale_by_a_whole_factor_is_the_same(mode):
    """The `tiny` preset's 128/160 reads every 4th row and column of 512x640 (slices, views)."""
    _assert_same_batches(*_make(mode, 512, 640), [(128, 160)])


@pytest.mark.parametrize("mode", LARGE_MODES)
def test_the_batch_of_a_downscale_for_every_preset_is_the_same(mode):
    _assert_same_batches(*_make(mode, 1100, 1501), ALL_SIZES)


def test_too_elongated_is_refused_alike():
    data, bits = _make("gray8", 1, 1400)
    with pytest.raises(ImageError) as expected:
        prepare(decode_image(data, "x", bits), 512, 640, MEAN, STD)
    with pytest.raises(ImageError) as found:
        prepare(decode_pixels(data, "x", bits), 512, 640, MEAN, STD)
    assert str(found.value) == str(expected.value)


@pytest.mark.parametrize(
    ("mode", "dtype", "bands", "full_scale"),
    [
        ("gray8", np.uint8, 1, 255),
        ("1-bit", np.uint8, 1, 255),
        ("gray+alpha", np.uint8, 1, 255),
        ("palette", np.uint8, 3, 255),
        ("rgb-jpeg", np.uint8, 3, 255),
        ("rgba", np.uint8, 3, 255),
        ("cmyk", np.uint8, 3, 255),
        ("gray16@12", np.uint16, 1, 4095),
        ("gray16@16", np.uint16, 1, 65535),
        ("I-tiff", np.int32, 1, 65535),
        ("pgm1000", np.uint16, 1, 1000),
        ("pgm100", np.uint8, 1, 100),
    ],
)
def test_the_pixels_convert_to_the_float_image(tmp_path, mode, dtype, bands, full_scale):
    data, bits = _make(mode, 37, 53)
    path = tmp_path / "image.bin"
    path.write_bytes(data)
    pixels = load_pixels(path, bits)
    assert len(pixels.bands) == bands and pixels.full_scale == full_scale
    assert all(b.dtype == dtype and b.shape == (37, 53) for b in pixels.bands)
    assert pixels.hw == (37, 53) and pixels.shape == (3, 37, 53)
    image = load_image(path, bits)
    unit = pixels.to_unit_float()
    assert unit.dtype == np.float32 and np.array_equal(unit, image)
    assert not pixels.bands[0].flags.writeable  # (frozen: its bands are read-only views)


def test_pixels_refuse_what_is_no_image():
    band = np.zeros((4, 5), np.uint8)
    for bands in [(), (band, band), (band.astype(np.float32),), (band, band[:3], band)]:
        with pytest.raises(ValueError):
            Pixels(bands, 255)
    with pytest.raises(ValueError):
        Pixels((band,), 0)
    kept = Pixels((band,), 255)
    assert band.flags.writeable and not kept.bands[0].flags.writeable  # the caller's untouched


def _truncated_jpeg() -> bytes:
    data, _ = _make("rgb-jpeg", 64, 80)
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "bits"),
    [
        (b"", 16),
        (b"just some text, not an image\n", 16),
        (_truncated_jpeg(), 16),
        (_encoded(Image.fromarray(np.full((8, 8), 4096, np.uint16)), "PNG"), 12),
        (_encoded(Image.fromarray(np.full((8, 8), 5000, np.int32), "I"), "TIFF"), 12),
        (_encoded(Image.fromarray(np.zeros((8, 8), np.float32), "F"), "TIFF"), 16),
    ],
    ids=["empty", "text", "truncated-jpeg", "past-pixel-bits", "I-past-pixel-bits", "float"],
)
def test_decode_pixels_refuses_what_decode_image_refuses(data, bits):
    with pytest.raises(ImageError) as expected:
        decode_image(data, "cam/x.png", bits)
    with pytest.raises(ImageError) as found:
        decode_pixels(data, "cam/x.png", bits)
    assert str(found.value) == str(expected.value)
    assert str(found.value).startswith("cam/x.png: ")


@pytest.mark.parametrize("mode", ["rgb-jpeg", "gray16@12", "pgm100"])
def test_the_pipeline_gives_the_same_verdict_and_bytes(tiny_model_dir, tmp_path, mode):
    data, bits = _make(mode, 240, 300)
    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=1), gate=False)
    pixels = decode_pixels(data, "x", bits)
    from_pixels = pipeline.process_array(pixels)
    from_floats = pipeline.process_array(decode_image(data, "x", bits))
    assert from_pixels.flagged and from_floats.flagged
    assert from_pixels.p_defect == from_floats.p_defect
    assert from_pixels.meta == from_floats.meta
    assert [t.data for t in from_pixels.encoded] == [t.data for t in from_floats.encoded]
    assert from_pixels.bytes_sent == from_floats.bytes_sent
    # the drawing of a flagged image's copy (predict --save): the same picture
    boxes, scores, names = [[10.0, 20.0, 120.0, 90.0]], [0.9], ["scratch"]
    drawn = draw_detections(pixels, boxes, scores, names, from_pixels.p_defect)
    expected = draw_detections(pixels.to_unit_float(), boxes, scores, names, from_pixels.p_defect)
    assert drawn.tobytes() == expected.tobytes()


def test_the_hot_folder_hands_over_the_pixels(tmp_path: Path):
    data, _ = _make("rgb", 24, 32)
    (tmp_path / "a.png").write_bytes(data)
    folder = HotFolder(tmp_path, settle_s=0, unreadable_grace_s=0)
    folder.scan()
    ready = folder.read(folder.next_candidate())
    assert ready is not None and ready.error is None
    assert isinstance(ready.image, Pixels) and ready.image.hw == (24, 32)
    assert np.array_equal(ready.image.to_unit_float(), decode_image(data))


def test_an_8bit_drawing_is_exact_for_every_value():
    """`annotate` draws an 8-bit band as it is: the numbers of its float image's drawing."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    gray = Pixels((values,), 255)
    assert np.array_equal(
        np.asarray(draw_detections(gray, [], [], [])),
        np.asarray(draw_detections(gray.to_unit_float(), [], [], [])),
    )
    wide = Pixels((np.arange(4096, dtype=np.uint16).reshape(64, 64),), 4095)
    assert np.array_equal(
        np.asarray(draw_detections(wide, [], [], [])),
        np.asarray(draw_detections(wide.to_unit_float(), [], [], [])),
    )


@pytest.mark.parametrize(
    ("band", "full_scale", "said"),
    [
        # a 12-bit camera's buffer MSB-aligned in 16 bits, given as 12-bit: judged as garbage
        (np.full((8, 8), 65520, np.uint16), 4095, "got 65520..65520"),
        (np.full((8, 8), -5000, np.int32), 255, "got -5000..-5000"),
        (np.zeros((8, 8), np.uint8), 255.9, "whole full scale"),
    ],
)
def test_pixels_of_ones_own_are_range_checked(band, full_scale, said):
    """`prepare` reads a `Pixels` unchecked (no `check_unit_image`): one a library user made
    from a camera SDK's buffer is checked as it is made, as the decoder's were as it decoded."""
    with pytest.raises(ValueError, match=said):
        Pixels((band,), full_scale)
    assert Pixels((np.full((8, 8), 4095, np.uint16),), 4095).hw == (8, 8)  # the top is in
