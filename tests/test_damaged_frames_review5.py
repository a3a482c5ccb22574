"""Review 5: damaged JPEGs and PNGs that decode without an error, and frames judged without a
word.

- A JPEG whose scan data ends early (cut and its end marker appended, or bytes zeroed in its
  scan data) decodes through Pillow without an error: every block after the damage is flat
  grey (128 in every channel) to the end of the image, and the edge judged it ("ok" for 2 of
  10 defective test images). A PNG whose zlib stream is complete but holds only its top rows
  decodes with black below. Both are refused (ImageError naming the file and why), so the hot
  folder quarantines them; genuine images, a genuine grey band at the bottom included, are not.
- A blank frame (black, white, flat) and a 16-bit grayscale frame of 12-bit values (a camera
  switched to Mono12) are judged, as before, but the daemon says so (WARNING `blank_frame`,
  `dim_wide_frame`, rate-limited, and splitdet_edge_image_warnings_total) and `predict`
  notes it in the image's record (`warnings`).

Small real files written with Pillow; the daemon runs with a stand-in pipeline (no model).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_edge_daemon import BrightIsDefective

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.preprocess import ImageError, decode_pixels

from support import daemon_config, image_rows, png_chunk

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------- helpers


def gasket(seed: int = 0, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    """A synthetic gasket image (`splitdet synth`'s renderer), uint8 [H, W, 3]."""
    from splitdet.training.synth_image import generate_image

    return generate_image(seed, 0, size, True).image


def jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def pillow_pixels(data: bytes) -> np.ndarray:
    """What Pillow itself decodes `data` to (no error for the damaged files here)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def grey_from(pixels: np.ndarray) -> int:
    """The first row of the run of all-128 rows that ends the image (its height: none; 0: it
    is all 128)."""
    grey = (pixels == 128).all(axis=(1, 2))
    other = np.flatnonzero(~grey)
    return 0 if other.size == 0 else int(other[-1]) + 1


def cut_and_ended(data: bytes, share: float) -> bytes:
    """`data` cut at `share` of its length, the JPEG end marker appended."""
    return data[: int(len(data) * share)] + b"\xff\xd9"


def zeroed(data: bytes, at: float, n: int = 2048) -> bytes:
    """`data` with `n` bytes zeroed from `at` of its length (inside its scan data)."""
    damaged = bytearray(data)
    start = int(len(data) * at)
    damaged[start : start + n] = bytes(n)
    return bytes(damaged)


def png_of_rows(array: np.ndarray, rows: int) -> bytes:
    """An 8-bit grayscale PNG of `array`'s size whose complete zlib stream holds only its first
    `rows` rows (a writer that ended the stream early)."""
    height, width = array.shape
    raw = b"".join(b"\0" + array[r].tobytes() for r in range(rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def sample(metric, name: str, **labels: str) -> float | None:
    for family in metric.collect():
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def events(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == name]


# -------------------------------------------------------- 1. JPEGs ending in the decoder's grey


@pytest.mark.parametrize("damage", ["cut at 30%, end marker appended", "2048 bytes zeroed"])
def test_a_jpeg_whose_scan_data_ends_early_is_refused_naming_the_grey_rows(damage):
    data = jpeg(gasket(1), quality=92)
    bad = cut_and_ended(data, 0.3) if damage.startswith("cut") else zeroed(data, 0.5)
    decoded = pillow_pixels(bad)  # (Pillow: no error, grey from some row to the end)
    row = grey_from(decoded)
    assert 0 < row < 256 - 8, row
    with pytest.raises(ImageError) as refused:
        decode_pixels(bad, "cam/part_0001.jpg")
    message = str(refused.value)
    assert message.startswith("cam/part_0001.jpg: a JPEG decoded as flat grey"), message
    assert "ends early or is damaged" in message
    # where the grey starts: in the block row (16 px) above its first whole grey row
    found = re.search(r"from about row (\d+) of 256( \(column \d+ of 256\))? on", message)
    assert found and row - 16 <= int(found[1]) <= row, message


def test_a_jpeg_grey_only_in_part_of_its_last_block_row_is_refused():
    """Bytes zeroed in the middle: the decoder goes on out of step and runs short in its last
    block row, from a few blocks in (no whole row grey)."""
    bad = zeroed(jpeg(gasket(2), quality=92), 0.5)
    decoded = pillow_pixels(bad)
    assert grey_from(decoded) == 256 and (decoded[-8:, -8:] == 128).all()
    with pytest.raises(ImageError, match=r"from about row 24\d of 256 \(column \d+ of 256\) on"):
        decode_pixels(bad, "x.jpg")


@pytest.mark.parametrize(
    "options",
    [dict(quality=75, restart_marker_blocks=8), dict(quality=75, progressive=True)],
    ids=["restart markers", "progressive"],
)
def test_a_damaged_jpeg_with_restart_markers_or_progressive_is_refused(options):
    data = jpeg(gasket(2), **options)
    bad = zeroed(data, 0.5) if "restart_marker_blocks" in options else cut_and_ended(data, 0.1)
    assert grey_from(pillow_pixels(bad)) < 256 - 8
    with pytest.raises(ImageError, match="a JPEG decoded as flat grey"):
        decode_pixels(bad, "x.jpg")


def test_a_grayscale_jpeg_cut_and_ended_is_refused():
    data = jpeg(gasket(3)[..., 1], quality=85)
    with pytest.raises(ImageError, match=r"flat grey \(128 in every channel\) from about row"):
        decode_pixels(cut_and_ended(data, 0.5), "x.jpg")


def test_ordinary_jpegs_are_not_refused():
    """Synthetic gasket images at several sizes, qualities and layouts decode as before."""
    for seed, size in enumerate([(256, 256), (320, 256), (257, 199), (100, 37)]):
        image = gasket(seed, (max(size[0], 256), max(size[1], 256)))
        image = np.asarray(Image.fromarray(image).resize(size))
        for options in (dict(quality=30), dict(quality=75, subsampling=0),
                        dict(quality=95, progressive=True), dict(quality=75, optimize=True),
                        dict(quality=75, restart_marker_blocks=4)):  # fmt: skip
            data = jpeg(image, **options)
            pixels = decode_pixels(data, "x.jpg")
            assert pixels.hw == (size[1], size[0])
            decode_pixels(jpeg(image[..., 0], **options), "x.jpg")


@pytest.mark.parametrize(
    "options",
    [dict(quality=80), dict(quality=75, progressive=True),
     dict(quality=75, restart_marker_blocks=8), dict(quality=90, subsampling=0)],
    ids=["baseline", "progressive", "restart markers", "4:4:4"],
)  # fmt: skip
def test_a_genuine_grey_band_at_the_bottom_is_not_refused(options):
    """A band of exactly 128 along the bottom of the image itself (a synthetic or padded
    image, a mid-grey low-noise background) decodes exactly as the decoder's fill does: it is
    told apart by decoding it again with bytes after its scan data (a complete scan is not
    changed by them), and by its restart markers, all there."""
    image = gasket(4)
    image[-40:] = 128
    data = jpeg(image, **options)
    assert grey_from(pillow_pixels(data)) <= 256 - 32  # (its top rows: chroma blended)
    assert decode_pixels(data, "x.jpg").hw == (256, 256)


def test_a_low_noise_mid_grey_scene_is_not_refused():
    """Noise of 1 DN around 128, quantised away by the JPEG: exact 128 over most of it."""
    noise = np.random.default_rng(1).normal(128, 1, (240, 320, 3))
    data = jpeg(np.clip(np.round(noise), 0, 255).astype(np.uint8), quality=75)
    assert grey_from(pillow_pixels(data)) < 240 - 8  # (the bottom rows as the fill's)
    decode_pixels(data, "x.jpg")


def test_a_uniform_mid_grey_jpeg_is_a_blank_frame_not_damage():
    from splitdet.edge.preprocess import frame_warning

    pixels = decode_pixels(jpeg(np.full((64, 96, 3), 128, np.uint8)), "x.jpg")
    warning = frame_warning(pixels, "x.jpg")
    assert warning is not None and warning.kind == "blank_frame"


# ------------------------------------------------------------------ 2. PNGs ending in black


def test_a_png_whose_zlib_stream_holds_only_its_top_rows_is_refused():
    rows = np.random.default_rng(0).integers(30, 220, (64, 48), dtype=np.uint8)
    bad = png_of_rows(rows, 32)
    assert not pillow_pixels(bad)[32:].any()  # (Pillow: no error, black below)
    with pytest.raises(ImageError) as refused:
        decode_pixels(bad, "cam/half.png")
    message = str(refused.value)
    assert message.startswith("cam/half.png: a PNG whose compressed pixel data ends after 32 of")
    assert "its 64 rows" in message and "decoded as black" in message
    assert decode_pixels(png_of_rows(rows, 64), "whole.png").hw == (64, 48)


def test_a_png_with_genuinely_black_bottom_rows_is_not_refused():
    image = gasket(5)
    image[-10:] = 0
    for array in (image, image[..., 0], image[..., 0].astype(np.uint16) * 257):
        assert decode_pixels(png(array), "x.png").hw == (256, 256)


# ------------------------------------------------------------------- 3. the hot folder quarantines


def test_the_daemon_quarantines_damaged_files_with_their_reason(tmp_path):
    config = daemon_config(tmp_path, tmp_path)
    good = jpeg(gasket(6), quality=92)
    (config.watch / "a_good.jpg").write_bytes(good)
    (config.watch / "b_cut.jpg").write_bytes(cut_and_ended(good, 0.3))
    rows = np.random.default_rng(0).integers(30, 220, (64, 48), dtype=np.uint8)
    (config.watch / "c_half.png").write_bytes(png_of_rows(rows, 32))
    EdgeDaemon(config, pipeline=BrightIsDefective()).run()
    by_name = {Path(r["path"]).name: r for r in image_rows(config.db)}
    assert by_name["a_good.jpg"]["verdict"] == "ok"
    reasons = {"b_cut.jpg": "a JPEG decoded as flat grey",
               "c_half.png": "compressed pixel data ends after 32 of its 64 rows"}  # fmt: skip
    for name, why in reasons.items():
        row = by_name[name]
        assert row["verdict"] == "error" and row["error_kind"] == "quarantine", row
        assert why in row["reason"] and name in row["reason"], row["reason"]
        assert Path(row["stored_path"]).is_file()


# ------------------------------------------------------------ 4. blank and dim frames: told


def twelve_bit_png() -> bytes:
    """A 16-bit grayscale PNG holding a Mono12 camera's values unscaled (0..4095)."""
    values = gasket(7)[..., 1].astype(np.uint16) * 16
    return png(values)


def test_blank_and_dim_frames_are_told_apart_from_ordinary_ones():
    from splitdet.edge.preprocess import frame_warning

    cases = {
        "black.png": png(np.zeros((48, 64, 3), np.uint8)),
        "white.png": png(np.full((48, 64), 255, np.uint8)),
        "capped.png": png(np.random.default_rng(0).integers(0, 3, (48, 64), dtype=np.uint8)),
        "mono12.png": twelve_bit_png(),
    }
    kinds = {}
    for name, data in cases.items():
        warning = frame_warning(decode_pixels(data, name), name)
        kinds[name] = warning.kind
        assert warning.message.startswith(f"{name}: ") and "judged all the same" in warning.message
    assert kinds == {"black.png": "blank_frame", "white.png": "blank_frame",
                     "capped.png": "blank_frame", "mono12.png": "dim_wide_frame"}  # fmt: skip
    mono12 = frame_warning(decode_pixels(twelve_bit_png(), "m.png"), "m.png")
    assert "--pixel-bits 12" in mono12.message and mono12.high < 4096
    # ordinary frames, a dark one and a full-range 16-bit one included: nothing
    wide = gasket(8)[..., 1].astype(np.uint16) * 257
    dark = (gasket(8) // 8).astype(np.uint8)
    for data in (png(gasket(8)), jpeg(gasket(8)), png(wide), png(dark)):
        assert frame_warning(decode_pixels(data, "x"), "x") is None
    # and with --pixel-bits 12, the same 12-bit file is no dim frame
    assert frame_warning(decode_pixels(twelve_bit_png(), "m.png", 12), "m.png") is None


def test_the_daemon_judges_blank_and_dim_frames_and_says_so_once_a_minute(tmp_path, caplog):
    config = daemon_config(tmp_path, tmp_path)
    for k in range(3):
        (config.watch / f"capped_{k}.png").write_bytes(png(np.full((48, 64, 3), k, np.uint8)))
        time.sleep(0.01)
    (config.watch / "mono12.png").write_bytes(twelve_bit_png())
    (config.watch / "ordinary.jpg").write_bytes(jpeg(gasket(9)))
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    with caplog.at_level(logging.WARNING, logger="splitdet.edge"):
        assert daemon.run() == 0
    rows = image_rows(config.db)
    assert sorted(r["verdict"] for r in rows) == ["ok"] * 5  # judged, not refused
    blank = events(caplog, "blank_frame")
    assert len(blank) == 1, caplog.text  # one line for the three: at most one a minute
    assert blank[0].levelno == logging.WARNING and blank[0].fields["path"].endswith("capped_0.png")
    assert "a blank frame" in blank[0].getMessage() and "once per 60 s" in blank[0].getMessage()
    [dim] = events(caplog, "dim_wide_frame")
    assert dim.fields["path"].endswith("mono12.png") and "--pixel-bits 12" in dim.getMessage()
    assert dim.fields["full_scale"] == 65535 and dim.fields["high"] < 4096
    counted = "splitdet_edge_image_warnings_total"
    assert sample(daemon.metrics.image_warnings, counted, kind="blank_frame") == 3
    assert sample(daemon.metrics.image_warnings, counted, kind="dim_wide_frame") == 1


def test_a_line_after_the_quiet_minute_counts_the_frames_it_stands_for(tmp_path, caplog):
    from splitdet.edge.daemon_metrics import EdgeMetrics
    from splitdet.edge.intake import FrameWarnings
    from splitdet.edge.preprocess import frame_warning
    from splitdet.edge.store import ResultStore

    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        told = FrameWarnings(EdgeMetrics(store), every_s=0.3)
        warning = frame_warning(decode_pixels(png(np.zeros((8, 8), np.uint8)), "b.png"), "b.png")
        with caplog.at_level(logging.WARNING, logger="splitdet.edge"):
            for image_id in range(1, 4):
                told.judged(warning, "b.png", image_id, "ok")
            time.sleep(0.35)
            told.judged(warning, "b.png", 4, "ok")
    finally:
        store.close()
    lines = events(caplog, "blank_frame")
    assert [r.fields["images"] for r in lines] == [1, 3]
    assert "(2 more since the last line)" in lines[1].getMessage()


def test_predict_notes_a_blank_frame_in_its_record(tmp_path, caplog):
    from splitdet.edge.predict import predict_paths

    class Decoding(BrightIsDefective):
        def decode(self, data: bytes, source: str):
            return decode_pixels(data, source)

    (tmp_path / "capped.png").write_bytes(png(np.zeros((48, 64, 3), np.uint8)))
    (tmp_path / "ordinary.png").write_bytes(png(gasket(10)))
    with caplog.at_level(logging.WARNING, logger="splitdet.edge.predict"):
        capped, ordinary = predict_paths(
            [tmp_path / "capped.png", tmp_path / "ordinary.png"], Decoding(), lambda: None
        )
    assert capped.verdict == "ok" and capped.error is None  # judged, as before
    [note] = capped.to_dict()["warnings"]
    assert note.startswith(f"{tmp_path / 'capped.png'}: a blank frame")
    assert ordinary.to_dict()["warnings"] == []
    assert [r.getMessage() for r in caplog.records] == [note]


@pytest.mark.parametrize("size", [(252, 256), (256, 252), (250, 244)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_bytes_zeroed_in_a_jpeg_whose_sides_are_not_whole_blocks_are_refused(size, mode):
    """A review found zeroed bytes judged in a 2448x2044 grayscale or 4:4:4 JPEG: the
    bottom-right 8 x 8 pixels looked at straddled two block rows, the grey only in the last."""
    image = gasket(5, (256, 256))[: size[0], : size[1]]
    array = image if mode == "RGB" else np.ascontiguousarray(image[..., 0])
    bad = zeroed(jpeg(array, quality=90, subsampling=0), 0.5, 512)
    assert (pillow_pixels(bad)[-1, -1] == 128).all()  # (the decoder's grey at the corner)
    with pytest.raises(ImageError, match="flat grey"):
        decode_pixels(bad, "x.jpg")


def _with_grey_band() -> np.ndarray:
    image = gasket(4)
    image[-64:] = 128
    return image


def test_a_restart_marker_after_the_last_interval_is_harmless():
    """Some hardware encoders write a restart marker after the last interval: with a genuine
    grey band at the bottom, it was refused as damage (the count of markers not exact)."""
    data = jpeg(_with_grey_band(), quality=75, restart_marker_blocks=8)
    assert data.endswith(b"\xff\xd9")
    extra = data[:-2] + b"\xff\xd5\xff\xd9"
    assert pillow_pixels(extra).shape == (256, 256, 3)  # (Pillow decodes it cleanly)
    assert decode_pixels(extra, "x.jpg").hw == (256, 256)


def test_padding_between_segments_is_harmless():
    """Two zero bytes between the JFIF segment and the next (padding some writers leave),
    which the decoder skips: with a genuine grey band, it was refused."""
    data = jpeg(_with_grey_band(), quality=75)
    app0_end = 4 + int.from_bytes(data[4:6], "big")  # (SOI, then APP0: its length)
    assert data[2:4] == b"\xff\xe0"
    padded = data[:app0_end] + b"\0\0" + data[app0_end:]
    assert pillow_pixels(padded).shape == (256, 256, 3)
    assert decode_pixels(padded, "x.jpg").hw == (256, 256)


def test_a_whole_float_full_scale_is_taken():
    """`Pixels(bands, 255.0)` was taken before the range check came; a fractional one never
    means anything."""
    from splitdet.edge.preprocess import Pixels

    band = np.zeros((4, 4), np.uint8)
    assert Pixels((band,), 255.0).full_scale == 255
    assert Pixels((band,), np.float32(4095)).full_scale == 4095
    with pytest.raises(ValueError, match="whole full scale"):
        Pixels((band,), 255.5)
