"""The hot folder as a camera integration and a code review found it (`splitdet edge run
--watch`): "still changing" said of a file that changed once while it waited behind a backlog;
a folder whose modification time lies in the future listed at every poll; the daemon's own
reads blocking on a FIFO put in a candidate's place, or reading a file grown past the size
limit whole; a start-up line per sidecar file; and an image rewritten in place under a kept
file's very key (name, size, modification time, inode) never processed under --after keep."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.file_identity import file_key
from splitdet.edge.preprocess import MAX_FILE_BYTES
from splitdet.edge.store import Arrival, OutboxCap, ResultStore
from splitdet.edge.watcher import SKIPPED_NAMED_PER_SCAN, STILL_CHANGING_CHANGES, HotFolder

from support import daemon_config, image_rows, running, wait_for

WATCHER = "splitdet.edge.watcher"


def _events(caplog, event: str, level: int | None = None) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == event and (level is None or r.levelno == level)
    ]


def _png(path: Path, level: int = 90) -> bytes:
    Image.fromarray(np.full((32, 40), level, np.uint8)).save(path, "PNG")
    return path.read_bytes()


# 1. "still changing" only for a file that kept changing, over a true duration


def test_a_file_changed_once_after_waiting_behind_a_backlog_is_not_still_changing(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=WATCHER)
    shot = tmp_path / "b280.jpg"
    shot.write_bytes(b"x" * 5000)
    folder = HotFolder(tmp_path, settle_s=1.0)
    folder.scan()
    (candidate,) = folder._tracked.values()
    # it waited 46 s behind a backlog (as if first seen and settled that long ago) ...
    candidate.seen -= 46.0
    candidate.stable_since -= 46.0
    with open(shot, "r+b") as handle:  # ... and is truncated once
        handle.truncate(3000)
    folder.scan()
    assert folder._tracked["b280.jpg"].size == 3000
    assert not _events(caplog, "file_still_changing")


def test_a_file_that_keeps_changing_is_told_of_with_how_long_it_has(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=WATCHER)
    log_file = tmp_path / "preview.png"
    log_file.write_bytes(b"x")
    folder = HotFolder(tmp_path, settle_s=10.0)  # every change below comes within settle_s
    folder.scan()
    candidate = folder._tracked["preview.png"]
    candidate.seen -= 200.0  # first seen 200 s ago, changing since (within settle_s each time)
    candidate.changing_since = candidate.seen
    for n in range(STILL_CHANGING_CHANGES):
        log_file.write_bytes(b"x" * (n + 2))
        folder.scan()
    (line,) = _events(caplog, "file_still_changing")
    assert line.fields["changing_s"] >= 200.0


# 2. a folder time in the future: not listed at every poll


def test_a_folder_time_in_the_future_does_not_make_every_scan_a_listing(tmp_path):
    for n in range(3):
        (tmp_path / f"cam{n}.xml").write_text("<meta/>")
    _png(tmp_path / "a.png")
    future = 1_893_456_000 * 10**9  # 2030-01-01: a file server's clock running ahead
    os.utime(tmp_path, ns=(future, future))
    folder = HotFolder(tmp_path, settle_s=0.0, full_scan_s=3600.0)
    folder.scan()  # the first scan lists it
    listed = folder._last_full
    folder.ignore(folder.next_candidate())  # a file kept, as --after keep does
    for _ in range(3):
        folder.scan()
    assert folder._last_full == listed, "the folder was listed again though unchanged"
    (tmp_path / "b.png").write_bytes(_png(tmp_path / "b.tmp"))  # a change: listed again
    os.utime(tmp_path, ns=(future + 10**9, future + 10**9))
    folder.scan()
    assert folder._last_full > listed and "b.png" in folder._tracked


# 3. the daemon's reads: never blocking on a FIFO, never past the size limit


def _unblock(fifo: Path) -> None:
    """Let a reader blocked in open() on `fifo` go on (the old code's hang), so the test ends."""
    with contextlib.suppress(OSError):  # (no reader waiting: nothing to do)
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _returns(call) -> bool:
    """Whether `call()` returns (in a thread; False if it is still blocked after 30 s)."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(30)
    return not thread.is_alive()


def _scanned(shot: Path) -> tuple[HotFolder, object]:
    """A hot folder (no settle, no grace) holding the PNG `shot`, scanned: it and its candidate."""
    _png(shot)
    folder = HotFolder(shot.parent, settle_s=0.0, unreadable_grace_s=0.0)
    folder.scan()
    return folder, folder.next_candidate()


def test_a_candidate_replaced_by_a_fifo_is_not_opened(tmp_path):
    shot = tmp_path / "a.png"
    folder, candidate = _scanned(shot)
    shot.unlink()
    os.mkfifo(shot)
    results = []
    try:
        assert _returns(lambda: results.append(folder.read(candidate)))
    finally:
        _unblock(shot)
    assert results == [None]  # not the file it was: looked at again
    assert "a.png" not in folder._tracked


def test_a_candidate_grown_past_the_limit_is_not_read_whole(tmp_path):
    shot = tmp_path / "big.png"
    folder, candidate = _scanned(shot)
    os.truncate(shot, MAX_FILE_BYTES + 1)  # (sparse: grown after the scan)
    tracemalloc.start()
    try:
        folder.read(candidate)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < MAX_FILE_BYTES // 4


def test_the_intake_does_not_open_a_fifo_put_in_a_recorded_file_s_place(tiny_model_dir, tmp_path):
    config = daemon_config(tiny_model_dir, tmp_path, after="delete", settle_s=0.0)
    shot = config.watch / "latest.png"
    data = _png(shot)
    store = ResultStore(config.db, OutboxCap())  # a row under its key, other contents
    earlier = hashlib.sha256(b"an earlier shot").hexdigest()
    key = file_key(shot, shot.stat())
    store.record_ok(Arrival(str(shot), key, earlier, len(data), 0.0), 0.1, "f" * 64, {})
    store.close()
    daemon = EdgeDaemon(config)
    try:
        daemon.folder.scan()
        candidate = daemon.folder.next_candidate()
        shot.unlink()
        os.mkfifo(shot)
        try:
            assert _returns(lambda: daemon._intake.handle(candidate))
        finally:
            _unblock(shot)
    finally:
        daemon.store.close()


# 4. sidecars: a bounded number of lines at start, a new one still named


def test_many_sidecars_make_a_few_lines_and_a_new_one_is_named(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger=WATCHER)
    for n in range(40):
        (tmp_path / f"shot{n:03}.xml").write_text("<meta/>")
        (tmp_path / f"shot{n:03}.txt").write_text("meta")
    # (a review: these were counted with the sidecars; they are what an operator asks about)
    (tmp_path / "zlink.jpg").symlink_to(tmp_path / "shot000.xml")
    os.mkfifo(tmp_path / "zfifo.jpg")
    (tmp_path / "zsub").mkdir()
    folder = HotFolder(tmp_path)
    folder.scan()
    named = _events(caplog, "file_skipped", logging.INFO)
    assert len(named) == SKIPPED_NAMED_PER_SCAN + 3
    assert {Path(r.fields["path"]).name for r in named} >= {"zlink.jpg", "zfifo.jpg", "zsub"}
    (more,) = _events(caplog, "files_skipped")
    assert more.fields["count"] == 80 - SKIPPED_NAMED_PER_SCAN
    assert len(_events(caplog, "file_skipped", logging.DEBUG)) == more.fields["count"]
    assert folder.skipped_files() == 83
    caplog.clear()
    (tmp_path / "status.json").write_text("{}")
    folder.scan()
    (line,) = _events(caplog, "file_skipped")
    assert line.levelno == logging.INFO and line.fields["path"].endswith("status.json")
    assert not _events(caplog, "files_skipped")


# 5. --after keep: a rewrite in place under the kept file's very key


def _bmp(path: Path, level: int) -> bytes:
    Image.fromarray(np.full((48, 64), level, np.uint8)).save(path, "BMP")
    return path.read_bytes()


def test_a_kept_file_rewritten_under_its_key_is_compared_and_processed(
    tiny_model_dir, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    config = daemon_config(tiny_model_dir, tmp_path, after="keep", once=False, settle_s=0.3)
    first, second = _bmp(tmp_path / "a.bmp", 40), _bmp(tmp_path / "b.bmp", 200)
    assert len(first) == len(second) and first != second
    shot, taken = config.watch / "cam.bmp", 1_796_558_400 * 10**9  # 2026-12-06 12:00:00
    shot.write_bytes(first)
    os.utime(shot, ns=(taken, taken))
    daemon = EdgeDaemon(config)
    with running(daemon):
        wait_for(lambda: image_rows(config.db), 60, "the first shot's row")
        os.chmod(shot, 0o640)  # its ctime only: compared, the same bytes, no second row
        wait_for(lambda: _events(caplog, "already recorded"), 60, "the kept file compared")
        assert len(image_rows(config.db)) == 1
        with open(shot, "r+b") as handle:  # the second shot, in place: same inode
            handle.write(second)
        os.utime(shot, ns=(taken, taken))  # ... and the same whole-second time
        rows = wait_for(lambda: (r := image_rows(config.db))[1:] and r, 60, "a second row")
    assert [r["content_hash"] for r in rows] == [
        hashlib.sha256(data).hexdigest() for data in (first, second)
    ]
    (warning,) = _events(caplog, "same file key, other contents", logging.WARNING)
    assert warning.fields["image_id"] == rows[0]["id"]


def test_an_untouched_kept_file_is_not_handed_over_again(tmp_path):
    shot = tmp_path / "cam.png"
    _png(shot)
    folder = HotFolder(tmp_path, settle_s=0.0, full_scan_s=0.0)
    folder.scan()
    folder.ignore(folder.next_candidate())
    for _ in range(3):
        folder.scan()  # (full scans: every file stat'ed)
    assert not folder._tracked
    os.chmod(shot, 0o640)  # its ctime changed: handed over once more, to be compared
    folder.scan()
    candidate = folder.next_candidate()
    assert candidate is not None and candidate.recheck
    folder.ignore(candidate)
    folder.scan()
    assert not folder._tracked
