"""The cloud detection server in-process over loopback, with the real edge client.

Covers acceptance 1 (server detections equal the in-process split detector's) and the server's
behaviour under load, deadlines, repeated ids, tokens and reflection. Process-level behaviour
(bad-request table with memory, SIGTERM, failover, restart) is in test_cloud_process.py.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from cloud_fixtures import (
    FreezableProxy,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    start_cloud_process,
    write_model_dir,
)
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from splitdet.cloud.call_status import MAX_STATUS_CHARS
from splitdet.cloud.core import DetectionCore, load_cloud
from splitdet.cloud.idempotency import IdempotencyStore
from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.edge.client import (
    ClientConfig,
    CloudClient,
    ImageMeta,
    NeverRetry,
    RetryLater,
    classify,
)
from splitdet.shared.codec import encode, expected_level_shapes
from splitdet.shared.manifest import CLOUD_WEIGHTS, ManifestError, write_manifest
from splitdet.shared.messages import build_request
from splitdet.shared.spec import padded_size

from support import pb_field, pb_varint

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def served():
    model, model_dir, manifest = shared_model_dir(0)
    cloud, loaded = load_cloud(model_dir)
    assert loaded.fingerprint == manifest.fingerprint
    return model, model_dir, manifest, cloud


@pytest.fixture(scope="module")
def sample(served):
    return make_sample(served[0], seed=1, codec="int8")


@contextlib.contextmanager
def running(served, tmp_path, **settings):
    """An in-process server on a free port sharing the module's model, and a client to it."""
    _, model_dir, manifest, cloud = served
    config = ServerConfig(
        model_dir=model_dir,
        listen="127.0.0.1:0",
        threads=2,
        metrics_port=0,
        metrics_host="127.0.0.1",
        **settings,
    )
    store = IdempotencyStore(tmp_path / f"answers-{uuid.uuid4().hex}.sqlite", 1000)
    server = CloudServer(config, DetectionCore(cloud, manifest, store, config.max_decoded_bytes))
    server.start()
    client = CloudClient(ClientConfig(f"127.0.0.1:{server.port}", token=settings.get("token")))
    try:
        yield server, client
    finally:
        client.close()
        server.stop(0)
        store.close()


def _metric(server: CloudServer, key: str) -> float:
    return scrape_metrics(server.metrics_port).get(key, 0.0)


