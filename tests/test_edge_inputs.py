"""What the edge daemon meets in a hot folder besides good images (real files, no stand-ins):
folders it cannot list, files Pillow cannot decode, images too large for the memory, image
modes other than 8-bit RGB/grayscale, and folders holding many thousands of files."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sqlite3
import struct
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.preprocess import ImageError, decode_image, load_image, prepare
from splitdet.edge.watcher import HotFolder
from splitdet.training.voc import load_rgb

from support import nobody_scratch, run_without_torch

CLI = "import sys; from splitdet.shared.cli import main; sys.exit(main(sys.argv[1:]))"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------- helpers


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _pattern(height: int = 48, width: int = 64) -> np.ndarray:
    """UInt8[H, W, 3], every value 0..255 present, channels different."""
    g = (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)
    return np.stack([g, 255 - g, g // 2], axis=-1)


def corrupt_tiff() -> bytes:
    """A TIFF whose first directory is fine and whose second has no width or height: Pillow
    raises TypeError("Missing dimensions") counting its frames (what a fuzzer found)."""
    buffer = io.BytesIO()
    Image.new("L", (64, 48), 1).save(buffer, "TIFF")
    data = bytearray(buffer.getvalue())
    first = struct.unpack_from("<I", data, 4)[0]
    entries = struct.unpack_from("<H", data, first)[0]
    struct.pack_into("<I", data, first + 2 + 12 * entries, len(data))  # -> a second directory
    data += struct.pack("<H", 1) + struct.pack("<HHII", 259, 3, 1, 1) + struct.pack("<I", 0)
    return bytes(data)


def _too_long_folder(root: Path) -> str:
    """A chain of folders below `root` whose deepest path is longer than the system allows:
    listing it fails with ENAMETOOLONG, a real OSError even for root. Returns the chain's name
    below `root`."""
    part = "d" * 250
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(5000 // len(part)):
            os.mkdir(part, dir_fd=fd)
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)
    return part


def _warnings(caplog, needle: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and needle in r.getMessage()
    ]


def _run_daemon(prefix: list[str], model: Path, watch: Path, db: Path, *options: str):
    return subprocess.run(
        [*prefix, sys.executable, "-c", CLI, "edge", "run",
         "--model", str(model), "--watch", str(watch), "--db", str(db),
         "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--threads", "1",
         "--settle", "0", "--unreadable-grace", "0", "--poll", "0.05", *options],
        capture_output=True, text=True, timeout=100,
    )  # fmt: skip


def _rows(db: Path) -> list[dict]:
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        connection.row_factory = sqlite3.Row
        return [dict(r) for r in connection.execute("SELECT * FROM images ORDER BY id")]
    finally:
        connection.close()


# ------------------------------------------------------------------- 1. unreadable folders


def test_unlistable_subfolder_is_skipped_with_one_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitdet.edge.watcher")
    (tmp_path / "day1").mkdir()
    (tmp_path / "day1" / "a.png").write_bytes(_png(Image.new("L", (8, 8), 40)))
    (tmp_path / "b.png").write_bytes(_png(Image.new("L", (8, 8), 90)))
    chain = _too_long_folder(tmp_path)
    folder = HotFolder(tmp_path, settle_s=0, recursive=True)
    for _ in range(3):  # a scan every poll: one warning, not one per scan
        folder.scan()
    names = []
    while (candidate := folder.next_candidate()) is not None:
        names.append(candidate.name)
        folder.forget(candidate)
    assert sorted(names) == ["b.png", "day1/a.png"]
    warned = _warnings(caplog, chain)
    assert len(warned) == 1, warned
    assert "File name too long" in warned[0]


def test_hot_folder_that_vanishes_mid_run_pauses_the_scans(tmp_path, caplog):
    """An unmounted share: a warning, the files seen so far kept as they were (not new
    arrivals when it comes back), and the scans go on once it is back."""
    caplog.set_level(logging.INFO, logger="splitdet.edge.watcher")
    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "a.png").write_bytes(_png(Image.new("L", (8, 8), 40)))
    folder = HotFolder(watch, settle_s=0)
    folder.scan()
    before = folder.next_candidate()
    watch.rename(tmp_path / "away")
    folder.scan()
    folder.scan()
    assert len(_warnings(caplog, str(watch))) == 1
    assert folder.pending() == 1
    (tmp_path / "away").rename(watch)
    folder.scan()
    assert any("can be listed again" in r.getMessage() for r in caplog.records)
    after = folder.next_candidate()
    assert (after.file_key, after.order, after.first_seen) == (
        before.file_key,
        before.order,
        before.first_seen,
    )


def test_daemon_goes_on_past_a_folder_it_cannot_read(tiny_model_dir):
    """`edge run --recursive` beside a root-only lost+found: it warns and processes the rest."""
    with nobody_scratch(tiny_model_dir) as (prefix, root, model):
        watch = root / "hot"
        (watch / "day1").mkdir(parents=True)
        (watch / "day1" / "a.png").write_bytes(_png(Image.new("L", (64, 48), 40)))
        closed = watch / "lost+found"
        closed.mkdir()
        for path in (watch, watch / "day1", watch / "day1" / "a.png"):
            path.chmod(0o777)
        closed.chmod(0o000)
        try:
            result = _run_daemon(prefix, model, watch, root / "edge.sqlite", "--recursive")
        finally:
            closed.chmod(0o700)
        rows = _rows(root / "edge.sqlite")
    assert result.returncode in (0, 1), result.stderr  # 1: a flagged image left pending
    assert "Traceback" not in result.stderr, result.stderr
    warned = [line for line in result.stderr.splitlines() if "lost+found" in line]
    assert len(warned) == 1 and "Permission denied" in warned[0], result.stderr
    assert [Path(r["path"]).name for r in rows] == ["a.png"]


# ------------------------------------------------------------------------ 2. corrupt files


def test_whatever_pillow_raises_is_an_image_error():
    with pytest.raises(
        ImageError, match=re.escape("cam_0001.tif: corrupt or truncated image, cannot be")
    ):
        decode_image(corrupt_tiff(), "cam_0001.tif")


def test_daemon_quarantines_a_corrupt_tiff_and_goes_on(tiny_model_dir, tmp_path):
    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "cam_0001.tif").write_bytes(corrupt_tiff())
    (watch / "cam_0002.png").write_bytes(_png(Image.new("RGBA", (64, 48), (40, 50, 60, 0))))
    result = _run_daemon([], tiny_model_dir, watch, tmp_path / "edge.sqlite")
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [reason_file] = (watch / "quarantine").glob("*cam_0001.tif.reason.txt")
    reason = reason_file.read_text()
    assert "cannot be decoded" in reason and "Missing dimensions" in reason
    rows = {Path(r["path"]).name: r for r in _rows(tmp_path / "edge.sqlite")}
    assert rows.keys() == {"cam_0001.tif", "cam_0002.png"}
    assert rows["cam_0002.png"]["p_defect"] is not None  # the RGBA image was classified


# ------------------------------------------------------------------------ 3. large images


def test_running_out_of_memory_while_decoding_is_an_image_error():
    """A 6000 x 6000 PNG of 100 KB under an address-space limit too small for its floats."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux's /proc to set the limit")
    result = run_without_torch(
        """
        import io, resource
        from PIL import Image
        from splitdet.edge.preprocess import ImageError, decode_image
        buffer = io.BytesIO()
        Image.new("L", (6000, 6000), 40).save(buffer, "PNG")
        data = buffer.getvalue()
        status = open("/proc/self/status").read()
        size_kb = int(status.split("VmSize:")[1].split()[0])
        limit = (size_kb + 200 * 1024) * 1024  # 200 MB more: the floats need 432 MB
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
        try:
            decode_image(data, "huge.png")
        except ImageError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "huge.png: too large to decode in the memory available: 6000 x 6000 px" in (
        result.stdout
    )


def test_a_large_grayscale_image_needs_little_more_memory_than_its_floats(tmp_path):
    """Decoding writes the float image in place; prepare works a channel at a time (the
    whole-image code needed 2 more float images beside it: 2.4 GB for a 7900 x 7900 PNG)."""
    path = tmp_path / "large.png"
    Image.new("L", (2000, 1500), 40).save(path)
    floats = 3 * 2000 * 1500 * 4
    tracemalloc.start()
    try:
        image = load_image(path)
        decode_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        held = tracemalloc.get_traced_memory()[0]
        prepared = prepare(image, 512, 640, MEAN, STD)
        prepare_extra = tracemalloc.get_traced_memory()[1] - held
    finally:
        tracemalloc.stop()
    assert prepared.resized_hw == (480, 640)
    assert decode_peak < 1.2 * floats, decode_peak / floats
    assert prepare_extra < 1.2 * floats, prepare_extra / floats


# -------------------------------------------------------------------------- 4. image modes


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("RGBA", "png"), ("LA", "png"), ("CMYK", "jpg"), ("CMYK", "tif"), ("YCbCr", "tif"),
     ("1", "png"), ("P", "png"), ("RGB", "png"), ("L", "png")],
)  # fmt: skip
def test_modes_training_takes_are_taken_as_training_takes_them(tmp_path, mode, suffix):
    path = tmp_path / f"image.{suffix}"
    Image.fromarray(_pattern()).convert(mode).save(path)
    with Image.open(path) as written:
        assert written.mode == mode
    expected = np.asarray(load_rgb(path), dtype=np.float32).transpose(2, 0, 1) / 255.0
    np.testing.assert_array_equal(load_image(path), expected)


@pytest.mark.parametrize("byte_order", ["<u2", ">u2"])
def test_16_bit_grayscale_of_either_byte_order(tmp_path, byte_order):
    values = (_pattern()[..., 0].astype(np.uint32) * 257 + 3).astype(byte_order)
    path = tmp_path / "gray16.tif"
    Image.fromarray(values).save(path)
    with Image.open(path) as written:
        assert written.mode == ("I;16B" if byte_order == ">u2" else "I;16")
    image = load_image(path)
    expected = values.astype(np.float32) / np.float32(65535)
    for channel in image:
        np.testing.assert_array_equal(channel, expected)


def test_32_bit_integers_only_within_16_bits(tmp_path):
    within = _pattern()[..., 0].astype(np.int32) * 257
    Image.fromarray(within).save(tmp_path / "within.tif")
    expected = within.astype(np.float32) / np.float32(65535)
    np.testing.assert_array_equal(load_image(tmp_path / "within.tif")[0], expected)
    Image.fromarray(within * 2).save(tmp_path / "beyond.tif")
    with pytest.raises(
        ImageError, match=re.escape("beyond.tif: 32-bit integer pixels outside 0..65535")
    ):
        load_image(tmp_path / "beyond.tif")


def test_float_images_are_refused_naming_the_mode(tmp_path):
    Image.fromarray(_pattern()[..., 0].astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ImageError, match=re.escape("float.tif: unsupported image mode 'F'")):
        load_image(tmp_path / "float.tif")


# ---------------------------------------------------------------- 5. many files at once


def test_files_kept_in_the_folder_are_handed_over_in_arrival_order(tmp_path):
    """Files kept in the folder (--after keep) are all handed over again after a restart, in
    arrival order (by mtime, then name), each once. (The hand-over stops at the first ready
    file: 16k files took 0.38 s, against 5.3 s when every file was compared per hand-over.)"""
    n = 2_000
    for i in range(n):
        (tmp_path / f"cam_{i:05d}.png").write_bytes(b"")
    folder = HotFolder(tmp_path, settle_s=0)
    folder.scan()
    names = []
    while (candidate := folder.next_candidate(set())) is not None:
        names.append(candidate.name)
        folder.ignore(candidate)
    assert names == sorted(names) and len(names) == n


class _CountedEntry:
    """A DirEntry whose stat() calls are counted."""

    def __init__(self, entry: os.DirEntry, counts: Counter) -> None:
        self._entry, self._counts = entry, counts

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        self._counts["entry stat"] += 1
        return self._entry.stat(follow_symlinks=follow_symlinks)

    def __getattr__(self, name: str):
        return getattr(self._entry, name)


@contextlib.contextmanager
def _file_calls(monkeypatch) -> Iterator[Counter]:
    """Counts of the file system calls made in the block: folder listings (scandir), stats
    of listed files (DirEntry.stat), and os.stat / os.lstat / os.fstat."""
    counts: Counter = Counter()
    real_scandir, real_stat, real_lstat, real_fstat = os.scandir, os.stat, os.lstat, os.fstat

    @contextlib.contextmanager
    def scandir(path):
        counts["scandir"] += 1
        with real_scandir(path) as listing:
            yield (_CountedEntry(entry, counts) for entry in listing)

    def stat(path, *args, **kwargs):
        counts["stat"] += 1
        return real_stat(path, *args, **kwargs)

    def lstat(path, *args, **kwargs):
        counts["lstat"] += 1
        return real_lstat(path, *args, **kwargs)

    def fstat(fd):
        counts["fstat"] += 1
        return real_fstat(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "scandir", scandir)
        patch.setattr(os, "stat", stat)
        patch.setattr(os, "lstat", lstat)
        patch.setattr(os, "fstat", fstat)
        yield counts


def _age(path: Path, seconds: float = 3600) -> None:
    """Set a file's or folder's modification time `seconds` back."""
    past = os.stat(path).st_mtime_ns - int(seconds * 1e9)
    os.utime(path, ns=(past, past))


def test_an_idle_folder_of_kept_files_is_not_listed_on_every_poll(tmp_path, monkeypatch):
    """Under --after keep every poll (0.25 s) listed and stat'ed every file kept: 5000 kept
    files cost 12% of a core with nothing arriving. Now a poll stats each folder once and
    lists them only when their times changed; new files are still found at the next poll."""
    (tmp_path / "day1").mkdir()
    names = [f"cam_{i:04d}.png" for i in range(300)] + [f"day1/cam_{i:04d}.png" for i in range(300)]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    for folder in (tmp_path / "day1", tmp_path):
        _age(folder)  # written long ago: no change can hide in the same timestamp tick
    folder = HotFolder(tmp_path, settle_s=0, recursive=True, recent_s=0)
    folder.scan()
    taken = []
    while (candidate := folder.next_candidate()) is not None:
        taken.append(candidate.name)
        folder.ignore(candidate)  # kept in place (--after keep)
    assert sorted(taken) == sorted(names)

    with _file_calls(monkeypatch) as idle:
        for _ in range(5):
            folder.scan()
    assert idle["scandir"] == idle["entry stat"] == idle["lstat"] == 0, idle
    assert idle["stat"] + idle["fstat"] == 5 * 2, idle  # the hot folder and day1, once a poll

    (tmp_path / "day1" / "new.png").write_bytes(b"y")
    with _file_calls(monkeypatch) as arrived:
        folder.scan()
    # a folder changed: listed, every file stat'ed (a removed name written again may have got
    # its old inode back: only its stat tells it from the one done)
    assert arrived["scandir"] == 2 and arrived["entry stat"] == 601, arrived
    candidate = folder.next_candidate()
    assert candidate is not None and candidate.name == "day1/new.png"
    folder.ignore(candidate)
    assert folder.next_candidate() is None


def test_a_kept_file_removed_and_written_again_is_seen_at_once(tmp_path):
    """`rm latest.png; cp new.png latest.png`: ext4 and tmpfs give the new file the inode the
    removed one had at once. The folder's times change, so it is listed; a listing that
    stat'ed only names whose inode differed passed it over until a full scan (30 s), and a
    version written again before then was never taken (review of the folder-scan change)."""
    latest = tmp_path / "latest.png"
    latest.write_bytes(b"version A")
    _age(latest)
    _age(tmp_path)
    folder = HotFolder(tmp_path, settle_s=0, full_scan_s=3600, recent_s=0)
    folder.scan()
    folder.ignore(folder.next_candidate())
    inode = latest.stat().st_ino
    folder.scan()
    assert folder.next_candidate() is None
    latest.unlink()
    latest.write_bytes(b"version B, longer")
    if latest.stat().st_ino != inode:
        pytest.skip("this file system gave the new file another inode")
    folder.scan()
    candidate = folder.next_candidate()
    assert candidate is not None and candidate.name == "latest.png"


def test_a_kept_file_written_again_in_place_is_seen(tmp_path):
    """A camera rewriting one name in place (latest.png: same inode, its folder's times do not
    change) has each version taken: at the next poll while the file was kept lately
    (`recent_s`), else at the next full scan (`full_scan_s`)."""
    latest = tmp_path / "latest.png"
    latest.write_bytes(b"1")
    _age(latest)
    _age(tmp_path)
    folder = HotFolder(tmp_path, settle_s=0, full_scan_s=0.2)
    versions = []
    for version in (b"22", b"333"):
        folder.scan()
        candidate = folder.next_candidate()
        versions.append(latest.read_bytes())
        folder.ignore(candidate)
        with open(latest, "r+b") as handle:  # in place: same inode
            handle.write(version)
    folder.scan()  # kept lately: stat'ed at every poll
    assert folder.next_candidate() is not None
    folder.ignore(folder.next_candidate())
    assert versions == [b"1", b"22"]

    lazy = HotFolder(tmp_path, settle_s=0, full_scan_s=0.2, recent_s=0)
    lazy.scan()
    lazy.ignore(lazy.next_candidate())
    with open(latest, "r+b") as handle:
        handle.write(b"4444")
    time.sleep(0.3)  # past full_scan_s: the next scan stats every file
    lazy.scan()
    candidate = lazy.next_candidate()
    assert candidate is not None and candidate.size == 4


def test_an_image_wider_than_the_cloud_takes_is_refused_at_the_edge():
    """A line-scan image 65600 px wide passed the edge, cost its work, then the cloud refused
    it for good (a dead letter instead of a quarantined file)."""
    from splitdet.shared.spec import MAX_ORIGINAL_SIDE

    buffer = io.BytesIO()
    Image.new("L", (MAX_ORIGINAL_SIDE + 64, 2), 128).save(buffer, format="PNG")
    with pytest.raises(ImageError, match=f"side over {MAX_ORIGINAL_SIDE} px"):
        decode_image(buffer.getvalue(), "line.png")
    buffer = io.BytesIO()
    Image.new("L", (MAX_ORIGINAL_SIDE, 2), 128).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), "line.png").shape == (3, 2, MAX_ORIGINAL_SIDE)
