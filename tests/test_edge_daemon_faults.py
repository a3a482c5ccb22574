"""The edge daemon against the faults a field install meets: a file name that is not UTF-8
(a Latin-1 share), names too long for the archive's ID_ prefix, a quarantine that cannot be
written, a name already taken in a shared archive, a second daemon on one database, a wall
clock that steps back, and a stopped store read by another user.

Real files, real SQLite, the real daemon (in-process, or the CLI entry point) with the tiny
exported model; the cloud address is a closed port, so flagged images stay pending.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge.collect import collect_results
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.file_identity import file_path, path_text
from splitdet.edge.file_moves import REASON_SUFFIX, STORED_NAME_MAX
from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_file import StoreInUse, open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.edge.watcher import file_key
from splitdet.shared.cli import main

from support import as_nobody, daemon_config, image_rows

pytestmark = pytest.mark.timeout(60)

#: Flags everything (p(defect) >= 0).
EVERYTHING = 0.0
CORRUPT = b"\x89PNG\r\n\x1a\n not really a png"


def png(level: int) -> bytes:
    """A small PNG of one grey level (distinct levels: distinct files and request ids)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def latin1(name: str) -> str:
    """`name` as a Latin-1 share delivers it: its bytes, not valid UTF-8, as Python sees them."""
    return os.fsdecode(name.encode("latin-1"))


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def prune_every_final_result(db: Path) -> None:
    """What `edge prune --older-than 0s` did before a retention under a minute was refused."""
    with contextlib.closing(ResultStore(db)) as store:
        store.prune(time.time())


# ------------------------------------------------------------------------ 1. names not UTF-8


