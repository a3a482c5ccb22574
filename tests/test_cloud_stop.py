"""How the cloud stops with calls running: the calls its grace cuts are logged, a second SIGTERM
ends the grace at once (both were silent: an operator had no record of the calls lost, and a
second signal changed nothing). Real servers on loopback, and one real process."""

from __future__ import annotations

import itertools
import logging
import signal
import threading
import time

import grpc
import pytest
from cloud_fixtures import (
    DETECT,
    make_sample,
    shared_model_dir,
    start_cloud_process,
    start_loopback_server,
)

from splitdet.cloud.serve_loop import HURRY_AFTER_S
from splitdet.edge.client import ClientConfig, CloudClient, RetryLater

from support import wait_for

pytestmark = pytest.mark.timeout(180)

IN_FLIGHT = "splitdet_cloud_in_flight"


def _send_in_background(
    address: str, request_id: str, edge_name: str | None = None
) -> tuple[threading.Thread, list]:
    """A Detect call in a thread, from `edge_name`: (the thread, [its answer or exception])."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=7, codec="int8")
    outcome: list = []

    def send() -> None:
        config = ClientConfig(address, own_connection=True, edge_name=edge_name)
        with CloudClient(config) as client:
            try:
                outcome.append(
                    client.detect(sample.encoded, sample.image, request_id, manifest.fingerprint)
                )
            except Exception as exc:
                outcome.append(exc)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, outcome


def _cut_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [
        record.fields
        for record in caplog.records
        if getattr(record, "fields", {}).get("event") == "calls_cut"
    ]


@pytest.mark.parametrize("hurried", [False, True])
def test_calls_cut_by_the_end_of_the_grace_or_a_second_signal_are_logged(tmp_path, caplog, hurried):
    server = start_loopback_server(tmp_path, threads=2, debug_delay_s=120.0)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    thread, outcome = _send_in_background(f"127.0.0.1:{server.port}", "long")
    wait_for(lambda: server.servicer.running() == 1, 30, "the call running")
    hurry = threading.Event()
    grace = 60.0 if hurried else 1.0
    stopper = threading.Thread(target=server.stop, args=(grace, hurry), daemon=True)
    started = time.monotonic()
    stopper.start()
    if hurried:
        time.sleep(0.5)
        assert stopper.is_alive()  # (waiting for the call within its 60 s)
        hurry.set()
    stopper.join(30)
    assert not stopper.is_alive(), "stop() did not end"
    assert time.monotonic() - started < 30
    thread.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], RetryLater), outcome
    assert outcome[0].code is grpc.StatusCode.UNAVAILABLE
    cut = _cut_lines(caplog)
    assert len(cut) == 1 and cut[0]["calls"] == 1 and cut[0]["hurried"] is hurried


class _SlowRefusalSink(logging.Handler):
    """A log handler that takes a second over each refused line, before the lines propagate."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "fields", {}).get("event") == "refused":
            time.sleep(1.0)


def test_cut_calls_name_their_edges_and_stopped_is_the_last_line(tmp_path, caplog):
    """The calls_cut WARNING named no camera, and the cut calls' own refused lines came after
    "stopped": an operator read a stopped server as still refusing."""
    server = start_loopback_server(tmp_path, threads=2, max_concurrent=2, debug_delay_s=120.0)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    calls = [_send_in_background(f"127.0.0.1:{server.port}", f"long-{name}", name)
             for name in ("press-2", "press-1")]  # fmt: skip
    wait_for(lambda: server.servicer.running() == 2, 30, "the calls running")
    slow = _SlowRefusalSink()  # (a loaded machine: the cut calls' threads end late)
    logging.getLogger("splitdet.cloud.call_status").addHandler(slow)
    try:
        server.stop(0.5)
    finally:
        logging.getLogger("splitdet.cloud.call_status").removeHandler(slow)
    for thread, _ in calls:
        thread.join(30)
    cut = _cut_lines(caplog)
    assert len(cut) == 1 and cut[0]["edges"] == ["press-1", "press-2"], caplog.text
    assert "press-1, press-2" in next(r.getMessage() for r in caplog.records
                                      if "cancelled" in r.getMessage())  # fmt: skip
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert events.count("refused") == 2 and events[-1] == "stopped", events


