"""One cloud server serving several exports at once (a rolling upgrade of the edges): each
request answered by the model its fingerprint names, on a real gRPC server on loopback."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
from cloud_fixtures import (
    TINY_OVERRIDES,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    write_model_dir,
)

from splitdet.cloud.core import DetectionCore, load_cloud
from splitdet.cloud.idempotency import IdempotencyStore
from splitdet.cloud.server import CloudServer, ServerConfig
from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry
from splitdet.edge.predict import RemoteDetector
from splitdet.shared.cli import main

from conftest import make_tiny_model

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """(old, new): the old export as the fixtures make it; the new one another model with
    another class list, as an upgrade might bring."""
    old_model, old_dir, old_manifest = shared_model_dir(0)
    new_model = make_tiny_model(9, class_names=("scratch", "dent"), **TINY_OVERRIDES)
    new_dir = tmp_path_factory.mktemp("new") / "model"
    new_manifest = write_model_dir(new_model, new_dir)
    assert new_manifest.fingerprint != old_manifest.fingerprint
    return (old_model, old_dir, old_manifest), (new_model, new_dir, new_manifest)


@pytest.fixture
def server(exports, tmp_path):
    """A started server: the old export the default, the new one beside it."""
    (_, old_dir, _), (_, new_dir, _) = exports
    config = ServerConfig(
        model_dir=old_dir,
        more_model_dirs=(new_dir,),
        listen="127.0.0.1:0",
        threads=2,
        metrics_port=0,
        metrics_host="127.0.0.1",
        answers_db=tmp_path / "answers.sqlite",
    )
    started = CloudServer(config).start()
    client = CloudClient(ClientConfig(f"127.0.0.1:{started.port}"))
    yield started, client
    client.close()
    started.stop(0)


def test_each_request_is_answered_by_the_model_it_names(exports, server):
    _, client = server
    for index, (model, _, manifest) in enumerate(exports):
        sample = make_sample(model, seed=3, codec="fp32")
        answer = client.detect(sample.encoded, sample.image, f"req-{index}", manifest.fingerprint)
        reference = sample.reference
        assert len(reference["boxes"]) > 0, "a comparison over zero detections proves nothing"
        assert answer.fingerprint == manifest.fingerprint
        np.testing.assert_allclose(answer.boxes, reference["boxes"].numpy(), rtol=0, atol=1e-4)
        np.testing.assert_array_equal(answer.labels, reference["labels"].numpy())
        names = manifest.class_names
        assert answer.class_names == tuple(names[label - 1] for label in answer.labels)
    # the old export's features sent as if made by the new one: decoded against the new model
    old_model, new_fingerprint = exports[0][0], exports[1][2].fingerprint
    sample = make_sample(old_model, seed=3, codec="fp32")
    crossed = client.detect(sample.encoded, sample.image, "crossed", new_fingerprint)
    assert crossed.fingerprint == new_fingerprint
    assert not np.array_equal(crossed.boxes, sample.reference["boxes"].numpy())


def test_a_model_not_served_is_refused_naming_every_served_one(exports, server, caplog):
    _, client = server
    sample = make_sample(exports[0][0], seed=3, codec="int8")
    with (
        caplog.at_level("INFO", logger="splitdet.cloud.servicer"),
        pytest.raises(NeverRetry) as refused,
    ):
        client.detect(sample.encoded, sample.image, "unknown", "f" * 64)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    for _, _, manifest in exports:
        assert manifest.fingerprint[:16] in refused.value.message
    # the server's log names the edge that sent it (one of many cameras)
    assert any("Detect from ipv4:127.0.0.1:" in r.getMessage() for r in caplog.records)


def test_manifests_by_fingerprint_and_the_served_list(exports, server):
    _, client = server
    (_, _, old), (_, _, new) = exports
    default = client.manifest()
    assert default.fingerprint == old.fingerprint
    assert default.served == (old.fingerprint, new.fingerprint)
    chosen = client.manifest(new.fingerprint)
    assert chosen.fingerprint == new.fingerprint
    assert chosen.class_names == ("scratch", "dent")
    assert json.loads(json.dumps(chosen.data))["fingerprint"] == new.fingerprint
    with pytest.raises(NeverRetry) as refused:
        client.manifest("0" * 64)
    assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
    # what `splitdet predict --cloud` checks first: an edge on either export may talk to it
    for _, _, manifest in exports:
        RemoteDetector(client, manifest.fingerprint).check_model()
    with pytest.raises(NeverRetry, match="not served here"):
        RemoteDetector(client, "0" * 64).check_model()


def test_metrics_count_answers_per_model(exports, server):
    """An operator drops the old export once its count stops rising."""
    started, client = server
    (old_model, _, old), (_, _, new) = exports
    key = 'splitdet_cloud_model_answers_total{fingerprint="%s"}'
    before = scrape_metrics(started.metrics_port)
    assert before[key % old.fingerprint] == before[key % new.fingerprint] == 0
    assert before[f'splitdet_cloud_model{{default="true",fingerprint="{old.fingerprint}"}}'] == 1
    assert before[f'splitdet_cloud_model{{default="false",fingerprint="{new.fingerprint}"}}'] == 1
    sample = make_sample(old_model, seed=4, codec="int8")
    client.detect(sample.encoded, sample.image, "one", old.fingerprint)
    client.detect(sample.encoded, sample.image, "one", old.fingerprint)  # answered from store
    after = scrape_metrics(started.metrics_port)
    assert after[key % old.fingerprint] == 2 and after[key % new.fingerprint] == 0


def test_a_stored_answer_is_not_given_for_another_model(exports, tmp_path):
    """The idempotency store keys answers by request id: the same id sent for the other model
    is computed by that model, never answered with the first model's stored boxes."""
    from splitdet.cloud.core import DetectCall

    (old_model, old_dir, old), (_, new_dir, new) = exports
    cloud, manifest = load_cloud(old_dir)
    store = IdempotencyStore(tmp_path / "answers.sqlite", 100)
    core = DetectionCore(cloud, manifest, store, also=[load_cloud(new_dir)])
    try:
        sample = make_sample(old_model, seed=5, codec="int8")
        call = DetectCall("same-id", old.fingerprint, sample.image, sample.encoded)
        first = core.detect(call)
        assert core.detect(call).cached
        other = core.detect(replace(call, fingerprint=new.fingerprint))
        assert not other.cached and other.fingerprint == new.fingerprint
        assert first.fingerprint == old.fingerprint
        assert [d.box for d in other.detections] != [d.box for d in first.detections]
    finally:
        store.close()


