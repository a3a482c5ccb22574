"""The cloud operator review's findings, each against a real server on loopback.

1. A --max-decoded-mib below what an export's largest input decodes to let the server start,
   then refused every such request (INVALID_ARGUMENT: dead letters), naming no option.
2. The same request_id with other contents was computed twice when sent at once (and a retry
   then refused), but refused at once when sent one after the other; a request differing only
   in a log-only field ran the heads twice; the store let a later answer replace the first.
3. Calls refused because every thread was held were not counted per edge, and their log line
   named no edge or peer.
4. Calls without an edge name (`unnamed`) or with a bad one (`invalid`) fired the README's
   "camera gone quiet" alert, and the README never named those labels.
5. A caller that cancelled its call (killed) was logged as one whose deadline had passed.
6. `--models-dir M` given an export folder M said only that M holds no export.
7. An edge's --client-cert and --client-key that are not a pair got gRPC's raw handshake error.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cloud_fixtures import (
    DETECT,
    LAST_SEEN,
    TINY_OVERRIDES,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    start_loopback_server,
    write_model_dir,
)
from test_cloud_tls import ThrowawayCA

from splitdet.cloud import threads as server_threads
from splitdet.cloud.core import DetectionCore, load_cloud
from splitdet.cloud.idempotency import IdempotencyStore, StoredAnswer
from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import MIB, ServerConfig
from splitdet.shared.cli import main
from splitdet.shared.edge_name import EDGE_NAME_KEY
from splitdet.shared.manifest import ManifestError
from splitdet.shared.messages import build_request
from splitdet.shared.wire import detection_pb2 as pb

from conftest import make_tiny_model

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[1] / "cloud" / "README.md"
REFUSALS = 'splitdet_cloud_edge_refusals_total{code="%s",edge="%s"}'


def _request(seed: int, request_id: str, source: str | None = None) -> bytes:
    """A serialized DetectRequest for shared_model_dir(0) of a random image `seed`."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=seed, codec="int8")
    image = sample.image if source is None else replace(sample.image, source=source)
    request = build_request(sample.encoded, image, request_id, manifest.fingerprint)
    return request.SerializeToString()


def _detect(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        DETECT, request_serializer=None, response_deserializer=pb.DetectResponse.FromString
    )


def _named(name: str) -> tuple[tuple[str, str], ...]:
    return ((EDGE_NAME_KEY, name),)


