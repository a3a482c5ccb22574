"""`edge.preprocess` and `edge.pipeline` used as a Python library (review 4).

1. `decode_image` swapped the process's warning filters and display for the whole decode
   (`catch_warnings(record=True)`, filter "always"): a warning the application's other
   threads raised meanwhile was taken as the image's, logged at INFO as a "decoder warning"
   and never shown by the application's `warnings.showwarning`; the application's own
   filters (`simplefilter("error")`) did not apply to it. Now only Pillow's warnings are the
   decoder's; the others are the application's, filtered and shown as ever.
2. `prepare` (and so `EdgePipeline.process_array`) took any array: a NaN band gave
   p_defect NaN and "not flagged" (a defect-free verdict), 8-bit values 0..255 were taken as
   they were. Now anything but a floating-point [3, H, W] array of finite values in [0, 1]
   is a ValueError saying what is expected; splitdet's own decoding never trips it.

Real images, real Pillow, a real ONNX Runtime session on the tiny export; the other thread's
warning is raised inside the decode window by wrapping Pillow's `Image.open` (fault
injection: the decode waits for that thread, no timing luck).
"""

from __future__ import annotations

import io
import logging
import struct
import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import preprocess
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.preprocess import ImageError, decode_image, prepare
from splitdet.edge.runtime import EdgeRuntime

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _png(mode: str, array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "PNG", **save)
    return buffer.getvalue()


def _rgb_png() -> bytes:
    rng = np.random.default_rng(0)
    return _png("RGB", rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))


def _tiff_pillow_warns_about() -> bytes:
    """A 4x3 8-bit grayscale TIFF whose ImageDescription (tag 270) says its 1000 bytes lie past
    the file's end: Pillow warns "Tag data larger than file", skips the tag and decodes it."""
    entries = [(256, 3, 1, 4), (257, 3, 1, 3), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (270, 2, 1000, 1 << 20), (273, 4, 1, 0), (277, 3, 1, 1), (278, 3, 1, 3),
               (279, 4, 1, 12)]  # fmt: skip
    pixels_at = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = pixels_at if tag == 273 else value
        packed = struct.pack("<HI", value, 0)[:4] if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, count) + packed
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + bytes(range(0, 240, 20))


