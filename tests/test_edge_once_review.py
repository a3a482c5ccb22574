"""`edge run --once` as a cron job runs it: a reviewer found that a file still being written
(a camera writing without a pause) kept a --once run going for as long as it changed, past
--drain-timeout, and the cron job's `flock -n` then skipped every later run. The run now leaves
such files for the next run once it has waited --drain-timeout (never less than
ONCE_UNSETTLED_MIN_S) without taking a file, says so, and exits 1 (try again)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from test_edge_daemon import BrightIsDefective
from test_edge_daemon_faults import png

from splitdet.edge import daemon as daemon_module
from splitdet.edge.daemon import EdgeDaemon

from support import daemon_config, image_rows

pytestmark = pytest.mark.timeout(120)


def test_a_file_that_keeps_changing_is_left_for_the_next_run(tmp_path, monkeypatch, caplog):
    """... and the outbox is not drained for another --drain-timeout after that (a review: a
    run with the cloud down lasted twice --drain-timeout): the sender had it already."""
    monkeypatch.setattr(daemon_module, "ONCE_UNSETTLED_MIN_S", 1.0, raising=False)
    # (a settle 25 times the camera's pace, and a grace: a loaded machine that stalls the camera
    # thread a moment must not complete its file, nor quarantine one read half written)
    config = daemon_config(tmp_path, tmp_path, drain_timeout_s=1.0, settle_s=0.5,
                           unreadable_grace_s=3.0)  # fmt: skip
    (config.watch / "done.png").write_bytes(png(250))  # (flagged: the cloud down, it waits)
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
    [drained] = [r.fields for r in caplog.records
                 if getattr(r, "fields", {}).get("event") == "drain_timeout"]  # fmt: skip
    assert drained["drain_timeout_s"] == 0.0 and drained["outbox_depth"] == 1, drained


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


def test_a_refused_export_is_named_after_another_exports_answer(tiny_model_dir, tmp_path, caplog):
    """A review: the refusal of an earlier export's requests (the cloud no longer serves it,
    a rolling upgrade's leftovers) was forgotten as soon as the current export's request was
    answered, and drain_timeout asked whether the cloud was up. It stands until that export's
    own requests are answered."""
    import grpc
    from test_edge_answer_checks import FakeCloud, good_answer

    old, new = "a" * 64, "f" * 64  # (BrightIsDefective's export is "f" * 64)

    fields = {"fingerprint": old, "model_config": BrightIsDefective.manifest.model_config}

    class OldExport(BrightIsDefective):
        manifest = type("Manifest", (), fields)()

    class SlowBright(BrightIsDefective):  # (the new image's request made a second late)
        def process_array(self, image):
            time.sleep(1.0)
            return super().process_array(image)

    class ServesTheNewOnly(FakeCloud):  # (its manifest names both: the refusal comes at Detect)
        def GetManifest(self, request, context):
            answer = super().GetManifest(request, context)
            answer.served_fingerprints.append(old)
            return answer

        def Detect(self, request, context):
            if request.model_fingerprint == old:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "model not served")
            return good_answer(request)

    config = daemon_config(tiny_model_dir, tmp_path, drain_timeout_s=3.0)
    (config.watch / "first.png").write_bytes(png(250))
    assert EdgeDaemon(config, pipeline=OldExport()).run() == 1  # (cloud down: pending)
    cloud = ServesTheNewOnly(tiny_model_dir)
    cloud.fingerprint = new
    time.sleep(1.0)  # (its retry, set by the first run within retry_max_s 0.5, due now)
    try:  # (the old export's request, due first, is refused and held 30 s; then the new one)
        (config.watch / "second.png").write_bytes(png(240))
        again = daemon_config(tiny_model_dir, tmp_path, cloud=cloud.address, drain_timeout_s=3.0,
                              retry_max_s=30.0)  # fmt: skip
        with caplog.at_level(logging.INFO, logger="splitdet"):
            assert EdgeDaemon(again, pipeline=SlowBright()).run() == 1
    finally:
        cloud.stop()
    refused = [r.created for r in caplog.records
               if getattr(r, "fields", {}).get("event") == "model_refused"]  # fmt: skip
    answered = [r.created for r in caplog.records
                if getattr(r, "fields", {}).get("event") == "defect"]  # fmt: skip
    assert refused and answered and min(refused) < max(answered)  # (the order the fault needs)
    verdicts = sorted(row["verdict"] for row in image_rows(config.db))
    assert verdicts == ["defect", "pending"], verdicts
    drained = [
        r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "drain_timeout"
    ][-1]  # (the 2nd run)
    assert drained["refused"] and drained["refused"].startswith("FAILED_PRECONDITION"), drained


def test_a_database_held_locked_is_not_told_as_files_still_being_written(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """A review: with settled images and the --db held by another program, the run ended
    with only `once_left_unsettled` ("still being written"), the store_busy_stopped diagnosis
    never logged: the wait for the files was counted from before the lock's."""
    from test_edge_store_busy import run_once_held_locked

    from splitdet.edge import store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 200)
    monkeypatch.setattr(daemon_module, "ONCE_UNSETTLED_MIN_S", 0.1, raising=False)
    config = daemon_config(tiny_model_dir, tmp_path, drain_timeout_s=1.0, settle_s=0.5)
    outcome, _ = run_once_held_locked(config, png(30), caplog)
    assert outcome == [1]
    events = [getattr(r, "fields", {}).get("event") for r in caplog.records]
    assert "store_busy_stopped" in events and "once_left_unsettled" not in events, events