def test_a_name_that_is_not_utf8_is_processed_and_every_command_reads_it(
    tiny_model_dir, tmp_path, capsys
):
    """Before: `UnicodeEncodeError: surrogates not allowed` from the store, on every restart."""
    config = daemon_config(tiny_model_dir, tmp_path, after="archive")
    good, bad = latin1("Prüfung.png"), latin1("kaputt_ü.png")
    (config.watch / good).write_bytes(png(40))
    (config.watch / bad).write_bytes(CORRUPT)
    assert EdgeDaemon(config).run() == 0
    assert EdgeDaemon(config).run() == 0  # a restart finds nothing left to do
    assert sorted(os.listdir(config.watch)) == ["archive", "quarantine"]
    ok, quarantined = image_rows(config.db)
    assert ok["verdict"] == "ok" and ok["path"].endswith("/Pr\\xfcfung.png")  # exact bytes
    assert quarantined["error_kind"] == "quarantine" and "kaputt_\\xfc" in quarantined["reason"]
    for row, data in ((ok, png(40)), (quarantined, CORRUPT)):
        stored = Path(row["stored_path"])  # valid UTF-8, the file really there
        assert stored.read_bytes() == data and "\ufffd" in stored.name
    reason_file = Path(quarantined["stored_path"] + REASON_SUFFIX)
    assert "kaputt_\\xfc" in reason_file.read_text("utf-8")

    # flagged: its request names the file (a protobuf string must be UTF-8 too)
    (config.watch / latin1("Bild_ä.png")).write_bytes(png(90))
    assert EdgeDaemon(replace(config, threshold=EVERYTHING)).run() == 1  # pending: no cloud
    assert image_rows(config.db)[-1]["verdict"] == "pending"

    capsys.readouterr()
    assert cli("edge", "status", "--db", config.db, "--json") == 0
    assert json.loads(capsys.readouterr().out)["verdicts"]["pending"] == 1
    assert cli("edge", "results", "--db", config.db, "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert Path(listed[0]["path"]).name == "Pr\\xfcfung.png"
    with contextlib.closing(open_readonly(config.db)) as db:
        summary = collect_results(db, tmp_path / "review")
    assert len(summary.collected) == 1 and not summary.missing


@pytest.mark.parametrize(
    "name", [b"plain\xff.png", b"lit\\x41.png", b"both\\x41\xff.png", b"back\\\xfc.png"]
)
def test_a_stored_name_reads_back_as_the_file(tmp_path, name):
    """Bad bytes become \\xNN; a name holding a literal backslash too must still read back
    (its own backslashes are escaped when it has bad bytes)."""
    path = os.fsdecode(bytes(tmp_path) + b"/" + name)
    Path(path).write_bytes(b"x")
    stored = path_text(path)
    stored.encode("utf-8")  # what SQLite takes
    found = stored if os.path.exists(stored) else file_path(stored)
    assert os.fsencode(found) == os.fsencode(path)


def test_a_kept_file_whose_name_is_not_utf8_is_recognised_and_never_pruned(
    tiny_model_dir, tmp_path
):
    """--after keep: the row's path is the escaped name; the daemon and prune still match it
    with the file (prune would otherwise delete the row and the file be processed again)."""
    config = daemon_config(tiny_model_dir, tmp_path, after="keep")
    name = latin1("Übung.png")
    (config.watch / name).write_bytes(png(50))
    assert EdgeDaemon(config).run() == 0
    assert EdgeDaemon(config).run() == 0
    [row] = image_rows(config.db)
    assert row["stored_path"] == row["path"] and (config.watch / name).is_file()
    prune_every_final_result(config.db)
    assert len(image_rows(config.db)) == 1
    with contextlib.closing(open_readonly(config.db)) as db:  # the file under its real name
        summary = collect_results(db, tmp_path / "review")
    assert len(summary.collected) == 1 and not summary.missing


def test_prune_under_keep_drops_the_rows_of_a_name_the_camera_reused(tiny_model_dir, tmp_path):
    """--after keep, a camera writing latest.png over and over: the rows of its earlier shots
    go (the file there is another arrival); the row of the file there now stays."""
    config = daemon_config(tiny_model_dir, tmp_path, after="keep")
    latest = config.watch / "latest.png"
    for level in (40, 41, 42):
        latest.write_bytes(png(level))
        os.utime(latest, ns=(level * 10**9, level * 10**9))  # a new shot: a new mtime
        assert EdgeDaemon(config).run() == 0
    assert len(image_rows(config.db)) == 3
    prune_every_final_result(config.db)
    [kept] = image_rows(config.db)
    assert kept["content_hash"] == sha(png(42))
    assert EdgeDaemon(config).run() == 0  # and the file there is still known: not redone
    assert len(image_rows(config.db)) == 1


# ------------------------------------------------------------------------ 2. quarantine writes


def test_long_names_are_quarantined_and_archived_under_shorter_ones(tiny_model_dir, tmp_path):
    """Before: [Errno 36] File name too long for ID_NAME.reason.txt (exit 2, again on every
    restart), and an archive move of a 247+ byte name failed, the file left in --watch."""
    config = daemon_config(tiny_model_dir, tmp_path, after="archive")
    corrupt, good = "c" * 240 + ".png", "g" * 246 + "ü.png"  # 244 and 252 bytes
    (config.watch / corrupt).write_bytes(CORRUPT)
    (config.watch / good).write_bytes(png(60))
    assert EdgeDaemon(config).run() == 0
    assert sorted(os.listdir(config.watch)) == ["archive", "quarantine"]
    by_name = {Path(r["path"]).name: r for r in image_rows(config.db)}
    for name, data in ((corrupt, CORRUPT), (good, png(60))):
        stored = Path(by_name[name]["stored_path"])
        assert stored.read_bytes() == data
        assert len(stored.name.encode()) <= STORED_NAME_MAX
        assert stored.name.startswith(f"{by_name[name]['id']:08d}_") and stored.suffix == ".png"
    reason = Path(by_name[corrupt]["stored_path"] + REASON_SUFFIX)
    assert reason.read_text().strip() == by_name[corrupt]["reason"]


def test_a_row_an_earlier_version_recorded_with_a_too_long_name_is_finished(
    tiny_model_dir, tmp_path
):
    """What an earlier splitdet left (its row committed with ID_NAME too long for the file
    system, then it died on the reason file): the restart finishes under a shorter name."""
    config = daemon_config(tiny_model_dir, tmp_path)
    source = config.watch / ("c" * 240 + ".png")
    source.write_bytes(CORRUPT)
    too_long = config.quarantine / f"00000001_{source.name}"
    arrival = Arrival(
        str(source), file_key(source, source.stat()), sha(CORRUPT), len(CORRUPT), time.time()
    )
    with contextlib.closing(ResultStore(config.db)) as store:
        store.record_error(arrival, "quarantine", "corrupt", "f" * 64, str(too_long))
    assert EdgeDaemon(config).run() == 0
    [row] = image_rows(config.db)
    stored = Path(row["stored_path"])
    assert stored.read_bytes() == CORRUPT and not source.exists()
    assert len(stored.name.encode()) <= STORED_NAME_MAX
    assert Path(row["stored_path"] + REASON_SUFFIX).read_text() == "corrupt\n"


def test_a_reason_file_that_cannot_be_written_is_logged_not_fatal(tiny_model_dir, tmp_path, caplog):
    """The quarantine folder becomes unusable mid-run (here a file takes its place; a chmod
    or a full disk fail the same way): a WARNING and the file stays, instead of the daemon
    dying and dying again on every restart (the row is committed before the reason file)."""
    quarantine = tmp_path / "quarantine"
    config = daemon_config(tiny_model_dir, tmp_path, quarantine_dir=quarantine, settle_s=0.5)
    (config.watch / "broken.png").write_bytes(CORRUPT)
    daemon = EdgeDaemon(config)
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    with caplog.at_level(logging.WARNING, logger="splitdet.edge"):
        thread.start()
        deadline = time.monotonic() + 30
        # made and checked writable at start-up (replaced between, the start failed), before
        # the file settles
        while daemon._sweeper is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        quarantine.rmdir()
        quarantine.write_bytes(b"")
        thread.join(20)
    assert status == [0]
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert "cannot write reason file" in events and "cannot move file" in events
    [row] = image_rows(config.db)
    assert row["error_kind"] == "quarantine" and (config.watch / "broken.png").is_file()

    quarantine.unlink()  # fixed: the restart finishes the move, reason file included
    assert EdgeDaemon(config).run() == 0
    assert image_rows(config.db) == [row] and not (config.watch / "broken.png").exists()
    assert Path(row["stored_path"]).read_bytes() == CORRUPT
    assert Path(row["stored_path"] + REASON_SUFFIX).read_text().strip() == row["reason"]


# ------------------------------------------------------------------------ 3. never overwrite


def test_a_shared_archive_and_quarantine_never_lose_a_file(tiny_model_dir, tmp_path):
    """Two daemons with their own databases (ids both start at 1), one archive and one
    quarantine: before, the second camera's 0001.png replaced the first's."""
    archive, quarantine = tmp_path / "archive", tmp_path / "quarantine"
    made = []
    for camera, level in (("a", 70), ("b", 80)):
        config = daemon_config(
            tiny_model_dir, tmp_path / camera, after="archive", archive_dir=archive,
            quarantine_dir=quarantine,
        )  # fmt: skip
        (config.watch / "0001.png").write_bytes(png(level))
        (config.watch / "0002.png").write_bytes(CORRUPT + camera.encode())
        assert EdgeDaemon(config).run() == 0
        made.append(config)
    stored = [row for config in made for row in image_rows(config.db)]
    assert len({row["stored_path"] for row in stored}) == 4
    for row in stored:  # every row names its own file, with its own bytes
        assert sha(Path(row["stored_path"]).read_bytes()) == row["content_hash"]
    assert len(list(archive.iterdir())) == 2
    assert len(list(quarantine.glob(f"*{REASON_SUFFIX}"))) == 2


def test_a_name_taken_after_it_was_recorded_gets_the_next_free_one(tiny_model_dir, tmp_path):
    """The crash window: the row is committed with its archive name, the process dies before
    the move, and meanwhile another writer puts a file under that name. The restart moves the
    file to a free name, recorded in the row, and leaves the other file as it was."""
    config = daemon_config(tiny_model_dir, tmp_path, after="archive")
    source = config.watch / "a.png"
    source.write_bytes(png(100))
    planned = config.archive / "00000001_a.png"
    store = ResultStore(config.db)
    key = file_key(source, source.stat())  # as the daemon's hot folder will find it
    arrival = Arrival(str(source), key, sha(png(100)), len(png(100)), time.time())
    store.record_ok(arrival, 0.1, "f" * 64, {}, str(planned))
    store.close()
    planned.parent.mkdir()
    planned.write_bytes(b"another camera's image")
    assert EdgeDaemon(config).run() == 0
    [row] = image_rows(config.db)
    assert planned.read_bytes() == b"another camera's image"
    assert row["stored_path"] != str(planned)
    assert Path(row["stored_path"]).read_bytes() == png(100) and not source.exists()


# ------------------------------------------------------------------------ 4. one daemon per db


def test_a_second_daemon_on_one_database_exits_at_start(tiny_model_dir, tmp_path, capsys):
    """Before: nothing stopped it, and one of them later died on UNIQUE file_key. The read-only
    and maintenance commands are not blocked; a holder killed with -9 blocks nothing."""
    config = daemon_config(tiny_model_dir, tmp_path)
    (config.watch / "a.png").write_bytes(png(30))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from splitdet.edge.store_file import WriterLock; "
         "lock = WriterLock(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
         str(config.db)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreInUse):
            EdgeDaemon(config)
        run = ("edge", "run", "--model", tiny_model_dir, "--watch", config.watch, "--db",
               config.db, "--cloud", "127.0.0.1:9", "--once", "--settle", "0", "--threads", "1",
               "--threshold", "2", "--drain-timeout", "0",
               "--log-format", "text")  # fmt: skip
        capsys.readouterr()
        assert cli(*run) == 2
        err = capsys.readouterr().err
        assert (
            f"--db {config.db} is in use by another `splitdet edge run` (pid {holder.pid})" in err
        ), err
        assert "Traceback" not in err and (config.watch / "a.png").exists()
        ResultStore(config.db).close()  # (a store for the read-only commands to read)
        assert cli("edge", "status", "--db", config.db) == 0
        assert cli("edge", "results", "--db", config.db) == 0
        assert cli("edge", "prune", "--db", config.db, "--older-than", "1d") == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert cli(*run) == 0  # the kernel dropped the lock with its holder
    assert [r["verdict"] for r in image_rows(config.db)] == ["ok"]


