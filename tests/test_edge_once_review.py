"""`edge run --once` as a cron job runs it: a reviewer found that a file still being written
(a camera writing without a pause) kept a --once run going for as long as it changed, past
--drain-timeout, and the cron job's `flock -n` then skipped every later run. The run now leaves
such files for the next run once it has waited --drain-timeout (never less than
ONCE_UNSETTLED_MIN_S) without taking a file, says so, and exits 1 (try again)."""

from __future__ import annotations

import logging
import threading

import pytest
from test_edge_daemon import BrightIsDefective
from test_edge_daemon_faults import png

from splitdet.edge import daemon as daemon_module
from splitdet.edge.daemon import EdgeDaemon

from support import daemon_config, image_rows

pytestmark = pytest.mark.timeout(120)


def test_a_file_that_keeps_changing_is_left_for_the_next_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(daemon_module, "ONCE_UNSETTLED_MIN_S", 1.0, raising=False)
    config = daemon_config(tmp_path, tmp_path, drain_timeout_s=1.0)
    (config.watch / "done.png").write_bytes(png(20))
    growing = config.watch / "growing.png"
    stop = threading.Event()

    def camera() -> None:  # a shot written 100 bytes at a time, without a pause (60 s at most)
        with open(growing, "wb") as out:
            for _ in range(3000):
                if stop.wait(0.02):
                    return
                out.write(b"x" * 100)
                out.flush()

    writer = threading.Thread(target=camera, daemon=True)
    writer.start()
    try:
        with caplog.at_level(logging.INFO, logger="splitdet"):
            status = EdgeDaemon(config, pipeline=BrightIsDefective()).run()
        still_writing = writer.is_alive()
    finally:
        stop.set()
        writer.join(10)
    assert still_writing  # (the run ended while the camera still wrote)
    assert status == 1  # try again: a file was left
    [row] = image_rows(config.db)
    assert row["path"].endswith("done.png")
    assert growing.exists()
    [left] = [r.fields for r in caplog.records
              if getattr(r, "fields", {}).get("event") == "once_left_unsettled"]  # fmt: skip
    assert left["files"] == 1 and "next run" in left["note"], left


@pytest.mark.parametrize(
    ("code", "status", "dead"),
    [("UNAUTHENTICATED", 1, 0), ("INVALID_ARGUMENT", 0, 1)],
)
def test_a_run_says_what_a_cron_wrapper_must_tell_apart(
    tiny_model_dir, tmp_path, caplog, code, status, dead
):
    """The reviewer: a token the cloud refuses ended a --once run exactly as a cloud that is
    down does ("Is the cloud up and answering?", exit 1), and dead letters ended it with
    exit 0 and a bare `stopped`. The drain_timeout line now names the refusal (a person's fix,
    not a retry's), and `stopped` counts this run's dead letters."""
    import grpc
    from test_edge_answer_checks import FakeCloud

    class Refusing(FakeCloud):
        def Detect(self, request, context):
            context.abort(getattr(grpc.StatusCode, code), f"refused: {code}")

    cloud = Refusing(tiny_model_dir)
    try:
        config = daemon_config(tiny_model_dir, tmp_path, cloud=cloud.address, drain_timeout_s=2.0)
        (config.watch / "bright.png").write_bytes(png(250))
        with caplog.at_level(logging.INFO, logger="splitdet"):
            assert EdgeDaemon(config, pipeline=BrightIsDefective()).run() == status
    finally:
        cloud.stop()
    fields = {r.fields["event"]: r.fields for r in caplog.records if hasattr(r, "fields")}
    assert fields["stopped"]["dead_letters"] == dead
    if code == "UNAUTHENTICATED":
        drained = fields["drain_timeout"]
        assert drained["refused"].startswith("UNAUTHENTICATED"), drained
        message = next(r.getMessage() for r in caplog.records
                       if getattr(r, "fields", {}).get("event") == "drain_timeout")  # fmt: skip
        assert "Is the cloud up" not in message and "will not help" in message, message
