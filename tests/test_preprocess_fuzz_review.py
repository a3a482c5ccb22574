"""Images a fuzz review found mishandled, on the edge (`preprocess.decode_image`) and in training
(`voc.load_rgb_and_peak`), which must agree:

1. a progressive JPEG of thousands of repeated scans stalled the decoder: refused from its
   segments, before decoding;
2. a 16-bit colour PNG was read at 8 bits (its top bytes) by a `--pixel-bits 12` model: refused;
3. a PGM whose maxval is not 255 or 65535 was not read over its maxval: read here;
4. damaged PNG, JPEG, TIFF files were "not an image file", an MPO "multi-frame": named;
5. Pillow's warnings went to stderr unnamed: logged once, naming the file.

Every image is made here, small.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.preprocess import MAX_JPEG_SCANS, ImageError, decode_image
from splitdet.training.voc_image import load_rgb_and_peak
from splitdet.training.voc_types import VocError

# ------------------------------------------------------------------------------ helpers


def _jpeg(progressive: bool, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small noisy colour JPEG, baseline or progressive (Pillow's encoder)."""
    pixels = np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def _last_scan(data: bytes) -> tuple[int, int]:
    """(start, end) of a JPEG's last scan: its start-of-scan marker to the end-of-image marker
    (walked here from the segments' lengths; scan data ends at a 0xFF not followed by 0x00 or a
    restart marker)."""
    pos, last = 2, -1
    while True:
        assert data[pos] == 0xFF
        marker = data[pos + 1]
        if marker == 0xD9:
            return last, pos
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            last = pos
            pos += 2 + length
            while not (data[pos] == 0xFF and data[pos + 1] not in (0x00, *range(0xD0, 0xD8))):
                pos += 1
        else:
            pos += 2 + length


def _many_scans(scans: int) -> bytes:
    """A progressive JPEG whose last scan is repeated until it holds `scans` scans."""
    data = _jpeg(progressive=True)
    start, end = _last_scan(data)
    own = data.count(b"\xff\xda")  # (noise at quality 90 holds no stray 0xFFDA: checked below)
    return data[:end] + data[start:end] * (scans - own) + data[end:]


