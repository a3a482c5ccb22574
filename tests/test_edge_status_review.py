"""`splitdet edge status` answers "is a daemon running, is anything stuck" honestly.

1. Whether a `splitdet edge run` runs on --db: its writer lock looked up in /proc/locks (never
   taken), with the holder's pid; none after kill -9; unknown where /proc/locks is unreadable.
   Before: nothing was said, and a killed daemon's store looked healthy.
2. The outbox's last error: how long ago, and said to be past once requests of its export
   were delivered after it; the next try counts the sender's pause after a failed send.
   Before: a fixed FAILED_PRECONDITION kept showing as the last error, with no time, and
   `next try in 0 s` while the sender waited out its backoff.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from splitdet.edge import store as store_module
from splitdet.edge.client import CloudDetections, NeverRetry, RetryLater
from splitdet.edge.sender import Backoff, Sender
from splitdet.edge.store import Arrival, ResultStore
from splitdet.edge.store_file import WriterLock, open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.shared.cli import main
from splitdet.shared.wire import detection_pb2 as pb

from support import wait_for

FINGERPRINT = "f" * 64
REFUSED = (
    "model fingerprint ffffffffffff is not served here; this server serves 0123456789ab: "
    "deploy the same export on both sides"
)


def _store_with_images(db: Path, n_ok: int = 1, n_pending: int = 0) -> list[int]:
    """A store holding `n_ok` results "ok" and `n_pending` flagged images (their requests in
    the outbox, made with FINGERPRINT); returns the pending rows' ids."""
    pending = []
    with contextlib.closing(ResultStore(db)) as store:
        for i in range(n_ok + n_pending):
            arrival = Arrival(f"/hot/{i}.png", f"{i}.png|1|1|{i}", f"{i:064d}", 1, time.time())
            if i < n_ok:
                store.record_ok(arrival, 0.1, FINGERPRINT, {})
                continue
            payload = pb.DetectRequest(request_id=f"r{i}").SerializeToString()
            image_id, _, _ = store.record_pending(arrival, 0.9, f"r{i}", payload, FINGERPRINT, {})
            pending.append(image_id)
    return pending


def _status(db: Path, capsys, *extra: str) -> str:
    assert main(["edge", "status", "--db", str(db), *extra]) == 0
    return capsys.readouterr().out


def _status_json(db: Path, capsys) -> dict:
    return json.loads(_status(db, capsys, "--json"))


@contextlib.contextmanager
def _no_flock_taken(monkeypatch):
    """Fail on any flock or lockf call meanwhile: the probe must never take the lock (a daemon
    starting at that instant would refuse to start)."""
    calls: list = []
    monkeypatch.setattr(fcntl, "flock", lambda *a: calls.append(("flock", a)))
    monkeypatch.setattr(fcntl, "lockf", lambda *a: calls.append(("lockf", a)))
    yield
    monkeypatch.undo()
    assert calls == []


# ------------------------------------------------------------------------ 1. the daemon


def _hold_writer_lock(db: Path) -> subprocess.Popen:
    """Another process holding `db`'s WriterLock (as `splitdet edge run` does), until killed."""
    code = (
        "import sys, time\n"
        "from splitdet.edge.store_file import WriterLock\n"
        "lock = WriterLock(sys.argv[1])\n"
        "print('locked', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_status_names_the_lock_holder_through_a_symlink_and_none_after_kill_9(
    tmp_path, capsys, monkeypatch
):
    """Before: no daemon line at all, while a daemon ran or after it was killed."""
    real = tmp_path / "data" / "edge.sqlite"
    real.parent.mkdir()
    _store_with_images(real, n_ok=2)
    link = tmp_path / "edge-link.sqlite"
    link.symlink_to(real)

    text = _status(link, capsys)  # no lock file: no daemon ever ran here
    assert not Path(f"{real}.lock").exists()
    assert re.search(r"^daemon        none is running on this --db \(the last image arrived "
                     r"\d+ s ago\)", text, re.M), text  # fmt: skip

    holder = _hold_writer_lock(real)  # (locks the real file's lock; status asks via the link)
    try:
        with _no_flock_taken(monkeypatch):
            text = _status(link, capsys)
            state = _status_json(link, capsys)["daemon"]
        assert f"daemon        running on this --db (pid {holder.pid})" in text, text
        # (the holder is no daemon: no record of its own, its keys there as null)
        assert state == {"state": "running", "pid": holder.pid,
                         "lock_file": f"{real}.lock", "detail": None, "export": None,
                         "started": None, "outbox_caps": None,
                         "outbox_full_since": None}  # fmt: skip
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert Path(f"{real}.lock").exists()  # left behind by kill -9, with its pid in it
    text = _status(link, capsys)
    assert "daemon        none is running on this --db (the last image arrived" in text, text
    daemon = _status_json(link, capsys)["daemon"]
    assert daemon["state"] == "none"
    # the same keys in every state, null when unknown (a script's d["daemon"]["started"])
    assert {daemon[key] for key in ("export", "started", "outbox_caps", "outbox_full_since")} == {
        None
    }


