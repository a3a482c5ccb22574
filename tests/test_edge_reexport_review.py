"""A re-export under a running edge, and a sender's store failure that stops the daemon (soak
review):

1. `splitdet export --out MODEL` into the folder a running `edge run --model MODEL` loaded: the
   daemon kept running the old export without a word. It now logs, within MODEL_CHECK_EVERY_S
   or so and once per change, that --model holds another export (WARNING
   `model_changed_on_disk`, splitdet_edge_model_changed_on_disk 1), and keeps running its own;
2. a cloud reloaded onto that new export refused every request with its own words ("deploy the
   same export on both sides"), although both sides held it on disk: the edge's `model_refused`
   line now says that --model holds the export the cloud serves, and to restart the edge;
3. the sender met a store failure the daemon stops on (a full disk; here a store made
   read-only under it) and logged "retrying in 0.5 s" just before the daemon's exit 2: the
   daemon now stops on it (StoreError: exit 2 from `edge run`), its line says so and promises
   no retry.

Real daemons in threads, real SQLite, real exports (tiny models), a real in-process cloud.
"""

from __future__ import annotations

import io
import logging
import shutil
import sqlite3
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_edge_daemon_recovery import scrape

from splitdet.edge import model_probe
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store_file import StoreError
from splitdet.shared.manifest import read_manifest

from support import daemon_config, running, wait_for

pytestmark = pytest.mark.timeout(240)

#: How often the daemon looks at its --model folder's manifest (5 s).
MODEL_CHECK_EVERY_S = getattr(model_probe, "MODEL_CHECK_EVERY_S", 5.0)


def png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 60, (128, 128, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def events(caplog, name: str) -> list[dict]:
    return [
        getattr(r, "fields", {}) | {"_level": r.levelno, "_message": r.getMessage()}
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == name
    ]


# ------------------------------------------------------- 1. a re-export is noticed


def test_a_reexport_into_the_running_model_folder_is_said_once(tiny_model_dir, tmp_path, caplog):
    """`splitdet export --out MODEL` over the folder the daemon runs: a WARNING naming both
    fingerprints within a bounded time, once; the gauge at 1; the daemon keeps its export."""
    from cloud_fixtures import tiny_model, write_model_dir

    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    running_fp = read_manifest(model).fingerprint
    config = daemon_config(model, tmp_path, once=False, metrics_port=0, metrics_host="127.0.0.1")
    daemon = EdgeDaemon(config)
    with caplog.at_level(logging.INFO, logger="splitdet.edge"), running(daemon):
        wait_for(lambda: events(caplog, "started"), 30, "the start")
        wait_for(lambda: daemon.metrics_port, 20, "the metrics endpoint")
        time.sleep(0.5)
        assert not events(caplog, "model_changed_on_disk")  # (the export it loaded)
        new = write_model_dir(tiny_model(0), model)  # the re-export, as `splitdet export` does
        assert new.fingerprint != running_fp
        began = time.monotonic()
        [line] = wait_for(lambda: events(caplog, "model_changed_on_disk"), 3 * MODEL_CHECK_EVERY_S,
                          "model_changed_on_disk")  # fmt: skip
        assert time.monotonic() - began <= 2 * MODEL_CHECK_EVERY_S + 1
        time.sleep(MODEL_CHECK_EVERY_S + 1)  # another look or two: the change is said once
        assert len(events(caplog, "model_changed_on_disk")) == 1
        metrics = scrape(daemon.metrics_port)
        assert daemon.fingerprint == running_fp  # it keeps running the export it loaded
    assert line["_level"] == logging.WARNING
    assert line["fingerprint"] == running_fp and line["on_disk"] == new.fingerprint
    assert new.fingerprint[:16] in line["_message"] and running_fp[:16] in line["_message"]
    assert "until restarted" in line["_message"] and "restart the edge" in line["_message"]
    assert metrics["splitdet_edge_model_changed_on_disk"] == 1.0


# ------------------------------------------------------- 2. the refusal names the restart


def test_a_refusal_by_a_cloud_serving_the_export_now_on_disk_says_to_restart(
    tiny_model_dir, tmp_path, caplog
):
    """The cloud serves the export now in --model (both sides hold it on disk): the refusal of
    the running one says to restart the edge, not to deploy one export on both sides."""
    from cloud_fixtures import shared_model_dir, start_loopback_server

    _, served_dir, served = shared_model_dir(0)
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    running_fp = read_manifest(model).fingerprint
    assert served.fingerprint != running_fp
    server = start_loopback_server(tmp_path / "cloud")
    try:
        config = daemon_config(model, tmp_path, once=False, threshold=0.0,
                               cloud=f"127.0.0.1:{server.port}", retry_initial_s=0.1,
                               retry_max_s=0.3)  # fmt: skip
        (config.watch / "a.png").write_bytes(png(1))  # flagged: sent, and refused
        daemon = EdgeDaemon(config)
        with caplog.at_level(logging.INFO, logger="splitdet.edge"), running(daemon):

            def refusals() -> list[dict]:
                return [e for e in events(caplog, "model_refused") if "held" in e]  # the sender's

            wait_for(refusals, 60, "the sender's model_refused")
            assert not any("restart the edge" in e["_message"] for e in refusals())
            shutil.copytree(served_dir, model, dirs_exist_ok=True)  # the cloud's export, here too
            hinted = wait_for(
                lambda: [e for e in refusals() if "fix" in e], 60, "a refusal naming the fix"
            )
        assert daemon.fingerprint == running_fp
    finally:
        server.stop(0)
    line = hinted[0]
    assert line["fingerprint"] == running_fp and line["_level"] == logging.ERROR
    expected = (f"--model {model} now holds the export the cloud serves "
                f"({served.fingerprint[:16]}…): restart the edge to run it")  # fmt: skip
    assert expected in line["_message"] and expected in line["fix"]


# ------------------------------------------------------- 3. a store failure that stops it


def test_a_full_store_is_one_the_daemon_stops_on_and_a_lock_is_not():
    """SQLite's own SQLITE_FULL ("database or disk is full") stops the daemon; a lock does not,
    nor an error of one request's row (the daemon would meet it again at every restart)."""
    from splitdet.edge.sender import stops_the_daemon

    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (b BLOB)")
    db.execute("PRAGMA max_page_count = 3")
    with pytest.raises(sqlite3.OperationalError, match="full") as full:
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 100_000,))
    assert stops_the_daemon(full.value)
    locked = sqlite3.OperationalError("database is locked")
    locked.sqlite_errorcode = sqlite3.SQLITE_BUSY
    assert not stops_the_daemon(locked)
    assert not stops_the_daemon(OSError("channel"))
    # one request's row (a constraint, a bad value): that request waits, the daemon goes on
    with pytest.raises(sqlite3.IntegrityError) as integrity:
        db.execute("CREATE TABLE u (k INTEGER PRIMARY KEY)")
        db.execute("INSERT INTO u VALUES (1)")
        db.execute("INSERT INTO u VALUES (1)")
    assert not stops_the_daemon(integrity.value)


