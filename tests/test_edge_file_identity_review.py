"""The edge daemon moves or deletes only the file it processed, and a file that arrives under a
recorded file_key with other contents is a new image (a review of the daemon as a line engineer
runs it: `latest.png` renamed over while the previous one was processed was archived under the
previous one's verdict, or deleted unread; an uncompressed shot with a whole-second time and a
reused inode was taken as "already recorded" and deleted unread). Also: an outbox cap below one
request's size let nothing through, for good."""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.file_identity import file_key
from splitdet.edge.store import Arrival, OutboxCap, OutboxFull, ResultStore

from support import daemon_config


def _shot(path: Path, level: int) -> bytes:
    """A uniform grey PNG shot at `path` (written under a temporary name, then renamed in, as
    the README asks of cameras); returns its bytes."""
    Image.fromarray(np.full((64, 80), level, np.uint8)).save(path.with_suffix(".tmp"), "PNG")
    os.replace(path.with_suffix(".tmp"), path)
    return path.read_bytes()


def _rows(db: Path) -> list[dict]:
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM images ORDER BY id")]


@pytest.mark.parametrize("after", ["archive", "delete"])
def test_a_file_renamed_over_one_being_processed_is_left_and_taken_next(
    tiny_model_dir, tmp_path, after
):
    config = daemon_config(tiny_model_dir, tmp_path, after=after, archive_dir=tmp_path / "archive")
    latest = config.watch / "latest.png"
    first = _shot(latest, 40)
    daemon = EdgeDaemon(config)
    process = daemon.pipeline.process_array
    second = []

    def camera_writes_again_meanwhile(image):
        if not second:
            second.append(_shot(latest, 200))
        return process(image)

    daemon.pipeline.process_array = camera_writes_again_meanwhile
    assert daemon.run() == 0
    rows = _rows(config.db)
    digests = [hashlib.sha256(data).hexdigest() for data in (first, second[0])]
    assert [r["content_hash"] for r in rows] == digests  # both shots, each once
    assert rows[0]["stored_path"] is None  # its file was gone: nothing archived under its row
    assert not latest.exists()
    if after == "archive":
        (kept,) = (tmp_path / "archive").iterdir()
        assert Path(rows[1]["stored_path"]) == kept and kept.read_bytes() == second[0]


def test_other_contents_under_a_recorded_file_key_are_a_new_image(tiny_model_dir, tmp_path):
    config = daemon_config(tiny_model_dir, tmp_path, after="delete")
    shot = config.watch / "latest.png"
    data = _shot(shot, 90)
    # an earlier shot recorded under the very key this one has (name, size, time, inode)
    key = file_key(shot, shot.stat())
    store = ResultStore(config.db, OutboxCap())
    earlier = hashlib.sha256(b"an earlier shot").hexdigest()
    store.record_ok(Arrival(str(shot), key, earlier, len(data), time.time()), 0.1, "f" * 64, {})
    store.close()
    assert EdgeDaemon(config).run() == 0
    rows = _rows(config.db)
    assert [r["content_hash"] for r in rows] == [earlier, hashlib.sha256(data).hexdigest()]
    assert rows[0]["file_key"] == f"{key}|superseded{rows[0]['id']}" and rows[1]["file_key"] == key
    assert rows[1]["verdict"] == "ok" and not shot.exists()


def test_the_same_contents_under_a_recorded_key_only_finish_the_move(tiny_model_dir, tmp_path):
    """A crash between commit and move: the file found again is the one recorded."""
    config = daemon_config(tiny_model_dir, tmp_path, after="delete")
    shot = config.watch / "a.png"
    data = _shot(shot, 90)
    store = ResultStore(config.db, OutboxCap())
    arrival = Arrival(str(shot), file_key(shot, shot.stat()),
                      hashlib.sha256(data).hexdigest(), len(data), time.time())  # fmt: skip
    store.record_ok(arrival, 0.1, "f" * 64, {})
    store.close()
    assert EdgeDaemon(config).run() == 0
    assert len(_rows(config.db)) == 1 and not shot.exists()