def test_status_says_a_real_daemon_runs_and_none_once_it_is_killed(
    tiny_model_dir, tmp_path, capsys
):
    """A real `splitdet edge run` on --db: running with its pid; after kill -9, none."""
    watch, db, ready = tmp_path / "hot", tmp_path / "edge.sqlite", tmp_path / "ready.json"
    watch.mkdir()
    command = [
        sys.executable, "-m", "splitdet.shared.cli", "edge", "run", "--model",
        str(tiny_model_dir), "--watch", str(watch), "--cloud", "127.0.0.1:9", "--db", str(db),
        "--ready-file", str(ready), "--threads", "1", "--poll", "0.05",
    ]  # fmt: skip
    with open(tmp_path / "edge.log", "wb") as log:
        daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: ready.exists() or daemon.poll() is not None, 60, "the daemon")
        assert daemon.poll() is None, (tmp_path / "edge.log").read_text()
        text = _status(db, capsys)
        assert f"daemon        running on this --db (pid {daemon.pid})" in text, text
    finally:
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(timeout=30)
    text = _status(db, capsys)
    assert "daemon        none is running on this --db (no image yet)" in text, text


def test_status_says_unknown_when_the_lock_table_cannot_be_read(tmp_path, capsys, monkeypatch):
    """No /proc/locks (not Linux, a restricted /proc): unknown, never a guess."""
    db = tmp_path / "edge.sqlite"
    _store_with_images(db)
    Path(f"{db}.lock").write_text("4242\n")  # a lock file: a daemon may have run
    monkeypatch.setattr("splitdet.edge.lock_holder.PROC_LOCKS", str(tmp_path / "no-locks"))
    text = _status(db, capsys)
    assert f"daemon        unknown: cannot read {tmp_path / 'no-locks'}" in text, text
    assert "4242" not in text  # (the pid in the file may be a dead daemon's)
    assert _status_json(db, capsys)["daemon"]["state"] == "unknown"


# ------------------------------------------------------------------- 2. the last error


class _Cloud:
    """A CloudClient stand-in: raises `refusal` while set, else answers with one box."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.refusal: Exception | None = None
        self.delay_s = delay_s  # (each call takes this long, unless the channel is closed)
        self.closed = threading.Event()

    def __call__(self) -> _Cloud:  # (Sender's make_client: a new channel)
        self.closed.clear()
        return self

    def send_request(self, request: pb.DetectRequest, timeout: float | None = None):
        if self.closed.wait(self.delay_s):  # (as a real call on a channel closed meanwhile)
            raise RetryLater(grpc.StatusCode.CANCELLED, "Channel closed!")
        if self.refusal is not None:
            raise self.refusal
        return CloudDetections(
            request.request_id, FINGERPRINT, np.array([[1.0, 1.0, 5.0, 5.0]], np.float32),
            np.array([0.9], np.float32), np.array([1]), ("scratch",), {}, False,
        )  # fmt: skip

    def close(self) -> None:
        self.closed.set()


def test_a_refused_export_served_again_shows_its_error_as_past(tmp_path, capsys):
    """Before: `last error: FAILED_PRECONDITION: ...` with no time, still shown as the last
    error after requests of that export were delivered again."""
    db = tmp_path / "edge.sqlite"
    _store_with_images(db, n_ok=0, n_pending=3)
    cloud = _Cloud()
    cloud.refusal = NeverRetry(grpc.StatusCode.FAILED_PRECONDITION, REFUSED)
    with contextlib.closing(ResultStore(db)) as store:
        sender = Sender(store, cloud, Backoff(0.5, 30.0))
        sender.send(store.next_due())  # refused: the export's three requests held for 30 s

        text = _status(db, capsys)
        error = f"FAILED_PRECONDITION: {REFUSED}"
        assert f"last error: {error}\n" in text, text
        assert re.search(r"^ {26}\(\d+ s ago; no request of its export delivered since\)$",
                         text, re.M), text  # fmt: skip
        with contextlib.closing(open_readonly(db)) as conn:
            later = store_status(conn, now=time.time() + 125)["outbox"]
        assert 124 < later["last_error_age_s"] < 135
        assert later["delivered_since_error_age_s"] is None

        cloud.refusal = None  # the operator deploys the export: its requests go again
        sender.send(store.next_due(now=time.time() + 31))
    outbox = _status_json(db, capsys)["outbox"]
    assert outbox["requests"] == 2 and outbox["last_error"] == error
    assert 0 <= outbox["delivered_since_error_age_s"] < 5
    text = _status(db, capsys)
    assert re.search(r"^ {14}last error: none since requests of its export were delivered again "
                     r"\(the last \d+ s ago\); the one before: FAILED_PRECONDITION", text,
                     re.M), text  # fmt: skip
    assert f"last error: {error}" not in text


def test_next_try_counts_the_senders_pause_after_a_failed_send(tmp_path, capsys):
    """Before: `next try in 0 s` (another request was due) while the sender paused 10-20 s."""
    db = tmp_path / "edge.sqlite"
    _store_with_images(db, n_ok=0, n_pending=3)
    cloud = _Cloud()
    cloud.refusal = RetryLater(grpc.StatusCode.UNAVAILABLE, "connection refused")
    lock = WriterLock(db)  # (as a daemon holds it: its sender is the one that pauses)
    with contextlib.closing(ResultStore(db)) as store:
        sender = Sender(store, cloud, Backoff(20.0, 20.0))
        pause = sender.send(store.next_due())
        assert 10 <= pause <= 20

        outbox = _status_json(db, capsys)["outbox"]
        assert outbox["next_try_in_s"] < 1  # (two requests are due: the sender waits anyway)
        assert pause - 8 < outbox["sender_waits_s"] <= pause  # (8: a loaded machine)
        text = _status(db, capsys)
        found = re.search(r"next try in (\d+) s \(the sender pauses after a failed send\)", text)
        assert found and pause - 8 <= int(found[1]) <= pause + 1, text

        cloud.refusal = None  # the cloud is back: the sender goes on after its pause
        assert sender.send(store.next_due()) == 0
    text = _status(db, capsys)
    assert "next try in 0 s\n" in text, text  # the third request is due, nothing waits
    assert "last error: none since requests of its export were delivered again" in text, text
    assert _status_json(db, capsys)["outbox"]["sender_waits_s"] is None
    lock.release()  # no daemon: no sender to try, and none pausing (it showed one)
    cloud.refusal = RetryLater(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with contextlib.closing(ResultStore(db)) as store:
        Sender(store, cloud, Backoff(20.0, 20.0)).send(store.next_due())
    text = _status(db, capsys)
    assert "next try once `splitdet edge run` runs on it\n" in text, text
    assert "pauses" not in text and "next try in" not in text, text


def test_a_requeued_request_does_not_hide_the_last_send_error(tmp_path, capsys):
    """A requeue's note ('requeued after a dead letter') is written with a newer time than any
    send error, and was shown as the last error instead of the cloud's real one."""
    db = tmp_path / "edge.sqlite"
    dead, failed = _store_with_images(db, n_ok=0, n_pending=2)
    with contextlib.closing(ResultStore(db)) as store:
        store.dead_letter(dead, "dead letter: refused")
        store.retry_later(failed, time.time() + 60, "UNAVAILABLE: cloud down")
        time.sleep(0.01)  # (the requeue's row change comes after the failure's)
        store.requeue_dead_letters()
    outbox = _status_json(db, capsys)["outbox"]
    assert outbox["requests"] == 2 and outbox["last_error"] == "UNAVAILABLE: cloud down"