def _wait(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _edge_run(model: Path, watch: Path, db: Path, *extra: str) -> tuple[str, ...]:
    """The `edge run` arguments of a daemon flagging nothing (unless `extra` gives its own
    --threshold: it is taken once), its cloud a closed port."""
    threshold = () if "--threshold" in extra else ("--threshold", "2")
    return ("edge", "run", "--model", str(model), "--watch", str(watch), "--db", str(db),
            "--cloud", "127.0.0.1:9", "--settle", "0", "--poll", "0.05", "--threads", "1",
            *threshold, "--log-format", "text", *extra)  # fmt: skip


def test_a_second_daemon_on_one_hot_folder_or_one_database_through_a_link_exits_at_start(
    tiny_model_dir, tmp_path, capsys
):
    """Before: two daemons on one --watch both classified and sent the same images (47 of 50
    doubled), and one reaching the same database through a symbolic link was let in, then
    died on UNIQUE file_key. Both are refused at start, naming the running daemon's pid."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    ready = tmp_path / "first.ready.json"
    first = subprocess.Popen(
        [sys.executable, "-m", "splitdet.shared.cli",
         *_edge_run(tiny_model_dir, watch, db, "--ready-file", str(ready),
                    "--quarantine", str(tmp_path / "quarantine"))],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait(lambda: ready.exists() or first.poll() is not None, 60, "the first daemon")
        assert first.poll() is None, first.stderr.read()
        (tmp_path / "hot-link").symlink_to(watch)
        (tmp_path / "db-link.sqlite").symlink_to(db)
        other_watch = tmp_path / "other"
        other_watch.mkdir()
        (other_watch / "a.png").write_bytes(png(30))
        capsys.readouterr()
        for watch_given, db_given, expected in [
            (tmp_path / "hot-link", tmp_path / "other.sqlite",
             f"--watch {watch} is in use by another `splitdet edge run` (pid {first.pid}); "
             "one daemon per hot folder"),
            (other_watch, tmp_path / "db-link.sqlite",
             f"--db {tmp_path / 'db-link.sqlite'} is in use by another `splitdet edge run` "
             f"(pid {first.pid}, as {db}); one daemon per database"),
        ]:  # fmt: skip
            assert cli(*_edge_run(tiny_model_dir, watch_given, db_given, "--once")) == 2
            err = capsys.readouterr().err
            assert expected in err, err
            assert "Traceback" not in err
        assert (other_watch / "a.png").exists() and not (tmp_path / "other.sqlite").exists()
        assert not list(watch.iterdir())  # the folder lock wrote nothing there
    finally:
        first.kill()
        first.wait()
    # the kernel dropped both locks with their holder
    assert cli(*_edge_run(tiny_model_dir, tmp_path / "hot-link", tmp_path / "db-link.sqlite",
                          "--once", "--drain-timeout", "0")) == 0  # fmt: skip


@pytest.mark.parametrize("what", ["deleted", "replaced"])
def test_a_database_deleted_or_replaced_while_running_stops_the_daemon(
    tiny_model_dir, tmp_path, capsys, what
):
    """Before: the daemon went on writing into the deleted (or replaced) file, so every later
    result was lost, and with --after delete the images too; `edge status` found no
    database. Now it stops with an error naming the file before it deletes another image."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    codes: list[int] = []
    daemon = threading.Thread(
        target=lambda: codes.append(cli(*_edge_run(tiny_model_dir, watch, db, "--after",
                                                   "delete"))),
        daemon=True,
    )  # fmt: skip
    capsys.readouterr()
    daemon.start()
    (watch / "a.png").write_bytes(png(30))
    _wait(lambda: not (watch / "a.png").exists(), 60, "the first image to be done")
    assert [r["verdict"] for r in image_rows(db)] == ["ok"]
    if what == "deleted":
        for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            path.unlink(missing_ok=True)
    else:  # e.g. a backup restored over it with mv
        ResultStore(tmp_path / "restored.sqlite").close()
        os.replace(tmp_path / "restored.sqlite", db)
    (watch / "b.png").write_bytes(png(60))
    daemon.join(timeout=30)
    assert not daemon.is_alive(), "the daemon went on writing into the lost database"
    err = capsys.readouterr().err
    assert codes == [2], err
    assert f"--db {db}: the database file was {what}" in err, err
    assert "Traceback" not in err
    assert (watch / "b.png").exists()  # not deleted: its result went nowhere


def test_a_database_deleted_during_the_final_drain_stops_the_batch(
    tiny_model_dir, tmp_path, capsys
):
    """`edge run --once` waits up to --drain-timeout for the cloud to take the outbox; a --db
    deleted meanwhile went unnoticed (the answers would go to the lost file) until the drain
    time was over. It now stops within a few seconds, exit 2, naming the file."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    (watch / "a.png").write_bytes(png(200))
    codes: list[int] = []
    args = _edge_run(tiny_model_dir, watch, db, "--threshold", "0", "--once",
                     "--drain-timeout", "120")  # fmt: skip
    daemon = threading.Thread(target=lambda: codes.append(cli(*args)), daemon=True)
    capsys.readouterr()
    daemon.start()

    def waiting() -> bool:
        try:
            return [r["verdict"] for r in image_rows(db)] == ["pending"]
        except sqlite3.Error:  # not created yet
            return False

    _wait(waiting, 60, "the flagged image waiting for the (dead) cloud")
    time.sleep(0.5)  # in the drain now
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        path.unlink(missing_ok=True)
    daemon.join(timeout=30)
    assert not daemon.is_alive(), "the drain went on into the deleted database"
    err = capsys.readouterr().err
    assert codes == [2] and f"--db {db}: the database file was deleted" in err, err


# ------------------------------------------------------------------------ 5. clock steps


def test_a_backward_clock_step_neither_holds_the_outbox_nor_ages_below_zero(
    tiny_model_dir, tmp_path
):
    """A request's next_try and created were set a day ahead of the clock as it is now (it
    stepped back: an edge box without RTC, an NTP step). Before, the request waited a day and
    the oldest-pending age was -86400 s, so an age > 600 alert could never fire."""
    config = daemon_config(tiny_model_dir, tmp_path, threshold=EVERYTHING)
    (config.watch / "a.png").write_bytes(png(120))
    assert EdgeDaemon(config).run() == 1  # pending: the cloud is unreachable
    ahead = time.time() + 86400
    with contextlib.closing(sqlite3.connect(config.db)) as con, con:
        con.execute("UPDATE outbox SET next_try = ?, created = ?", (ahead, ahead))
    attempts = image_rows(config.db)[0]["attempts"]

    daemon = EdgeDaemon(replace(config, drain_timeout_s=1.5))
    age = daemon.metrics.registry.get_sample_value("splitdet_edge_oldest_pending_age_seconds")
    assert age == 0.0
    assert daemon.run() == 1
    assert image_rows(config.db)[0]["attempts"] > attempts  # tried again, not a day later
    with contextlib.closing(open_readonly(config.db)) as db:
        outbox = store_status(db)["outbox"]
    assert outbox["next_try_in_s"] <= config.retry_max_s + 1 and outbox["oldest_age_s"] == 0


# ------------------------------------------------------------------------ 6. another user


def _run_status_as_another_user(db: Path) -> subprocess.CompletedProcess:
    """`splitdet edge status --db DB` as a user who may read DB's folder but not write it:
    nobody when we are root; else ourselves, the folder made read-only."""
    command = [sys.executable, "-m", "splitdet.shared.cli", "edge", "status", "--db", str(db)]
    if os.geteuid() != 0:
        db.parent.chmod(0o555)
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30)
        finally:
            db.parent.chmod(0o755)
    prefix = as_nobody()  # (None where that user cannot run this Python: a 0700 home)
    if prefix is None:
        pytest.skip("no unprivileged user who can run this Python")
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=30, cwd="/")


def test_status_reads_a_stopped_store_in_a_folder_it_cannot_write(tiny_model_dir):
    """Before: `not a usable SQLite database (attempt to write a readonly database)`: the
    read-only open had to create the -shm file beside the store."""
    folder = Path(tempfile.mkdtemp(prefix="splitdet-ro-"))  # (pytest's tmp is 0700)
    try:
        folder.chmod(0o755)
        work = folder / "w"
        work.mkdir()
        config = daemon_config(tiny_model_dir, work)
        (config.watch / "a.png").write_bytes(png(10))
        assert EdgeDaemon(config).run() == 0
        db = folder / "edge.sqlite"
        shutil.move(config.db, db)  # a stopped daemon leaves no -wal or -shm
        assert not Path(f"{db}-shm").exists() and not Path(f"{db}-wal").exists()
        done = _run_status_as_another_user(db)
        assert done.returncode == 0, done.stderr
        assert "ok 1" in done.stdout
        assert not Path(f"{db}-shm").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
