"""A request id reused under another export (a client of its own, written from the proto, that
numbers its requests per camera across two models) is a conflict as the README says: counted
and logged, and the first export's answer stays stored. It was computed afresh at every call,
and neither counted nor logged."""

from __future__ import annotations

import logging

import grpc
from cloud_fixtures import (
    DETECT,
    detect_bytes,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    start_loopback_server,
)

from splitdet.shared.wire import detection_pb2 as pb

CONFLICTS = "splitdet_cloud_request_id_conflicts_total"
HEADS_RUNS = "splitdet_cloud_heads_runs_total"


def test_an_id_reused_under_another_export_is_counted_and_logged(tmp_path, caplog):
    model_0, _, manifest_0 = shared_model_dir(0)
    model_1, dir_1, manifest_1 = shared_model_dir(1)
    server = start_loopback_server(tmp_path, more_model_dirs=(dir_1,))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            detect = channel.unary_unary(DETECT)

            def send(model, manifest) -> pb.DetectResponse:
                raw = detect_bytes(make_sample(model, seed=11), manifest.fingerprint, "cam-7")
                return pb.DetectResponse.FromString(detect(raw, timeout=60))

            with caplog.at_level(logging.INFO, logger="splitdet.cloud"):
                assert not send(model_0, manifest_0).cached
                answers = [send(model_1, manifest_1) for _ in range(2)]
                again = send(model_0, manifest_0)
        metrics = scrape_metrics(server.metrics_port)
    finally:
        server.stop(0)
    assert not any(answer.cached for answer in answers)  # computed, with model 1's heads
    assert again.cached  # the first export's answer stays stored
    assert metrics[HEADS_RUNS] == 3
    assert metrics[CONFLICTS] == 2, metrics
    logged = [r for r in caplog.records if getattr(r, "fields", {}).get("event")
              == "request_id_conflict"]  # fmt: skip
    # (the first at once, the second in the line a minute later or at the stop: at most one a
    # minute)
    assert logged and logged[0].fields["request_id"] == "cam-7", caplog.text
