"""The edge daemon while another program holds its database locked (an `sqlite3` shell in a
transaction, a backup): the soak review's daemon exited for good (`database is locked`, exit
2) once a lock was held past the busy timeout, and the hot folder filled up. Now it waits and
takes the image again. Real SQLite, the real daemon in a thread, the tiny exported model."""

from __future__ import annotations

import contextlib
import io
import logging
import sqlite3
import threading

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import daemon as daemon_module
from splitdet.edge import store as store_module
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store_file import StoreLocked

from support import daemon_config, image_rows, wait_for

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
    thread = threading.Thread(target=daemon.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="splitdet"):
        thread.start()
        try:
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
        finally:
            daemon.request_stop()
            thread.join(30)
    assert not thread.is_alive()
    rows = image_rows(config.db)
    assert sorted(row["path"].rsplit("/", 1)[-1] for row in rows) == ["a.png", "b.png"]
    assert not (config.watch / "b.png").exists()  # archived once recorded
    busy = _events(caplog, "store_busy")
    assert len(busy) == 1  # (one line a minute, however many rounds it waited)
    assert busy[0]["path"].endswith("b.png") and busy[0]["db"] == str(config.db)


def test_a_batch_run_stops_on_a_database_held_locked_for_its_drain_timeout(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """`edge run --once` from cron waited for good on a database another program never let
    go; it now gives up after --drain-timeout, its image left where it was, exit status 1."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    config = daemon_config(tiny_model_dir, tmp_path, drain_timeout_s=1.0)
    daemon = EdgeDaemon(config)  # (the database opened before the lock below is taken)
    holder = sqlite3.connect(config.db, isolation_level=None)
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(daemon.run()), daemon=True)
    with contextlib.closing(holder), caplog.at_level(logging.INFO, logger="splitdet"):
        holder.execute("BEGIN IMMEDIATE")
        (config.watch / "a.png").write_bytes(_png(30))
        thread.start()
        thread.join(60)
        alive = thread.is_alive()
        holder.execute("ROLLBACK")
    thread.join(30)
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
    once a minute, and starts once the lock is let go; a batch run waits --drain-timeout."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    config = daemon_config(tiny_model_dir, tmp_path, drain_timeout_s=120.0)
    EdgeDaemon(config)._shutdown()  # the database made, then let go
    (config.watch / "a.png").write_bytes(_png(30))
    holder = sqlite3.connect(config.db, isolation_level=None)
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(EdgeDaemon(config).run()))
    with contextlib.closing(holder), caplog.at_level(logging.INFO, logger="splitdet"):
        holder.execute("BEGIN EXCLUSIVE")  # (a reader is shut out too)
        thread.daemon = True
        thread.start()
        wait_for(lambda: _events(caplog, "store_busy"), 30, "a store_busy line")
        wait_for(lambda: _events(caplog, "store_busy")[0]["failures"] >= 1, 5, "a failure")
        assert thread.is_alive() and not outcome, "the daemon did not wait for the database"
        holder.execute("ROLLBACK")
        thread.join(60)  # (inside: its INFO lines are captured)
    assert outcome == [0]
    busy = _events(caplog, "store_busy")
    assert len(busy) == 1 and busy[0]["path"] is None
    assert "waits for it to start" in caplog.text
    assert _events(caplog, "store_resumed")
    assert [row["path"].rsplit("/", 1)[-1] for row in image_rows(config.db)] == ["a.png"]


def test_a_batch_run_started_on_a_database_held_locked_stops_at_its_drain_timeout(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    config = daemon_config(tiny_model_dir, tmp_path, drain_timeout_s=0.5)
    EdgeDaemon(config)._shutdown()
    holder = sqlite3.connect(config.db, isolation_level=None)
    with contextlib.closing(holder):
        holder.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreLocked, match="another program holds it locked"):
            EdgeDaemon(config)
        holder.execute("ROLLBACK")
    EdgeDaemon(config)._shutdown()  # its locks were let go: another run can start


def test_a_file_passed_over_while_the_database_is_locked_does_not_end_the_wait(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """A file the round passes over (here: its archive move failed and is not due again yet)
    wrote nothing, yet was taken for a round that did: `store_resumed` and a new `store_busy`
    followed each other every round while the lock lasted."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 100)
    monkeypatch.setattr(daemon_module, "MOVE_RETRY_INITIAL_S", 600.0)
    monkeypatch.setattr(daemon_module, "MOVE_RETRY_MAX_S", 600.0)
    config = daemon_config(tiny_model_dir, tmp_path, once=False, after="archive")
    daemon = EdgeDaemon(config)
    thread = threading.Thread(target=daemon.run, daemon=True)
    with caplog.at_level(logging.INFO, logger="splitdet"):
        thread.start()
        try:
            wait_for(lambda: config.archive.is_dir(), 30, "the archive folder")
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
                    lambda: daemon._busy.failures >= 4 or len(_events(caplog, "store_busy")) > 1,
                    30,
                    "rounds passing a.png over, then failing on b.png",
                )
                resumed = _events(caplog, "store_resumed")
                busy = _events(caplog, "store_busy")
                holder.execute("ROLLBACK")
            wait_for(lambda: len(image_rows(config.db)) == 2, 30, "the second image's result")
        finally:
            daemon.request_stop()
            thread.join(30)
    assert resumed == [], "store_resumed while the database was still locked"
    assert len(busy) == 1
    assert _events(caplog, "store_resumed")  # once b.png was recorded
