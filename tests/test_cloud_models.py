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
from splitdet.cloud.idempotency import IdempotencyStore, StoredAnswer
from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry, build_request
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
        caplog.at_level("INFO", logger="splitdet.cloud"),
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


def test_a_full_answers_store_still_answers(exports, tmp_path, caplog):
    """The answers store's disk is full (SQLITE_FULL, by a page limit at its current size): the
    heads' answer is good, so it is returned and the store's failure logged. Before, the call
    failed as INTERNAL, which the edge takes for a permanent refusal."""
    from splitdet.cloud.core import DetectCall

    (old_model, old_dir, old), _ = exports
    cloud, manifest = load_cloud(old_dir)
    store = IdempotencyStore(tmp_path / "answers.sqlite", 100)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(sqlite3.OperationalError, match="full"):  # fill what room is left
        for i in range(100):
            store.put(f"filler-{i}", StoredAnswer(old.fingerprint, "0" * 64, b"x" * 2000))
    core = DetectionCore(cloud, manifest, store)
    server = CloudServer(ServerConfig(model_dir=old_dir, listen="127.0.0.1:0", threads=2), core)
    sample = make_sample(old_model, seed=6, codec="int8")
    caplog.set_level("WARNING", logger="splitdet.cloud.core")
    try:
        result = core.detect(DetectCall("full", old.fingerprint, sample.image, sample.encoded))
        again = core.detect(DetectCall("full", old.fingerprint, sample.image, sample.encoded))
    finally:
        store.close()
    assert not result.cached and not again.cached  # computed twice: nothing could be kept
    assert [d.box for d in result.detections] == [d.box for d in again.detections]
    np.testing.assert_allclose(
        [d.box for d in result.detections], sample.reference["boxes"].numpy(), atol=1e-3
    )
    assert "full" in caplog.text and "answered without it" in caplog.text
    # something to alert on: a counter, and an event in JSON logs (idempotency is off meanwhile)
    counted = server.metrics.registry.get_sample_value("splitdet_cloud_answers_store_errors_total")
    assert counted == 2
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert events.count("answers_store_failed") == 1  # (the next within a minute: counted)


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


def _write_images(watch, names, seed: int) -> None:
    from PIL import Image

    watch.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(watch / name)


def _cloud(tmp_path, model_dir, *more):
    """A started server for `model_dir` (the default) and `more`, with its own answers file."""
    config = ServerConfig(
        model_dir=model_dir, more_model_dirs=more, listen="127.0.0.1:0", threads=2,
        metrics_port=0, metrics_host="127.0.0.1",
        answers_db=tmp_path / f"answers-{model_dir.parent.name}-{len(more)}.sqlite",
    )  # fmt: skip
    return CloudServer(config).start()


def _edge(model_dir, watch, db, server, drain_s: float, retry_max_s: float = 0.1):
    """An edge daemon in batch mode (--once) that flags every image (threshold 0)."""
    from splitdet.edge.daemon import EdgeDaemon
    from splitdet.edge.daemon_config import DaemonConfig

    return EdgeDaemon(
        DaemonConfig(
            model_dir=model_dir, watch=watch, cloud=f"127.0.0.1:{server.port}", db=db,
            settle_s=0.05, poll_s=0.05, once=True, drain_timeout_s=drain_s, threshold=0.0,
            retry_initial_s=0.05, retry_max_s=retry_max_s,
        )
    )  # fmt: skip


