"""A second review of the cloud short of resources (commit c14043c), each against real
in-process servers and gRPC clients on loopback:

1. a failure raised while handling a MemoryError (its `__context__`) was read as a shortage:
   RESOURCE_EXHAUSTED, retried for ever, its traceback lost; and any RuntimeError naming
   DefaultCPUAllocator was one. Only the exception itself and its `raise ... from` causes count;
2. a shortage's message said "the request is fine: retry later", though a request at the
   export's largest input can fail every time: it names the request's size and what to do;
3. a shortage's WARNING shared its log line's rate limit with busy refusals (INFO), which hid it;
4. an answers DB on a nearly full disk stopped the server from starting;
5. `calls_cut` counted health checks and GetManifest calls still receiving their request;
6. `stop_incomplete` said "threads left: none" (daemon threads, gRPC's all, left out), and its
   stacks said "the process goes on" right before the exit.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from cloud_fixtures import (
    DETECT,
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

STORE_ERRORS = "splitdet_cloud_answers_store_errors_total"


@pytest.fixture(scope="module")
def model():
    return shared_model_dir(0)


@pytest.fixture(scope="module")
def sample(model):
    return make_sample(model[0], seed=1, codec="int8")


def _events(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == event]


# ---------------------------------------------- 1. only the exception itself, or its cause


def _bug_in_the_fallback(*_args, **_kwargs):
    try:
        raise MemoryError("elsewhere")
    except MemoryError:
        raise ValueError("a bug in the fallback")  # noqa: B904 (the reviewer's case)


def _raised_from_a_memory_error(*_args, **_kwargs):
    try:
        raise MemoryError("Unable to allocate 50.0 MiB for an array")
    except MemoryError as exc:
        raise RuntimeError("the heads failed") from exc


def _raise(error: BaseException):
    def fail(*_args, **_kwargs):
        raise error

    return fail


@pytest.mark.parametrize(
    ("fail", "expected"),
    [
        (_bug_in_the_fallback, grpc.StatusCode.INTERNAL),
        (
            _raise(RuntimeError("DefaultCPUAllocator: invalid argument 2")),
            grpc.StatusCode.INTERNAL,
        ),
        (_raised_from_a_memory_error, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            _raise(RuntimeError("can't allocate memory: you tried to allocate 52428800 bytes")),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
    ids=[
        "raised-during-a-MemoryError",
        "DefaultCPUAllocator-alone",
        "raised-from-a-MemoryError",
        "allocator-without-its-name",
    ],
)
def test_only_the_error_itself_or_its_explicit_cause_is_a_shortage(
    fail, expected, model, sample, tmp_path, caplog, monkeypatch
):
    """Before: the first two were RESOURCE_EXHAUSTED "ran short of memory" at WARNING, the
    ValueError's text and traceback lost, and the edge retried them for ever."""
    _, _, manifest = model
    with loopback_detect(tmp_path) as (_server, send):
        monkeypatch.setattr(torch, "from_numpy", fail)
        with caplog.at_level(logging.INFO, logger="splitdet"):
            code, message = detect_code(send, detect_bytes(sample, manifest.fingerprint, "cause-1"))
    assert code is expected, (code, message)
    if expected is grpc.StatusCode.INTERNAL:
        assert "ran short of" not in message, message
        [failed] = _events(caplog, "failed")
        assert failed.levelno == logging.ERROR and failed.exc_info is not None
        assert "Traceback" in caplog.text and message.startswith("internal error: "), message
    else:
        assert "ran short of memory" in message and isinstance(classify(code, message), RetryLater)
        assert _events(caplog, "failed") == []


# ------------------------------------------------------------------ 2. an honest message