def test_a_refusal_of_an_export_abandoned_meanwhile_is_not_named(tmp_path):
    """A review: `edge abandon` of the refused export's requests (the operator's fix) left the
    refusal named in drain_timeout ("running again will not help"). A refusal of an export
    stands only while the outbox holds its requests; this edge's own (a token) always."""
    from test_edge_store import arrival

    from splitdet.edge.sender import Sender
    from splitdet.edge.store import ResultStore

    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        sender = Sender(store, lambda: None)
        sender._refusals["a" * 64] = "FAILED_PRECONDITION: model not served"
        assert sender.refused_by_cloud is None  # (no request of that export waits)
        store.record_pending(arrival(1), 0.9, "req-1", b"x", "a" * 64, {})
        assert sender.refused_by_cloud == "FAILED_PRECONDITION: model not served"
        sender._refusals[""] = "UNAUTHENTICATED: bad token"
        assert sender.refused_by_cloud.startswith("FAILED_PRECONDITION")
        assert sender.refused_by_cloud.endswith("UNAUTHENTICATED: bad token")
    finally:
        store.close()


def test_a_move_that_keeps_failing_does_not_keep_a_run_going(tmp_path, monkeypatch, caplog):
    """A review: a file whose move failed in a way that changed its ctime (hard-linked into
    the archive, its removal refused, the link undone) was taken again as a new version at
    every scan, "already recorded", and the failed move reset the run's wait each time: the
    run never ended. The wait now counts from the last file recorded or moved."""
    import errno
    import os

    from splitdet.edge import file_moves

    monkeypatch.setattr(daemon_module, "ONCE_UNSETTLED_MIN_S", 1.0, raising=False)
    config = daemon_config(
        tmp_path, tmp_path, drain_timeout_s=1.0, after="archive", settle_s=0.3
    )  # (taken again, it settles anew: pending meanwhile)
    image = config.watch / "a.png"
    image.write_bytes(png(20))

    def refused_and_touched(source, target, *args):
        os.chmod(source, 0o644 if os.stat(source).st_mode & 0o100 else 0o744)  # (a new ctime)
        raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(source))

    monkeypatch.setattr(file_moves, "move_no_clobber", refused_and_touched)
    finished: list[int] = []
    run = threading.Thread(
        target=lambda: finished.append(EdgeDaemon(config, pipeline=BrightIsDefective()).run()),
        daemon=True,
    )
    with caplog.at_level(logging.INFO, logger="splitdet"):
        run.start()
        run.join(60)
    assert finished, "the run did not end"  # (0 or 1: its move is the next run's, as ever)
    assert image.exists() and len(image_rows(config.db)) == 1
