"""Review findings on the edge daemon in a hostile environment:

1. a healthy store on a full disk was called "not a usable SQLite database (disk I/O error)"
   (an operator replacing it loses the results still to deliver);
2. `--save-annotated` on a full disk left a truncated JPEG under its final name and logged a
   traceback per image without an event name or the folder;
3. `edge run --once` against a cloud that accepts but never answers overran --drain-timeout
   by the call's own deadline and never said that delivery gave up.

Real full disks: a small tmpfs mounted for the test (skipped where mounting is not allowed);
a real TCP listener that never answers; real SQLite, the real daemon in-process with the
stand-in pipeline of test_edge_daemon.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_edge_daemon import BrightIsDefective

from splitdet.edge.client import CloudDetections
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.sender import Sender, annotate_hook
from splitdet.edge.store import Arrival, OutboxItem, ResultStore
from splitdet.edge.store_file import StoreError
from splitdet.shared.cli import main
from splitdet.shared.wire import detection_pb2 as pb

from support import daemon_config, image_rows

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------ helpers


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the file system holding `folder` with one file, then give `leave` bytes back."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(chunk)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def events(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == name]


def png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------- 1. a store on a full disk


def test_a_healthy_store_on_a_full_disk_is_not_called_unusable(small_disk, tmp_path, capsys):
    """Before: `--db e.sqlite: not a usable SQLite database (disk I/O error)` from `edge run`
    and `edge status` alike, for a store that was fine once space was freed."""
    db = small_disk / "e.sqlite"
    with contextlib.closing(ResultStore(db)) as store:
        store.record_ok(Arrival(str(small_disk / "a.png"), "a.png|1|1|1", "0" * 64, 1, 1.0),
                        0.1, "f" * 64, {})  # fmt: skip
    assert not Path(f"{db}-shm").exists()  # stopped cleanly: opening it makes the -shm again
    filler = fill(small_disk)

    with pytest.raises(StoreError) as caught:  # `edge run`'s open
        ResultStore(db)
    message = str(caught.value)
    assert "not a usable" not in message
    assert "the file system holding it is full" in message and "bytes free" in message
    assert "free space there and start again" in message
    assert "do not delete or replace it" in message

    # `edge run` itself: its lock file beside the store cannot take its pid either (before: a
    # bare `[Errno 28] No space left on device`, naming nothing)
    config = daemon_config(tmp_path, tmp_path, db=db)
    with pytest.raises(StoreError, match="the file system holding it is full") as caught:
        EdgeDaemon(config, pipeline=BrightIsDefective())
    assert "do not delete or replace it" in str(caught.value)

    assert main(["edge", "status", "--db", str(db)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--db {db}: cannot open it" in last and "is full" in last, last
    assert "not a usable" not in last and "Traceback" not in last

    filler.unlink()  # space again: the same file is a store, its result there
    assert main(["edge", "status", "--db", str(db)]) == 0
    assert "ok 1" in capsys.readouterr().out


def test_other_open_failures_name_the_disk_not_the_file(small_disk, tmp_path):
    """Before: a store on a file system remounted read-only was `not a usable SQLite database
    (unable to open database file)`. A file that is not a database still is one."""
    db = small_disk / "e.sqlite"
    ResultStore(db).close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=20)
    with pytest.raises(StoreError) as caught:
        ResultStore(db)
    message = str(caught.value)
    assert "not a usable" not in message and "cannot open it" in message
    assert "mounted read-only" in message and "do not delete or replace it" in message
    with pytest.raises(StoreError) as caught:  # a new one: no database to keep there
        ResultStore(small_disk / "new.sqlite")
    message = str(caught.value)
    assert "mounted read-only" in message and "do not delete" not in message, message

    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database, whatever its name says" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        ResultStore(garbage)


# --------------------------------------------------------- 2. --save-annotated, disk full


def _answered(image_id: int, source: Path) -> tuple[OutboxItem, CloudDetections]:
    item = OutboxItem(image_id, f"r{image_id}", b"", 0.0, 0, str(source), str(source), "f" * 64)
    answer = CloudDetections(
        f"r{image_id}", "f" * 64, np.array([[4.0, 4.0, 60.0, 60.0]], np.float32),
        np.array([0.9], np.float32), np.array([1]), ("scratch",), {}, False,
    )  # fmt: skip
    return item, answer


def test_annotated_images_on_a_full_disk_are_whole_or_absent_and_logged_once(
    small_disk, tmp_path, caplog
):
    """Before: a truncated JPEG under its final name, then one `after-answer hook failed`
    traceback per image (no event, no folder)."""
    source = tmp_path / "defect.png"  # noise: a JPEG of it is far larger than the room left
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(source)
    save_dir = small_disk / "annotated"
    save_dir.mkdir()
    filler = fill(small_disk, leave=8192)
    hook = annotate_hook(save_dir, pixel_bits=8)
    with caplog.at_level(logging.INFO, logger="splitdet"):
        for image_id in (1, 2, 3):
            hook(*_answered(image_id, source))  # never raises: the result is stored anyway
        assert list(save_dir.iterdir()) == []  # no partial image, no temporary file
        [line] = events(caplog, "annotate_failed")  # one line for the three
        assert line.levelno == logging.WARNING and line.exc_info is None
        assert line.fields["folder"] == str(save_dir)
        assert line.fields["reason"] == "no space left on device"
        assert str(save_dir) in line.getMessage() and "Errno" not in line.getMessage()

        filler.unlink()
        hook(*_answered(4, source))
    [written] = list(save_dir.iterdir())
    assert written.name == f"00000004_{source.stem}.jpg"
    with Image.open(written) as image:
        image.load()  # whole
        assert image.format == "JPEG"
    [resumed] = events(caplog, "annotate_resumed")
    assert resumed.fields["failures"] == 3


def test_a_failing_after_answer_step_is_one_warning_with_an_event(tmp_path, caplog):
    """Before: `log.exception("after-answer hook failed for %s")`: a traceback, no event."""

    class Answering:
        def send_request(self, request, timeout=None):
            return _answered(1, tmp_path / "x.png")[1]

        def close(self) -> None:
            pass

    def broken(item, answer):
        raise RuntimeError("the annotation step broke")

    with contextlib.closing(ResultStore(tmp_path / "edge.sqlite")) as store:
        payload = pb.DetectRequest(request_id="r1").SerializeToString()
        store.record_pending(Arrival("a.png", "a.png|1|1|1", "0" * 64, 1, 1.0), 0.9, "r1",
                             payload, "f" * 64, {})  # fmt: skip
        sender = Sender(store, Answering, on_answer=broken)
        with caplog.at_level(logging.INFO, logger="splitdet"):
            sender.send(store.next_due(max_wait_s=1.0))
        assert [r["verdict"] for r in image_rows(store.path)] == ["defect"]
    [line] = events(caplog, "answer_hook_failed")
    assert line.levelno == logging.WARNING and line.exc_info is None
    assert "RuntimeError: the annotation step broke" in line.getMessage()
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]


# --------------------------------------------------------- 3. --once, a cloud that never answers


@pytest.fixture
def silent_cloud():
    """host:port of a TCP listener that accepts connections and never answers (a hung cloud,
    or a proxy in front of one)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    done.set()
    thread.join(5)
    for conn in [*accepted, server]:
        conn.close()