class _AppThread:
    """The application's other thread: on `go`, it warns `message` (UserWarning) and notes
    what that raised in its own thread (an exception under an "error" filter, or nothing)."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.go, self.done = threading.Event(), threading.Event()
        self.raised: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.go.wait(30)
        try:
            warnings.warn(self.message, UserWarning, stacklevel=1)
        except UserWarning as exc:
            self.raised.append(exc)
        finally:
            self.done.set()


def _warn_inside_the_decode(monkeypatch, app: _AppThread):
    """Wrap Pillow's `Image.open` so that, inside `decode_image`'s window, the app thread warns
    (and is waited for) before Pillow opens the file."""
    real_open = Image.open

    def open_and_let_the_app_warn(*args, **kwargs):
        app.go.set()
        assert app.done.wait(30), "the app thread never warned"
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_and_let_the_app_warn)


def test_an_app_threads_warning_during_a_decode_reaches_the_apps_showwarning(monkeypatch, caplog):
    shown: list[str] = []
    app = _AppThread("app warning 1")
    with warnings.catch_warnings():
        warnings.simplefilter("default")

        def app_showwarning(message, category, filename, lineno, file=None, line=None):
            shown.append(f"{category.__name__}: {message}")

        warnings.showwarning = app_showwarning
        _warn_inside_the_decode(monkeypatch, app)
        with caplog.at_level(logging.INFO, logger="splitdet.edge.preprocess"):
            image = decode_image(_tiff_pillow_warns_about(), "cam.tif")
    app.thread.join(30)
    assert image.shape == (3, 3, 4)
    assert shown == ["UserWarning: app warning 1"]  # the app's, shown by the app
    logged = [r.getMessage() for r in caplog.records if "decoder warning" in r.getMessage()]
    # Pillow's own, the file's: logged naming it (not the app's)
    assert logged == ["cam.tif: decoder warning: Tag data larger than file. Skipping tag 270"]


def test_an_apps_error_filter_still_raises_in_its_own_thread_during_a_decode(monkeypatch):
    app = _AppThread("app warning 2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the application's choice for its own warnings
        _warn_inside_the_decode(monkeypatch, app)
        decode_image(_rgb_png(), "frame.png")
    app.thread.join(30)
    assert [str(e) for e in app.raised] == ["app warning 2"]


def test_the_warning_filters_are_given_back_after_a_refused_file():
    before = list(warnings.filters), warnings.showwarning
    with pytest.raises(ImageError):
        decode_image(_rgb_png()[:60] + b"\xff" * 2000, "cut.png")
    assert (list(warnings.filters), warnings.showwarning) == before
    assert not preprocess._WARNINGS_LOCK.locked()


# ---------------------------------------------------------------- 2. arrays refused


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((3, 8, 8), 128, np.uint8), "got uint8 values (divide by 255)"),
        (np.full((3, 8, 8), 4095, np.uint16), "got uint16 values (divide by 65535)"),
        (np.full((3, 8, 8), 200.0, np.float32), "got values in [200, 200]"),
        (np.full((3, 8, 8), -0.5, np.float32), "got values in [-0.5, -0.5]"),
    ],
)
def test_prepare_refuses_what_is_not_unit_floats(array, expected):
    with pytest.raises(ValueError) as refused:
        prepare(array, 32, 64, MEAN, STD)
    assert str(refused.value).startswith("expected Float32[3, H, W] in [0, 1], ")
    assert expected in str(refused.value)


def test_prepare_refuses_a_nan_band_and_an_infinity():
    image = np.full((3, 20, 30), 0.5, np.float32)
    image[:, 5:7, :] = np.nan
    with pytest.raises(ValueError, match=r"180 non-finite value\(s\) \(NaN or infinity\) of 1800"):
        prepare(image, 32, 64, MEAN, STD)
    image = np.full((3, 20, 30), 0.5, np.float32)
    image[1, 0, 0] = np.inf
    with pytest.raises(ValueError, match=r"1 non-finite value"):
        preprocess.check_unit_image(image)


def test_prepare_refuses_a_pil_image_naming_its_type():
    with pytest.raises(ValueError) as refused:
        preprocess.check_unit_image(Image.new("RGB", (8, 8)))  # type: ignore[arg-type]
    assert "got PIL.Image.Image; read image files with load_image or decode_image" in str(
        refused.value
    )


def test_prepare_takes_float64_and_rounding_past_the_ends():
    image = np.linspace(-5e-4, 1 + 5e-4, 3 * 16 * 24).reshape(3, 16, 24)  # float64
    assert prepare(image, 32, 64, MEAN, STD).batch.dtype == np.float32


def test_splitdet_decoding_never_trips_the_check():
    """Every kind of file `decode_image` takes comes out in [0, 1]."""
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    wide = np.array([[0, 65535], [1, 30000]], dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(wide).save(buffer, "PNG")
    files = {
        "rgb": _png("RGB", rgb),
        "gray": _png("L", rgb),
        "palette": _png("P", rgb),
        "rgba": _png("RGBA", rgb),
        "1-bit": _png("1", rgb),
        "16-bit": buffer.getvalue(),
        "pgm 4095": b"P5 2 1 4095\n" + np.array([0, 4095], ">u2").tobytes(),
    }
    for name, data in files.items():
        image = decode_image(data, name)
        preprocess.check_unit_image(image)
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0, name


def test_process_array_refuses_a_nan_frame_instead_of_passing_it(tiny_model_dir):
    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=1))
    frame = np.full((3, 64, 80), 0.5, np.float32)
    assert np.isfinite(pipeline.process_array(frame).p_defect)
    frame[:, 10:12, :] = np.nan
    with pytest.raises(ValueError, match=r"expected Float32\[3, H, W\] in \[0, 1\], got 480 non"):
        pipeline.process_array(frame)
    with pytest.raises(ValueError, match="got uint8 values"):
        pipeline.process_array(np.full((3, 64, 80), 128, np.uint8))


def _header_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (Pillow reads only that)."""
    from support import png_chunk

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b"")


def test_an_apps_own_pillow_call_is_not_made_an_error_during_a_decode(monkeypatch):
    """DecompressionBombWarning was made an error for the whole process while a decode ran:
    an application that opens its own 95-megapixel image in another thread (its choice to
    allow it) got an exception whenever a camera thread was decoding (30 of 30 with 4)."""
    real_open = Image.open
    go, done, raised = threading.Event(), threading.Event(), []

    def app() -> None:
        go.wait(30)
        try:
            real_open(io.BytesIO(_header_png(10000, 9500)))
        except Exception as exc:  # what the app's own thread met
            raised.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=app, daemon=True)
    thread.start()

    def open_and_let_the_app_open(*args, **kwargs):
        go.set()
        assert done.wait(30), "the app thread never opened its image"
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_and_let_the_app_open)
    # (the app's thread's warning is handed to the app: shown, not raised in its thread)
    with pytest.warns(Image.DecompressionBombWarning, match="95000000 pixels"):
        decode_image(_rgb_png(), "frame.png")
    thread.join(30)
    assert raised == []


def test_an_image_past_pillows_warning_size_is_still_refused_in_one_line():
    with pytest.raises(ImageError, match=r"big\.png: 10000x9500 pixels exceeds the 64000000"):
        decode_image(_header_png(10000, 9500), "big.png")