def _await(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _in_flight(server: CloudServer) -> float:
    return scrape_metrics(server.metrics_port)["splitdet_cloud_in_flight"]


def _computing(server: CloudServer) -> bool:
    """Whether a Detect call is being computed (read from the server's own table of them:
    sooner than a metrics scrape, which a loaded machine may delay past a short call)."""
    return bool(server.servicer._inflight._running)


# ------------------------------------------------------------------- 1. --max-decoded-mib


def test_a_max_decoded_mib_below_the_largest_input_refuses_to_start(tmp_path):
    """The test export's largest input (224x288) decodes to 1.3 MiB: with --max-decoded-mib 1
    the server refused every request of that size, serving nothing; now it does not start,
    naming the option, the export and the MiB it needs."""
    _, model_dir, manifest = shared_model_dir(0)
    with pytest.raises(ManifestError) as refused:
        start_loopback_server(tmp_path, max_decoded_bytes=MIB).stop(0)
    message = str(refused.value)
    assert "--max-decoded-mib 1:" in message and "--max-decoded-mib 2 or more" in message
    assert str(model_dir) in message and manifest.fingerprint[:16] in message
    assert "1.3 MiB" in message


def test_a_reload_refuses_an_export_beyond_max_decoded_mib_and_serves_the_rest(tmp_path):
    """A 320x320 export (2.1 MiB of features) copied into --models-dir of a server bounded at
    2 MiB is refused at the reload like a broken export; the one served stays served."""
    manifest = shared_model_dir(0)[2]
    folder = tmp_path / "models"
    folder.mkdir()
    server = start_loopback_server(tmp_path, models_dir=folder, max_decoded_bytes=2 * MIB)
    try:
        big_model = make_tiny_model(3, **{**TINY_OVERRIDES, "min_size": 320, "max_size": 320})
        big = write_model_dir(big_model, tmp_path / "big")
        shutil.copytree(tmp_path / "big", folder / "big")
        change = server.reload()
        assert change["added"] == [] and change["served"] == [manifest.fingerprint]
        (problem,) = change["problems"]
        assert "--max-decoded-mib 2:" in problem and "--max-decoded-mib 3 or more" in problem
        assert str(folder / "big") in problem and big.fingerprint[:16] in problem
    finally:
        server.stop(0)


def test_a_request_beyond_max_decoded_mib_is_refused_naming_the_option(tmp_path):
    """A core given a bound below the export's inputs (no start-up check: the core is the
    caller's) refuses the request, and its message names --max-decoded-mib."""
    _, model_dir, _ = shared_model_dir(0)
    cloud, manifest = load_cloud(model_dir)
    config = ServerConfig(model_dir=model_dir, listen="127.0.0.1:0", threads=1)
    server = CloudServer(config, DetectionCore(cloud, manifest, None, MIB)).start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            _detect(channel)(_request(21, "too-big"), timeout=30)
    finally:
        channel.close()
        server.stop(0)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "1048576-byte bound (--max-decoded-mib 1)" in refused.value.details()


# ------------------------------------------------------------ 2. one request per request id


def test_the_same_id_with_other_contents_at_once_is_computed_as_one_after_the_other(tmp_path):
    """Sent while the first is computed, a request of the same id but other contents (the same
    image's features from another machine) is computed on its own and answered, as it is once
    the first is answered: never refused (it would be a dead letter for good) nor given the
    other's answer, nor stored (a review found a conflicting request that finished first taking
    the id's stored answer, so that every retry of the first was computed again); an edge's
    retry of its own conflicting request joins it; the first's retry is answered from the
    store; each conflict computed is counted."""
    server = start_loopback_server(tmp_path, max_concurrent=3, debug_delay_s=2.5)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    first, other = _request(22, "dup"), _request(23, "dup")
    try:
        running = _detect(channel).future(first, timeout=30)
        _await(lambda: _computing(server), "the first call running")
        at_once = [_detect(channel).future(other, timeout=30) for _ in range(2)]
        at_once = [call.result() for call in at_once]
        first_answer = running.result()
        retried = _detect(channel)(first, timeout=30)
        after = _detect(channel)(other, timeout=30)
        metrics = scrape_metrics(server.metrics_port)
    finally:
        channel.close()
        server.stop(0)
    assert not first_answer.cached and retried.cached
    assert list(retried.boxes) == list(first_answer.boxes)
    assert sorted(answer.cached for answer in at_once) == [False, True]  # the second joined
    assert not after.cached
    assert list(after.boxes) == list(at_once[0].boxes)
    assert metrics["splitdet_cloud_heads_runs_total"] == 3
    assert metrics["splitdet_cloud_request_id_conflicts_total"] == 2


def test_a_request_differing_only_in_its_source_waits_for_the_running_one(tmp_path):
    """The image's `source` is for logs only (not part of the request's digest): a call that
    differs from the running one only there joins it, and the heads run once."""
    server = start_loopback_server(tmp_path, max_concurrent=2, debug_delay_s=2.5)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    # (both made first: making one runs the edge half, which may outlast the first call)
    request, resent = _request(24, "src", "a.png"), _request(24, "src", "copy-of-a.png")
    try:
        running = _detect(channel).future(request, timeout=30)
        _await(lambda: _computing(server), "the first call running")
        joined = _detect(channel)(resent, timeout=30)
        answered = running.result()
        heads = scrape_metrics(server.metrics_port)["splitdet_cloud_heads_runs_total"]
    finally:
        channel.close()
        server.stop(0)
    assert joined.cached and not answered.cached and heads == 1
    assert [b.x1 for b in joined.boxes] == [b.x1 for b in answered.boxes]


def test_the_first_answer_stored_under_an_id_is_never_replaced(tmp_path):
    store = IdempotencyStore(tmp_path / "answers.sqlite", capacity=10)
    try:
        assert store.put("id", StoredAnswer("fp", "digest-first", b"first"))
        assert not store.put("id", StoredAnswer("fp", "digest-other", b"other"))
        assert store.get("id") == StoredAnswer("fp", "digest-first", b"first")
        assert len(store) == 1
    finally:
        store.close()


# ------------------------------------------------------------ 3. refused for want of a thread


def test_a_call_refused_for_want_of_a_thread_is_counted_and_logged_per_edge(
    tmp_path, monkeypatch, caplog
):
    """Two stalled Detects hold both Detect threads: cam-busy's Detect is refused at once,
    counted under its label and logged with its peer and name (it was neither)."""
    monkeypatch.setattr(server_threads, "SPARE_RPC_THREADS", 1)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    server = start_loopback_server(tmp_path, max_concurrent=1, max_queued=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    attacker = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stop = threading.Event()

    def never():
        stop.wait()
        return
        yield  # (a generator)

    stalled_call = attacker.stream_unary(DETECT, request_serializer=None,
                                         response_deserializer=None)  # fmt: skip
    request = _request(25, "busy")
    try:
        _detect(channel)(_request(26, "first"), metadata=_named("cam-busy"), timeout=30)
        stalled = [stalled_call.future(never(), metadata=_named("cam-stall")) for _ in range(2)]
        busy = 'splitdet_cloud_rpc_threads_busy{pool="detect"}'
        _await(lambda: scrape_metrics(server.metrics_port)[busy] == 2, "both threads held")
        with pytest.raises(grpc.RpcError) as refused:
            _detect(channel)(request, metadata=_named("cam-busy"), timeout=30)
        metrics = scrape_metrics(server.metrics_port)
    finally:
        stop.set()
        for future in locals().get("stalled", []):
            future.cancel()
        channel.close()
        attacker.close()
        server.stop(0)
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "threads for Detect calls are held" in refused.value.details()
    assert dict(refused.value.trailing_metadata())["splitdet-reason"] == "busy"
    assert metrics[REFUSALS % ("RESOURCE_EXHAUSTED", "cam-busy")] == 1
    (line,) = [r for r in caplog.records if getattr(r, "fields", {}).get("event") ==
               "threads_exhausted"]  # fmt: skip
    fields = line.fields
    assert fields["edge"] == "cam-busy" and fields["method"] == "Detect"
    assert fields["peer"].startswith("ipv4:127.0.0.1:") and fields["pool"] == "detect"
    assert fields["code"] == "RESOURCE_EXHAUSTED"
    assert fields["message"] == refused.value.details()
    assert "cam-busy" in line.getMessage() and fields["peer"] in line.getMessage()


# --------------------------------------------------------- 4. the labels of nameless calls


def _quiet_camera_regex() -> str:
    """The edge regex the README's "camera gone quiet" alert leaves out (Markdown unescaped)."""
    found = re.search(r'last_seen_timestamp_seconds\{edge!~"(.+?)"\}', README.read_text())
    assert found, "no camera-gone-quiet alert in cloud/README.md"
    return found[1].replace("\\|", "|")


def test_nameless_and_badly_named_calls_are_documented_and_left_out_of_the_quiet_alert(
    tmp_path,
):
    """A Detect without an edge name is labelled "unnamed", one with a bad name "invalid": the
    README names both labels, and its quiet-camera alert (Prometheus regexes match whole
    labels) leaves them out as it leaves out "other", while a real camera stays in it."""
    server = start_loopback_server(tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        for index, metadata in enumerate(((), _named("no spaces allowed"), _named("cam-1"))):
            _detect(channel)(_request(27, f"label-{index}"), metadata=metadata, timeout=30)
        metrics = scrape_metrics(server.metrics_port)
    finally:
        channel.close()
        server.stop(0)
    labels = {key for key in metrics if key.startswith("splitdet_cloud_edge_last_seen")}
    assert labels >= {LAST_SEEN % "unnamed", LAST_SEEN % "invalid", LAST_SEEN % "cam-1"}
    excluded = _quiet_camera_regex()
    for label in ("unnamed", "invalid", "other", "NAME-load0"):
        assert re.fullmatch(excluded, label), (label, excluded)
    assert not re.fullmatch(excluded, "cam-1")
    text = README.read_text()
    assert "`unnamed`" in text and "`invalid`" in text


# ------------------------------------------------------------ 5. a caller gone, not late


def test_a_caller_that_cancelled_is_not_said_to_have_passed_its_deadline(tmp_path, caplog):
    """cam-killed's call (60 s deadline) is joined by an identical one, so it is computed to
    its end; cancelled meanwhile, its line said "its deadline passed". Now it says it cancelled
    or disconnected before its deadline."""
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    server = start_loopback_server(tmp_path, max_concurrent=1, debug_delay_s=1.5)
    killed = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    patient = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    request = _request(28, "killed")
    running = server.servicer._inflight._running  # (read only: when the second has joined)
    try:
        first = _detect(killed).future(request, metadata=_named("cam-killed"), timeout=60)
        _await(lambda: _in_flight(server) >= 1, "the first call running")
        second = _detect(patient).future(request, metadata=_named("cam-patient"), timeout=60)
        _await(lambda: any(entry.followers for calls in list(running.values())
                           for entry in list(calls.values())), "joined")  # fmt: skip
        first.cancel()
        assert second.result().cached

        def line():
            return [r for r in caplog.records
                    if getattr(r, "fields", {}).get("edge") == "cam-killed"]  # fmt: skip

        _await(line, "cam-killed's line")
    finally:
        killed.close()
        patient.close()
        server.stop(0)
    (record,) = line()
    message = record.fields["message"]
    assert "the caller was gone when its answer was ready" in message
    assert "cancelled the call or disconnected before its deadline" in message
    assert "deadline passed" not in message


# ------------------------------------------------------- 6. --models-dir given an export


def test_models_dir_given_an_export_says_to_serve_it_with_model(tmp_path, capsys):
    _, model_dir, _ = shared_model_dir(0)
    argv = ["cloud", "--models-dir", str(model_dir), "--listen", "127.0.0.1:0",
            "--answers-db", str(tmp_path / "answers.sqlite")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if " INFO " not in line]
    assert f"--models-dir {model_dir}: is an export itself" in line, err
    assert f"serve it with --model {model_dir}" in line, err
    assert "holds no export" not in line


# ----------------------------------------------------- 7. a client pair that is no pair


def test_an_edge_client_key_not_of_its_certificate_is_named_before_connecting(tmp_path, capsys):
    """`splitdet edge check` against a mutual-TLS cloud with another certificate's key: gRPC
    said only "Invalid private key ... Failed to create security handshaker"; now a one-line
    error names both options before any connection."""
    ca = ThrowawayCA(tmp_path, "plant")
    server_cert, server_key = ca.issue("cloud", server=True)
    client_cert, _ = ca.issue("edge-1", server=False)
    _, other_key = ca.issue("edge-2", server=False)
    _, model_dir, _ = shared_model_dir(0)
    server = start_loopback_server(
        tmp_path, tls_cert=server_cert, tls_key=server_key, client_ca=ca.cert_path
    )
    try:
        code = main([
            "edge", "check", "--model", str(model_dir), "--cloud", f"localhost:{server.port}",
            "--root-certs", str(ca.cert_path), "--client-cert", str(client_cert),
            "--client-key", str(other_key),
        ])  # fmt: skip
    finally:
        server.stop(0)
    err = capsys.readouterr().err
    assert code == 2, err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert f"--client-key {other_key}: not the key of --client-cert {client_cert}" in line, err
