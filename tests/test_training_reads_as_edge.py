"""Training reads an image as the edge does: what the edge refuses, training refuses in the
edge's words, and what the edge reads, training reads as the same pixels.

- A JPEG or PNG whose tail is zeros before its image data ends (a writer that sized the file
  first and stalled, or a copy cut short and padded) is refused by the edge
  (`preprocess.check_written`); training's reader (`voc.load_rgb`: the training dataset,
  `data check --decode`) decoded it (a JPEG's zeros as noise, without a word).
- A PNG's EXIF orientation in an eXIf chunk after its pixels (IDAT) is seen by the edge's
  `collect` (which writes such an image as an untagged PNG), not by training's header read,
  which let boxes drawn on the turned view train on the stored pixels.
- Every mode the edge takes (grayscale, RGB, palette, alpha, CMYK, 1-bit, 16-bit, progressive
  JPEG) decodes to the same pixels in training (16-bit: within training's 8-bit rounding), and
  what it refuses (float, Lab, several frames, a decompression bomb) training refuses too.

Tiny images written in tmp_path; no torch.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import collect
from splitdet.edge.preprocess import UNWRITTEN_TAIL_BYTES, ImageError, decode_image
from splitdet.training import voc

from support import bomb_png, make_tiny_voc, png_chunk, run_main

pytestmark = pytest.mark.timeout(60)


def noise_rgb(seed: int = 0, size: tuple[int, int] = (128, 160)) -> np.ndarray:
    """uint8 [H, W, 3] noise (its JPEG's scan data has no long zero runs)."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def zero_tailed(data: bytes, written: int) -> bytes:
    """`data` as a writer that sized the file first leaves it after `written` bytes."""
    return data[:written] + bytes(len(data) - written)


def edge_words(data: bytes, source: str) -> str:
    with pytest.raises(ImageError) as refused:
        decode_image(data, source)
    return str(refused.value)


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_training_refuses_a_zero_padded_tail_in_the_edge_s_words(tmp_path, fmt, suffix):
    data = encoded(noise_rgb(), fmt)
    path = tmp_path / f"half{suffix}"
    path.write_bytes(zero_tailed(data, len(data) // 2))
    expected = edge_words(path.read_bytes(), str(path))
    assert "not all written yet" in expected
    with pytest.raises(voc.VocError) as refused:
        voc.load_rgb(path)
    assert str(refused.value) == expected  # the file named, the problem as the edge says it


@pytest.mark.parametrize("fmt,suffix", [("JPEG", ".jpg"), ("PNG", ".png")])
def test_zeros_after_a_whole_image_are_padding_to_training_as_to_the_edge(tmp_path, fmt, suffix):
    data = encoded(noise_rgb(1), fmt)
    path = tmp_path / f"padded{suffix}"
    path.write_bytes(data + bytes(4 * UNWRITTEN_TAIL_BYTES))
    edge = decode_image(path.read_bytes(), str(path))
    trained = np.asarray(voc.load_rgb(path)).transpose(2, 0, 1).astype(np.float32) / 255
    np.testing.assert_array_equal(trained, edge)


def test_data_check_and_train_name_a_zero_padded_jpeg_as_the_edge_does(tmp_path, capsys):
    root = make_tiny_voc(tmp_path / "ds", n_defective=2, n_free=1)
    sample = voc.read_annotation(root, "img_002")  # (defect-free: no boxes to keep)
    sample.image_path.unlink()
    data = encoded(noise_rgb(2), "JPEG")
    path = root / "JPEGImages" / "img_002.jpg"
    path.write_bytes(zero_tailed(data, len(data) // 3))
    voc.write_annotation(
        root / "Annotations" / "img_002.xml",
        voc.VocSample("img_002", path, 160, 128, ()),
    )
    (root / "ImageSets" / "Main" / "test.txt").unlink()  # (make_tiny_voc's splits share ids)
    voc.write_split(root, "train", ["img_000", "img_002"])
    voc.write_split(root, "val", ["img_001"])
    expected = edge_words(path.read_bytes(), str(path))
    for decode in (("--decode",), ()):  # (the header read looks at the file's tail too)
        code, out, _ = run_main(capsys, "data", "check", root, *decode, "--no-progress")
        problems = [line for line in out.splitlines() if line.startswith("problem: ")]
        assert (code, problems) == (1, [f"problem: {expected}"])
    # train's reader refuses it before any training, in the same words
    with pytest.raises(voc.VocError) as refused:
        voc.read_split(root, "train")
    assert str(refused.value) == expected


def exif_orientation(value: int) -> bytes:
    """An eXIf chunk's data (TIFF-structured EXIF) holding orientation `value`."""
    exif = Image.Exif()
    exif[voc.EXIF_ORIENTATION] = value
    data = exif.tobytes()
    return data[6:] if data.startswith(b"Exif\0\0") else data


def png_with(chunk: bytes, *, before_pixels: bool) -> bytes:
    """A 96 x 64 RGB PNG holding `chunk` (a whole chunk) before its IDAT or after it."""
    data = encoded(noise_rgb(3, (64, 96)), "PNG")
    at = data.index(b"IDAT") - 4 if before_pixels else data.rindex(b"IEND") - 4
    return data[:at] + chunk + data[at:]


def write_sample(root: Path, data: bytes, boxes: bool) -> Path:
    """A one-image VOC tree at `root`, its image `data` (a 96 x 64 PNG), one box or none."""
    path = root / "JPEGImages" / "a.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    objects = (voc.VocObject("scratch", (10.0, 10.0, 30.0, 20.0)),) if boxes else ()
    voc.write_annotation(root / "Annotations" / "a.xml", voc.VocSample("a", path, 96, 64, objects))
    return path


def edge_orientation(path: Path) -> int:
    """The orientation the edge's `collect` reads of the image at `path`."""
    with Image.open(path) as image:
        return collect._orientation(image)


@pytest.mark.parametrize("before_pixels", [True, False], ids=["eXIf before IDAT", "after IDAT"])
def test_a_png_s_exif_orientation_after_its_pixels_is_refused_as_before_them(
    tmp_path, before_pixels
):
    data = png_with(png_chunk(b"eXIf", exif_orientation(6)), before_pixels=before_pixels)
    path = write_sample(tmp_path / "boxed", data, boxes=True)
    assert edge_orientation(path) == 6  # the edge's collect sees it either way
    with pytest.raises(voc.VocError, match=r"a\.png is 96x64 px: its EXIF orientation tag \(6\)"):
        voc.read_annotation(tmp_path / "boxed", "a")
    # without boxes nothing lies on the turned view: read as it is, as before
    write_sample(tmp_path / "boxless", data, boxes=False)
    assert voc.read_annotation(tmp_path / "boxless", "a").width == 96


def test_metadata_after_a_png_s_pixels_without_a_turn_is_no_turn(tmp_path):
    for chunk in (
        png_chunk(b"eXIf", exif_orientation(1)),
        png_chunk(b"tEXt", b"Comment\0line 3, camera 2"),
    ):
        path = write_sample(tmp_path, png_with(chunk, before_pixels=False), boxes=True)
        assert edge_orientation(path) == 1
        assert voc.read_annotation(tmp_path, "a").objects


def test_a_header_exif_wins_over_one_after_the_pixels_as_on_the_edge(tmp_path):
    data = png_with(png_chunk(b"eXIf", exif_orientation(1)), before_pixels=True)
    at = data.rindex(b"IEND") - 4
    data = data[:at] + png_chunk(b"eXIf", exif_orientation(8)) + data[at:]
    path = write_sample(tmp_path, data, boxes=True)
    assert edge_orientation(path) == 1
    assert voc.read_annotation(tmp_path, "a").objects


def png16_rgb() -> bytes:
    """A 16-bit RGB PNG of 48 x 64 noise."""
    rows = np.random.default_rng(5).integers(0, 65536, (48, 64 * 3)).astype(">u2")
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    header = struct.pack(">IIBBBBB", 64, 48, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def mode_images() -> dict[str, tuple[str, object]]:
    """{name: (suffix, PIL image or encoded bytes)} of every kind the edge takes."""
    rgb = noise_rgb(4, (48, 64))
    alpha = np.dstack([rgb, rgb[..., 0]])
    wide = np.random.default_rng(6).integers(0, 65536, (48, 64)).astype(np.uint16)
    palette = Image.fromarray(rgb).convert("P")
    return {
        "L": (".png", Image.fromarray(rgb[..., 0])),
        "RGB JPEG": (".jpg", Image.fromarray(rgb)),
        "progressive JPEG": (".jpg", encoded(rgb, "JPEG", progressive=True)),
        "CMYK JPEG": (".jpg", Image.fromarray(rgb).convert("CMYK")),
        "CMYK TIFF": (".tif", Image.fromarray(rgb).convert("CMYK")),
        "palette": (".png", palette),
        "palette + transparency": (".png", encoded(np.asarray(palette), "PNG", transparency=3)),
        "RGBA": (".png", Image.fromarray(alpha)),
        "LA": (".png", Image.fromarray(alpha[..., [0, 3]])),
        "1-bit": (".png", Image.fromarray(rgb[..., 0] > 128)),
        "16-bit PNG": (".png", Image.fromarray(wide)),
        "16-bit TIFF": (".tif", Image.fromarray(wide)),
        "32-bit integer TIFF": (".tif", Image.fromarray(wide.astype(np.int32))),
        "16-bit RGB PNG": (".png", png16_rgb()),
    }


@pytest.mark.parametrize("name", list(mode_images()))
def test_every_mode_the_edge_takes_reads_as_the_same_pixels_in_training(tmp_path, name):
    suffix, image = mode_images()[name]
    path = tmp_path / f"image{suffix}"
    if isinstance(image, bytes):
        path.write_bytes(image)
    else:
        image.save(path)
    edge = decode_image(path.read_bytes(), str(path))
    trained = np.asarray(voc.load_rgb(path)).transpose(2, 0, 1).astype(np.float32) / 255
    assert trained.shape == edge.shape
    # 8-bit images: exactly; 16-bit ones: within training's rounding to 8 bits
    assert np.abs(trained - edge).max() <= 0.5 / 255 + 1e-6


def refused_kinds(tmp_path: Path) -> dict[str, Path]:
    rgb = noise_rgb(7, (48, 64))
    kinds = {}
    for name, suffix, save in (
        ("float", ".tif", lambda p: Image.fromarray(rgb[..., 0].astype(np.float32)).save(p)),
        ("Lab", ".tif", lambda p: Image.fromarray(rgb).convert("LAB").save(p)),
        (
            "two frames",
            ".tif",
            lambda p: Image.fromarray(rgb).save(
                p, save_all=True, append_images=[Image.new("RGB", (64, 48))]
            ),
        ),
        ("bomb", ".png", lambda p: p.write_bytes(bomb_png())),
    ):
        path = tmp_path / f"{name.replace(' ', '_')}{suffix}"
        save(path)
        kinds[name] = path
    return kinds


def test_what_the_edge_refuses_training_refuses(tmp_path):
    for name, path in refused_kinds(tmp_path).items():
        with pytest.raises(ImageError):
            decode_image(path.read_bytes(), str(path))
        with pytest.raises(voc.VocError, match=str(path.name)):
            voc.image_size(path)  # (the header read every split read makes)
        assert name