def test_a_store_failure_in_the_sender_stops_the_daemon_and_its_line_says_so(
    tiny_model_dir, tmp_path, caplog
):
    """The sender's write fails for another reason than a lock (here the store made read-only
    under it; a full disk alike): it logged "retrying in N s" and went on, the daemon stopping
    only when its loop met the failure too (exit 2 after the promise of a retry). Now the
    daemon stops on it (StoreError, naming --db), and the sender's line says so."""
    config = daemon_config(tiny_model_dir, tmp_path, once=False, threshold=0.0,  # (cloud: down)
                           retry_initial_s=0.05, retry_max_s=0.1)  # fmt: skip
    (config.watch / "a.png").write_bytes(png(2))
    daemon = EdgeDaemon(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        thread.start()
        try:
            wait_for(lambda: events(caplog, "send_retry"), 60, "a failed send (the cloud down)")
            with daemon.store._lock:  # the store becomes read-only under the running sender
                daemon.store._db.execute("PRAGMA query_only = 1")
            thread.join(20)
            assert not thread.is_alive(), "the daemon did not stop on the sender's failure"
        finally:
            daemon.request_stop()
            thread.join(30)
    [exc] = failure
    assert isinstance(exc, StoreError) and str(exc).startswith(f"{config.db}: ")
    assert "readonly" in str(exc) and "met by the sender" in str(exc)
    lines = events(caplog, "sender_error")
    assert lines and all(e["fatal"] is True for e in lines), lines
    assert "the daemon stops" in lines[0]["_message"]
    assert not any("retrying" in e["_message"] for e in lines)
    assert not events(caplog, "stopped")  # (as when its loop meets the failure: exit 2)
