"""What a review of the hot folder found, each fixed and kept so:

1. Hot folders that overlap: a daemon with --recursive and another on one of its subfolders
   both took every image there (10 images, 12-17 results, moves racing). Now whichever starts
   second is refused, naming the other's folder and pid; a plain daemon on a folder and
   another on its subfolder stay legitimate. A hot folder removed and made again kept its
   daemon's lock on the removed folder, so a second daemon on the same path was let in: now
   the daemon locks the new folder, or stops when another holds it.
2. Entries never taken were never told of: a symbolic link to an image, a subfolder without
   --recursive, a symbolic link to a folder under --recursive, a FIFO. Each is now told once
   (`file_skipped`, with why) and counted in `splitdet_edge_skipped_files`.
3. A good image the daemon may not read (mode 0600, the camera's user) was quarantined as an
   unreadable image. It now waits in the folder, with a WARNING, and is taken once readable.
4. "quarantined" was logged before the move that then failed; a file rewritten without pause
   was taken silently or never, with nothing said while it changed.

Real files, real SQLite, real daemons (subprocesses, or in-process) with the tiny exported
model; the cloud address is a closed port and nothing is flagged.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import watcher
from splitdet.edge.daemon import EdgeDaemon
from splitdet.shared.cli import main
from splitdet.shared.folder_lock import DirectoryLock

from support import daemon_config, image_rows, wait_for

pytestmark = pytest.mark.timeout(90)


def png(level: int) -> bytes:
    """A small PNG of one grey level (distinct levels: distinct files)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def edge_run(model: Path, watch: Path, db: Path, *extra: str) -> list[str]:
    """`edge run` arguments: nothing flagged, a closed cloud port, short waits."""
    return ["edge", "run", "--model", str(model), "--watch", str(watch), "--db", str(db),
            "--cloud", "127.0.0.1:9", "--settle", "0", "--unreadable-grace", "0", "--poll",
            "0.05", "--threads", "1", "--threshold", "2", "--log-format", "text",
            *extra]  # fmt: skip


def cli(*args: str) -> int:
    return main([str(a) for a in args])


@contextlib.contextmanager
def running(args: list[str], tmp_path: Path, name: str, prefix: tuple[str, ...] = ()):
    """An `edge run` process (its stderr in tmp_path/NAME.log), yielded once it is running
    (its ready file written); SIGKILLed at the end unless it ended."""
    ready, log = tmp_path / f"{name}.ready.json", tmp_path / f"{name}.log"
    with open(log, "w") as err:
        process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "splitdet.shared.cli", *args,
             "--ready-file", str(ready)],
            stderr=err, text=True,
        )  # fmt: skip
    process.log = log  # type: ignore[attr-defined]
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, 60, f"{name} to start")
        assert process.poll() is None, log.read_text()
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def logged(process: subprocess.Popen) -> str:
    return process.log.read_text()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ 1a. folders in folders


def test_a_recursive_daemon_is_refused_over_a_subfolder_another_daemon_watches(
    tiny_model_dir, tmp_path, capsys
):
    """Before: both started, and both took every image of the subfolder."""
    top, line = tmp_path / "W", tmp_path / "W" / "line1" / "cam2"
    line.mkdir(parents=True)
    (line / "a.png").write_bytes(png(30))
    args = edge_run(tiny_model_dir, line, tmp_path / "line.sqlite",
                    "--quarantine", tmp_path / "q-line")  # fmt: skip
    with running(args, tmp_path, "line") as holder:
        capsys.readouterr()
        code = cli(*edge_run(tiny_model_dir, top, tmp_path / "top.sqlite", "--recursive",
                             "--once", "--quarantine", tmp_path / "q-top"))  # fmt: skip
        err = capsys.readouterr().err
    assert code == 2, err
    assert (
        f"--watch {top} --recursive: its subfolder {line} is the --watch of another "
        f"`splitdet edge run` (pid {holder.pid}), and both would take every file in it; "
        "one daemon per hot folder"
    ) in err, err
    assert "Traceback" not in err and not (tmp_path / "top.sqlite").exists()


