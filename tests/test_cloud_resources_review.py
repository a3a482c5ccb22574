"""An SRE's review of the cloud server short of resources, each against real components:

1. a cloud short of memory or threads answered INTERNAL (torch's allocator, a MemoryError) or
   gRPC's UNKNOWN (the receive timer's thread that could not start), which the edge keeps as
   dead letters: now RESOURCE_EXHAUSTED, which it retries as for a busy cloud;
2. a stop whose gRPC stop never completes (its state lock held for good) hung the process
   until kill -9: now it is bounded, logged with the threads' stacks, and exits 1;
3. a read-only or full file system under --answers-db gave sqlite's bare "unable to open
   database file" / "database or disk is full", after the models' load: now it says which,
   and what to do; a read-only one before the load, a full one once the store cannot open
   (a nearly full disk is no reason to refuse: tests/test_cloud_review2.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch
from cloud_fixtures import (
    detect_bytes,
    detect_code,
    loopback_detect,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    start_loopback_server,
)

from splitdet.edge.client_errors import RetryLater, classify
from splitdet.shared.cli import main

from support import wait_for

pytestmark = pytest.mark.timeout(180)

FAILED = 'splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED",method="Detect"}'
#: torch's CPU allocator's error as the SRE's edge logged it (an address-space limit)
TORCH_OOM = (
    "[enforce fail at alloc_cpu.cpp:114] data. DefaultCPUAllocator: can't allocate memory: you "
    "tried to allocate 52428800 bytes. Error code 12 (Cannot allocate memory)"
)


@pytest.fixture(scope="module")
def model():
    return shared_model_dir(0)


@pytest.fixture(scope="module")
def sample(model):
    return make_sample(model[0], seed=1, codec="int8")


# ------------------------------------------------------------ 1. short of memory or threads


@pytest.mark.parametrize(
    "error",
    [RuntimeError(TORCH_OOM), MemoryError("Unable to allocate 50.0 MiB for an array")],
    ids=["torch-allocator", "MemoryError"],
)
def test_a_cloud_short_of_memory_refuses_for_a_retry(error, model, sample, tmp_path, caplog,
                                                     monkeypatch):  # fmt: skip
    """Before: INTERNAL "internal error: RuntimeError: ... can't allocate memory", a dead
    letter at the edge. The heads' first torch call fails as under `prlimit --as`."""
    _, _, manifest = model

    def no_memory(*_args, **_kwargs):
        raise error

    with loopback_detect(tmp_path) as (server, send):
        monkeypatch.setattr(torch, "from_numpy", no_memory)
        with caplog.at_level(logging.INFO, logger="splitdet"):
            code, message = detect_code(send, detect_bytes(sample, manifest.fingerprint, "oom-1"))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
        assert "ran short of memory" in message and type(error).__name__ in message, message
        assert isinstance(classify(code, message), RetryLater)  # the edge's own reading
        assert scrape_metrics(server.metrics_port)[FAILED] == 1
        lines = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "refused"]
        assert lines and lines[0].levelno == logging.WARNING and lines[0].exc_info is None
        monkeypatch.undo()  # memory again: the retry is answered
        assert detect_code(send, detect_bytes(sample, manifest.fingerprint, "oom-1")) == (
            grpc.StatusCode.OK, "")  # fmt: skip


def test_a_thread_that_cannot_start_refuses_for_a_retry(model, sample, tmp_path, caplog,
                                                        monkeypatch):  # fmt: skip
    """Before: the receive timer's `Thread.start()` raised outside any handler and gRPC
    answered UNKNOWN "Exception calling application: can't start new thread", a dead letter."""
    _, _, manifest = model

    def cannot_start(_self):
        raise RuntimeError("can't start new thread")

    with loopback_detect(tmp_path) as (server, send):
        monkeypatch.setattr(threading.Timer, "start", cannot_start)
        with caplog.at_level(logging.INFO, logger="splitdet"):
            code, message = detect_code(
                send, detect_bytes(sample, manifest.fingerprint, "threads-1")
            )
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
        assert "ran short of threads" in message, message
        assert "process/thread limit is too low" in message and "LimitNPROC=" in message
        assert "more memory" not in message, message  # (the limit is on threads)
        assert isinstance(classify(code, message), RetryLater)
        assert any(getattr(r, "fields", {}).get("event") == "refused" for r in caplog.records)
        monkeypatch.undo()  # (the metrics endpoint starts a Timer too)
        assert scrape_metrics(server.metrics_port)[FAILED] == 1
        assert detect_code(send, detect_bytes(sample, manifest.fingerprint, "threads-1")) == (
            grpc.StatusCode.OK, "")  # fmt: skip