def test_a_shortage_message_names_the_request_size_and_what_to_do(
    model, sample, tmp_path, monkeypatch
):
    """Before: "the request is fine: retry later", also for a request that fails every time
    on a cloud without the memory for the export's largest inputs."""
    _, _, manifest = model
    h, w = sample.image.resized_hw
    with loopback_detect(tmp_path) as (_server, send):
        monkeypatch.setattr(torch, "from_numpy", _raise(MemoryError("Unable to allocate")))
        code, message = detect_code(send, detect_bytes(sample, manifest.fingerprint, "size-1"))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
    assert "request is fine" not in message, message
    assert f"for this request ({h}x{w} px after resizing): not the request's fault" in message
    assert (
        "it is retried; if it keeps failing, the cloud needs more memory for this "
        "export's largest inputs (lower --max-concurrent, or more memory)" in message
    ), message
    assert isinstance(classify(code, message), RetryLater)  # (the edge keeps retrying it)


# ----------------------------------------------- 3. a shortage's own log line, not a busy one


def test_a_shortage_is_logged_after_a_busy_refusal_of_the_same_edge(
    model, sample, tmp_path, caplog, monkeypatch
):
    """Before: both keyed ("refused", edge, "RESOURCE_EXHAUSTED"): the busy line (INFO) logged
    first, the shortage (WARNING) within the minute after was left out."""
    _, _, manifest = model
    entered, go = threading.Event(), threading.Event()

    def held_then_short(*_args, **_kwargs):
        entered.set()
        go.wait(60)
        raise MemoryError("Unable to allocate 50.0 MiB for an array")

    with loopback_detect(tmp_path, threads=2, max_concurrent=1, max_queued=0) as (_server, send):
        monkeypatch.setattr(torch, "from_numpy", held_then_short)
        outcome: list = []
        first = threading.Thread(
            target=lambda: outcome.append(
                detect_code(send, detect_bytes(sample, manifest.fingerprint, "holds-the-slot"))
            ),
            daemon=True,
        )
        with caplog.at_level(logging.INFO, logger="splitdet"):
            first.start()
            wait_for(entered.is_set, 30, "the first call running its heads")
            busy = detect_code(send, detect_bytes(sample, manifest.fingerprint, "busy"))
            go.set()
            first.join(60)
    assert busy[0] is grpc.StatusCode.RESOURCE_EXHAUSTED and "ran short" not in busy[1], busy
    assert outcome and outcome[0][0] is grpc.StatusCode.RESOURCE_EXHAUSTED, outcome
    refused = _events(caplog, "refused")
    short = [r for r in refused if "ran short of memory" in r.fields["message"]]
    assert len(refused) == 2 and len(short) == 1, [r.getMessage() for r in refused]
    assert short[0].levelno == logging.WARNING


# ------------------------------------------------------- 4. a nearly full answers disk


def _fill(folder: Path, leave: int) -> None:
    """Fill `folder`'s file system to leave about `leave` bytes free."""
    stat = os.statvfs(folder)
    with open(folder / "filler", "wb") as fh:
        fh.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


