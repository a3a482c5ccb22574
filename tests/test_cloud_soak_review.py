"""The cloud soak review's and flake hunt's findings, each against a real server on loopback.

1. Empty or malformed Detect calls under made-up names used up the edge labels: a real new
   camera then counted as "other" for a week.
2. One log line per refused call (a cancelling client, junk callers) and per answer a full
   answers disk could not keep: thousands of lines, no rate limit.
3. An answer computed after the stop began was counted as a store error (closed database).
4. A caller whose own deadline ended its wait, reset a little before the server's deadline,
   was counted CANCELLED ("caller went away") instead of DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

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

from splitdet.cloud import metrics as metrics_module
from splitdet.cloud.core import DetectCall
from splitdet.cloud.server import CloudServer
from splitdet.shared.edge_name import EDGE_NAME_KEY
from splitdet.shared.messages import build_request
from splitdet.shared.wire import detection_pb2 as pb

pytestmark = pytest.mark.timeout(120)

REFUSALS = 'splitdet_cloud_edge_refusals_total{code="%s",edge="%s"}'
FAILURES = 'splitdet_cloud_failures_total{code="%s",method="Detect"}'
STORE_ERRORS = "splitdet_cloud_answers_store_errors_total"


def _start(tmp_path, **settings) -> CloudServer:
    return start_loopback_server(tmp_path, threads=2, **settings)


def _request(seed: int, request_id: str, fingerprint: str | None = None) -> bytes:
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=seed, codec="int8")
    return build_request(
        sample.encoded, sample.image, request_id, fingerprint or manifest.fingerprint
    ).SerializeToString()


def _detect(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(
        DETECT, request_serializer=None, response_deserializer=pb.DetectResponse.FromString
    )


def _refused(detect: grpc.UnaryUnaryMultiCallable, raw: bytes, name: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        detect(raw, metadata=((EDGE_NAME_KEY, name),), timeout=30)
    return refused.value.code()


def test_malformed_detects_under_made_up_names_take_no_edge_label(tmp_path, monkeypatch):
    """Empty and unknown-model Detects under 40 made-up names (no token required) leave the
    labels free: they count as "other" (or under a name's label if it has one). A real new
    camera then gets its own label, and so does one whose checked Detect is refused as busy."""
    monkeypatch.setattr(metrics_module, "MAX_EDGE_LABELS", 3)
    server = _start(tmp_path, max_concurrent=1, max_queued=0, debug_delay_s=30.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    detect = _detect(channel)
    unknown = _request(21, "unknown-model", "0" * 64)
    try:
        for index in range(20):
            assert _refused(detect, b"", f"junk-{index}") is grpc.StatusCode.INVALID_ARGUMENT
            code = _refused(detect, unknown, f"junk-fp-{index}")
            assert code is grpc.StatusCode.FAILED_PRECONDITION
        # the slot held by a slow call (its debug delay), the next checked call is refused as
        # busy: it claims its label (an operator must see that camera refused)
        slow = detect.future(_request(22, "slow"), metadata=((EDGE_NAME_KEY, "cam-new"),))
        busy = _request(23, "busy")
        code = grpc.StatusCode.OK
        for _ in range(200):  # until the slow call holds the slot (each try is refused at once)
            code = _refused(detect, busy, "cam-busy")
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        slow.cancel()
        metrics = scrape_metrics(server.metrics_port)
    finally:
        channel.close()
        server.stop(0)
    seen = {key for key in metrics if key.startswith("splitdet_cloud_edge_last_seen")}
    assert seen == {LAST_SEEN % "cam-new", LAST_SEEN % "cam-busy", LAST_SEEN % "other"}
    assert metrics[REFUSALS % ("INVALID_ARGUMENT", "other")] == 20
    assert metrics[REFUSALS % ("FAILED_PRECONDITION", "other")] == 20
    assert metrics[REFUSALS % ("RESOURCE_EXHAUSTED", "cam-busy")] == 1
    assert not any("junk" in key for key in metrics)


class _Clock:
    """Monotonic seconds a test steps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(caplog, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == event]


def test_refusals_are_logged_once_per_kind_per_minute_and_counted_each(tmp_path, caplog):
    """30 junk Detects: one `refused` line (the first, at once), not 30; another code gets its
    own line; a minute later the next line says how many were left out. The counters count
    every call."""
    caplog.set_level("INFO", logger="splitdet.cloud")
    server = _start(tmp_path)
    clock = _Clock()
    server.servicer.refusal_lines.clock = clock
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    detect = _detect(channel)
    try:
        for index in range(30):
            _refused(detect, b"", f"junk-{index}")
        assert len(_lines(caplog, "refused")) == 1
        _refused(detect, _request(24, "unknown-model", "0" * 64), "junk-fp")
        first, other = _lines(caplog, "refused")
        assert (first.fields["code"], other.fields["code"]) == (
            "INVALID_ARGUMENT",
            "FAILED_PRECONDITION",
        )
        assert "repeats" not in first.fields and "repeats" not in other.fields
        clock.now += 61.0
        _refused(detect, b"", "junk-last")
        metrics = scrape_metrics(server.metrics_port)
    finally:
        channel.close()
        server.stop(0)
    *_, last = _lines(caplog, "refused")
    assert len(_lines(caplog, "refused")) == 3
    assert last.fields["repeats"] == 29 and last.fields["edge"] == "junk-last"
    # the edges left out are named (many share "other"), the first 20 of them
    assert last.fields["repeats_from"] == [f"junk-{index}" for index in range(1, 21)]
    assert "29 more like it (edges junk-1, junk-2," in last.getMessage()
    assert "junk-20, …) since" in last.getMessage()
    assert metrics[FAILURES % "INVALID_ARGUMENT"] == 31
    assert metrics[REFUSALS % ("INVALID_ARGUMENT", "other")] == 31


def _call(seed: int, request_id: str) -> DetectCall:
    model, _, manifest = shared_model_dir(0)
    sample = make_sample(model, seed=seed, codec="int8")
    return DetectCall(request_id, manifest.fingerprint, sample.image, sample.encoded)


def test_a_full_answers_disk_is_logged_once_per_minute_and_counted_each(tmp_path, caplog):
    """Every answer the store cannot keep is counted; one `answers_store_failed` line per
    minute says so, the next one how many were left out."""
    caplog.set_level("WARNING", logger="splitdet.cloud.core")
    server = _start(tmp_path)
    clock = _Clock()
    core = server.core
    core.store_failure_lines.clock = clock
    database = core.store._db
    pages = database.execute("PRAGMA page_count").fetchone()[0]
    database.execute(f"PRAGMA max_page_count = {pages}")
    call = _call(25, "full")
    try:
        for index in range(4):  # (the first fills what room the page count left)
            core.detect(replace(call, request_id=f"full-{index}"))
        clock.now += 61.0
        core.detect(replace(call, request_id="full-last"))
        counted = server.metrics.registry.get_sample_value(STORE_ERRORS)
    finally:
        server.stop(0)
    lines = _lines(caplog, "answers_store_failed")
    assert counted is not None and len(lines) == 2, caplog.text
    assert "repeats" not in lines[0].fields
    assert (
        lines[1].fields["repeats"] == counted - 2 and lines[1].fields["request_id"] == "full-last"
    )


def test_an_answer_computed_after_the_stop_is_not_a_store_error(tmp_path, caplog):
    """--grace 0 with a computation still running: the store closed before its answer was
    ready. That answer is not kept, quietly: no WARNING, no store error (the metric behind the
    "repeats computed again" alert, which reads as a disk problem)."""
    caplog.set_level("DEBUG", logger="splitdet.cloud")
    server = _start(tmp_path)
    server.stop(0)  # the store is closed
    result = server.core.detect(_call(26, "late"))  # the computation that was still running
    assert result.request_id == "late" and not result.cached
    assert server.metrics.registry.get_sample_value(STORE_ERRORS) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert _lines(caplog, "answer_not_kept_closed")


class _GoneContext:
    """A call's context as the server sees it once its caller reset the stream, with
    `remaining` seconds of the deadline left by the server's own clock."""

    def __init__(self, remaining: float) -> None:
        self.remaining = remaining
        self.code: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((EDGE_NAME_KEY, "cam-timeout"),)

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def time_remaining(self) -> float:
        return self.remaining

    def is_active(self) -> bool:
        return False

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        raise grpc.RpcError(message)


def _code(server: CloudServer, raw: bytes, remaining: float) -> grpc.StatusCode | None:
    context = _GoneContext(remaining)
    with pytest.raises(grpc.RpcError):
        server.servicer.Detect(raw, context)
    return context.code


@pytest.mark.parametrize("where", ["waiting for a slot", "holding a slot"])
def test_a_caller_gone_at_its_deadline_is_deadline_exceeded(tmp_path, where):
    """The flake: the edge's deadline fires before the server's (which started later, by the
    call's transit and dispatch), the edge resets the stream, and the server saw a caller gone
    with 0.2 s left: CANCELLED, "caller went away". Within DEADLINE_SLACK_S of its deadline
    it is DEADLINE_EXCEEDED; a caller gone with seconds left is still CANCELLED."""
    waiting = where == "waiting for a slot"
    server = _start(tmp_path, max_concurrent=1, max_queued=1, debug_delay_s=5.0)
    raw = _request(27, "gone")
    try:
        if waiting:
            assert server.servicer._slots.acquire(1.0)  # the one slot held by another call
        try:
            assert _code(server, raw, 0.2) is grpc.StatusCode.DEADLINE_EXCEEDED
            assert _code(server, raw, 20.0) is grpc.StatusCode.CANCELLED
        finally:
            if waiting:
                server.servicer._slots.release()
    finally:
        server.stop(0)


def test_a_new_cameras_first_answered_detect_does_not_mark_other_seen(tmp_path):
    """A Detect counted as "other" until its checks passed set other's last-seen on its way:
    an alert on "other" (the labels full, or a camera without one) fired for every new
    camera."""
    server = _start(tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        reply = _detect(channel)(
            _request(25, "first"), metadata=((EDGE_NAME_KEY, "cam-1"),), timeout=30
        )
        assert reply  # (answered)
        metrics = scrape_metrics(server.metrics_port)
    finally:
        channel.close()
        server.stop(0)
    seen = {key for key in metrics if key.startswith("splitdet_cloud_edge_last_seen")}
    assert seen == {LAST_SEEN % "cam-1"}


def test_a_deleted_answers_database_is_counted_and_said_and_a_kept_answer_again_said(
    tmp_path, caplog
):
    """Deleting the answers database under a running cloud went unnoticed: it kept storing into
    the unlinked file (lost at the next restart) with no error counted and no line. Now each
    answer not kept is counted and logged (answers_store_failed names the file); and once a
    store keeps answers again after failing (a full disk freed), one line says so."""
    caplog.set_level("INFO", logger="splitdet.cloud.core")
    server = _start(tmp_path)
    core, call = server.core, _call(27, "gone")
    try:
        database = core.store._db
        pages = database.execute("PRAGMA page_count").fetchone()[0]
        database.execute(f"PRAGMA max_page_count = {pages}")  # full
        for index in range(3):
            core.detect(replace(call, request_id=f"full-{index}"))
        database.execute("PRAGMA max_page_count = 1000000")  # space freed
        core.detect(replace(call, request_id="kept"))
        [resumed] = _lines(caplog, "answers_store_resumed")
        assert resumed.fields["not_kept"] >= 1, caplog.text

        failed_before = server.metrics.registry.get_sample_value(STORE_ERRORS)
        Path(core.store.path).unlink()
        core.detect(replace(call, request_id="after-delete"))
        counted = server.metrics.registry.get_sample_value(STORE_ERRORS)
        core.store.close()  # (the server stopping): an answer not kept is no sign of health
        core.store_failure_lines.clock = lambda: 1e12  # (a minute later: a line is due)
        core.detect(replace(call, request_id="after-close"))
        assert len(_lines(caplog, "answers_store_resumed")) == 1, caplog.text
    finally:
        server.stop(0)
    assert counted == failed_before + 1
    gone = [r for r in _lines(caplog, "answers_store_failed") if "deleted or replaced" in
            r.getMessage()]  # fmt: skip
    assert gone and str(core.store.path) in gone[0].getMessage()
