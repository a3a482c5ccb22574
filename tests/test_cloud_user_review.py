"""The user-role review of the cloud server: edge labels that fill up silently, which camera is
slow, token refusals counted and logged per camera, refusal levels, a stale --ready-file. Real
servers on loopback, one real process."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from cloud_fixtures import (
    DETECT,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    start_cloud_process,
    start_loopback_server,
)

from splitdet.cloud import metrics as metrics_module
from splitdet.cloud.served_exports import export_dirs
from splitdet.cloud.server_config import ServerConfig
from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry, RetryLater
from splitdet.shared.edge_name import EDGE_NAME_KEY

from support import wait_for

pytestmark = pytest.mark.timeout(180)

REFUSALS = 'splitdet_cloud_edge_refusals_total{code="%s",edge="%s"}'
ANSWER_S = 'splitdet_cloud_edge_answer_seconds_%s{edge="%s"}'


def _warnings(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if getattr(record, "fields", {}).get("event") == event and record.levelno == logging.WARNING
    ]


def test_a_name_finding_every_label_held_is_warned_of_and_counted(monkeypatch, caplog):
    """Past MAX_EDGE_LABELS, a new camera was counted as "other" without a word: now a WARNING
    names it, the limit and --forget-edges-after (at most one per LABELS_FULL_EVERY_S), and
    gauges show the labels held and the names folded into "other"."""
    monkeypatch.setattr(metrics_module, "MAX_EDGE_LABELS", 2)
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    metrics = metrics_module.ServerMetrics(["fp"])

    def claim(name: str) -> str:
        return metrics.edge_of(((EDGE_NAME_KEY, name),), claim=True)

    assert [claim("cam-1"), claim("cam-2"), claim("cam-3"), claim("cam-3")] == [
        "cam-1", "cam-2", "other", "other",
    ]  # fmt: skip
    warned = _warnings(caplog, "edge_labels_full")
    assert len(warned) == 1, caplog.text
    text = warned[0].getMessage()
    assert "cam-3" in text and "all 2 edge labels" in text and "--forget-edges-after" in text
    assert claim("cam-4") == "other"  # within the interval: no second line
    assert len(_warnings(caplog, "edge_labels_full")) == 1
    values = {s.name: s.value for family in metrics.registry.collect() for s in family.samples}
    assert values["splitdet_cloud_edge_labels"] == 2
    assert values["splitdet_cloud_edge_names_unlabelled"] == 2  # cam-3 and cam-4


def test_slot_wait_and_each_edges_answer_time_are_measured(tmp_path):
    """The stage times leave out the wait for a slot and name no camera: a histogram of the
    slot wait, and each edge's answer time (count and sum), show a camera kept waiting."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=3, codec="int8")
    server = start_loopback_server(tmp_path, max_concurrent=1, debug_delay_s=1.5)
    address = f"127.0.0.1:{server.port}"
    clients = {
        name: CloudClient(ClientConfig(address, edge_name=name, own_connection=True))
        for name in ("cam-a", "cam-b")
    }

    def send(name: str) -> None:
        clients[name].detect(sample.encoded, sample.image, f"id-{name}", manifest.fingerprint)

    try:
        threads = [threading.Thread(target=send, args=(name,)) for name in clients]
        threads[0].start()  # cam-a holds the one slot 1.5 s; cam-b asks for it meanwhile
        in_flight = "splitdet_cloud_in_flight"
        wait_for(lambda: scrape_metrics(server.metrics_port)[in_flight] == 1, 30, "cam-a's slot")
        threads[1].start()
        for thread in threads:
            thread.join(60)
        metrics = scrape_metrics(server.metrics_port)
    finally:
        for client in clients.values():
            client.close()
        server.stop(0)
    waited = 'splitdet_cloud_slot_wait_seconds_%s{outcome="slot"}'
    assert metrics[waited % "count"] == 2
    assert metrics[waited % "sum"] >= 0.5  # cam-b waited for cam-a's 1.5 s
    assert metrics['splitdet_cloud_slot_wait_seconds_count{outcome="refused"}'] == 0
    for name in clients:
        assert metrics[ANSWER_S % ("count", name)] == 1
        assert metrics[ANSWER_S % ("sum", name)] >= 1.5
    assert metrics[ANSWER_S % ("sum", "cam-b")] >= 2.0  # its wait, then its own 1.5 s


