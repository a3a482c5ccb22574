"""What a shift's `edge status` and training's header read cost (a review of the commits
that added them).

- `edge status --arrived-from/--arrived-until` counted the window's images by verdict in a
  query SQLite ran through images_verdict (for its GROUP BY order), fetching every row of the
  store by id to test its `arrived`: twice a plain pass from the page cache, a random read per
  row from disk; and it made a second pass of its own for the window's last image and result.
- Training's header read (`train`, `data split`, `data check`) read whole files it only had
  to look at: a PNG with any text chunk after its pixels (a camera SDK's `Software`) had every
  pixel decoded for its orientation, the chunk walk read 8 KB per chunk (a PNG of 8 KB IDAT
  chunks read whole), and a TIFF, BMP or PGM ending in zeros (black bottom rows) was read
  whole for a JPEG/PNG check that never applies to it.

Real SQLite stores (the project's ResultStore schema, rows by plain SQL), real image files;
the bytes a read takes are those Linux counts in /proc/self/io.
"""

from __future__ import annotations

import io
import sqlite3
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.store import ResultStore
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.training import voc
from splitdet.training.voc_image import _image_header

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0


def make_store(path: Path, n: int = 400) -> None:
    """A store of `n` rows, one a minute: ok, defect, pending, and dead-letter errors."""
    ResultStore(path).close()
    db = sqlite3.connect(path)
    rows = []
    for i in range(n):
        verdict = ("ok", "defect", "pending", "error")[i % 4]
        arrived = T0 + 60 * i
        rows.append((
            f"k{i}", f"/w/{i}.png", f"/a/{i}.png", "h" * 64, 1, arrived,
            None if verdict == "pending" else arrived + 1, arrived + 1, verdict,
            "fp", "dead_letter" if verdict == "error" else None,
        ))  # fmt: skip
    db.executemany(
        "INSERT INTO images (file_key, path, stored_path, content_hash, size_bytes, arrived,"
        " finished, updated, verdict, fingerprint, error_kind) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        rows,
    )
    db.commit()
    db.close()


def status_plans(path: Path, arrived: tuple) -> tuple[dict, list[tuple[str, list[str]]]]:
    """`store_status` of the store at `path` in the window, and each SELECT it ran with the
    plan SQLite gives it."""
    db = open_readonly(path)
    ran: list[str] = []
    db.set_trace_callback(ran.append)
    try:
        summary = store_status(db, now=T0 + 10**6, arrived=arrived)
    finally:
        db.set_trace_callback(None)
    plans = [
        (sql, [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql)])
        for sql in ran
        if sql.lstrip().upper().startswith("SELECT")
        and "FROM images" in sql
        and "LIMIT" not in sql  # (in_watch's newest rows: no pass over the table)
    ]
    db.close()
    return summary, plans


def test_a_windowed_status_makes_no_pass_through_the_verdict_index_nor_one_more(tmp_path):
    path = tmp_path / "edge.sqlite"
    make_store(path)
    window = (T0 + 60 * 100, T0 + 60 * 200)  # rows 100..199
    summary, plans = status_plans(path, window)
    assert summary["verdicts"] == {"ok": 25, "defect": 25, "pending": 25, "error": 25}
    assert summary["last_arrival"] == T0 + 60 * 199
    assert summary["last_finished"] == T0 + 60 * 199 + 1  # (199: an error row, finished)
    assert summary["store"] == {"images": 400, "last_arrival": T0 + 60 * 399}
    assert summary["dead_letters"]["not_kept"] == 100  # the whole store's
    by_index = [sql for sql, plan in plans if "SCAN images USING INDEX images_verdict" in plan]
    assert by_index == [], by_index  # (a whole index in order: a row fetched per entry)
    passes = [sql for sql, plan in plans if "SCAN images" in plan]
    # the whole store's times and count, the window's verdicts with its last times, its
    # warnings, its results by export, its thresholds: one pass each
    assert len(passes) <= 5, passes


def test_a_status_without_a_window_is_the_whole_store_s_as_before(tmp_path):
    path = tmp_path / "edge.sqlite"
    make_store(path)
    summary, plans = status_plans(path, (None, None))
    assert summary["verdicts"] == {"ok": 100, "defect": 100, "pending": 100, "error": 100}
    assert summary["last_arrival"] == summary["store"]["last_arrival"] == T0 + 60 * 399
    assert summary["store"]["images"] == 400
    assert summary["dead_letters"]["not_kept"] == 100
    passes = [sql for sql, plan in plans if "SCAN images" in plan]
    assert len(passes) <= 4, passes  # as before the window was added