@pytest.mark.parametrize(("codec", "seed"), [("fp32", 2), ("fp16", 3), ("int8", 4)])
def test_server_detections_equal_in_process_ones(served, tmp_path, codec, seed):
    model, _, manifest, _ = served
    sample = make_sample(model, seed=seed, codec=codec)
    with running(served, tmp_path) as (_server, client):
        result = client.detect(sample.encoded, sample.image, f"req-{codec}", manifest.fingerprint)
        served_manifest = client.manifest()
    reference = sample.reference
    assert len(reference["boxes"]) > 0, "a comparison over zero detections proves nothing"
    np.testing.assert_allclose(result.boxes, reference["boxes"].numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(result.scores, reference["scores"].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(result.labels, reference["labels"].numpy())
    assert set(result.class_names) == {"scratch"}
    assert not result.cached and result.fingerprint == manifest.fingerprint
    assert result.timings["total_s"] >= result.timings["rpn_s"] + result.timings["roi_s"] > 0
    assert served_manifest.fingerprint == manifest.fingerprint
    assert served_manifest.data["model_config"] == manifest.model_config.to_dict()


def test_repeated_request_id_is_answered_from_the_store(served, tmp_path, sample):
    fingerprint = served[2].fingerprint
    with running(served, tmp_path) as (server, client):
        first = client.detect(sample.encoded, sample.image, "same-id", fingerprint)
        heads_runs = _metric(server, "splitdet_cloud_heads_runs_total")
        again = client.detect(sample.encoded, sample.image, "same-id", fingerprint)
        assert again.cached and not first.cached
        np.testing.assert_array_equal(again.boxes, first.boxes)
        np.testing.assert_array_equal(again.scores, first.scores)
        np.testing.assert_array_equal(again.labels, first.labels)
        assert _metric(server, "splitdet_cloud_heads_runs_total") == heads_runs == 1
        assert _metric(server, "splitdet_cloud_cache_hits_total") == 1
        # other contents under the id (the same image's features from another machine):
        # computed on their own and answered, not the stored answer, not refused
        other = make_sample(served[0], seed=9)
        answered = client.detect(other.encoded, other.image, "same-id", fingerprint)
        assert not answered.cached
        assert _metric(server, "splitdet_cloud_heads_runs_total") == 2
        assert _metric(server, "splitdet_cloud_request_id_conflicts_total") == 1
        # the first answer stays stored
        assert client.detect(sample.encoded, sample.image, "same-id", fingerprint).cached


def _await_metric(server, name: str, value: float, timeout: float = 10.0) -> None:
    """Wait until the server's metric `name` reaches `value` (a call started, queued...)."""
    deadline = time.monotonic() + timeout
    while _metric(server, name) < value:
        assert time.monotonic() < deadline, f"{name} never reached {value}"
        time.sleep(0.02)


def test_an_identical_call_waits_for_the_running_one_instead_of_a_slot(served, tmp_path, sample):
    """An edge sends again a request the cloud is still computing (its first call timed out):
    the second waits for the first's answer without a slot, and the heads run once. Before, it
    took a slot of its own (here: refused, the one slot taken and no queue), or ran them again.
    The same id with other contents is no such call: it does not join the first, but needs a
    slot of its own (here: refused busy)."""
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=0, debug_delay_s=1.5) as (
        server,
        client,
    ):
        first: list = []
        # made before the slow call: on a loaded machine, making it took longer than the call
        other = make_sample(served[0], seed=9)
        slow = threading.Thread(
            target=lambda: first.append(
                client.detect(sample.encoded, sample.image, "resent", fingerprint)
            )
        )
        slow.start()
        _await_metric(server, "splitdet_cloud_in_flight", 1)
        with pytest.raises(RetryLater) as busy:  # same id, other request: no joining, its
            client.detect(other.encoded, other.image, "resent", fingerprint)  # own slot
        assert busy.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        # (a conflict is counted once computed: this one was refused before)
        assert _metric(server, "splitdet_cloud_request_id_conflicts_total") == 0
        again = client.detect(sample.encoded, sample.image, "resent", fingerprint)
        slow.join(10)
        assert len(first) == 1 and not first[0].cached and again.cached
        np.testing.assert_array_equal(again.boxes, first[0].boxes)
        np.testing.assert_array_equal(again.scores, first[0].scores)
        assert _metric(server, "splitdet_cloud_heads_runs_total") == 1
        assert _metric(server, "splitdet_cloud_cache_hits_total") == 1


def test_the_running_call_goes_on_for_the_one_waiting_when_its_caller_leaves(
    served, tmp_path, sample
):
    """The usual case: the first call's caller gave up (its deadline) and sent again. The
    first is computed to its end for the second, which gets the answer."""
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=0, debug_delay_s=1.5) as (
        server,
        _,
    ):
        impatient = CloudClient(ClientConfig(f"127.0.0.1:{server.port}", timeout_s=1.0))
        patient = CloudClient(ClientConfig(f"127.0.0.1:{server.port}", timeout_s=30.0))
        try:
            gave_up: list = []

            def first() -> None:
                try:
                    impatient.detect(sample.encoded, sample.image, "retried", fingerprint)
                except RetryLater as exc:
                    gave_up.append(exc.code)

            thread = threading.Thread(target=first)
            thread.start()
            _await_metric(server, "splitdet_cloud_in_flight", 1)
            answer = patient.detect(sample.encoded, sample.image, "retried", fingerprint)
            thread.join(10)
            assert gave_up == [grpc.StatusCode.DEADLINE_EXCEEDED]
            assert answer.cached and len(answer.boxes) > 0
            assert _metric(server, "splitdet_cloud_heads_runs_total") == 1
            # one answer given, one call whose caller had left: counted as such, not as two
            # answers (an edge timing out on every call looked twice as busy and healthy)
            answers = _metric(
                server, f'splitdet_cloud_model_answers_total{{fingerprint="{fingerprint}"}}'
            )
            key = 'splitdet_cloud_failures_total{code="DEADLINE_EXCEEDED",method="Detect"}'
            assert (answers, _metric(server, key)) == (1, 1)
        finally:
            impatient.close()
            patient.close()


def _one_running_one_waiting(server, send) -> tuple[threading.Thread, threading.Thread]:
    """Threads calling send("first"), running once this returns, and send("second"), waiting
    for a slot (one slot, a debug delay)."""
    first = threading.Thread(target=send, args=("first",))
    first.start()
    _await_metric(server, "splitdet_cloud_in_flight", 1)
    second = threading.Thread(target=send, args=("second",))
    second.start()
    _await_metric(server, "splitdet_cloud_queued", 1)
    return first, second