def test_an_answers_db_on_a_nearly_full_disk_does_not_stop_the_start(
    small_disk, tmp_path, capsys, model, sample
):
    """Before: exit 2 "--answers-db …: cannot write it: no space left on device (500 KiB
    free …)", though the store opened, answered and kept answers there (it is not fatal
    either when it cannot: answers still go out)."""
    from splitdet.cloud.idempotency import IdempotencyStore
    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig

    db = small_disk / "a.sqlite"
    IdempotencyStore(db).close()
    _fill(small_disk, 500 * 1024)
    code = main(
        [
            "cloud",
            "--model",
            str(tmp_path / "no-such-model"),
            "--listen",
            "127.0.0.1:0",
            "--answers-db",
            str(db),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "no space left" not in err and "no-such-model" in err, err
    _, model_dir, manifest = model
    config = ServerConfig(model_dir=model_dir, listen="127.0.0.1:0", metrics_port=0, answers_db=db)
    server = CloudServer(config).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            send = channel.unary_unary(DETECT)
            assert detect_code(send, detect_bytes(sample, manifest.fingerprint, "kept-1"))[0] is (
                grpc.StatusCode.OK
            )
        assert scrape_metrics(server.metrics_port)[STORE_ERRORS] == 0
    finally:
        server.stop(0)


# ------------------------------------------------------------- 5. calls_cut: Detect only


def _stall(channel: grpc.Channel, method: str) -> tuple[grpc.Future, threading.Event]:
    """A call of `method` that sends its headers and never its request: (its future, the
    event that lets its request stream end)."""
    stop = threading.Event()

    def never() -> Iterator[bytes]:
        stop.wait()
        return
        yield  # (a generator)

    call = channel.stream_unary(method, request_serializer=None, response_deserializer=None)
    return call.future(never(), timeout=120), stop


def test_a_stop_cutting_only_health_checks_and_get_manifest_logs_no_cut_calls(tmp_path, caplog):
    """Before: "0 Detect call(s) still running and 2 still receiving their request were
    cancelled, from edge(s) unnamed": a health check or a GetManifest cut loses nothing."""
    server = start_loopback_server(tmp_path, threads=2)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    stops = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = []
            for method in ("/grpc.health.v1.Health/Check", "/splitdet.v1.Detection/GetManifest"):
                call, stop = _stall(channel, method)
                calls.append(call)
                stops.append(stop)
            wait_for(
                lambda: server._guard.busy("server") == 1 and server._guard.busy("manifest") == 1,
                30,
                "the calls holding threads",
            )
            server.stop(0.2)
            for call in calls:
                with pytest.raises(grpc.RpcError):
                    call.result(timeout=30)
    finally:
        for stop in stops:
            stop.set()
    cut = _events(caplog, "calls_cut")
    assert cut == [], [r.getMessage() for r in cut]


# --------------------------------------------------- 6. stop_incomplete names what is stuck


def test_stop_incomplete_names_the_daemon_threads_left_and_its_stacks_say_it_exits(
    tmp_path, caplog
):
    """Before: "threads left: none" (every daemon thread left out: gRPC's, the stop's own),
    and the stacks' header "stacks of N threads (SIGUSR1); the process goes on:"."""
    from splitdet.cloud.server import StopIncomplete

    server = start_loopback_server(tmp_path, grace_s=0.2)
    lock = server._server._state.lock  # gRPC's own
    stuck = threading.Event()
    waiter = threading.Thread(target=stuck.wait, name="test-stuck-daemon", daemon=True)
    waiter.start()
    raised: list[BaseException] = []

    def stop() -> None:
        try:
            server.stop()
        except BaseException as exc:
            raised.append(exc)

    lock.acquire()
    stopper = threading.Thread(target=stop, name="test-stopper", daemon=True)
    try:
        with caplog.at_level(logging.INFO, logger="splitdet"):
            stopper.start()
            stopper.join(60)  # (a bound for the test, far beyond the stop's)
            assert not stopper.is_alive(), "the stop did not return"
    finally:
        lock.release()
        stuck.set()
    assert len(raised) == 1 and isinstance(raised[0], StopIncomplete), raised
    [error] = _events(caplog, "stop_incomplete")
    threads = error.fields["threads"]
    assert "test-stuck-daemon" in threads and "splitdet-grpc-stop" in threads, threads
    assert "test-stopper" not in threads and "threads left: none" not in error.getMessage()
    [stacks] = _events(caplog, "stacks")
    header = stacks.getMessage().splitlines()[0]
    assert header.endswith("threads (the stop did not complete; exiting):"), header
    assert "SIGUSR1" not in header and "goes on" not in header, header


def test_sigusr1_stacks_keep_their_wording(caplog):
    from splitdet.shared.stacks import log_stacks

    with caplog.at_level(logging.INFO, logger="splitdet"):
        log_stacks()
    [stacks] = _events(caplog, "stacks")
    assert "threads (SIGUSR1); the process goes on:" in stacks.getMessage().splitlines()[0]