def _png(width: int, height: int, depth: int, colour: int, rows: np.ndarray) -> bytes:
    """A PNG written chunk by chunk (Pillow writes no 16-bit colour PNG): `rows` holds the
    samples, big-endian for 16-bit ones, no filter."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    raw = b"".join(b"\0" + rows[y].tobytes() for y in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


#: 12-bit camera values (a Mono12 camera's, saved unscaled), 4 x 3 px.
VALUES12 = np.array([[0, 100, 337, 4095], [1, 2000, 3000, 4000], [7, 15, 2047, 4094]])


def _png16_colour(colour: int) -> bytes:
    """VALUES12 as a 16-bit PNG of colour type 2 (RGB), 4 (gray + alpha) or 6 (RGBA)."""
    gray = VALUES12.astype(">u2")
    alpha = np.full_like(gray, 65535)
    bands = {2: [gray] * 3, 4: [gray, alpha], 6: [gray] * 3 + [alpha]}[colour]
    return _png(4, 3, 16, colour, np.stack(bands, axis=-1).astype(">u2"))  # (stack: native)


def _png16_gray(values: np.ndarray) -> bytes:
    """`values` as a 16-bit grayscale PNG (Pillow's encoder)."""
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def _pgm(values: np.ndarray, maxval: int, plain: bool = False) -> bytes:
    """`values` as a binary (P5) or plain (P2) PGM of `maxval`, with a comment and uneven
    whitespace in its header."""
    height, width = values.shape
    if plain:
        raster = "\n".join(" ".join(str(v) for v in row) for row in values).encode()
        return f"P2\n# plain\n{width}  {height}\n{maxval}\n".encode() + raster + b"\n"
    dtype = np.uint8 if maxval < 256 else np.dtype(">u2")
    header = f"P5 # a camera's\n{width}\t{height}\r\n# its maximum:\n{maxval}\n".encode()
    return header + values.astype(dtype).tobytes()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --------------------------------------------------------------- 1. JPEG of too many scans


def test_a_jpeg_of_more_scans_than_any_encoder_writes_is_refused_before_decoding(
    tmp_path, monkeypatch
):
    progressive, baseline = _jpeg(progressive=True), _jpeg(progressive=False)
    assert progressive.count(b"\xff\xda") == 10  # a colour progressive JPEG's own scans
    assert decode_image(progressive, "p.jpg").shape == (3, 48, 64)
    assert decode_image(baseline, "b.jpg").shape == (3, 48, 64)
    at_the_bound = _many_scans(MAX_JPEG_SCANS)
    assert decode_image(at_the_bound, "at.jpg").shape == (3, 48, 64)

    stalling = _many_scans(MAX_JPEG_SCANS + 50)
    assert stalling.count(b"\xff\xda") == MAX_JPEG_SCANS + 50
    expected = (
        f"cam.jpg: a progressive JPEG of {MAX_JPEG_SCANS + 50} scans, more than the "
        f"{MAX_JPEG_SCANS} any camera or encoder writes (a decoder-stalling file?)"
    )
    path = _write(tmp_path, "cam.jpg", stalling)
    with monkeypatch.context() as patched:  # refused from its segments: never decoded
        patched.setattr(Image.Image, "load", lambda *_: pytest.fail("decoded"))
        with pytest.raises(ImageError) as refused:
            decode_image(stalling, "cam.jpg")
        assert str(refused.value) == expected
    with pytest.raises(VocError) as in_training:
        load_rgb_and_peak(path)
    assert str(in_training.value) == expected.replace("cam.jpg", str(path))
    assert load_rgb_and_peak(_write(tmp_path, "p.jpg", progressive))[0].size == (64, 48)


def test_a_stray_byte_between_segments_does_not_hide_the_scans(monkeypatch):
    """A review: one 0x00 after the APP0 segment stopped the segment walk (no scan counted),
    while the decoder skips such bytes and decoded every scan of the stalling file."""
    stalling = _many_scans(MAX_JPEG_SCANS + 50)
    app0_end = 4 + int.from_bytes(stalling[4:6], "big")  # SOI, then APP0's marker and length
    assert stalling[2:4] == b"\xff\xe0"
    strayed = stalling[:app0_end] + b"\x00" + stalling[app0_end:]
    with monkeypatch.context() as patched:
        patched.setattr(Image.Image, "load", lambda *_: pytest.fail("decoded"))
        with pytest.raises(ImageError, match=f"of {MAX_JPEG_SCANS + 50} scans"):
            decode_image(strayed, "cam.jpg")


def test_start_of_scan_bytes_inside_metadata_are_no_scans():
    """A review of the stray-byte fix: counting every 0xFFDA pair in the file refused a JPEG
    whose metadata segment held 200 of them (with one stray byte besides) as a JPEG of 201
    scans. The walk now goes on past a stray byte, and skips segments by their length."""
    data = _jpeg(progressive=False)
    metadata = b"\xff\xe9" + (2 + 400).to_bytes(2, "big") + b"\xff\xda" * 200  # an APP9
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    crafted = data[:app0_end] + metadata + b"\x00" + data[app0_end:]
    assert decode_image(crafted, "cam.jpg").shape == (3, 48, 64)


def test_decoding_in_two_threads_leaves_the_warning_filters_as_they_were():
    """A review: the hot folder's thread and the sender's (--save-annotated) decoding at once
    left the process's warnings swapped for good (later warnings went to a dead list)."""
    import threading

    before = (list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl)
    noise = np.random.default_rng(0).integers(0, 256, (600, 800, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")  # (its inflate lets the other thread run)
    png = buffer.getvalue()

    def decode_many() -> None:
        for _ in range(40):
            decode_image(png, "cam.png")

    threads = [threading.Thread(target=decode_many) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (list(warnings.filters), warnings.showwarning, warnings._showwarnmsg_impl) == before


# ------------------------------------------------------------ 2. 16-bit colour PNG, 12-bit


@pytest.mark.parametrize(("colour", "kind"), [(2, "RGB"), (4, "grayscale + alpha"), (6, "RGBA")])
def test_a_16_bit_colour_png_is_refused_by_a_model_of_other_pixel_bits(tmp_path, colour, kind):
    data = _png16_colour(colour)
    path = _write(tmp_path, "cam.png", data)
    with pytest.raises(ImageError) as refused:
        decode_image(data, "cam.png", pixel_bits=12)
    message = str(refused.value)
    assert message.startswith(f"cam.png: a 16-bit {kind} PNG (colour type {colour}), ")
    assert "--pixel-bits 12" in message and "save it as 16-bit grayscale" in message
    with pytest.raises(VocError) as in_training:
        load_rgb_and_peak(path, pixel_bits=12)
    assert str(in_training.value) == message.replace("cam.png", str(path))
    # 16 bits: the same picture at 8 bits (the top byte), as before, on both sides
    image = decode_image(data, "cam.png", pixel_bits=16)
    np.testing.assert_array_equal(image[0], (VALUES12 >> 8).astype(np.float32) / 255)
    assert load_rgb_and_peak(path, pixel_bits=16)[0].size == (4, 3)
    # the 16-bit grayscale copy is read over 0..4095 with --pixel-bits 12, as it was
    gray = decode_image(_png16_gray(VALUES12), "gray.png", pixel_bits=12)
    np.testing.assert_array_equal(gray[0], VALUES12.astype(np.float32) / np.float32(4095))


# --------------------------------------------------------------------- 3. PGM over maxval


def test_a_pgm_is_read_over_its_own_maxval_as_the_png_of_the_same_values(tmp_path):
    steps = np.arange(16).reshape(4, 4)
    # 273 k of 4095 is 4369 k of 65535 exactly: the same image, to the bit
    png = decode_image(_png16_gray(steps * 4369), "cam.png", pixel_bits=16)
    for plain in (False, True):
        pgm = _pgm(steps * 273, 4095, plain)
        for bits in (16, 12):  # a PGM states its own maximum, whatever --pixel-bits
            np.testing.assert_array_equal(decode_image(pgm, "cam.pgm", pixel_bits=bits), png)
    # any value: over its maxval, not rounded to 16 bits first
    for maxval in (100, 1000, 4095):
        values = np.minimum(VALUES12, maxval)
        for plain in (False, True):
            image = decode_image(_pgm(values, maxval, plain), "cam.pgm")
            expected = values.astype(np.float32) / np.float32(maxval)
            for channel in image:
                np.testing.assert_array_equal(channel, expected)
        # training: over its maxval too, rounded to 8 bits; no 16-bit peak
        path = _write(tmp_path, f"m{maxval}.pgm", _pgm(values, maxval))
        rgb, peak = load_rgb_and_peak(path, pixel_bits=12)
        assert peak is None
        eight = np.floor(values * 255 / maxval + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(rgb)[..., 1], eight)


def test_a_16_bit_pgm_is_read_as_any_16_bit_image_over_pixel_bits(tmp_path):
    """A review of the PGM reader: a maxval-65535 PGM holding a 12-bit camera's values was read
    over 65535 whatever --pixel-bits, so an export of --pixel-bits 12 (trained on them read
    over 4095) saw them at 1/16 of their brightness, and training lost their peak (data
    check's warning on 16-bit images that stop at 4095)."""
    pgm = _pgm(VALUES12, 65535)
    png = _png16_gray(VALUES12)
    for bits in (16, 12):
        np.testing.assert_array_equal(
            decode_image(pgm, "cam.pgm", pixel_bits=bits),
            decode_image(png, "cam.png", pixel_bits=bits),
        )
    assert decode_image(pgm, "cam.pgm", pixel_bits=12).max() == 1.0
    _, peak = load_rgb_and_peak(_write(tmp_path, "cam.pgm", pgm), pixel_bits=12)
    assert peak == 4095


def test_a_pgm_past_its_maxval_cut_short_or_too_large_is_refused_by_name(tmp_path):
    past = _pgm(VALUES12, 4000)  # 4094, 4095 past 4000: Pillow clipped them silently
    with pytest.raises(ImageError, match=r"^cam\.pgm: a PGM with a pixel of 4095, past its own"):
        decode_image(past, "cam.pgm")
    path = _write(tmp_path, "cam.pgm", past)
    with pytest.raises(VocError, match="a PGM with a pixel of 4095, past its own maxval 4000"):
        load_rgb_and_peak(path)
    short = _pgm(VALUES12, 4095)[:-5]
    with pytest.raises(ImageError, match=r"^cam\.pgm: a PGM cut short: its 4x3 pixels need 24"):
        decode_image(short, "cam.pgm")
    with pytest.raises(ImageError, match=r"^cam\.pgm: a PGM cut short: 11 of its 12 pixels"):
        decode_image(_pgm(VALUES12, 4095, plain=True).rsplit(b" ", 1)[0], "cam.pgm")
    with pytest.raises(ImageError, match="has a side over"):
        decode_image(b"P5 70000 1 4095\n" + bytes(140000), "wide.pgm")
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image(b"P5 9000 9000 255\n", "bomb.pgm")


# ----------------------------------------------------------- 4. damaged files, named


def test_a_damaged_file_of_a_known_format_is_named_as_such():
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 3).save(buffer, "PNG")
    bad_crc = bytearray(buffer.getvalue())
    bad_crc[29] ^= 0xFF  # the IHDR chunk's CRC
    with pytest.raises(ImageError) as refused:
        decode_image(bytes(bad_crc), "cam.png")
    assert str(refused.value) == (
        "cam.png: a PNG file whose content is damaged or cut short, cannot be decoded "
        "(Pillow: broken PNG file (bad header checksum in b'IHDR'))"
    )
    garbage = bytes(range(256)) * 4
    for name, head in [
        ("JPEG", b"\xff\xd8\xff\xe0"),
        ("TIFF", b"II*\x00"),
        ("TIFF", b"MM\x00*"),
        ("PNG", b"\x89PNG\r\n\x1a\n"),
        ("GIF", b"GIF89a"),
    ]:
        with pytest.raises(ImageError) as refused:
            decode_image(head + garbage, "cam.img")
        assert str(refused.value).startswith(
            f"cam.img: a {name} file whose content is damaged or cut short, cannot be decoded "
            "(Pillow: "
        ), head
    with pytest.raises(ImageError, match=r"^x\.bin: not an image file \(unrecognised format\)$"):
        decode_image(b"hello, not an image" + garbage, "x.bin")


def test_a_two_image_mpo_is_named_as_a_jpeg_holding_two_images():
    buffer = io.BytesIO()
    left, right = Image.new("RGB", (16, 8), "red"), Image.new("RGB", (16, 8), "blue")
    left.save(buffer, "MPO", save_all=True, append_images=[right])
    with pytest.raises(ImageError) as refused:
        decode_image(buffer.getvalue(), "stereo.jpg")
    assert str(refused.value) == (
        "stereo.jpg: a JPEG holding 2 images (MPO, e.g. a stereo or preview image): only "
        "single-image files are supported"
    )


# ------------------------------------------------------------ 5. decoder warnings, logged


def _tiff_with_a_tag_past_its_end() -> bytes:
    """A 4x3 8-bit grayscale TIFF, uncompressed, whose ImageDescription (270) says its 1000
    bytes lie past the file's end: Pillow warns "Tag data larger than file", skips the tag and
    decodes the pixels."""
    entries = [  # (tag, type, count, value): 3 SHORT, 4 LONG, 2 ASCII
        (256, 3, 1, 4),
        (257, 3, 1, 3),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (270, 2, 1000, 1 << 20),
        (273, 4, 1, 0),  # strip offset, set below
        (277, 3, 1, 1),
        (278, 3, 1, 3),
        (279, 4, 1, 12),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    pixels_at = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = pixels_at if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + bytes(range(0, 240, 20))


def test_decoder_warnings_are_logged_once_naming_the_file_not_printed(caplog):
    data = _tiff_with_a_tag_past_its_end()
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        with caplog.at_level(logging.INFO, logger="splitdet.edge.preprocess"):
            image = decode_image(data, "cam.tif")
    np.testing.assert_array_equal(image[0].ravel() * 255, np.arange(0, 240, 20))
    assert [str(w.message) for w in escaped] == []
    lines = [
        (r.levelno, r.getMessage()) for r in caplog.records if "decoder warning" in r.getMessage()
    ]
    assert lines == [
        (logging.INFO, "cam.tif: decoder warning: Tag data larger than file. Skipping tag 270")
    ]