def test_beyond_max_concurrent_is_resource_exhausted(served, tmp_path, sample):
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=0, debug_delay_s=1.5) as (
        server,
        client,
    ):
        results = []
        slow = threading.Thread(
            target=lambda: results.append(
                client.detect(sample.encoded, sample.image, "slow", fingerprint)
            )
        )
        slow.start()
        _await_metric(server, "splitdet_cloud_in_flight", 1)
        with pytest.raises(RetryLater) as busy:
            client.detect(sample.encoded, sample.image, "second", fingerprint)
        assert busy.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-concurrent 1" in busy.value.message
        assert client.health() == "SERVING"  # health and manifest still get a thread
        assert client.manifest().fingerprint == fingerprint
        slow.join(10)
        assert len(results) == 1 and len(results[0].boxes) > 0
        key = 'splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED",method="Detect"}'
        assert _metric(server, key) == 1


def test_a_call_beyond_max_concurrent_waits_its_turn(served, tmp_path, sample):
    """--max-queued: the second call waits for the first instead of being refused (the edge
    would back off 0.5 s or more); a third, with the queue full, is refused at once."""
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=1, debug_delay_s=1.0) as (
        server,
        client,
    ):
        results = {}

        def send(name: str) -> None:
            results[name] = client.detect(sample.encoded, sample.image, name, fingerprint)

        first, second = _one_running_one_waiting(server, send)
        with pytest.raises(RetryLater) as busy:
            client.detect(sample.encoded, sample.image, "third", fingerprint)
        assert busy.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued 1" in busy.value.message
        first.join(10)
        second.join(10)
        assert set(results) == {"first", "second"}  # the waiting call was answered
        assert len(results["second"].boxes) == len(results["first"].boxes) > 0
        assert _metric(server, "splitdet_cloud_queued") == 0


def test_a_full_server_answers_a_repeat_and_names_a_bad_call_without_a_slot(
    served, tmp_path, sample
):
    """Checks and the answers store come before the wait for a slot: with every slot taken
    and no queue, the repeat of an answered request gets its stored answer, and calls for
    another export or with a bad id get their own error, none "server busy"."""
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=0, debug_delay_s=1.5) as (
        server,
        client,
    ):
        first = client.detect(sample.encoded, sample.image, "answered", fingerprint)
        slow = threading.Thread(
            target=lambda: client.detect(sample.encoded, sample.image, "slow", fingerprint)
        )
        slow.start()
        _await_metric(server, "splitdet_cloud_in_flight", 1)
        again = client.detect(sample.encoded, sample.image, "answered", fingerprint)
        assert again.cached and len(again.boxes) == len(first.boxes) > 0
        with pytest.raises(NeverRetry) as other_export:
            client.detect(sample.encoded, sample.image, "elsewhere", "f" * 64)
        assert other_export.value.code is grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(NeverRetry) as bad_id:
            client.detect(sample.encoded, sample.image, "x" * 1000, fingerprint)
        assert bad_id.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert _metric(server, "splitdet_cloud_in_flight") == 1  # the slow call still runs
        slow.join(10)
        busy = 'splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED",method="Detect"}'
        assert _metric(server, busy) == 0
        assert _metric(server, "splitdet_cloud_heads_runs_total") == 2


def test_a_waiting_call_is_sent_elsewhere_at_once_on_shutdown(served, tmp_path, sample):
    """SIGTERM's drain: the running call finishes, the waiting one gets UNAVAILABLE now (to
    try another replica), not a slot during the grace period nor a 'server busy'."""
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=2, debug_delay_s=1.5) as (
        server,
        client,
    ):
        results, errors = {}, {}

        def send(name: str) -> None:
            try:
                results[name] = client.detect(sample.encoded, sample.image, name, fingerprint)
            except RetryLater as exc:
                errors[name] = (exc.code, exc.message, time.monotonic())

        first, second = _one_running_one_waiting(server, send)
        drained = time.monotonic()
        server.servicer.drain()
        second.join(10)
        first.join(10)
        code, message, when = errors["second"]
        assert code is grpc.StatusCode.UNAVAILABLE and "shutting down" in message
        assert when - drained < 1.0  # not after the running call's 1.5 s
        assert set(results) == {"first"}  # the running call finished
        busy = 'splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED",method="Detect"}'
        assert _metric(server, busy) == 0