def test_a_daemon_is_refused_below_a_recursive_one_but_not_below_a_plain_one(
    tiny_model_dir, tmp_path, capsys
):
    """Before: the second daemon started below the recursive one. A daemon without
    --recursive on the folder above takes only that folder's files: the one below is fine."""
    top, line = tmp_path / "W", tmp_path / "W" / "line1"
    line.mkdir(parents=True)
    (line / "a.png").write_bytes(png(40))
    below = edge_run(tiny_model_dir, line, tmp_path / "line.sqlite", "--once",
                     "--quarantine", tmp_path / "q-line")  # fmt: skip
    recursive = edge_run(tiny_model_dir, top, tmp_path / "top.sqlite", "--recursive",
                         "--quarantine", tmp_path / "q-top")  # fmt: skip
    with running(recursive, tmp_path, "recursive") as holder:
        capsys.readouterr()
        code = cli(*below)
        err = capsys.readouterr().err
    assert code == 2, err
    assert (
        f"--watch {line} lies in {top}, the --watch of another `splitdet edge run` "
        f"(pid {holder.pid}) that takes its subfolders too: both would take every file in it; "
        "one daemon per hot folder"
    ) in err, err
    assert "Traceback" not in err and not (tmp_path / "line.sqlite").exists()

    plain = edge_run(tiny_model_dir, top, tmp_path / "top2.sqlite",
                     "--quarantine", tmp_path / "q-top")  # fmt: skip
    with running(plain, tmp_path, "plain"):
        assert cli(*below) == 0
    assert [Path(r["path"]) for r in image_rows(tmp_path / "line.sqlite")] == [line / "a.png"]


@pytest.mark.parametrize("sub", ["marked", ".hidden"])
@pytest.mark.parametrize("recursive_first", [True, False], ids=["recursive-first", "plain-first"])
def test_a_daemon_in_a_folder_the_recursive_one_never_enters_is_let_in(
    tiny_model_dir, tmp_path, capsys, sub, recursive_first
):
    """A recursive daemon on W never enters W/marked (holding .splitdet-ignore, as the
    README says to keep it out) nor W/.hidden: a daemon there shares no file with it, and
    both ran before the overlap check (which refused the second of them, in either order).
    Each takes its own image; the recursive one's image in W/day1 is not refused."""
    top, line = tmp_path / "W", tmp_path / "W" / sub
    line.mkdir(parents=True)
    (top / "day1").mkdir()
    if sub == "marked":
        (line / ".splitdet-ignore").touch()
    (line / "a.png").write_bytes(png(40))
    (top / "day1" / "b.png").write_bytes(png(50))
    plain = edge_run(tiny_model_dir, line, tmp_path / "line.sqlite",
                     "--quarantine", tmp_path / "q-line")  # fmt: skip
    recursive = edge_run(tiny_model_dir, top, tmp_path / "top.sqlite", "--recursive",
                         "--quarantine", tmp_path / "q-top")  # fmt: skip
    first, second = (recursive, plain) if recursive_first else (plain, recursive)
    with running(first, tmp_path, "first") as holder:
        capsys.readouterr()
        code = cli(*second, "--once")
        err = capsys.readouterr().err
        assert code == 0, err
        first_db = tmp_path / ("top.sqlite" if recursive_first else "line.sqlite")
        wait_for(lambda: image_rows(first_db), 30, "the first daemon's image")
        assert holder.poll() is None, logged(holder)
    assert "in use" not in err and "lies in" not in err, err
    assert [Path(r["path"]) for r in image_rows(tmp_path / "line.sqlite")] == [line / "a.png"]
    assert [Path(r["path"]) for r in image_rows(tmp_path / "top.sqlite")] == [
        top / "day1" / "b.png"
    ]


# --------------------------------------------------------------- 1b. a folder made again


