"""A JPEG whose writer sized the file first (Windows copies to a share do) and stalled
longer than the settle time: its zero-filled end is not decoded as grey pixels but waits,
and the image is processed once it is all written."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.preprocess import UNWRITTEN_TAIL_BYTES, ImageError, decode_image
from splitdet.edge.watcher import HotFolder


def jpeg(seed: int = 0) -> bytes:
    """A noisy 160x128 JPEG (noise: its scan data has no long runs of zero bytes)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png16(seed: int = 0) -> bytes:
    """A noisy 160x128 16-bit PNG of 12-bit values (a Mono12 camera's)."""
    pixels = np.random.default_rng(seed).integers(0, 4096, (128, 160)).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def presized(data: bytes, written: int) -> bytes:
    """`data` as a writer that sized the file first leaves it after `written` bytes."""
    return data[:written] + bytes(len(data) - written)


def test_a_jpeg_not_all_written_is_refused_by_name_and_padding_is_not():
    data = jpeg()
    with pytest.raises(ImageError, match=r"half\.jpg: a JPEG whose last \d+ of \d+ bytes are"):
        decode_image(presized(data, len(data) // 2), "half.jpg")
    # zeros after the end-of-image marker are padding: the image is whole
    padded = decode_image(data + bytes(4 * UNWRITTEN_TAIL_BYTES), "padded.jpg")
    np.testing.assert_array_equal(padded, decode_image(data, "whole.jpg"))
    # a short zero run (below the bound) is left to Pillow
    assert decode_image(data + bytes(16), "short.jpg").shape == (3, 128, 160)
    # a trailer after the marker (a vendor's, a reused buffer's), then padding: whole
    trailer = data + b"\x12\x34ABCD" + bytes(4 * UNWRITTEN_TAIL_BYTES)
    np.testing.assert_array_equal(decode_image(trailer, "trailer.jpg"), padded)
    # ... a trailer holding what looks like markers (motion-photo video data)
    video = data + b"ftypmp42\xff\xda\x00\x08\xff\xc0" + bytes(4 * UNWRITTEN_TAIL_BYTES)
    np.testing.assert_array_equal(decode_image(video, "motion.jpg"), padded)


def test_progressive_jpegs_are_walked_scan_by_scan():
    """A progressive JPEG has many scans, each with its own start-of-scan marker."""
    pixels = np.random.default_rng(3).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    assert data.count(b"\xff\xda") > 1
    assert decode_image(data + bytes(4 * UNWRITTEN_TAIL_BYTES)).shape == (3, 128, 160)
    for written in (len(data) // 4, len(data) // 2, len(data) - UNWRITTEN_TAIL_BYTES):
        with pytest.raises(ImageError, match="not all written yet"):
            decode_image(presized(data, written), "progressive.jpg")


def test_an_exif_thumbnail_s_own_end_marker_does_not_pass_an_unwritten_jpeg():
    """The thumbnail in a camera JPEG's EXIF block is a JPEG of its own, its end-of-image
    marker near the file's start: the main image's scan is still unended."""
    pixels = np.random.default_rng(2).integers(0, 256, (128, 160, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    thumbnail = io.BytesIO()
    image.resize((40, 32)).save(thumbnail, "JPEG")
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation: as stored
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes() + thumbnail.getvalue())
    data = buffer.getvalue()
    assert data.count(b"\xff\xd9") >= 2  # the thumbnail's end, and the image's
    with pytest.raises(ImageError, match="not all written yet"):
        decode_image(presized(data, len(data) * 2 // 3), "camera.jpg")
    assert decode_image(data, "camera.jpg").shape == (3, 128, 160)


def test_a_png_not_all_written_is_refused_and_padding_is_not():
    """Pillow decodes a 16-bit PNG whose second half is zeros without a word (the reviewer's
    Mono12 camera on a share: a wrong verdict, and under --after delete the image lost)."""
    data = png16()
    with pytest.raises(ImageError, match=r"half\.png: a PNG whose last \d+ of \d+ bytes are"):
        decode_image(presized(data, len(data) // 2), "half.png")
    padded = decode_image(data + bytes(4 * UNWRITTEN_TAIL_BYTES), "padded.png")
    np.testing.assert_array_equal(padded, decode_image(data, "whole.png"))


@pytest.mark.parametrize(("name", "make"), [("cam_0001.jpg", jpeg), ("cam_0001.png", png16)])
def test_the_hot_folder_waits_for_a_stalled_presized_image(tmp_path: Path, name, make):
    data = make(1)
    path = tmp_path / name
    path.write_bytes(presized(data, len(data) // 3))
    folder = HotFolder(tmp_path, settle_s=0.05, unreadable_grace_s=30.0)
    folder.scan()
    time.sleep(0.1)  # the writer stalls past the settle time
    folder.scan()
    candidate = folder.next_candidate()
    assert candidate is not None
    assert folder.read(candidate) is None  # not handed over half written: it waits

    with open(path, "r+b") as handle:  # the writer resumes in place, size unchanged
        handle.write(data)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # coarse clocks
    folder.scan()
    time.sleep(0.1)
    folder.scan()
    candidate = folder.next_candidate()
    ready = folder.read(candidate)
    assert ready is not None and ready.error is None
    assert ready.data == data
    np.testing.assert_array_equal(ready.image.to_unit_float(), decode_image(data))