def test_token_refusals_count_under_a_known_cameras_label_and_each_name_is_logged(tmp_path, caplog):
    """A camera the server knew, now with a wrong token, counts under its own label (a
    stranger's name takes none: "unauthenticated"); and each name's first refusal is logged
    at once, at WARNING, not a minute late in another camera's `repeats_from`."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=2, codec="int8")
    server = start_loopback_server(tmp_path, token="s3cret")
    caplog.set_level(logging.WARNING, logger="splitdet.cloud")
    address = f"127.0.0.1:{server.port}"
    known = CloudClient(ClientConfig(address, edge_name="press-8", token="s3cret"))
    nameless = CloudClient(ClientConfig(address, token="s3cret"))  # labelled "unnamed"
    clients = [
        CloudClient(ClientConfig(address, edge_name=name, token="revoked"))
        for name in ("press-8", "press-7", "press-9", None)
    ]
    try:
        known.detect(sample.encoded, sample.image, "one", manifest.fingerprint)  # labelled
        nameless.manifest()
        for client in clients:
            with pytest.raises(NeverRetry, match="wrong bearer token"):
                client.manifest()
        metrics = scrape_metrics(server.metrics_port)
    finally:
        for client in (known, nameless, *clients):
            client.close()
        server.stop(0)
    assert metrics[REFUSALS % ("UNAUTHENTICATED", "press-8")] == 1
    # "unnamed" holds a label, but a caller without a name claims no camera's
    assert metrics[REFUSALS % ("UNAUTHENTICATED", "unauthenticated")] == 3
    assert REFUSALS % ("UNAUTHENTICATED", "unnamed") not in metrics
    assert not any('edge="press-7"' in key or 'edge="press-9"' in key for key in metrics)
    logged = [r.fields["edge"] for r in _warnings(caplog, "refused")]
    assert logged == ["press-8", "press-7", "press-9", "unnamed"], caplog.text


def test_refusals_of_a_misconfigured_edge_are_warnings_load_shedding_is_info(tmp_path, caplog):
    """Under --log-level WARNING an operator saw no refusal at all: a model not served and a
    request over --max-message-mib are WARNINGs now; a busy refusal stays INFO."""
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=4, codec="int8")
    server = start_loopback_server(
        tmp_path, max_concurrent=1, max_queued=0, debug_delay_s=3.0, max_message_bytes=1 << 20
    )
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    address = f"127.0.0.1:{server.port}"
    slow = CloudClient(ClientConfig(address, edge_name="cam-slow", own_connection=True))
    busy = CloudClient(ClientConfig(address, edge_name="cam-busy", own_connection=True))
    channel = grpc.insecure_channel(address)
    holder = threading.Thread(
        target=lambda: slow.detect(sample.encoded, sample.image, "slow", manifest.fingerprint),
        daemon=True,
    )
    try:
        holder.start()
        wait_for(lambda: scrape_metrics(server.metrics_port)["splitdet_cloud_in_flight"] == 1, 30,
                 "the slow call holding the slot")  # fmt: skip
        with pytest.raises(RetryLater):
            busy.detect(sample.encoded, sample.image, "busy", manifest.fingerprint)
        with pytest.raises(NeverRetry):
            busy.manifest("0" * 64)  # a model not served
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(DETECT)(b"\0" * (1 << 20 | 1), timeout=30,
                                        metadata=((EDGE_NAME_KEY, "cam-big"),))  # fmt: skip
        holder.join(30)
    finally:
        channel.close()
        slow.close()
        busy.close()
        server.stop(0)
    levels = {
        (r.fields["edge"], r.fields["code"]): r.levelname
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == "refused"
    }
    assert levels == {
        ("cam-busy", "RESOURCE_EXHAUSTED"): "INFO",
        ("cam-busy", "FAILED_PRECONDITION"): "WARNING",
        ("cam-big", "RESOURCE_EXHAUSTED"): "WARNING",
    }, caplog.text


def test_a_stale_ready_file_is_removed_at_start_and_once_draining(tmp_path):
    """A --ready-file outlived its server (SIGTERM, kill -9), and a new server left it in place
    while it loaded: a supervisor read a dead server as ready. Now it goes when the drain
    begins (health NOT_SERVING, calls finishing), and a start removes a dead process's, but
    not a live one's (two servers given one file: the second must not unready the first)."""
    model, model_dir, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=5, codec="int8")
    cloud = start_cloud_process(model_dir, tmp_path, "ready", "--debug-delay", "8", "--grace",
                                "20")  # fmt: skip
    ready = tmp_path / "ready.ready.json"
    client = CloudClient(ClientConfig(f"127.0.0.1:{cloud.port}", timeout_s=60))
    call = threading.Thread(
        target=lambda: client.detect(sample.encoded, sample.image, "slow", manifest.fingerprint),
        daemon=True,
    )
    try:
        assert json.loads(ready.read_text())["pid"] == cloud.process.pid
        call.start()
        in_flight = "splitdet_cloud_in_flight"
        wait_for(lambda: scrape_metrics(cloud.metrics_port)[in_flight] == 1, 30, "a call")
        cloud.process.send_signal(signal.SIGTERM)
        wait_for(lambda: not ready.exists(), 5, "the ready file gone once draining")
        assert cloud.process.poll() is None, "gone only once stopped, not while draining"
        assert cloud.process.wait(timeout=60) == 0
        call.join(30)
    finally:
        client.close()
        cloud.stop()

    def start_over(pid: int, name: str) -> tuple[subprocess.Popen, Path]:
        ready.write_text(json.dumps({"pid": pid, "port": 1}) + "\n")
        log_path = tmp_path / f"{name}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "splitdet.shared.cli", "cloud", "--model",
                 str(model_dir), "--listen", "127.0.0.1:0", "--threads", "1", "--ready-file",
                 str(ready), "--answers-db", str(tmp_path / f"{name}.sqlite")],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(lambda: "loading model" in log_path.read_text(), 60, "loading")
        return process, log_path

    for pid, name in ((999_999_999, "after-kill"), (os.getpid(), "beside-a-live-one")):
        process, log_path = start_over(pid, name)
        try:
            kept = ready.exists() and json.loads(ready.read_text())["pid"] == pid
            if pid == os.getpid():  # (this test's own process: alive)
                assert kept and "still running" in log_path.read_text(), log_path.read_text()
            else:  # a kill -9's, its pid dead: gone, or already this server's own
                assert not kept
        finally:
            process.kill()
            process.wait(timeout=30)


def test_a_models_dir_folder_without_a_manifest_is_logged_once(tmp_path, caplog):
    """A --models-dir subfolder holding no manifest.json was skipped without a word."""
    (tmp_path / "gasket-v3").mkdir()
    (tmp_path / "README.txt").write_text("not a folder")
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    config = ServerConfig(models_dir=tmp_path, threads=1)
    assert export_dirs(config) == ([], [])
    assert export_dirs(config) == ([], [])
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("event") == "not_an_export"]
    assert len(lines) == 1 and "gasket-v3" in lines[0].getMessage(), caplog.text