def _said(caplog, event: str, **fields) -> bool:
    """Whether the edge daemon logged `event` with these fields (within 10 s: the start-up
    probe runs beside the work)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in caplog.get_records("setup") + caplog.records:  # (fixtures log in setup)
            said = getattr(record, "fields", {})
            if (
                record.name == "splitdet.edge"
                and record.msg == event
                and all(said.get(k) == v for k, v in fields.items())
            ):
                return True
        time.sleep(0.05)
    return False


@pytest.fixture
def refused_backlog(exports, tmp_path, caplog):
    """(watch, db, server): an edge on the old export ran once against a cloud serving only the
    new one (the server, still running), which left its two requests pending."""
    (_, old_dir, _), (_, new_dir, _) = exports
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    _write_images(watch, ("a.png", "b.png"), seed=3)
    caplog.set_level("INFO", logger="splitdet.edge")
    new_only = _cloud(tmp_path, new_dir)
    try:
        assert _edge(old_dir, watch, db, new_only, drain_s=0.5).run() == 1  # undelivered
        assert _verdicts(db) == {"pending": 2}
        yield watch, db, new_only
    finally:
        new_only.stop(0)


def test_an_edge_behind_the_cloud_keeps_its_requests_until_its_model_is_served(
    exports, refused_backlog, tmp_path, caplog
):
    """The rolling upgrade done cloud first: the cloud serves only the new export, and an edge
    still on the old one is refused (FAILED_PRECONDITION). Before, each such request became a
    dead letter, its features dropped; now it waits in the outbox, and is delivered once the
    cloud serves the old export beside the new one."""
    (_, old_dir, _), (_, new_dir, _) = exports
    watch, db, _ = refused_backlog
    # said at start-up too, not only when the first defect is sent
    assert _said(caplog, "model_refused"), caplog.text
    both = _cloud(tmp_path, new_dir, old_dir)
    try:
        assert _edge(old_dir, watch, db, both, drain_s=60.0).run() == 0
        assert _said(caplog, "cloud_checked"), caplog.text
    finally:
        both.stop(0)
    assert _verdicts(db) == {"defect": 2}


def test_an_upgraded_edge_sends_its_earlier_requests_with_their_own_model(
    exports, refused_backlog, tmp_path, caplog
):
    """The rolling upgrade done edge first, without waiting for its outbox to empty: requests
    made with the old export stay in the outbox beside the new export's and go out under their
    own fingerprint. While the cloud does not serve the old export, they wait without holding up
    the new requests (before, the daemon refused to start on such an outbox, and a refused
    request paused the whole sender for the backoff cap: here 30 s, longer than the drain)."""
    from prometheus_client import generate_latest

    from splitdet.edge.daemon_metrics import EdgeMetrics
    from splitdet.edge.store import ResultStore

    (_, old_dir, old_manifest), (_, new_dir, new_manifest) = exports
    watch, db, new_only = refused_backlog  # the old export's two requests, refused
    _write_images(watch, ("c.png", "d.png"), seed=4)
    upgraded = _edge(new_dir, watch, db, new_only, drain_s=8.0, retry_max_s=30.0)
    started = time.monotonic()
    assert upgraded.run() == 1  # the old export's two are still pending
    assert time.monotonic() - started < 25  # (not held up by the old export's refusals)
    assert _said(caplog, "outbox_other_export", fingerprint=old_manifest.fingerprint,
                 pending=2), caplog.text  # fmt: skip
    assert _said(caplog, "model_refused", fingerprint=old_manifest.fingerprint,
                 role="earlier"), caplog.text  # fmt: skip
    assert _said(caplog, "cloud_checked", fingerprint=new_manifest.fingerprint,
                 role="current"), caplog.text  # fmt: skip
    assert _verdicts(db) == {"pending": 2, "defect": 2}
    store = ResultStore(db)
    try:
        assert store.outbox_fingerprints() == {old_manifest.fingerprint: 2}
        scraped = generate_latest(EdgeMetrics(store).registry).decode()
        assert (f'splitdet_edge_outbox_model_requests{{fingerprint="{old_manifest.fingerprint}"}}'
                " 2.0") in scraped  # fmt: skip
    finally:
        store.close()

    both = _cloud(tmp_path, new_dir, old_dir)
    try:
        # the old export's requests were held for the cap (30 s) by the run before; a new
        # daemon holds nothing in memory, and their next try in the database is honoured
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE outbox SET next_try = 0")
        assert _edge(new_dir, watch, db, both, drain_s=60.0).run() == 0
        answers = scrape_metrics(both.metrics_port)
    finally:
        both.stop(0)
    # answered by the model that made each request
    key = 'splitdet_cloud_model_answers_total{fingerprint="%s"}'
    assert answers[key % old_manifest.fingerprint] == 2
    assert answers[key % new_manifest.fingerprint] == 0  # (c, d were answered by new_only)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute("SELECT path, verdict, fingerprint FROM images").fetchall()
    made_by = {"a.png": old_manifest, "b.png": old_manifest, "c.png": new_manifest,
               "d.png": new_manifest}  # fmt: skip
    assert len(rows) == 4
    for path, verdict, fingerprint in rows:
        assert verdict == "defect"
        assert fingerprint == made_by[path.rsplit("/", 1)[-1]].fingerprint


def test_a_refused_export_costs_one_call_per_backoff_cap_not_one_per_request(exports, tmp_path):
    """Requests of an export the cloud refuses, made after the refusal, wait for the hold in
    the database instead of each going over the wire to be refused (a flagged image a second
    would otherwise cost a refused megabyte a second); another export's go on at once."""
    from splitdet.edge.sender import Backoff, Sender
    from splitdet.edge.store import Arrival, ResultStore

    (old_model, _, old_manifest), (_, new_dir, new_manifest) = exports
    server = _cloud(tmp_path, new_dir)
    store = ResultStore(tmp_path / "edge.sqlite")
    sender = Sender(
        store,
        lambda: CloudClient(ClientConfig(f"127.0.0.1:{server.port}")),
        Backoff(0.05, 30.0),
    )
    sample = make_sample(old_model, seed=5, codec="int8")

    def add(name: str, fingerprint: str) -> int:
        request = build_request(sample.encoded, sample.image, f"req-{name}", fingerprint)
        arrival = Arrival(str(tmp_path / name), f"{name}|1|1|1", name * 64, 1, time.time())
        image_id, _, verdict = store.record_pending(
            arrival, 0.9, f"req-{name}", request.SerializeToString(), fingerprint, {}
        )
        assert verdict == "pending"
        return image_id

    def refused() -> float:
        metrics = scrape_metrics(server.metrics_port)
        return metrics.get(
            'splitdet_cloud_failures_total{code="FAILED_PRECONDITION",method="Detect"}', 0.0
        )

    try:
        first = add("a", old_manifest.fingerprint)
        assert sender.send(store.next_due()) == 0.0  # refused, and no pause for the others
        assert refused() == 1
        add("b", old_manifest.fingerprint)  # made after the refusal
        add("c", new_manifest.fingerprint)
        for _ in range(3):
            sender._pass()
        assert refused() == 1  # "b" was held in the database, never sent
        assert store.outbox_fingerprints() == {old_manifest.fingerprint: 2}  # "c" delivered
        due = {row[0]: row[1] for row in store._query("SELECT image_id, next_try FROM outbox")}
        assert set(due) == {first, first + 1}
        assert min(due.values()) > time.time() + 25  # both wait for the cap, together
        errors = [row[0] for row in store._query("SELECT last_error FROM outbox")]
        assert any("not served here" in (e or "") for e in errors)  # the cloud's own words
        assert not any("held" in (e or "") for e in errors)
    finally:
        store.close()
        server.stop(0)