def test_calls_still_receiving_their_request_are_counted_as_cut(tmp_path, caplog):
    """A network review: a stop that cut Detect calls still uploading their request over a
    slow link logged no `calls_cut` (only calls already running were counted), against the
    README. They are now counted, with the edge each names."""
    server = start_loopback_server(tmp_path, threads=2)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    sent = threading.Event()

    def never_sent():
        sent.wait()
        yield b""

    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.stream_unary(DETECT).future(
                never_sent(), timeout=120, metadata=(("splitdet-edge", "slow-press"),)
            )
            wait_for(lambda: server._guard.receiving()[0] == 1, 30, "the call receiving")
            server.stop(0.2)
            with pytest.raises(grpc.RpcError) as ended:
                call.result(timeout=30)
    finally:
        sent.set()
    assert ended.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    [cut] = _cut_lines(caplog)
    assert (cut["calls"], cut["receiving"], cut["edges"]) == (0, 1, ["slow-press"]), cut
    assert server._guard.receiving() == (0, [])


def test_a_stop_with_nothing_running_logs_no_cut_calls(tmp_path, caplog):
    server = start_loopback_server(tmp_path, threads=2)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    server.stop(0)
    assert _cut_lines(caplog) == []


def test_a_second_sigterm_ends_the_grace_of_a_cloud_process(tmp_path):
    _, model_dir, _ = shared_model_dir(0)
    server = start_cloud_process(
        model_dir, tmp_path, "hurried", "--grace", "120", "--debug-delay", "120"
    )
    try:
        thread, outcome = _send_in_background(server.address, "long")
        wait_for(lambda: server.metrics().get(IN_FLIGHT, 0) >= 1, 60, "a call")
        server.process.terminate()
        wait_for(lambda: "draining for up to 120.0 s" in server.log(), 30, "the drain")
        time.sleep(HURRY_AFTER_S + 0.2)  # (one sent with the first would not count)
        assert server.process.poll() is None  # (waiting for the call within its grace)
        server.process.terminate()
        code = server.process.wait(timeout=60)
        thread.join(30)
    finally:
        server.stop()
    assert code == 0, server.log()
    assert "asked again to stop: 1 Detect call(s) still running were cancelled" in server.log()
    assert len(outcome) == 1 and isinstance(outcome[0], RetryLater), outcome


def test_signals_sent_together_keep_the_grace_and_late_ones_do_not_kill(tmp_path):
    """A terminal's SIGINT and a wrapper's SIGTERM come together: the second cut every call
    at once. And one more after the stop (a SIGHUP too), while the process exits, killed it
    (exit 143, 130 or 129)."""
    _, model_dir, _ = shared_model_dir(0)
    server = start_cloud_process(model_dir, tmp_path, "pair", "--grace", "60", "--debug-delay", "3")
    try:
        thread, outcome = _send_in_background(server.address, "short")
        wait_for(lambda: server.metrics().get(IN_FLIGHT, 0) >= 1, 60, "a call")
        server.process.send_signal(signal.SIGINT)
        server.process.terminate()
        wait_for(lambda: "INFO splitdet.cloud.server: stopped" in server.log(), 60, "the stop")
        for sig in itertools.cycle((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):  # until exit
            if server.process.poll() is not None:
                break
            server.process.send_signal(sig)
            time.sleep(0.0005)  # (the gap a late signal could fall in was under 1 ms)
        thread.join(30)
    finally:
        server.stop()
    assert server.process.returncode == 0, server.log()
    assert "calls_cut" not in server.log()
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome


def test_identical_calls_waiting_on_one_computation_are_counted_when_cut(tmp_path, caplog):
    """Calls joined to an identical one running (an edge re-sending) hold no slot: a stop
    that cut three calls said it cut one."""
    server = start_loopback_server(tmp_path, threads=4, debug_delay_s=120.0)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    calls = [_send_in_background(f"127.0.0.1:{server.port}", "same") for _ in range(3)]
    wait_for(lambda: server.servicer.running() == 3, 30, "three calls in")
    server.stop(1.0)
    for thread, _ in calls:
        thread.join(30)
    assert all(isinstance(outcome[0], RetryLater) for _, outcome in calls)
    cut = _cut_lines(caplog)
    assert len(cut) == 1 and cut[0]["calls"] == 3


def test_a_stop_with_no_grace_ends_the_grace_of_a_stop_running(tmp_path):
    """`stop(0)` (a `with` block's end) while a stop waits out its grace returned at once and
    shortened nothing; it now ends that grace and returns once the server has stopped."""
    server = start_loopback_server(tmp_path, threads=2, debug_delay_s=120.0)
    thread, outcome = _send_in_background(f"127.0.0.1:{server.port}", "long")
    wait_for(lambda: server.servicer.running() == 1, 30, "the call running")
    first = threading.Thread(target=server.stop, args=(120,), daemon=True)
    first.start()
    time.sleep(0.5)
    started = time.monotonic()
    server.stop(0)
    assert time.monotonic() - started < 60
    first.join(30)
    thread.join(30)
    assert not first.is_alive()
    assert isinstance(outcome[0], RetryLater)