def test_a_hot_folder_made_again_is_locked_again_or_the_daemon_stops(
    tiny_model_dir, tmp_path, capsys
):
    """Before: the daemon kept its lock on the removed folder, so a second daemon on the same
    path started and both took every image. Now the first locks the new folder (a second
    is refused), and stops when another holds the new one before it could."""
    watch = tmp_path / "hot"
    watch.mkdir()
    args = edge_run(tiny_model_dir, watch, tmp_path / "first.sqlite",
                    "--quarantine", tmp_path / "q")  # fmt: skip
    with running(args, tmp_path, "first") as first:
        shutil.rmtree(watch)
        watch.mkdir()
        wait_for(lambda: "hot folder locked anew" in logged(first), 20, "the new folder locked")
        capsys.readouterr()
        code = cli(*edge_run(tiny_model_dir, watch, tmp_path / "second.sqlite", "--once",
                             "--quarantine", tmp_path / "q2"))  # fmt: skip
        err = capsys.readouterr().err
        assert code == 2, err
        assert (
            f"--watch {watch} is in use by another `splitdet edge run` (pid {first.pid})"
        ) in err, err

        # made again, and held by another before this daemon looked (here: this test)
        shutil.rmtree(watch)
        made = tmp_path / "made"
        made.mkdir()
        other = DirectoryLock(made, "--watch", "`splitdet edge run`", "one daemon per hot folder")
        made.rename(watch)
        try:
            assert first.wait(20) == 2, logged(first)
        finally:
            other.release()
        err = logged(first)
    assert (
        f"error: --watch {watch} was removed and made again while this "
        f"daemon ran; stopped, as --watch {watch} is in use by another `splitdet edge run` "
        f"(pid {os.getpid()}); one daemon per hot folder"
    ) in err, err
    assert "Traceback" not in err


# ------------------------------------------------------------- 2. entries never taken, told


def run_a_while(config, caplog) -> tuple[EdgeDaemon, list[logging.LogRecord]]:
    """Run the daemon (not in batch mode) until it has processed one image and scanned a few
    more times; its `file_skipped` records."""
    daemon = EdgeDaemon(replace(config, once=False))
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        thread.start()
        try:
            wait_for(lambda: daemon.processed >= 1 or not thread.is_alive(), 30, "an image")
            time.sleep(0.4)  # several more scans: each entry is told once, not per scan
        finally:
            daemon.request_stop()
            thread.join(30)
    assert status == [0]
    told = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "file_skipped"]
    return daemon, told


def test_links_subfolders_and_fifos_are_told_once_and_counted(tiny_model_dir, tmp_path, caplog):
    """Before: a symbolic link to an image, a subfolder's image without --recursive and a FIFO
    were passed over in silence: no line, no count, no row."""
    config = daemon_config(tiny_model_dir, tmp_path, settle_s=0.0)
    watch = config.watch
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(png(50))
    (watch / "good.png").write_bytes(png(60))
    (watch / "linked.png").symlink_to(elsewhere)
    (watch / "sub").mkdir()
    (watch / "sub" / "c.png").write_bytes(png(70))
    (watch / "notes.txt").write_text("x\n")
    os.mkfifo(watch / "pipe.png")
    daemon, told = run_a_while(config, caplog)
    why = {Path(r.fields["path"]).name: r.fields.get("why") for r in told}
    assert why == {"linked.png": "link", "sub": "subfolder", "notes.txt": "extension",
                   "pipe.png": "special"}, why  # fmt: skip
    assert len(told) == len(why)  # once each, though scanned many times
    assert daemon.folder.skipped_files() == 4  # (splitdet_edge_skipped_files)
    text = {Path(r.fields["path"]).name: r.getMessage() for r in told}
    assert "symbolic link" in text["linked.png"] and "not followed" in text["linked.png"]
    assert "--recursive" in text["sub"]
    assert [Path(r["path"]).name for r in image_rows(config.db)] == ["good.png"]
    assert (watch / "linked.png").is_symlink() and elsewhere.read_bytes() == png(50)
    assert (watch / "sub" / "c.png").is_file()


def test_a_linked_folder_under_recursive_is_told_once(tiny_model_dir, tmp_path, caplog):
    """Before: --recursive passed over a symbolic link to a folder in silence. A real
    subfolder is entered; the daemon's own quarantine inside --watch is not told of."""
    config = daemon_config(tiny_model_dir, tmp_path, settle_s=0.0, recursive=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "b.png").write_bytes(png(80))
    (config.watch / "day1").mkdir()
    (config.watch / "day1" / "a.png").write_bytes(png(90))
    (config.watch / "linked-day").symlink_to(outside)
    daemon, told = run_a_while(config, caplog)
    assert [(Path(r.fields["path"]).name, r.fields["why"]) for r in told] == [
        ("linked-day", "folder_link")
    ]
    assert "not followed" in told[0].getMessage()
    assert daemon.folder.skipped_files() == 1
    assert [Path(r["path"]).name for r in image_rows(config.db)] == ["a.png"]


# ------------------------------------------------------------ 3. an image it may not read


