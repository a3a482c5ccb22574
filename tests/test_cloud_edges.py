"""The cloud sees which edge calls: every edge sends its name (gRPC metadata), and the server's
metrics and log lines carry it, bounded whatever callers send. Real servers on loopback."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from cloud_fixtures import LAST_SEEN, make_sample, scrape_metrics, shared_model_dir
from PIL import Image

from splitdet.cloud import metrics as metrics_module
from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry
from splitdet.shared.cli import main
from splitdet.shared.edge_name import EDGE_NAME_KEY, check_edge_name, default_edge_name
from splitdet.shared.messages import build_request
from splitdet.shared.wire import detection_pb2 as pb

pytestmark = pytest.mark.timeout(120)

ANSWERS = 'splitdet_cloud_edge_answers_total{edge="%s",fingerprint="%s"}'
REFUSALS = 'splitdet_cloud_edge_refusals_total{code="%s",edge="%s"}'


@pytest.fixture
def served(tmp_path):
    """(server, model, manifest): a started server with metrics on a free port."""
    model, model_dir, manifest = shared_model_dir(0)
    config = ServerConfig(
        model_dir=model_dir, listen="127.0.0.1:0", threads=2, metrics_port=0,
        metrics_host="127.0.0.1", answers_db=tmp_path / "answers.sqlite",
    )  # fmt: skip
    server = CloudServer(config).start()
    yield server, model, manifest
    server.stop(0)


def _client(server, name: str | None) -> CloudClient:
    return CloudClient(ClientConfig(f"127.0.0.1:{server.port}", edge_name=name))


def test_answers_refusals_and_last_seen_per_edge(served, caplog):
    server, model, manifest = served
    sample = make_sample(model, seed=2, codec="int8")
    a, b, anonymous = (
        _client(server, "line1-cam@a"),
        _client(server, "cam-b"),
        _client(server, None),
    )
    caplog.set_level("INFO", logger="splitdet.cloud")
    try:
        a.detect(sample.encoded, sample.image, "one", manifest.fingerprint)
        for request_id in ("two", "three"):
            b.detect(sample.encoded, sample.image, request_id, manifest.fingerprint)
        with pytest.raises(NeverRetry):
            b.detect(sample.encoded, sample.image, "four", "0" * 64)  # a model not served
        anonymous.manifest()
    finally:
        for client in (a, b, anonymous):
            client.close()
    metrics = scrape_metrics(server.metrics_port)
    assert metrics[ANSWERS % ("line1-cam@a", manifest.fingerprint)] == 1
    assert metrics[ANSWERS % ("cam-b", manifest.fingerprint)] == 2
    assert metrics[REFUSALS % ("FAILED_PRECONDITION", "cam-b")] == 1
    assert REFUSALS % ("FAILED_PRECONDITION", "line1-cam@a") not in metrics
    # an unnamed caller that was never answered a Detect has no label of its own
    assert metrics[LAST_SEEN % "other"] >= metrics[LAST_SEEN % "line1-cam@a"] > 1.7e9
    assert LAST_SEEN % "unnamed" not in metrics
    # the refusal's log line names the edge beside its address
    assert any("(edge cam-b)" in r.getMessage() and "refused" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip


def test_names_that_are_not_names_and_too_many_names_stay_bounded(served, monkeypatch):
    """Callers choose their metadata: a forged name is "invalid", and past MAX_EDGE_LABELS
    distinct names the rest count as "other", so no caller can grow the metrics without end.
    (Only answered Detects claim a label: GetManifest calls count as "other".)"""
    server, model, manifest = served
    monkeypatch.setattr(metrics_module, "MAX_EDGE_LABELS", 3)
    sample = make_sample(model, seed=2, codec="int8")
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    call = channel.unary_unary(
        "/splitdet.v1.Detection/Detect",
        request_serializer=pb.DetectRequest.SerializeToString,
        response_deserializer=pb.DetectResponse.FromString,
    )
    request = build_request(sample.encoded, sample.image, "one", manifest.fingerprint)
    try:
        for name in ("x" * 65, "two words", "cam-1", "cam-2", "cam-3", "cam-4"):
            call(request, metadata=((EDGE_NAME_KEY, name),), timeout=30)
    finally:
        channel.close()
    metrics = scrape_metrics(server.metrics_port)
    seen = {key for key in metrics if key.startswith("splitdet_cloud_edge_last_seen")}
    assert seen == {LAST_SEEN % name for name in ("invalid", "cam-1", "cam-2", "other")}


class _Clock:
    """Unix s that a test steps."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _series(metrics: metrics_module.ServerMetrics) -> set[str]:
    """The per-edge series a scrape of `metrics` would show, as 'metric{labels}' texts."""
    found = set()
    for family in metrics.registry.collect():
        for sample in family.samples:
            if "edge" in sample.labels and not sample.name.endswith("_created"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                found.add(f"{sample.name}{{{labels}}}")
    return found


def test_edges_silent_past_the_forget_time_leave_the_metrics_and_free_their_labels(monkeypatch):
    """The soak review's finding: 256 names seen once filled the labels for good (every later
    camera was "other"), and a retired camera's series stayed. Now an edge silent for
    `forget_edges_s` loses its last-seen, answers and refusals series and its label; one that
    keeps calling keeps them."""
    monkeypatch.setattr(metrics_module, "MAX_EDGE_LABELS", 2)
    clock = _Clock()
    metrics = metrics_module.ServerMetrics(["fp"], forget_edges_s=3600.0, clock=clock)

    def call(name: str) -> str:  # what a Detect of `name` answered, and refused once, leaves
        edge = metrics.edge_of(((EDGE_NAME_KEY, name),), claim=True)
        metrics.edge_last_seen.labels(edge).set(clock.now)
        metrics.edge_answers.labels(edge, "fp").inc()
        metrics.used(edge, "fp")
        metrics.refused(edge, grpc.StatusCode.DEADLINE_EXCEEDED)
        return edge

    assert [call("cam-1"), call("cam-2"), call("cam-3")] == ["cam-1", "cam-2", "other"]
    every = {
        LAST_SEEN % "cam-1",
        ANSWERS % ("cam-1", "fp"),
        REFUSALS % ("DEADLINE_EXCEEDED", "cam-1"),
    }
    assert every <= _series(metrics)
    clock.now += 3000.0
    call("cam-2")  # cam-2 goes on calling; cam-1 and "other" fall silent
    clock.now += 1000.0  # cam-1 silent for 4000 s, cam-2 for 1000 s
    assert call("cam-4") == "cam-4"  # the labels were full: cam-1 forgotten to make room
    series = _series(metrics)
    assert not [s for s in series if 'edge="cam-1"' in s or 'edge="other"' in s], series
    assert {LAST_SEEN % "cam-2", LAST_SEEN % "cam-4"} <= series
    assert metrics.edges_using("fp").keys() == {"cam-2", "cam-4"}
    clock.now += 4000.0  # every edge silent past the forget time: the next sweep drops them
    assert call("cam-1") == "cam-1"
    assert {s for s in _series(metrics) if "last_seen" in s} == {LAST_SEEN % "cam-1"}


def test_a_dropped_export_leaves_no_answer_series():
    """The soak review's finding: each export ever served left its answer series behind."""
    metrics = metrics_module.ServerMetrics(["old", "new"])
    for fingerprint in ("old", "new"):
        metrics.model_answers.labels(fingerprint).inc()
        metrics.edge_answers.labels("cam-1", fingerprint).inc()
        metrics.used("cam-1", fingerprint)
    metrics.served(["new"])
    metrics.forget(["old"])
    answer = SimpleNamespace(fingerprint="old", cached=True)  # a call under way at the reload
    metrics.observe(answer, "cam-1")
    samples = {(s.name, tuple(sorted(s.labels.items()))) for family in metrics.registry.collect()
               for s in family.samples if s.name.endswith("answers_total")}  # fmt: skip
    assert samples == {
        ("splitdet_cloud_model_answers_total", (("fingerprint", "new"),)),
        ("splitdet_cloud_edge_answers_total", (("edge", "cam-1"), ("fingerprint", "new"))),
    }


def test_an_edge_daemon_names_itself(served, tmp_path):
    """`splitdet edge run --name` reaches the cloud's metrics (here by the Detect of one image
    and the start-up probe)."""
    server, _, manifest = served
    watch = tmp_path / "hot"
    watch.mkdir()
    Image.fromarray(np.full((64, 80, 3), 99, np.uint8)).save(watch / "a.png")
    code = main(
        ["edge", "run", "--model", str(shared_model_dir(0)[1]), "--watch", str(watch),
         "--db", str(tmp_path / "edge.sqlite"), "--cloud", f"127.0.0.1:{server.port}",
         "--once", "--settle", "0", "--threshold", "0", "--log-format", "text",
         "--name", "press-7"]
    )  # fmt: skip
    assert code == 0
    assert scrape_metrics(server.metrics_port)[ANSWERS % ("press-7", manifest.fingerprint)] == 1


@pytest.mark.parametrize("name", ["", "two words", "x" * 65, "ünïcode", "a\nb"])
def test_a_bad_edge_name_is_refused_before_anything_runs(name, tmp_path, capsys):
    with pytest.raises(ValueError, match="edge name"):
        check_edge_name(name)
    with pytest.raises(ValueError, match="edge name"):
        ClientConfig("127.0.0.1:9", edge_name=name)
    with pytest.raises(SystemExit) as exits:
        main(["edge", "run", "--model", "m", "--watch", str(tmp_path), "--db", "d",
              "--cloud", "127.0.0.1:9", "--name", name])  # fmt: skip
    assert exits.value.code == 2
    assert "--name" in capsys.readouterr().err


def test_the_default_name_is_the_host_name_made_usable(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "Prüf stand#3.local")
    assert default_edge_name() == "Pr-f-stand-3.local"
    monkeypatch.setattr("socket.gethostname", lambda: "")
    assert default_edge_name() == "edge"


def test_json_logs_carry_the_refused_calls_fields(tmp_path):
    """`splitdet cloud --log-format json`: a log pipeline gets one object per line, and a
    refused call's line names the method, the edge, its address and the code."""
    import json
    import signal

    from cloud_fixtures import start_cloud_process

    _, model_dir, _ = shared_model_dir(0)
    cloud = start_cloud_process(model_dir, tmp_path, "json", "--log-format", "json")
    try:
        client = CloudClient(ClientConfig(cloud.address, edge_name="cam-j"))
        try:
            with pytest.raises(NeverRetry):
                client.manifest("0" * 64)
        finally:
            client.close()
        cloud.process.send_signal(signal.SIGTERM)
        assert cloud.process.wait(timeout=30) == 0
    finally:
        cloud.stop()
    events = {}
    for line in cloud.log().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            events.setdefault(entry.get("event"), entry)
    assert events["serving"]["port"] == cloud.port
    from splitdet.shared.version import splitdet_version  # (which splitdet: upgraded apart)

    assert events["serving"]["version"] == splitdet_version()
    refused = events["refused"]
    assert (refused["method"], refused["edge"], refused["code"]) == (
        "GetManifest",
        "cam-j",
        "FAILED_PRECONDITION",
    )
    assert refused["peer"].startswith("ipv4:127.0.0.1:")
    assert refused["level"] == "WARNING"  # (a model not served: a misconfigured edge)
    assert {"draining", "stopped"} <= set(events)


def test_an_edge_refused_for_its_token_is_named(tmp_path, caplog):
    """A wrong token is refused before the servicer runs: the refusal is counted (a name
    without a label of its own under "unauthenticated") and its log line names the edge it
    claims to be,
    for the operator to find the edge with the wrong token."""
    model, model_dir, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=2, codec="int8")
    config = ServerConfig(
        model_dir=model_dir, listen="127.0.0.1:0", threads=2, metrics_port=0,
        metrics_host="127.0.0.1", answers_db=tmp_path / "answers.sqlite", token="s3cret",
    )  # fmt: skip
    server = CloudServer(config).start()
    caplog.set_level("INFO", logger="splitdet.cloud")
    address = f"127.0.0.1:{server.port}"
    wrong = CloudClient(ClientConfig(address, edge_name="press-7", token="wrong"))
    right = CloudClient(ClientConfig(address, edge_name="press-8", token="s3cret"))
    try:
        with pytest.raises(NeverRetry, match="wrong bearer token"):
            wrong.manifest()
        right.manifest()
        right.detect(sample.encoded, sample.image, "one", manifest.fingerprint)  # labelled
        metrics = scrape_metrics(server.metrics_port)
    finally:
        wrong.close()
        right.close()
        server.stop(0)
    # counted under one label: without the token, a caller must not be able to use up the
    # edge labels or keep a dead camera "seen" by claiming its name
    assert metrics[REFUSALS % ("UNAUTHENTICATED", "unauthenticated")] == 1
    assert not any('edge="press-7"' in key for key in metrics)
    assert metrics[LAST_SEEN % "press-8"] > 1.7e9
    assert any("(claims edge press-7)" in r.getMessage() and "UNAUTHENTICATED" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip
