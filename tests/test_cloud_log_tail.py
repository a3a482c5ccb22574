"""The log lines a limiter left out after the last one of their kind are said when the cloud
stops (`LineLimiter.flush`, `CloudServer.write_lines_left_out`).

Before, an operator reading the log after a stop saw one `refused` line per edge and minute and
never learnt of the hundreds refused after it: only the counters counted them. Now the stop
writes, for each kind with lines left out, the last one left out, at its kind's level and with
its event and fields, carrying `repeats`/`repeats_from` for the others and `at_stop`; then
`stopped`, still the last line. A real server on loopback (in-process, and one process under
SIGTERM with --log-format json) and the limiter with a stepped clock.
"""

from __future__ import annotations

import json
import logging
import threading

import grpc
import pytest
from cloud_fixtures import (
    DETECT,
    shared_model_dir,
    start_cloud_process,
    start_loopback_server,
)

from splitdet.cloud.log_limit import LineLimiter, repeats_note
from splitdet.shared.edge_name import EDGE_NAME_KEY
from splitdet.shared.logs import JsonLogFormatter, TextLogFormatter

pytestmark = pytest.mark.timeout(180)

TOKEN = "s3cret-token-for-the-tail-tests"


class _Clock:
    """Monotonic seconds a test steps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _recorder(written: list[tuple[str, int, list[str], bool]], who: str):
    """A `log_limit.Line` that records (who, repeats, names, at_stop) instead of logging."""

    def line(repeats: int, names: list[str], at_stop: bool) -> None:
        written.append((who, repeats, names, at_stop))

    return line


def test_flush_writes_the_last_line_left_out_of_each_kind_and_counts_the_others():
    clock = _Clock()
    lines = LineLimiter(60.0, clock)
    written: list[tuple[str, int, list[str], bool]] = []

    def send(kind: str, who: str) -> bool:
        return lines.write_from(kind, who, _recorder(written, who))

    assert send("a", "e1")  # the first of a kind: at once
    assert not any(send("a", who) for who in ("e2", "e3", "e2"))
    assert send("b", "e1")  # a kind none is left out of: nothing at the stop
    assert send("c", "e1") and not send("c", "e2") and not send("c", "e4")
    lines.admit_from("d", "e5")
    lines.admit_from("d", "e6")  # (left out without a line to write: counted, never written)
    del written[:]
    assert lines.flush() == 2
    # the last left out, the others counted: "e2" was also about earlier ones, "e4" only itself
    assert written == [("e2", 2, ["e2", "e3"], True), ("e4", 1, ["e2"], True)]
    del written[:]
    assert lines.flush() == 0 and written == []  # said once
    clock.now += 10.0  # still within the interval: a line left out after the flush is new
    assert not send("a", "e7")
    assert lines.flush() == 1 and written == [("e7", 0, [], True)]
    del written[:]
    clock.now += 61.0
    assert send("a", "e8") and written == [("e8", 0, [], False)]  # nothing counted twice


def test_flush_counts_every_line_once_against_lines_still_being_written():
    """Threads leaving lines out while the stop flushes: each line is written, or counted in
    a written line's repeats, exactly once."""
    lines = LineLimiter(3600.0)
    written: list[tuple[str, int, list[str], bool]] = []
    sent_each, threads = 500, 4
    start = threading.Barrier(threads + 1)

    def send(index: int) -> None:
        start.wait()
        for _ in range(sent_each):
            lines.write_from("kind", f"e{index}", _recorder(written, f"e{index}"))

    workers = [threading.Thread(target=send, args=(index,)) for index in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    while any(worker.is_alive() for worker in workers):
        lines.flush()
    for worker in workers:
        worker.join()
    lines.flush()
    assert sum(1 + repeats for _, repeats, _, _ in written) == sent_each * threads


def test_a_line_held_back_until_the_stop_says_so_and_keeps_its_level(caplog):
    from splitdet.cloud.call_status import refusal_line  # (new with the stop's lines)

    assert repeats_note(0, 60.0, [], at_stop=True) == (
        " [held back (at most one such line per 60 s) until the server's stop]"
    )
    assert repeats_note(2, 10.0, ["a", "b"], at_stop=True) == (
        " [held back (at most one such line per 10 s) until the server's stop, as were 2 more "
        "like it (edges a, b) since the last such line]"
    )
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    failed = refusal_line("Detect", "ipv4:1", "cam", grpc.StatusCode.INTERNAL, "boom", "failed",
                          60.0)  # fmt: skip
    failed(1, ["cam"], True)  # at the stop, no exception in hand: ERROR, without a traceback
    (record,) = caplog.records
    assert record.levelno == logging.ERROR and record.exc_info is None
    assert record.fields["at_stop"] is True and record.fields["repeats"] == 1


def _call(channel: grpc.Channel, edge: str, token: str, body: bytes = b"") -> grpc.StatusCode:
    """A raw Detect from `edge` with `token`: its status code."""
    metadata = ((EDGE_NAME_KEY, edge), ("authorization", f"Bearer {token}"))
    try:
        channel.unary_unary(DETECT)(body, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _fields(records: list[logging.LogRecord]) -> list[dict]:
    return [dict(r.fields) for r in records if isinstance(getattr(r, "fields", None), dict)]


def test_the_stop_says_the_refusals_left_out_before_stopped(tmp_path, caplog):
    """Wrong tokens from two edges and junk from a third, each more than once within the
    minute, one wrong token from a fourth: after the stop, every refusal is in the log (a
    line, or a line's repeats), the ones left out in a WARNING/INFO line of their kind's event
    marked `at_stop`, before `stopped`, the last line; none for the edge refused once."""
    caplog.set_level(logging.INFO, logger="splitdet.cloud")
    server = start_loopback_server(tmp_path, token=TOKEN)
    sent = {"cam-a": 5, "cam-b": 3, "cam-c": 1}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            for edge, count in sent.items():
                for _ in range(count):
                    assert _call(channel, edge, "wrong") == grpc.StatusCode.UNAUTHENTICATED
            for _ in range(4):  # the right token, a request that is not one
                assert _call(channel, "cam-junk", TOKEN, b"\xff") == (
                    grpc.StatusCode.INVALID_ARGUMENT
                )
    finally:
        server.stop(0)
    records = [r for r in caplog.records if isinstance(getattr(r, "fields", None), dict)]
    assert records[-1].fields["event"] == "stopped", caplog.text
    refused = [r for r in records if r.fields["event"] == "refused"]
    for edge, count in {**sent, "cam-junk": 4}.items():
        lines = [r for r in refused if r.fields["edge"] == edge]
        assert sum(1 + r.fields.get("repeats", 0) for r in lines) == count, caplog.text
        at_stop = [r for r in lines if r.fields.get("at_stop")]
        assert len(at_stop) == (count > 1), caplog.text
        for record in at_stop:  # the kind's own line: its level, event and fields
            assert record.levelno == lines[0].levelno
            assert record.fields.keys() - lines[0].fields.keys() <= {
                "repeats",
                "repeats_from",
                "at_stop",
            }
            assert record.fields["code"] == lines[0].fields["code"]
            assert "until the server's stop" in record.getMessage()
    tail = next(r for r in refused if r.fields["edge"] == "cam-a" and r.fields.get("at_stop"))
    assert tail.levelno == logging.WARNING
    assert (tail.fields["repeats"], tail.fields["repeats_from"]) == (3, ["cam-a"])
    assert "as were 3 more like it (edges cam-a) since the last such line" in tail.getMessage()
    # both log formats keep their conventions
    entry = json.loads(JsonLogFormatter().format(tail))
    assert (entry["event"], entry["level"], entry["at_stop"], entry["repeats"]) == (
        "refused",
        "WARNING",
        True,
        3,
    )
    text = TextLogFormatter().format(tail)
    assert "\n" not in text and " event=refused " in text
    assert "repeats=3" in text and "at_stop=true" in text


def test_a_sigterm_ends_a_json_log_with_the_refusals_left_out_then_stopped(tmp_path):
    """`splitdet cloud --log-format json`, wrong tokens from one edge, SIGTERM: the log's last
    line is `stopped`, the one before it the refusal left out, as JSON."""
    _, model_dir, _ = shared_model_dir(0)
    token_file = tmp_path / "token.txt"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    server = start_cloud_process(
        model_dir, tmp_path, "tail", "--token-file", str(token_file), "--log-format", "json"
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            for _ in range(4):
                assert _call(channel, "cam-x", "wrong") == grpc.StatusCode.UNAUTHENTICATED
        server.process.terminate()
        assert server.process.wait(timeout=60) == 0
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert [e.get("event") for e in entries[-2:]] == ["refused", "stopped"], server.log()
    tail = entries[-2]
    assert (tail["level"], tail["edge"], tail["at_stop"], tail["repeats"]) == (
        "WARNING",
        "cam-x",
        True,
        2,
    )
    refused = [e for e in entries if e.get("event") == "refused"]
    assert sum(1 + e.get("repeats", 0) for e in refused) == 4