def test_an_empty_outbox_takes_one_request_larger_than_its_byte_cap(tmp_path):
    store = ResultStore(tmp_path / "e.sqlite", OutboxCap(max_items=10, max_bytes=50))
    arrivals = [Arrival(f"/hot/{n}.png", f"{n}.png|1|{n}|{n}", f"{n:064x}", 1, time.time())
                for n in range(2)]  # fmt: skip
    assert store.outbox_has_room(89)
    _, _, verdict = store.record_pending(arrivals[0], 0.9, "r0", b"x" * 89, "f" * 64, {})
    assert verdict == "pending"
    assert not store.outbox_has_room(1)
    with pytest.raises(OutboxFull):
        store.record_pending(arrivals[1], 0.9, "r1", b"x", "f" * 64, {})
    store.close()


def test_a_file_replaced_before_its_quarantine_is_not_said_quarantined(
    tiny_model_dir, tmp_path, caplog
):
    folders = {"archive_dir": tmp_path / "archive", "quarantine_dir": tmp_path / "q"}
    config = daemon_config(tiny_model_dir, tmp_path, after="archive", **folders)
    latest = config.watch / "latest.png"
    _shot(latest, 40)
    daemon = EdgeDaemon(config)
    process, calls = daemon.pipeline.process_array, []

    def replaced_then_failing(image):
        calls.append(1)
        if len(calls) == 1:
            _shot(latest, 200)
            raise RuntimeError("the model could not process it")
        return process(image)

    daemon.pipeline.process_array = replaced_then_failing
    with caplog.at_level(logging.INFO, logger="splitdet"):
        assert daemon.run() == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("file replaced before its move" in m for m in messages), messages
    assert not any(m.startswith("quarantined") for m in messages), messages
    assert not (tmp_path / "q").exists() or list((tmp_path / "q").iterdir()) == []
    rows = _rows(config.db)
    assert [r["verdict"] for r in rows] == ["error", "ok"] and rows[0]["stored_path"] is None


def test_an_answer_is_drawn_only_on_the_image_it_answers(tmp_path, caplog):
    """--save-annotated drew the previous shot's boxes on the camera's next shot, found under
    the same name once the previous one was replaced (or deleted, --after delete)."""
    from splitdet.edge.client import CloudDetections
    from splitdet.edge.sender import annotate_hook
    from splitdet.edge.store import OutboxItem

    shot = tmp_path / "latest.png"
    first = _shot(shot, 40)
    digest = hashlib.sha256(first).hexdigest()
    boxes, scores = np.array([[4.0, 4.0, 60.0, 40.0]], np.float32), np.array([0.9], np.float32)
    answer = CloudDetections("r1", "f" * 64, boxes, scores, np.array([1]), ("scratch",), {}, False)
    item = OutboxItem(1, "r1", b"", 0.0, 0, None, str(shot), "f" * 64, digest)
    saved = tmp_path / "annotated"
    saved.mkdir()
    hook = annotate_hook(saved, pixel_bits=8)
    hook(item, answer)
    assert [p.name for p in saved.iterdir()] == ["00000001_latest.jpg"]
    _shot(shot, 200)  # the next shot, under the same name
    (saved / "00000001_latest.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="splitdet"):
        hook(item, answer)
    assert list(saved.iterdir()) == []
    assert any("no file left to annotate for image 1" in r.getMessage() for r in caplog.records)


def test_a_recorded_file_that_cannot_be_read_is_finished_by_its_key(tiny_model_dir):
    """`edge run --once` hung, silent, on a row's file still in --watch that it could stat but
    not read (the content check failed, the file was tried again every poll)."""
    import subprocess
    import sys

    from support import nobody_scratch

    with nobody_scratch(tiny_model_dir) as (prefix, root, model):
        watch = root / "hot"
        watch.mkdir(mode=0o777)
        watch.chmod(0o777)
        shot = watch / "a.png"
        data = _shot(shot, 90)
        db = root / "edge.sqlite"
        store = ResultStore(db, OutboxCap())
        store.record_ok(Arrival(str(shot), file_key(shot, shot.stat()),
                                hashlib.sha256(data).hexdigest(), len(data), time.time()),
                        0.1, "f" * 64, {})  # fmt: skip
        store.close()
        for path in (db, *root.glob("edge.sqlite*")):
            path.chmod(0o666)
        shot.chmod(0)  # its owner (root) reads it; the daemon's user cannot
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "splitdet.shared.cli", "edge", "run",
             "--model", str(model), "--watch", str(watch), "--db", str(db),
             "--cloud", "127.0.0.1:9", "--once", "--after", "delete", "--drain-timeout", "0",
             "--settle", "0", "--threads", "1", "--log-format", "text"],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "already recorded" in result.stderr and not shot.exists(), result.stderr