def bytes_read() -> int:
    """The bytes this process has read so far (Linux's rchar)."""
    with open("/proc/self/io") as stats:
        return next(int(line.split()[1]) for line in stats if line.startswith("rchar"))


needs_proc_io = pytest.mark.skipif(
    not Path("/proc/self/io").exists(), reason="reads counted by Linux's /proc/self/io"
)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def rechunked_png(image: Image.Image, idat_bytes: int | None = None,
                  after_pixels: tuple[bytes, ...] = ()) -> bytes:  # fmt: skip
    """`image` as a PNG whose pixel data is split into IDAT chunks of `idat_bytes` (as libpng
    writes them: 8 KB), with the whole chunks `after_pixels` between its last IDAT and IEND."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data, pos, head, pixels = buffer.getvalue(), 8, [], b""
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IDAT":
            pixels += body
        elif kind != b"IEND":
            head.append(chunk(kind, body))
        pos += 12 + length
    step = idat_bytes or len(pixels)
    idats = [chunk(b"IDAT", pixels[i : i + step]) for i in range(0, len(pixels), step)]
    return b"".join([data[:8], *head, *idats, *after_pixels, chunk(b"IEND", b"")])


def noise(size: tuple[int, int] = (1024, 768)) -> Image.Image:
    """A grey noise image (compresses little: its PNG is about its pixel count in bytes)."""
    return Image.fromarray(np.random.default_rng(7).integers(0, 256, size[::-1], dtype=np.uint8))


def header_read_bytes(path: Path) -> int:
    """The bytes training's header read of `path` reads (a second read: Pillow's own first)."""
    voc.image_size(path)
    before = bytes_read()
    voc.image_size(path)
    return bytes_read() - before


@needs_proc_io
@pytest.mark.parametrize(
    "after_pixels",
    [chunk(b"tEXt", b"Software\0camera-sdk 4.2"), chunk(b"iTXt", b"Comment\0\0\0\0\0shift 2")],
    ids=["tEXt Software", "iTXt Comment"],
)
def test_a_text_after_a_png_s_pixels_costs_the_header_read_no_decoding(tmp_path, after_pixels):
    path = tmp_path / "a.png"
    path.write_bytes(rechunked_png(noise(), after_pixels=(after_pixels,)))
    assert voc.image_size(path) == (1024, 768)
    read = header_read_bytes(path)
    assert read < path.stat().st_size // 10, (read, path.stat().st_size)


@needs_proc_io
def test_the_chunk_walk_reads_a_few_bytes_of_each_chunk_not_the_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(rechunked_png(noise(), idat_bytes=8192))
    read = header_read_bytes(path)
    assert read < path.stat().st_size // 10, (read, path.stat().st_size)


@needs_proc_io
@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PPM"])
def test_an_image_of_another_format_ending_in_zeros_is_not_read_whole(tmp_path, fmt):
    """An uncompressed image in a black border (a part on a dark background) ends in zeros
    (a BMP's last rows are its top ones); the zero-padded-tail check is a JPEG's and a PNG's
    only (`preprocess.check_written`)."""
    pixels = np.random.default_rng(1).integers(1, 256, (768, 1024), dtype=np.uint8)
    pixels[:64] = pixels[-64:] = 0
    path = tmp_path / f"a.{fmt.lower()}"
    Image.fromarray(pixels).save(path, fmt)
    read = header_read_bytes(path)
    assert read < path.stat().st_size // 10, (read, path.stat().st_size)


def raw_profile_exif(orientation: int) -> bytes:
    """The text ImageMagick writes an EXIF block as ("Raw profile type exif"), holding
    `orientation`."""
    exif = Image.Exif()
    exif[voc.EXIF_ORIENTATION] = orientation
    block = exif.tobytes()
    return f"\nexif\n{len(block):8d}\n{block.hex()}\n".encode()


@pytest.mark.parametrize("kind", [b"tEXt", b"zTXt"])
def test_an_exif_text_after_a_png_s_pixels_is_still_read(tmp_path, kind):
    """The keyword Pillow reads an EXIF block from, after the pixels, is still seen."""
    text = raw_profile_exif(6)
    body = (
        b"Raw profile type exif\0" + text
        if kind == b"tEXt"
        else b"Raw profile type exif\0\0" + zlib.compress(text)
    )
    path = tmp_path / "a.png"
    path.write_bytes(rechunked_png(noise((64, 48)), after_pixels=(chunk(kind, body),)))
    assert _image_header(path, None) == ((64, 48), 6)
