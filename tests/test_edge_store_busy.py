"""The edge daemon while another program holds its database locked (an `sqlite3` shell in a
transaction, a backup): the soak review's daemon exited for good (`database is locked`, exit
2) once a lock was held past the busy timeout, and the hot folder filled up. Now it waits and
takes the image again. Real SQLite, the real daemon in a thread, the tiny exported model."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import after_actions
from splitdet.edge import daemon as daemon_module
from splitdet.edge import store as store_module
from splitdet.edge.daemon import EdgeDaemon
from splitdet.shared.cli import main

from support import daemon_config, image_rows, running, wait_for

pytestmark = pytest.mark.timeout(90)


def _png(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((24, 32, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict]:
    return [
        record.fields
        for record in caplog.records
        if getattr(record, "fields", {}).get("event") == event
    ]


def test_a_database_held_locked_past_the_busy_timeout_delays_the_image_and_loses_nothing(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    config = daemon_config(tiny_model_dir, tmp_path, once=False, after="archive")
    daemon = EdgeDaemon(config)
    with caplog.at_level(logging.INFO, logger="splitdet"), running(daemon) as thread:
        (config.watch / "a.png").write_bytes(_png(30))
        wait_for(lambda: len(image_rows(config.db)) == 1, 30, "the first image's result")
        holder = sqlite3.connect(config.db, isolation_level=None)
        with contextlib.closing(holder):
            holder.execute("BEGIN IMMEDIATE")  # (as `sqlite3 edge.sqlite` would)
            (config.watch / "b.png").write_bytes(_png(60))
            wait_for(lambda: _events(caplog, "store_busy"), 30, "a store_busy line")
            assert thread.is_alive(), "the daemon stopped on a locked database"
            assert (config.watch / "b.png").exists()
            holder.execute("ROLLBACK")
        wait_for(lambda: len(image_rows(config.db)) == 2, 30, "the second image's result")
        wait_for(lambda: _events(caplog, "store_resumed"), 10, "a store_resumed line")
    rows = image_rows(config.db)
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in rows) == ["a.png", "b.png"]
    assert not (config.watch / "b.png").exists()  # archived once recorded
    busy = _events(caplog, "store_busy")
    assert len(busy) == 1  # (one line a minute, however many rounds it waited)
    assert busy[0]["path"].endswith("b.png") and busy[0]["db"] == str(config.db)


def run_once_held_locked(config, image: bytes, caplog) -> tuple[list[int], bool]:
    """`EdgeDaemon(config).run()` (a --once run) in a thread while another connection holds
    `config.db` (BEGIN IMMEDIATE, taken once the daemon opened it), `image` arriving as
    WATCH/a.png; the lock let go when the run ends or after 60 s. ([its exit status], whether
    it still ran at 60 s); its INFO lines in `caplog`."""
    daemon = EdgeDaemon(config)  # (the database opened before the lock below is taken)
    holder = sqlite3.connect(config.db, isolation_level=None)
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(daemon.run()), daemon=True)
    with contextlib.closing(holder), caplog.at_level(logging.INFO, logger="splitdet"):
        holder.execute("BEGIN IMMEDIATE")
        (config.watch / "a.png").write_bytes(image)
        thread.start()
        thread.join(60)
        alive = thread.is_alive()
        holder.execute("ROLLBACK")
    thread.join(30)
    return outcome, alive


def test_a_batch_run_stops_on_a_database_held_locked_for_its_drain_timeout(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """`edge run --once` from cron waited for good on a database another program never let
    go; it now gives up after --drain-timeout, its image left where it was, exit status 1."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    config = daemon_config(tiny_model_dir, tmp_path, drain_timeout_s=1.0)
    outcome, alive = run_once_held_locked(config, _png(30), caplog)
    assert not alive, "the batch run still waited for the locked database"
    assert outcome == [1]
    assert (config.watch / "a.png").exists()  # untouched, for the next run
    stopped = _events(caplog, "store_busy_stopped")
    assert len(stopped) == 1 and stopped[0]["images_left"] == 1
    assert stopped[0]["waited_s"] >= 1.0
    assert image_rows(config.db) == []  # what its transaction wrote was rolled back