# -------------------------------------------------------------------- 2. a bounded stop


def test_a_stop_gRPC_never_completes_is_bounded_and_logged(tmp_path, caplog):
    """gRPC's state lock held for good (as by a `Thread.start()` that never returns): before,
    `stop` blocked on it for ever."""
    from splitdet.cloud.server import StopIncomplete

    server = start_loopback_server(tmp_path, grace_s=0.2)
    lock = server._server._state.lock  # gRPC's own
    lock.acquire()
    raised: list[BaseException] = []

    def stop() -> None:
        try:
            server.stop()
        except BaseException as exc:
            raised.append(exc)

    stopper = threading.Thread(target=stop, daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="splitdet"):
            stopper.start()
            stopper.join(60)  # (a bound for the test, far beyond the stop's)
            assert not stopper.is_alive(), "the stop did not return"
    finally:
        lock.release()
    assert len(raised) == 1 and isinstance(raised[0], StopIncomplete), raised
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert "stop_incomplete" in events and "stacks" in events and "stopped" not in events
    error = next(r for r in caplog.records if r.fields.get("event") == "stop_incomplete")
    assert error.levelno == logging.ERROR and "did not complete" in error.getMessage()


#: `splitdet cloud` whose gRPC server's state lock is taken for good once it serves.
STUCK_CLOUD = """
import sys, threading
import grpc._server
from splitdet.shared.cli import main

started = grpc._server._Server.start

def start(self):
    started(self)
    held = threading.Event()

    def hold():
        self._state.lock.acquire()
        held.set()
        threading.Event().wait()

    threading.Thread(target=hold, daemon=True).start()
    held.wait()

grpc._server._Server.start = start
sys.exit(main(sys.argv[1:]))
"""


def test_a_cloud_whose_stop_hangs_exits_non_zero(model, tmp_path):
    """Before: `SIGTERM: draining for up to 0.2 s`, then nothing until kill -9."""
    _, model_dir, _ = model
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "cloud.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", STUCK_CLOUD, "cloud", "--model", str(model_dir),
             "--listen", "127.0.0.1:0", "--threads", "1", "--grace", "0.2",
             "--answers-db", str(tmp_path / "a.sqlite"), "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
    try:
        wait_for(lambda: ready.exists() or process.poll() is not None, 90, "the cloud serving")
        assert ready.exists(), log_path.read_text()
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(60)  # (a bound for the test, far beyond the stop's)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the cloud never exited:\n{log_path.read_text()}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log_path.read_text()
    assert code == 1, text
    assert "stop_incomplete" in text and "gRPC's stop did not complete" in text, text
    assert "threads (the stop did not complete; exiting):" in text, text
    assert "threads (SIGUSR1); the process goes on" not in text, text
    assert not ready.exists()


# ------------------------------------------------------- 3. a read-only or full answers disk


def _cloud_error(capsys, answers_db: Path, tmp_path: Path) -> str:
    """`splitdet cloud`'s error line for `answers_db`, its --model a folder that does not
    exist: the answers database must be judged before any model is loaded."""
    code = main(["cloud", "--model", str(tmp_path / "no-such-model"), "--listen",
                 "127.0.0.1:0", "--answers-db", str(answers_db)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_a_read_only_answers_disk_is_named_before_the_models_load(small_disk, tmp_path, capsys):
    """Before: `--answers-db …: unable to open database file`, after the load."""
    from splitdet.cloud.idempotency import IdempotencyStore

    existing = small_disk / "ans.sqlite"
    IdempotencyStore(existing).close()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, timeout=20)
    for db in (existing, small_disk / "new.sqlite"):
        err = _cloud_error(capsys, db, tmp_path)
        assert f"--answers-db {db}: " in err and "is mounted read-only" in err, err
        assert "remount it read-write or give --answers-db on another" in err, err
        assert "no-such-model" not in err and "Traceback" not in err, err


def test_a_full_answers_disk_is_named_when_the_store_cannot_open(small_disk, model, tmp_path,
                                                                 capsys):  # fmt: skip
    """Before: `--answers-db …: database or disk is full`. Named once opening the store
    fails, not guessed from the free space (an existing store on a nearly full disk works)."""
    _, model_dir, _ = model
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
    db = small_disk / "ans.sqlite"
    code = main(["cloud", "--model", str(model_dir), "--listen", "127.0.0.1:0",
                 "--metrics-port", "0", "--answers-db", str(db)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--answers-db {db}: cannot open it (database or disk is full)" in err, err
    assert "no space left on device" in err and "Traceback" not in err, err