def test_a_wait_ended_by_the_callers_deadline_is_deadline_exceeded(served, tmp_path, sample):
    """Neither 'server busy' (the saturation alert) nor 'caller went away'."""
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=2, debug_delay_s=2.0) as (
        server,
        client,
    ):
        slow = threading.Thread(
            target=lambda: client.detect(sample.encoded, sample.image, "slow", fingerprint)
        )
        slow.start()
        _await_metric(server, "splitdet_cloud_in_flight", 1)
        with pytest.raises(RetryLater) as late:
            client.detect(sample.encoded, sample.image, "late", fingerprint, timeout=0.5)
        assert late.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        slow.join(10)
        key = 'splitdet_cloud_failures_total{code="%s",method="Detect"}'
        _await_metric(server, key % "DEADLINE_EXCEEDED", 1)
        assert _metric(server, key % "CANCELLED") == 0
        assert _metric(server, key % "RESOURCE_EXHAUSTED") == 0


def test_every_call_has_a_deadline(served, tmp_path, sample):
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, debug_delay_s=2.0) as (server, client):
        started = time.monotonic()
        with pytest.raises(RetryLater) as late:
            client.detect(sample.encoded, sample.image, "late", fingerprint, timeout=0.3)
        assert late.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        # the server notices the caller left and abandons the work instead of running the heads
        deadline = time.monotonic() + 5
        while _metric(server, "splitdet_cloud_in_flight") > 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _metric(server, "splitdet_cloud_heads_runs_total") == 0


def test_token_on_plaintext(served, tmp_path, sample):
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, token="s3cret") as (server, client):
        assert len(client.detect(sample.encoded, sample.image, "t1", fingerprint).boxes) > 0
        for token in (None, "wrong", "s3cret-but-longer"):
            config = replace(client.config, token=token)
            with CloudClient(config) as other:
                with pytest.raises(NeverRetry) as refused:
                    other.manifest()
                assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED
                assert other.health() == "SERVING"  # health probes need no token
        key = 'splitdet_cloud_failures_total{code="UNAUTHENTICATED",method="GetManifest"}'
        assert _metric(server, key) == 3