def test_a_daemon_started_on_a_database_held_locked_waits_for_it_to_start(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """A daemon (re)started while a backup holds its database exited 2; it now waits, says so
    once a minute, and starts once the lock is let go."""
    monkeypatch.setattr(daemon_module, "OPEN_TRY_MS", 100)
    config = daemon_config(tiny_model_dir, tmp_path, once=False)
    EdgeDaemon(config)._shutdown()  # the database made, then let go
    holder = sqlite3.connect(config.db, isolation_level=None)
    made: list[EdgeDaemon] = []
    thread = threading.Thread(target=lambda: made.append(EdgeDaemon(config)), daemon=True)
    with contextlib.closing(holder), caplog.at_level(logging.INFO, logger="splitdet"):
        holder.execute("BEGIN EXCLUSIVE")  # (a reader is shut out too)
        thread.start()
        wait_for(lambda: _events(caplog, "store_busy"), 30, "a store_busy line")
        thread.join(3)  # (some tries of 0.1 s)
        assert thread.is_alive() and not made, "the daemon did not wait for the database"
        holder.execute("ROLLBACK")
        thread.join(60)  # (inside: its INFO lines are captured)
    assert len(made) == 1
    made[0]._shutdown()
    busy = _events(caplog, "store_busy")
    assert len(busy) == 1 and busy[0]["path"] is None  # (one line a minute)
    assert "the daemon waits for it to start" in caplog.text
    assert _events(caplog, "store_resumed")


def _edge_run(model_dir, tmp_path, *extra: str) -> subprocess.Popen:
    """`splitdet edge run` on tmp_path/hot and tmp_path/edge.sqlite, its log in tmp_path/log."""
    command = [
        sys.executable, "-m", "splitdet.shared.cli", "edge", "run", "--model", str(model_dir),
        "--watch", str(tmp_path / "hot"), "--db", str(tmp_path / "edge.sqlite"),
        "--cloud", "127.0.0.1:9", "--threads", "1", *extra,
    ]  # fmt: skip
    log = open(tmp_path / "log", "wb")  # noqa: SIM115 (the process holds it)
    with log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def _run_on_locked(db, model_dir, tmp_path, extra: list[str], meanwhile) -> int:
    """`_edge_run` while another connection holds `db` locked (BEGIN EXCLUSIVE), `meanwhile`
    called with the process; its exit status (killed if it runs past a minute)."""
    holder = sqlite3.connect(db, isolation_level=None)
    with contextlib.closing(holder):
        holder.execute("BEGIN EXCLUSIVE")
        process = _edge_run(model_dir, tmp_path, *extra)
        try:
            meanwhile(process)
            return process.wait(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(30)
            holder.execute("ROLLBACK")


def _json_events(tmp_path) -> list[dict]:
    lines = (tmp_path / "log").read_text(errors="replace").splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.parametrize("once", [False, True])
def test_sigterm_while_a_daemon_waits_for_a_locked_database_stops_it_cleanly(
    tiny_model_dir, tmp_path, once
):
    """The wait came before the daemon's signal handlers: SIGTERM killed it (exit 143, no
    `stopped` line) and SIGINT was seen only after SQLite's 10 s wait. Now both stop the
    wait within about a second: exit 0 (1 for a batch run: its images are left), `stopped`,
    its locks let go."""
    config = daemon_config(tiny_model_dir, tmp_path)
    EdgeDaemon(config)._shutdown()  # the database made, then let go

    def stop_once_waiting(process: subprocess.Popen) -> None:
        wait_for(lambda: any(e.get("event") == "store_busy" for e in _json_events(tmp_path)),
                 60, "a store_busy line")  # fmt: skip
        process.terminate()

    extra = ["--once", "--drain-timeout", "120"] if once else []
    code = _run_on_locked(config.db, tiny_model_dir, tmp_path, extra, stop_once_waiting)
    assert code == (1 if once else 0), (tmp_path / "log").read_text()
    stopped = [e for e in _json_events(tmp_path) if e.get("event") == "stopped"]
    assert len(stopped) == 1 and "before the daemon started" in stopped[0]["note"]
    assert EdgeDaemon(config).run() == 0  # its locks were let go: another run starts


def test_a_batch_run_started_on_a_database_held_locked_stops_at_its_drain_timeout(
    tiny_model_dir, tmp_path
):
    """`--once` on a database locked at its start waits --drain-timeout, then exits 1 (as for
    a lock met later: the images are left for the next run), not 2 (a usage error)."""
    config = daemon_config(tiny_model_dir, tmp_path)
    EdgeDaemon(config)._shutdown()
    (config.watch / "a.png").write_bytes(_png(30))
    once = ["--once", "--drain-timeout", "2"]
    code = _run_on_locked(config.db, tiny_model_dir, tmp_path, once, lambda _process: None)
    assert code == 1, (tmp_path / "log").read_text()
    events = _json_events(tmp_path)
    busy = [e for e in events if e.get("event") == "store_busy"]
    assert busy and "waits for it up to --drain-timeout 2s" in busy[0]["msg"]
    stopped = [e for e in events if e.get("event") == "store_busy_stopped"]
    assert len(stopped) == 1 and stopped[0]["images_left"] is None
    assert 2.0 <= stopped[0]["waited_s"] < 10  # (tries of 1 s: not SQLite's 10 s each)
    assert (config.watch / "a.png").exists() and image_rows(config.db) == []


@pytest.mark.parametrize("retry_s", [600.0, 0.2])
def test_a_file_passed_over_while_the_database_is_locked_does_not_end_the_wait(
    tiny_model_dir, tmp_path, monkeypatch, caplog, retry_s
):
    """A file the round passes over (its archive move failed and is not due again yet), or
    whose move is tried again and fails again, wrote nothing, yet was taken for a round that
    did: `store_resumed` and a new `store_busy` followed each other while the lock lasted."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr(after_actions, "MOVE_RETRY_INITIAL_S", retry_s)
    monkeypatch.setattr(after_actions, "MOVE_RETRY_MAX_S", retry_s)
    config = daemon_config(tiny_model_dir, tmp_path, once=False, after="archive")
    daemon = EdgeDaemon(config)
    with caplog.at_level(logging.INFO, logger="splitdet"), running(daemon):
        # its start made the folder and checked it writable (a CI run replaced it between)
        wait_for(lambda: daemon._sweeper is not None, 30, "the daemon started", interval=0.005)
        config.archive.rmdir()
        config.archive.write_bytes(b"")  # a file where the folder was: moves into it fail
        (config.watch / "a.png").write_bytes(_png(30))
        wait_for(lambda: len(image_rows(config.db)) == 1, 30, "the first image's result")
        holder = sqlite3.connect(config.db, isolation_level=None)
        with contextlib.closing(holder):
            holder.execute("BEGIN IMMEDIATE")
            (config.watch / "b.png").write_bytes(_png(60))
            wait_for(lambda: _events(caplog, "store_busy"), 30, "a store_busy line")
            wait_for(  # (the second: a store_busy line after a false store_resumed)
                lambda: daemon._busy.failures >= 6 or len(_events(caplog, "store_busy")) > 1,
                30,
                "rounds passing a.png over, then failing on b.png",
            )
            resumed = _events(caplog, "store_resumed")
            busy = _events(caplog, "store_busy")
            holder.execute("ROLLBACK")
        wait_for(lambda: len(image_rows(config.db)) == 2, 30, "the second image's result")
    assert resumed == [], "store_resumed while the database was still locked"
    assert len(busy) == 1
    assert _events(caplog, "store_resumed")  # once b.png was recorded


def test_a_daemon_run_in_a_programs_main_thread_gives_its_signal_handlers_back(
    tiny_model_dir, tmp_path
):
    """A program (a notebook, a batch script) that runs the daemon and goes on: after a stop
    by SIGTERM its handlers were left as SIG_IGN, so Ctrl-C did nothing for the rest of it."""
    if threading.current_thread() is not threading.main_thread():  # (SIGTERM would end it)
        pytest.skip("the daemon takes signals in the main thread only")
    config = daemon_config(tiny_model_dir, tmp_path, once=False)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    daemon = EdgeDaemon(config)

    def stop_once_it_listens() -> None:  # (SIGTERM before its handler would end this process)
        if wait_for(lambda: signal.getsignal(signal.SIGTERM) == daemon.request_stop, 60,
                    "the daemon's SIGTERM handler", interval=0.01):  # fmt: skip
            os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=stop_once_it_listens, daemon=True)
    sender.start()
    assert daemon.run() == 0
    sender.join(10)
    assert daemon.signalled
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_a_stop_signal_before_the_daemon_is_built_ends_the_start_up(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """Anything before the daemon's own handlers (loading the model, reading its files) only
    noted a stop signal, passed on once the daemon was built: a start-up blocked there
    (a FIFO as token file then, refused at once since; a hung file system) ignored SIGTERM
    and SIGINT for good, and one noted while a locked --db was waited for was lost. It now
    ends the start-up at once. The hung read is injected into the model's loading; the
    command runs in this process, in its main thread, and gets a real SIGTERM."""
    (tmp_path / "hot").mkdir()
    blocked, released = threading.Event(), threading.Event()

    def loading_from_a_hung_share(*_args, **_kwargs):
        blocked.set()
        released.wait(60)  # (a signal's handler runs in this wait, and may raise out of it)
        raise AssertionError("the start-up was not ended by SIGTERM")

    monkeypatch.setattr(daemon_module, "EdgeRuntime", loading_from_a_hung_share)
    sender = threading.Thread(
        target=lambda: blocked.wait(60) and os.kill(os.getpid(), signal.SIGTERM), daemon=True
    )
    sender.start()
    argv = ["edge", "run", "--model", str(tiny_model_dir), "--watch", str(tmp_path / "hot"),
            "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9", "--threads", "1",
            "--log-format", "text"]  # fmt: skip
    # (`edge run` stopped by a signal leaves SIGTERM and SIGINT ignored while its process ends,
    # here the test's: conftest's `_signals_kept` puts them back after the test)
    try:
        with caplog.at_level(logging.INFO, logger="splitdet"):
            code = main(argv)
    finally:
        released.set()
        sender.join(10)
    assert code == 0
    stopped = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event")
               == "stopped"]  # fmt: skip
    assert len(stopped) == 1 and "before the daemon started" in stopped[0]["note"], stopped
