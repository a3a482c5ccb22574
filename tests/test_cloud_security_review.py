"""The cloud security review's findings, each against a real server on loopback.

1. Request ids were global across tokens: one token holder could claim the id another edge's
   image will be sent under (it is predictable), making that image a dead letter.
2. Unauthenticated or cheap calls under made-up edge names used up the edge labels.
3. Calls that send their headers and never their request held the server's threads for ever.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
from cloud_fixtures import (
    DETECT,
    LAST_SEEN,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    start_loopback_server,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitdet.cloud import metrics as metrics_module
from splitdet.cloud import threads as server_threads
from splitdet.cloud.health_status import HealthStatus
from splitdet.cloud.server import CloudServer
from splitdet.shared.edge_name import EDGE_NAME_KEY
from splitdet.shared.messages import build_request
from splitdet.shared.wire import detection_pb2 as pb

pytestmark = pytest.mark.timeout(120)

TOKEN_A = "token-of-camera-a-0123456789abcdef"
TOKEN_B = "token-of-camera-b-fedcba9876543210"


def _start(tmp_path, **settings) -> CloudServer:
    return start_loopback_server(tmp_path, threads=1, **settings)


def _request(seed: int, request_id: str) -> bytes:
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=seed, codec="int8")
    return build_request(
        sample.encoded, sample.image, request_id, manifest.fingerprint
    ).SerializeToString()


def _detect(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        DETECT, request_serializer=None, response_deserializer=pb.DetectResponse.FromString
    )


def test_a_request_id_is_the_callers_own_per_token(tmp_path):
    """cam-b (token B) sends id X first with its own features; cam-a (token A) sending its
    genuine request under X is answered (not INVALID_ARGUMENT "already used"), and each one's
    byte-identical repeat is still answered from the store."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN_A}\n{TOKEN_B}\n")
    server = _start(tmp_path, token_file=tokens)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    detect = _detect(channel)
    a = [("authorization", f"Bearer {TOKEN_A}"), (EDGE_NAME_KEY, "cam-a")]
    b = [("authorization", f"Bearer {TOKEN_B}"), (EDGE_NAME_KEY, "cam-b")]
    poison, genuine = _request(11, "request-x"), _request(12, "request-x")
    try:
        assert not detect(poison, metadata=b, timeout=30).cached
        assert not detect(genuine, metadata=a, timeout=30).cached
        assert detect(genuine, metadata=a, timeout=30).cached
        assert detect(poison, metadata=b, timeout=30).cached
    finally:
        channel.close()
        server.stop(0)