def test_once_ends_at_the_drain_timeout_and_says_what_is_left(tmp_path, silent_cloud, caplog):
    """Before: 1 s of --drain-timeout took about 8 s (the call in flight joined for 5 s, the
    cloud probe for 2 s), and the only closing line was `stopped ... outbox_depth=3`."""
    drain = 1.0
    config = daemon_config(tmp_path, tmp_path, cloud=silent_cloud, drain_timeout_s=drain,
                           retry_initial_s=0.1, retry_max_s=0.5)  # fmt: skip
    for i in range(3):  # bright: flagged, sent to the cloud
        (config.watch / f"{i}.png").write_bytes(png(250 - i))
        time.sleep(0.01)
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    with caplog.at_level(logging.INFO, logger="splitdet"):
        start = time.monotonic()
        assert daemon.run() == 1
        took = time.monotonic() - start
    # (before: about 8 s; the margin is for a loaded machine, not for a call joined)
    assert took < drain + 4.0, f"the run took {took:.1f} s for --drain-timeout {drain:g}"
    [line] = events(caplog, "drain_timeout")
    assert line.levelno == logging.WARNING
    assert line.fields["outbox_depth"] == 3 and line.fields["call_cancelled"] is True
    assert "3 request(s) left in the outbox" in line.getMessage()
    assert "next run delivers them" in line.getMessage()
    # the cancelled call is neither an attempt nor a refusal: all three wait, due now
    assert [(r["verdict"], r["attempts"]) for r in image_rows(config.db)] == [("pending", 0)] * 3
    assert not events(caplog, "dead_letter") and not events(caplog, "send_retry")
    records = [r.getMessage() for r in caplog.records if r.name.startswith("splitdet")]
    assert records.index(line.getMessage()) < len(records) - 1  # then `stopped`