def test_answers_that_cannot_be_stored_back_off_and_are_named_as_local(
    tmp_path, monkeypatch, caplog
):
    """The cloud answered and the answer could not be stored (a full disk, a database held
    locked): each answered call reset the sender's failures, so it sent the request again
    every 0.25-0.5 s with an ERROR line each time, and --once's drain_timeout then asked
    whether the cloud was up. The row of errors now grows the pause, and is named as local."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 50)
    db = tmp_path / "edge.sqlite"
    _store_with_images(db, n_ok=0, n_pending=1)
    with contextlib.closing(ResultStore(db)) as store:
        holder = sqlite3.connect(db, isolation_level=None)
        with contextlib.closing(holder), caplog.at_level(logging.ERROR, logger="splitdet"):
            holder.execute("BEGIN IMMEDIATE")  # (the answer cannot be written)
            sender = Sender(store, _Cloud(), Backoff(0.1, 30.0))
            sender.start()
            time.sleep(3.0)
            errors, local = sender.errors, sender.local_error
            holder.execute("ROLLBACK")
            wait_for(lambda: store.outbox_stats().depth == 0, 30, "the answer stored")
            sender.stop()
            sender.join(10)
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "sender_error"]
    assert 2 <= len(lines) <= 8, len(lines)  # (0.1, 0.2, 0.4, 0.8, 1.6 s at most: not 25)
    assert errors == len(lines) and "database is locked" in local
    assert sender.errors == 0 and sender.local_error is None  # (the row ended)


def test_a_call_cancelled_at_the_drain_timeout_keeps_the_local_error(tmp_path, monkeypatch):
    """--once's drain_timeout cancels the call in flight; that pass counted as one without
    error and wiped the row, so the line asked about the cloud half of the time although the
    answers could not be stored here."""
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 50)
    db = tmp_path / "edge.sqlite"
    _store_with_images(db, n_ok=0, n_pending=1)
    with contextlib.closing(ResultStore(db)) as store:
        holder = sqlite3.connect(db, isolation_level=None)
        with contextlib.closing(holder):
            holder.execute("BEGIN IMMEDIATE")  # (the answers cannot be written)
            sender = Sender(store, _Cloud(delay_s=0.6), Backoff(0.05, 0.1))
            sender.start()
            wait_for(lambda: sender.errors >= 2, 30, "errors in a row")
            wait_for(lambda: sender._in_flight, 30, "a call in flight")
            sender.cancel()
            sender.join(10)
            holder.execute("ROLLBACK")
    assert sender.local_error is not None and "database is locked" in sender.local_error