def test_the_same_export_given_twice_is_one_line(exports, tmp_path, capsys):
    (_, old_dir, old), _ = exports
    argv = ["cloud", "--model", str(old_dir), "--model", str(old_dir), "--listen", "127.0.0.1:0"]
    argv += ["--answers-db", str(tmp_path / "answers.sqlite")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert "the same export" in lines[0] and old.fingerprint[:16] in lines[0]


def _verdicts(db) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        found = conn.execute("SELECT verdict, COUNT(*) FROM images GROUP BY verdict").fetchall()
    return dict(found)


def _probe_said(caplog, event: str) -> bool:
    """Whether the edge daemon's start-up probe of the cloud logged `event` (within 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(r.name == "splitdet.edge" and r.msg == event for r in caplog.records):
            return True
        time.sleep(0.05)
    return False


def test_an_edge_behind_the_cloud_keeps_its_requests_until_its_model_is_served(
    exports, tmp_path, caplog
):
    """The rolling upgrade done cloud first: the cloud serves only the new export, and an edge
    still on the old one is refused (FAILED_PRECONDITION). Before, each such request became a
    dead letter, its features dropped; now it waits in the outbox, and is delivered once the
    cloud serves the old export beside the new one."""
    from PIL import Image

    from splitdet.edge.daemon import DaemonConfig, EdgeDaemon

    (_, old_dir, _), (_, new_dir, _) = exports
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(watch / name)

    def cloud(*more):
        config = ServerConfig(
            model_dir=new_dir, more_model_dirs=more, listen="127.0.0.1:0", threads=2,
            answers_db=tmp_path / f"answers-{len(more)}.sqlite",
        )  # fmt: skip
        return CloudServer(config).start()

    def edge(server, drain_s: float) -> EdgeDaemon:
        return EdgeDaemon(
            DaemonConfig(
                model_dir=old_dir,
                watch=watch,
                cloud=f"127.0.0.1:{server.port}",
                db=db,
                settle_s=0.05,
                poll_s=0.05,
                once=True,
                drain_timeout_s=drain_s,
                threshold=0.0,
                retry_initial_s=0.05,
                retry_max_s=0.1,
            )
        )

    caplog.set_level("INFO", logger="splitdet.edge")
    new_only = cloud()
    try:
        assert edge(new_only, drain_s=1.0).run() == 1  # undelivered: both still pending
        # said at start-up too, not only when the first defect is sent
        assert _probe_said(caplog, "model_refused"), caplog.text
    finally:
        new_only.stop(0)
    assert _verdicts(db) == {"pending": 2}
    both = cloud(old_dir)
    try:
        assert edge(both, drain_s=60.0).run() == 0
        assert _probe_said(caplog, "cloud_checked"), caplog.text
    finally:
        both.stop(0)
    assert _verdicts(db) == {"defect": 2}
