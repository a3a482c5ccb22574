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

from splitdet.edge import store as store_module
from splitdet.edge.daemon import EdgeDaemon

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