def test_calls_that_never_send_their_request_leave_health_and_refusals_a_thread(served, tmp_path):
    """Detect calls hold a thread while their request arrives. Callers that open calls and
    never finish sending (more than every Detect thread) must not leave a health check, a
    manifest or a token refusal without one; without a token such calls are refused at once."""
    stop = threading.Event()

    def never_sent():
        stop.wait()
        yield b""

    settings = {"token": "s3cret", "max_concurrent": 1, "max_queued": 1}
    with (
        running(served, tmp_path, **settings) as (server, client),
        grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        open_call = channel.stream_unary("/splitdet.v1.Detection/Detect")
        with_token = (("authorization", "Bearer s3cret"),)
        # more than the 1 + 1 + 8 Detect threads
        held = [open_call.future(never_sent(), timeout=60, metadata=with_token) for _ in range(16)]
        time.sleep(0.5)
        assert client.health() == "SERVING"
        assert client.manifest().fingerprint == served[2].fingerprint
        open_manifest = channel.stream_unary("/splitdet.v1.Detection/GetManifest")
        held += [  # more than GetManifest's 8 threads
            open_manifest.future(never_sent(), timeout=60, metadata=with_token) for _ in range(12)
        ]
        time.sleep(0.5)
        assert client.health() == "SERVING"
        started = time.monotonic()
        without = [open_call.future(never_sent(), timeout=20) for _ in range(16)]
        for call in without:
            with pytest.raises(grpc.RpcError) as refused:
                call.result(timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < 5  # at once, not at their deadline
        assert client.health() == "SERVING"
        stop.set()
        for call in held:
            with contextlib.suppress(grpc.RpcError):
                call.result(timeout=10)


def test_a_caller_cut_off_mid_request_gives_its_thread_back(served, tmp_path, sample):
    """Calls without a deadline whose caller's network goes silent before the request is sent
    hold every Detect thread. The server's keepalive ping goes unanswered, the connection is
    closed, and the threads serve again (gRPC's server default pings after 2 hours). The ping's
    wait is never shorter than --max-receive (a slow upload's answer to it waits behind its
    bytes), so both are 1 s here."""
    stop = threading.Event()

    def never_sent():
        stop.wait()
        yield b""

    settings = {"max_concurrent": 1, "max_queued": 1, "keepalive_s": 1, "keepalive_timeout_s": 1,
                "max_receive_s": 1}  # fmt: skip
    with running(served, tmp_path, **settings) as (server, client):
        proxy = FreezableProxy(server.port)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
                open_call = channel.stream_unary("/splitdet.v1.Detection/Detect")
                held = [open_call.future(never_sent()) for _ in range(12)]  # > 1 + 1 + 8 threads
                time.sleep(0.5)
                proxy.cut()
                fingerprint = served[2].fingerprint
                started = time.monotonic()
                while True:  # refused at once (RESOURCE_EXHAUSTED) while the threads are held
                    try:
                        answer = client.detect(
                            sample.encoded, sample.image, "after", fingerprint, 30
                        )
                        break
                    except RetryLater as exc:  # as the edge does: retry later
                        assert "RESOURCE_EXHAUSTED" in str(exc)
                        assert time.monotonic() - started < 15, exc
                        time.sleep(0.25)
                assert len(answer.boxes) > 0
                assert time.monotonic() - started < 15  # not at its 30 s deadline
                stop.set()
                for call in held:  # their side of the cut never hears the close
                    call.cancel()
        finally:
            proxy.close()


def test_an_edge_whose_connection_went_silent_connects_anew(served, tmp_path):
    """A connection cut off without a close (a NAT entry expired) is given up after the
    client's keepalive time plus its timeout, and the next call opens a new one; before,
    gRPC waited 60 s for the ping's answer whatever keepalive_timeout_s said."""
    with running(served, tmp_path) as (server, _):
        proxy = FreezableProxy(server.port)
        try:
            address = f"127.0.0.1:{proxy.port}"
            config = ClientConfig(address, keepalive_time_s=1, keepalive_timeout_s=1)
            with CloudClient(config) as client:
                assert client.health() == "SERVING"
                proxy.cut()
                time.sleep(4)  # a ping after 1 s unanswered, given up 1 s later
                assert client.health(timeout=5) == "SERVING"
        finally:
            proxy.close()


def test_a_request_over_the_bound_is_counted_and_logged(served, tmp_path, caplog):
    """gRPC refused a request over --max-message-mib before splitdet saw it: the edge got a
    final RESOURCE_EXHAUSTED and the cloud counted and logged nothing. Now a request over the
    bound by up to gRPC's margin is refused by the servicer: counted by edge and code, logged
    with the caller's address, and still final for the edge ("larger than max")."""
    caplog.set_level("INFO", logger="splitdet.cloud")
    with running(served, tmp_path, max_message_bytes=1 << 20) as (server, _):
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            detect = channel.unary_unary("/splitdet.v1.Detection/Detect")
            with pytest.raises(grpc.RpcError) as refused:
                detect(b"\0" * (3 << 20), timeout=30, metadata=(("splitdet-edge", "cam7"),))
        code, details = refused.value.code(), refused.value.details()
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"request of {3 << 20} bytes is larger than max message size" in details
        assert "--max-message-mib 1" in details
        assert isinstance(classify(code, details), NeverRetry)
        key = 'splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED",method="Detect"}'
        assert _metric(server, key) == 1
        # (a refused Detect keeps its edge's name: the camera an operator must find)
        key = 'splitdet_cloud_edge_refusals_total{code="RESOURCE_EXHAUSTED",edge="cam7"}'
        assert _metric(server, key) == 1
    (record,) = [r for r in caplog.records if "larger than max" in r.getMessage()]
    assert record.fields["edge"] == "cam7" and record.fields["peer"].startswith("ipv4:127.0.0.1")


def test_a_call_cut_by_shutdown_is_not_charged_to_the_edge(served, tmp_path, sample, caplog):
    """A call still running when --grace ends was logged and counted as DEADLINE_EXCEEDED, the
    code the README reads as "an edge whose --timeout is too short"; it is UNAVAILABLE."""
    caplog.set_level("INFO", logger="splitdet.cloud")
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, debug_delay_s=5.0) as (server, client):
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                client.detect(sample.encoded, sample.image, "cut", fingerprint, 60)
            except (RetryLater, NeverRetry) as exc:
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 10
        while _metric(server, "splitdet_cloud_in_flight") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        registry = server.metrics.registry
        server.stop(0.5)
        caller.join(30)
        assert outcome and isinstance(outcome[0], RetryLater)

        def refusals() -> dict[str, float]:
            return {
                sample.labels["code"]: sample.value
                for metric in registry.collect()
                if metric.name == "splitdet_cloud_edge_refusals"
                for sample in metric.samples
                if sample.name.endswith("_total") and sample.value
            }

        deadline = time.monotonic() + 10  # the handler ends after the call is cut
        while not refusals() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refusals() == {"UNAVAILABLE": 1}  # (was CANCELLED or DEADLINE_EXCEEDED)
    (record,) = [r for r in caplog.records if getattr(r, "fields", {}).get("code")]
    assert "server stopped before" in record.fields["message"] and record.fields["peer"]


def test_tokens_rotate_without_a_restart(served, tmp_path, caplog, monkeypatch):
    """The token file is watched: a second line is accepted beside the first (edges move to it
    one by one), then the old line is removed and refused. A file emptied by mistake, or
    removed, is logged and the tokens before it kept."""
    from splitdet.cloud import tokens

    monkeypatch.setattr(tokens, "TOKEN_CHECK_S", 0.05)
    token_file = tmp_path / "tokens.txt"
    token_file.write_text("old-token\n")
    caplog.set_level("INFO", logger="splitdet.cloud")
    with running(served, tmp_path, token_file=token_file) as (server, _):

        def answers(token: str) -> bool:
            config = ClientConfig(f"127.0.0.1:{server.port}", token=token)
            with CloudClient(config) as client:
                try:
                    client.manifest()
                except NeverRetry as refused:
                    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
                    return False
            return True

        def soon(condition) -> bool:
            deadline = time.monotonic() + 10
            while not condition():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
            return True

        assert answers("old-token") and not answers("new-token")
        token_file.write_text("old-token\nnew-token\n")
        assert soon(lambda: answers("new-token")) and answers("old-token")
        token_file.write_text("new-token\n")
        assert soon(lambda: not answers("old-token")) and answers("new-token")
        token_file.write_text("")
        assert soon(lambda: "holds no usable token" in caplog.text)
        assert answers("new-token")  # kept
        token_file.unlink()
        assert soon(lambda: "is gone" in caplog.text)
        assert answers("new-token")
    # each line has its event, for a JSON log pipeline to key on (they had none)
    events = {getattr(r, "fields", {}).get("event") for r in caplog.records}
    assert {"token_file_empty", "token_file_gone"} <= events, events


def test_token_lines_a_rotation_may_meet(tmp_path, monkeypatch):
    """Comments, a byte-order mark on an appended line, a line that is not a token (skipped,
    the rest applied), and a file that is not regular (read once, never again)."""
    import os

    from splitdet.cloud.tokens import AcceptedTokens
    from splitdet.shared.cli import read_token

    token_file = tmp_path / "tokens.txt"
    token_file.write_text("# rotated by José on 12/04\nold\n\ufeffnew\nbad\u2011line\n")
    assert read_token(token_file) == "old"  # what an edge sends: only that line is checked
    tokens = AcceptedTokens(token_file=token_file)
    try:
        assert tokens.accepts("Bearer old") and tokens.accepts("Bearer new")
        assert not tokens.accepts("Bearer # rotated by José on 12/04".encode().decode())
        assert not tokens.accepts("Bearer bad")
    finally:
        tokens.close()
    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    piped = AcceptedTokens("from-a-pipe", fifo)  # must not block on the pipe
    try:
        assert piped.accepts("Bearer from-a-pipe") and not piped.accepts("Bearer old")
    finally:
        piped.close()


def _reflected_services(port: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return ProtoReflectionDescriptorDatabase(channel).get_services()


def test_reflection_is_off_by_default_and_on_by_flag(served, tmp_path):
    with running(served, tmp_path) as (server, _), pytest.raises(grpc.RpcError) as off:
        _reflected_services(server.port)
    assert off.value.code() is grpc.StatusCode.UNIMPLEMENTED
    with running(served, tmp_path, reflection=True) as (server, _):
        assert "splitdet.v1.Detection" in _reflected_services(server.port)


def test_load_cloud_refuses_weights_that_do_not_fit(tmp_path):
    model, model_dir, _ = shared_model_dir(0)
    target = tmp_path / "model"
    write_model_dir(model, target)
    heads = torch.load(model_dir / CLOUD_WEIGHTS, weights_only=True)
    variants = {
        "foreign key": {**heads, "backbone.body.conv1.weight": torch.zeros(1)},
        "missing key": {k: v for k, v in heads.items() if not k.startswith("rpn.head.cls")},
        "wrong shape": {**heads, "rpn.head.cls_logits.bias": torch.zeros(7)},
        "not a dict": [1, 2, 3],
    }
    for problem, state in variants.items():
        torch.save(state, target / CLOUD_WEIGHTS)
        write_manifest(target, model.config, 0.5, "int8")  # a consistent, hashed directory
        with pytest.raises(ManifestError):
            load_cloud(target)
            pytest.fail(f"{problem}: loaded")
    (target / CLOUD_WEIGHTS).write_bytes(b"edited after export")
    with pytest.raises(ManifestError, match="differ from the manifest"):
        load_cloud(target)


def test_a_bug_is_internal_and_the_server_keeps_serving(served, tmp_path, sample):
    fingerprint = served[2].fingerprint
    with running(served, tmp_path, max_concurrent=1, max_queued=0) as (server, client):
        real_detect = server.core.detect

        def broken(call, is_cancelled=None, before_compute=None, model=None, digest=None,
                   conflict=False):  # fmt: skip
            before_compute()  # the one slot taken, then the heads fail: it must come back
            raise RuntimeError("heads exploded")

        server.core.detect = broken
        with pytest.raises(NeverRetry) as failed:
            client.detect(sample.encoded, sample.image, "bug", fingerprint)
        assert failed.value.code is grpc.StatusCode.INTERNAL
        assert "heads exploded" in failed.value.message
        server.core.detect = real_detect
        assert client.health() == "SERVING"
        assert len(client.detect(sample.encoded, sample.image, "ok", fingerprint).boxes) > 0


@pytest.mark.parametrize("codec", ["int8", "fp16"])
def test_server_equals_predict_in_process_on_the_onnx_edge(served, tmp_path, codec):
    """Acceptance 1 end to end: `splitdet predict`'s engine (ONNX edge + in-process cloud half)
    and the server give the same detections for the same image and codec."""
    pytest.importorskip("onnxruntime")
    from splitdet.cloud.local import LocalDetector
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.runtime import EdgeRuntime

    model_dir, manifest = served[1], served[2]
    pipeline = EdgePipeline(EdgeRuntime(model_dir, threads=1), codec=codec, gate=False)
    image = np.random.default_rng(7).random((3, 300, 380), dtype=np.float32)
    edge = pipeline.process_array(image)
    local, _ = LocalDetector(model_dir).detect("local", edge, "random")
    meta = ImageMeta(edge.meta.original_hw, edge.meta.resized_hw, "random")
    with running(served, tmp_path) as (_, client):
        remote = client.detect(edge.encoded, meta, f"onnx-{codec}", manifest.fingerprint)
    assert len(local) == len(remote.boxes) > 0
    np.testing.assert_array_equal(remote.boxes, np.array([d.box for d in local], np.float32))
    np.testing.assert_array_equal(remote.scores, np.array([d.score for d in local], np.float32))
    np.testing.assert_array_equal(remote.labels, [d.label for d in local])


# ------------------------------------------------------------- fuzz findings, end to end


def _nasty_requests(sample, fingerprint: str, spec) -> dict[str, bytes]:
    """The nastiest inputs the wire fuzz (test_wire_fuzz.py) found or aimed at, serialized;
    `spec`: the served model's split spec."""
    good = {t.name: t for t in sample.encoded}
    big = (3400, 3400)  # far past the model's input; 7 kB of int8 zeros claim it (a review's)
    shapes = expected_level_shapes(spec, padded_size(*big))
    zeros = {n: np.zeros(s, np.float32) for n, s in shapes.items()}

    def request(levels=None, image=sample.image, rid="nasty", fp=fingerprint) -> bytes:
        levels = list(good.values()) if levels is None else levels
        return build_request(levels, image, rid, fp).SerializeToString()

    def replace_level(level: str, **changes) -> list:
        return [replace(t, **changes) if t.name == level else t for t in good.values()]

    c = good["0"].shape[0]
    header = b"\x28\xb5\x2f\xfd\xc0\x50" + ((1 << 64) - 1).to_bytes(8, "little")
    many_empty_tensors = pb_field(4, b"") * (1 << 20)  # 2 MiB of wire, a million messages
    long_shape = pb_field(4, pb_field(1, b"0") + pb_field(2, b"\x01" * (3 << 20)))
    return {
        "a million empty tensors": request() + many_empty_tensors,
        "a shape of 3 million dimensions": request(levels=[]) + long_shape,
        "codec name of 100 kB": request(levels=replace_level("0", codec="x" * 100_000)),
        "tensor name of 100 kB": request(levels=replace_level("0", name="é" * 50_000)),
        "frame declaring 2**64-1 bytes": request(levels=replace_level("0", data=header)),
        "shape of 2**62": request(levels=replace_level("0", shape=(1 << 62, 1, 1))),
        "shape of int64 min": request(levels=replace_level("0", shape=(-(1 << 63), 1, 1))),
        "inf zero_point": request(levels=replace_level("1", zero_point=(float("inf"),) * c)),
        "scale of the wrong length": request(levels=replace_level("1", scale=(1.0,) * (c + 1))),
        "resized 0x0": request(image=replace(sample.image, resized_hw=(0, 0))),
        "original 2**32-1": request(image=replace(sample.image, original_hw=((1 << 32) - 1, 1))),
        "resized larger than the features": request(
            image=replace(sample.image, resized_hw=(448, 560))
        ),
        "resized past the model's input, features to match": request(
            levels=encode(zeros, "int8"), image=replace(sample.image, resized_hw=big)
        ),
        "request id of 100 kB": request(rid="r" * 100_000),
        "request id with a NUL": request(rid="a\x00b"),
        "groups nested 10000 deep": request()
        + pb_varint(15 << 3 | 3) * 10_000
        + pb_varint(15 << 3 | 4) * 10_000,
        "wrong fingerprint": request(fp="0" * 64),
        "no fingerprint": request(fp=""),
        "no bytes at all": b"",
    }


def test_nasty_requests_get_clean_refusals_from_a_real_server(served, tmp_path, sample):
    """`splitdet cloud` as a process: each fuzz finding is INVALID_ARGUMENT (FAILED_PRECONDITION
    for the fingerprint) with a short message naming it, memory stays bounded, and the server
    keeps serving."""
    _, model_dir, manifest, _ = served
    server = start_cloud_process(model_dir, tmp_path, "nasty")
    try:
        with CloudClient(ClientConfig(server.address, timeout_s=60)) as client:
            assert len(
                client.detect(sample.encoded, sample.image, "warm", manifest.fingerprint).boxes
            )
            peak_before = server.rss_peak_bytes()
            outcomes = {}
            with grpc.insecure_channel(server.address) as channel:
                send = channel.unary_unary("/splitdet.v1.Detection/Detect")  # raw bytes
                spec = manifest.model_config.split_spec
                for name, raw in _nasty_requests(sample, manifest.fingerprint, spec).items():
                    try:
                        send(raw, timeout=60)
                        outcomes[name] = (grpc.StatusCode.OK, "")
                    except grpc.RpcError as error:
                        outcomes[name] = (error.code(), error.details() or "")
            growth_mib = (server.rss_peak_bytes() - peak_before) / (1 << 20)
            expected = {name: grpc.StatusCode.INVALID_ARGUMENT for name in outcomes}
            expected["wrong fingerprint"] = grpc.StatusCode.FAILED_PRECONDITION
            wrong = {n: o for n, o in outcomes.items() if o[0] is not expected[n]}
            assert not wrong, wrong
            for name, (_, message) in outcomes.items():
                assert 0 < len(message) <= MAX_STATUS_CHARS, f"{name}: {len(message)} chars"
            assert "more than 16 tensors" in outcomes["a million empty tensors"][1]
            assert "shape has more than" in outcomes["a shape of 3 million dimensions"][1]
            assert "unknown codec 'xxx" in outcomes["codec name of 100 kB"][1]
            assert "invalid tensor name 'ééé" in outcomes["tensor name of 100 kB"][1]
            assert "no model_fingerprint" in outcomes["no bytes at all"][1]
            past = outcomes["resized past the model's input, features to match"][1]
            assert "3400x3400 is larger than model" in past and "long side at most" in past, past
            assert growth_mib < 64, f"peak memory grew by {growth_mib:.0f} MiB"  # 547 unbounded
            assert client.health() == "SERVING"
            result = client.detect(sample.encoded, sample.image, "after", manifest.fingerprint)
            assert len(result.boxes) > 0 and not result.cached
        assert server.process.poll() is None
    finally:
        server.stop()


def test_silent_connections_to_the_metrics_port_hold_no_more_than_its_cap(served, sample, tmp_path):
    """prometheus_client's server kept a thread and a descriptor for every connection that sent
    nothing, for good: a reviewer's 1,192 of them left the gRPC listener no descriptor to
    accept a camera with. The cloud's endpoint closes those beyond its cap at once, and the
    Detect beside it answers."""
    from splitdet.shared.metrics_http import MAX_CONNECTIONS

    manifest = served[2]
    with running(served, tmp_path) as (server, client):
        silent = []
        for _ in range(MAX_CONNECTIONS + 40):
            sock = socket.create_connection(("127.0.0.1", server.metrics_port), timeout=5)
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the end of its headers
            silent.append(sock)
        time.sleep(0.3)
        closed = 0
        for sock in silent:
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                closed += sock.recv(1) == b""
        assert closed >= 40, closed
        result = client.detect(sample.encoded, sample.image, "beside-silent", manifest.fingerprint)
        assert result.boxes is not None
        for sock in silent:
            sock.close()
        time.sleep(0.3)  # (their threads see the end of the stream)
        assert scrape_metrics(server.metrics_port)  # served again