def test_cheap_calls_under_made_up_names_take_no_edge_label(tmp_path, monkeypatch):
    """GetManifest calls under many names (no token required) leave every label free, and so
    does a malformed Detect (it counts as "other"); the real camera's first answered Detect
    claims its own label."""
    monkeypatch.setattr(metrics_module, "MAX_EDGE_LABELS", 3)
    server = _start(tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    manifest = channel.unary_unary(
        "/splitdet.v1.Detection/GetManifest",
        request_serializer=pb.GetManifestRequest.SerializeToString,
        response_deserializer=pb.ManifestResponse.FromString,
    )
    try:
        for index in range(5):
            name = ((EDGE_NAME_KEY, f"bogus-{index}"),)
            manifest(pb.GetManifestRequest(), metadata=name, timeout=10)
        with pytest.raises(grpc.RpcError):  # refused: not a DetectRequest
            _detect(channel)(b"\xff", metadata=((EDGE_NAME_KEY, "cam-refused"),), timeout=10)
        reply = _detect(channel)(
            _request(13, "real"), metadata=((EDGE_NAME_KEY, "cam-real"),), timeout=30
        )
        assert reply.request_id == "real"
        metrics = scrape_metrics(server.metrics_port)
    finally:
        channel.close()
        server.stop(0)
    seen = {key for key in metrics if key.startswith("splitdet_cloud_edge_last_seen")}
    assert seen == {LAST_SEEN % "cam-real", LAST_SEEN % "other"}


def test_open_health_watches_do_not_use_up_the_health_threads(tmp_path, monkeypatch):
    """A health Watch returns its thread at once and keeps its stream open: counted as holding
    a thread for its life, 32 of them refused every health check and token refusal."""
    monkeypatch.setattr(server_threads, "SERVER_RPC_THREADS", 4)
    server = _start(tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = health_pb2_grpc.HealthStub(channel)
    watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(8)]
    try:
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for watch in watches:
            watch.cancel()
        channel.close()
        server.stop(0)


def test_a_server_watched_by_health_probes_stops_and_tells_them(tmp_path):
    """grpc_health sent watchers their new status under its lock while gRPC's event thread
    waited for that lock to forget a cancelled watcher: stop() with open and cancelled Watch
    streams hung for good. Now it stops, and the watchers still open hear NOT_SERVING."""
    server = _start(tmp_path)
    channel, gone = (grpc.insecure_channel(f"127.0.0.1:{server.port}") for _ in range(2))
    watches = [
        health_pb2_grpc.HealthStub(on).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        for on in [channel] * 2 + [gone] * 8
    ]
    for watch in watches:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    for watch in watches[2:]:
        watch.cancel()
    stopper = threading.Thread(target=server.stop, args=(5,), daemon=True)
    stopper.start()
    stopper.join(30)
    try:
        assert not stopper.is_alive(), "stop() hung with health watchers open"
        for watch in watches[:2]:
            statuses = [answer.status for answer in _until_closed(watch)]
            assert statuses == [health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        channel.close()
        gone.close()


def test_an_open_health_watch_does_not_hold_the_stop_for_its_grace(tmp_path):
    """A probe watching health (gRPC's client-side health checking does) held every stop for
    the whole grace, up to an hour, after it had heard NOT_SERVING: its stream stayed open.
    Now each stream hears NOT_SERVING (a name never set, nothing more) and is ended with OK,
    and an idle server stops at once."""
    server = _start(tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        watches = [
            stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=120)
            for name in ("", "", "never.set")
        ]
        firsts = [next(watch).status for watch in watches]
        assert firsts[:2] == [health_pb2.HealthCheckResponse.SERVING] * 2
        assert firsts[2] == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        started = time.monotonic()
        stopper = threading.Thread(target=server.stop, args=(60,), daemon=True)
        stopper.start()
        rest = [list(watch) for watch in watches]  # (an RpcError here: not ended with OK)
        stopper.join(60)
        assert not stopper.is_alive()
        assert time.monotonic() - started < 30, "stop() waited out the grace for the watchers"
        not_serving = health_pb2.HealthCheckResponse(
            status=health_pb2.HealthCheckResponse.NOT_SERVING
        )
        assert rest == [[not_serving], [not_serving], []]
        assert all(watch.code() is grpc.StatusCode.OK for watch in watches)
    finally:
        channel.close()


def test_clients_opening_and_cancelling_health_watches_do_not_freeze_the_server(tmp_path):
    """grpc_health sent a new Watch its first status under its lock; gRPC's event thread,
    forgetting a cancelled Watch, waited for that lock while the send waited for it. Two
    seconds of watches opened and cancelled (no token needed) froze every call for good."""
    server = _start(tmp_path)
    address = f"127.0.0.1:{server.port}"
    until = time.monotonic() + 2

    def open_and_cancel() -> None:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < until:
                watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=5) for _ in range(6)]
                for watch in watches[::2]:
                    watch.cancel()
                for watch in watches[1::2]:
                    with contextlib.suppress(grpc.RpcError):
                        next(watch)
                    watch.cancel()

    callers = [threading.Thread(target=open_and_cancel, daemon=True) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    try:
        with grpc.insecure_channel(address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert not any(caller.is_alive() for caller in callers)
    finally:
        server.stop(0)


def _until_closed(watch) -> list:
    """The answers a Watch stream gives until the server closes it."""
    answers = []
    try:
        answers.extend(watch)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
    return answers


def _stall(channel: grpc.Channel, method: str, count: int, metadata=()) -> tuple:
    """`count` calls of `method` that send their headers and never their request: (their
    futures, the event that would let their request streams end)."""
    stop = threading.Event()

    def never() -> Iterator[bytes]:
        stop.wait()
        return
        yield  # (a generator)

    call = channel.stream_unary(method, request_serializer=None, response_deserializer=None)
    return [call.future(never(), metadata=metadata) for _ in range(count)], stop


def _metrics_once(server: CloudServer, ready: Callable[[dict], bool]) -> dict:
    """The server's metrics once `ready` holds for them (within 30 s)."""
    deadline = time.monotonic() + 30
    while not ready(metrics := scrape_metrics(server.metrics_port)):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    return metrics


def _health(channel: grpc.Channel) -> tuple[str, float]:
    """(SERVING or the status code's name, seconds) of one health check."""
    start = time.monotonic()
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        outcome = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as exc:
        outcome = exc.code().name
    return outcome, time.monotonic() - start


def test_calls_that_never_send_their_request_are_refused_beyond_the_threads_then_ended(
    tmp_path, monkeypatch
):
    """The reviewer's slow loris: stalled health checks and Detects held every thread (health
    DEADLINE_EXCEEDED, other edges' Detects hanging), unseen and for ever. Now calls beyond a
    pool's threads are refused at once (counted), and the stalled calls end within the
    connection age + --max-call, after which health answers again."""
    monkeypatch.setattr(server_threads, "SERVER_RPC_THREADS", 3)
    monkeypatch.setattr(server_threads, "SPARE_RPC_THREADS", 2)
    server = _start(
        tmp_path, max_concurrent=1, max_queued=0, max_connection_age_s=3.0, max_call_s=3.0
    )
    request = _request(14, "victim")  # (a forward pass: made before the calls stall)
    attacker = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    victim = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stalled_health, stop_health = _stall(attacker, "/grpc.health.v1.Health/Check", 5)
    stalled_detect, stop_detect = _stall(attacker, DETECT, 5)
    exhausted = 'splitdet_cloud_rpc_threads_exhausted_total{pool="%s"}'
    try:
        # (the stalled calls reach the server: 3 hold the server's threads, 3 the Detect
        # pool's, the rest refused; outcomes, not times, tell "at once" from a 5 s deadline)
        metrics = _metrics_once(
            server,
            lambda m: m.get(exhausted % "server", 0) >= 2 and m.get(exhausted % "detect", 0) >= 2,
        )
        assert metrics['splitdet_cloud_rpc_threads_busy{pool="detect"}'] == 3
        outcome, _ = _health(victim)
        assert outcome in ("SERVING", "RESOURCE_EXHAUSTED"), outcome
        try:
            _detect(victim)(request, timeout=5)
            outcome = "OK"
        except grpc.RpcError as exc:
            outcome = exc.code().name
        assert outcome == "RESOURCE_EXHAUSTED", outcome
        assert scrape_metrics(server.metrics_port)[exhausted % "detect"] >= 3
        # age 3 s (+10%) and 3 s for the calls on it: every stalled call ends, its thread free
        for future in stalled_health + stalled_detect:
            assert future.exception(timeout=30) is not None
        outcome, _ = _health(victim)
        assert outcome == "SERVING", outcome
        assert _detect(victim)(request, timeout=30).request_id == "victim"
    finally:
        stop_health.set()
        stop_detect.set()
        attacker.close()
        victim.close()
        server.stop(0)


class _Context:
    """What Watch uses of a gRPC call's context: a call still open."""

    def add_callback(self, callback) -> bool:
        return True


def test_a_watcher_that_lets_nothing_through_holds_no_call_and_no_stop():
    """A client may announce a flow-control window of 0: a send to it then waits for good.
    The first send was made on a thread of gRPC's pool (held, uncounted, for as long), and the
    NOT_SERVING of a stop waited for it: stop() hung until the client left. Now one sender
    thread waits, and Watch, Check and the stop go on; the watcher hears every status in
    order once its window opens. (gRPC's send callback stood in for: it blocks.)"""
    status = HealthStatus()
    window = threading.Event()
    heard: list[int] = []

    def send(response) -> bool:
        window.wait(30)  # (the client lets nothing through until then)
        heard.append(response.status)
        return True

    done = threading.Event()
    threading.Thread(
        target=lambda: (
            status.Watch(health_pb2.HealthCheckRequest(), _Context(), send),
            status.set("", health_pb2.HealthCheckResponse.SERVING),
            status.enter_graceful_shutdown(),
            done.set(),
        ),
        daemon=True,
    ).start()
    assert done.wait(10), "Watch, set or the stop waited for a send"
    answer = status.Check(health_pb2.HealthCheckRequest(), _Context())
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    window.set()
    status.close()
    status._sender.join(10)
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert heard == [serving, serving, not_serving]