def without_read_rights() -> list[str]:
    """The command prefix of a daemon that cannot read a file of mode 000: none for a user
    (its own file), root without the capabilities that pass over permissions."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("root, and no setpriv to drop CAP_DAC_OVERRIDE with")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_an_image_it_may_not_read_waits_and_is_taken_once_readable(tiny_model_dir, tmp_path):
    """Before: quarantined after the grace as "cannot read (Permission denied)", with a
    permanent error row. Now a WARNING (once), the file waits in the folder, a batch run
    ends leaving it there, and a running daemon takes it once its mode is fixed."""
    prefix = without_read_rights()
    watch, db, quarantine = tmp_path / "hot", tmp_path / "edge.sqlite", tmp_path / "q"
    watch.mkdir()
    (watch / "good.png").write_bytes(png(20))
    closed = watch / "closed.png"
    closed.write_bytes(png(25))
    closed.chmod(0o000)
    batch = subprocess.run(
        [*prefix, sys.executable, "-m", "splitdet.shared.cli",
         *edge_run(tiny_model_dir, watch, db, "--once", "--drain-timeout", "0",
                   "--quarantine", str(quarantine))],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert batch.returncode == 0, batch.stderr
    warned = [line for line in batch.stderr.splitlines() if "event=file_unreadable" in line]
    assert len(warned) == 1 and str(closed) in warned[0], batch.stderr
    assert "Permission denied" in warned[0] and "not quarantined" in warned[0]
    assert "quarantined" not in batch.stderr.replace("not quarantined", "")
    assert [Path(r["path"]).name for r in image_rows(db)] == ["good.png"]
    assert closed.exists() and not list(quarantine.iterdir())

    args = edge_run(tiny_model_dir, watch, db, "--quarantine", quarantine)
    with running([str(a) for a in args], tmp_path, "daemon", tuple(prefix)) as daemon:
        wait_for(lambda: "event=file_unreadable" in logged(daemon), 20, "the warning")
        time.sleep(0.5)  # polled many times meanwhile: still one warning
        closed.chmod(0o644)
        wait_for(lambda: len(image_rows(db)) == 2, 20, "the image taken once readable")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0
        err = logged(daemon)
    assert err.count("event=file_unreadable") == 1, err
    assert "can be read now" in err and "Traceback" not in err
    row = image_rows(db)[1]
    assert Path(row["path"]).name == "closed.png" and row["verdict"] == "ok", row


# ------------------------------------------------------------------------ 4. small ones


def test_quarantined_is_logged_only_once_the_file_is_there(tiny_model_dir, tmp_path, caplog):
    """Before: "quarantined ... to=Q/x" was logged, then "cannot move file": the first line
    stated a move that did not happen. The line now follows the move it states."""
    quarantine = tmp_path / "quarantine"
    config = daemon_config(tiny_model_dir, tmp_path, quarantine_dir=quarantine, settle_s=0.5)
    (config.watch / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    daemon = EdgeDaemon(config)
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    with caplog.at_level(logging.WARNING, logger="splitdet.edge"):
        thread.start()
        # (its folders made and checked: the services start after, the sweeper last)
        wait_for(lambda: daemon._sweeper is not None, 10, "the daemon started", interval=0.005)
        quarantine.rmdir()
        quarantine.write_bytes(b"")  # the quarantine unusable (as a read-only one)
        thread.join(20)
    assert status == [0]
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert "cannot move file" in events and "quarantined" not in events, events
    assert "to be quarantined" in events, events
    assert events.index("cannot move file") < events.index("to be quarantined")

    quarantine.unlink()  # fixed: the restart moves the file
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        assert EdgeDaemon(config).run() == 0
    assert not (config.watch / "broken.png").exists()


def test_a_file_that_keeps_changing_is_told_of(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """Before: a file rewritten without pause for longer than --settle gave no line at all
    until it stopped changing. Now an INFO once (`file_still_changing`), then it is taken as
    usual once it settles."""
    monkeypatch.setattr(watcher, "STILL_CHANGING_SETTLES", 2)
    monkeypatch.setattr(watcher, "STILL_CHANGING_MIN_S", 0.5)
    config = daemon_config(tiny_model_dir, tmp_path, settle_s=0.5, once=False)
    path = config.watch / "busy.png"
    daemon = EdgeDaemon(config)
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        thread.start()
        end = time.monotonic() + 1.8
        level = 0
        while time.monotonic() < end:  # rewritten every 50 ms, never still for 0.5 s
            path.write_bytes(png(level % 200))
            level += 1
            time.sleep(0.05)
        wait_for(lambda: daemon.processed >= 1, 20, "the file taken once it settled")
        daemon.request_stop()
        thread.join(20)
    assert status == [0]
    told = [r for r in caplog.records
            if getattr(r, "fields", {}).get("event") == "file_still_changing"]  # fmt: skip
    assert len(told) == 1 and told[0].levelno == logging.INFO, caplog.text
    assert told[0].fields["path"] == str(path) and "--settle 0.5" in told[0].getMessage()
    [row] = image_rows(config.db)
    assert row["content_hash"] is not None and Path(row["path"]) == path


def test_a_file_past_the_byte_limit_is_told_in_the_words_predict_and_data_check_use(
    tiny_model_dir, tmp_path
):
    """The daemon said "P: 268435457 bytes is larger than 268435456" where predict said
    "P is 256.0 MiB, over the 256 MiB limit" (one limit, three wordings). Now one wording,
    and the file (sparse: no disk used) is refused whole, never read into memory."""
    from splitdet.edge.preprocess import MAX_FILE_BYTES, ImageError, read_image_file

    config = daemon_config(tiny_model_dir, tmp_path, quarantine_dir=tmp_path / "q")
    big = config.watch / "huge.png"
    with open(big, "wb") as handle:
        handle.truncate(MAX_FILE_BYTES + 1)
    assert EdgeDaemon(config).run() == 0
    [row] = image_rows(config.db)
    with pytest.raises(ImageError) as refused:  # the file kept whole, in the quarantine
        read_image_file(Path(row["stored_path"]))
    expected = f"is {MAX_FILE_BYTES + 1} bytes, over the 256 MiB ({MAX_FILE_BYTES} bytes) limit"
    assert row["verdict"] == "error" and row["reason"] == f"{big} {expected}", row
    assert str(refused.value).endswith(expected), refused.value


def test_the_ready_file_goes_when_the_daemon_stops_and_a_dead_ones_at_start(
    tiny_model_dir, tmp_path
):
    """`--ready-file` stayed after the daemon stopped (and after a kill -9), naming a dead pid:
    a supervisor read a stopped daemon as ready. Now a stop removes it, and a start removes a
    dead process's but leaves a live one's (two daemons given one file) until it is ready."""
    watch, db, ready = tmp_path / "hot", tmp_path / "edge.sqlite", tmp_path / "ready.json"
    watch.mkdir()
    (watch / "a.png").write_bytes(png(30))
    for pid in (999_999_999, os.getpid()):  # a kill -9's (dead), this test's (alive)
        ready.write_text(json.dumps({"pid": pid}) + "\n")
        batch = subprocess.run(
            [sys.executable, "-m", "splitdet.shared.cli",
             *edge_run(tiny_model_dir, watch, db, "--once", "--drain-timeout", "0",
                       "--ready-file", str(ready))],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert batch.returncode == 0, batch.stderr
        assert not ready.exists(), f"left after the stop (it named {pid} at start)"
        assert ("still running" in batch.stderr) == (pid == os.getpid()), batch.stderr


def test_a_file_denied_then_failing_otherwise_is_not_said_readable(tmp_path, monkeypatch, caplog):
    """A file kept back for its permissions whose next read failed for another reason (EIO on
    a failing disk) was logged "can be read now" (event file_readable); it was not read."""
    import errno

    from splitdet.edge import watcher_reports

    (tmp_path / "a.png").write_bytes(png(20))
    folder = watcher.HotFolder(tmp_path, settle_s=0, unreadable_grace_s=0)
    failures = iter([PermissionError(errno.EACCES, "Permission denied"),
                     OSError(errno.EIO, "Input/output error")])  # fmt: skip

    def failing_read(path: Path) -> bytes:
        raise next(failures)

    monkeypatch.setattr(watcher, "read_regular_file", failing_read)
    monkeypatch.setattr(watcher_reports, "DENIED_RETRY_S", 0)  # tried again at once
    folder.scan()
    assert folder.read(folder.next_candidate()) is None  # denied: waits
    assert folder.pending() == 0
    with caplog.at_level(logging.INFO, logger="splitdet.edge.watcher"):
        ready = folder.read(folder.next_candidate())
    assert ready is not None and "cannot read (Input/output error)" in ready.error
    assert "can be read now" not in caplog.text
    assert folder.pending() == 1  # no longer counted as kept back for its permissions
