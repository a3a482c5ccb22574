"""The edge daemon's liveness: /healthz on its metrics endpoint answers 503 once its loop has
not gone round for --stall-after seconds (a read hung on a share gone away), 200 again when
it does, and stays 200 while the loop waits for outbox room; the loop's age is a gauge.

The real daemon in-process on real files and a real SQLite store, its endpoint asked over HTTP;
the model is the stand-in `BrightIsDefective`. A hung share is made by holding the hot folder's
scan on an event (the fault injected, not the code under test).
"""

from __future__ import annotations

import io
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image
from test_edge_daemon import BrightIsDefective

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store import OutboxCap
from splitdet.edge.watcher import HotFolder
from splitdet.shared.cli import main

from support import daemon_config, wait_for

pytestmark = pytest.mark.timeout(180)


def png(level: int) -> bytes:
    """A small PNG of one grey level."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def healthz(port: int) -> tuple[int, str]:
    """(HTTP status, body) of the daemon's /healthz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def loop_age(port: int) -> float:
    """splitdet_edge_loop_age_seconds from the daemon's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("splitdet_edge_loop_age_seconds "):
                return float(line.split()[1])
    raise AssertionError("no splitdet_edge_loop_age_seconds in /metrics")


def test_healthz_answers_503_while_the_loop_hangs_and_200_once_it_goes_on(tmp_path, monkeypatch):
    hang, hanging = threading.Event(), threading.Event()
    released = threading.Event()
    real_scan = HotFolder.scan

    def scan_on_a_share(folder: HotFolder) -> None:
        if hang.is_set() and not released.is_set():  # the share went away: the read blocks
            hanging.set()
            released.wait(60)
        real_scan(folder)

    monkeypatch.setattr(HotFolder, "scan", scan_on_a_share)
    config = daemon_config(tmp_path, tmp_path, once=False, metrics_port=0,
                           metrics_host="127.0.0.1", stall_after_s=2.0)  # fmt: skip
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        port = wait_for(lambda: daemon.metrics_port, 30, "the metrics endpoint")
        _, body = wait_for(lambda: (s := healthz(port))[0] == 200 and s, 30, "200")
        assert body.startswith("ok: ")
        hang.set()
        wait_for(hanging.is_set, 30, "the scan to hang")
        _, body = wait_for(lambda: (s := healthz(port))[0] == 503 and s, 30, "a 503")
        assert body.startswith("stalled: ") and "--stall-after 2)" in body, body
        assert loop_age(port) >= 2.0  # the metrics endpoint still answers beside it
        released.set()
        wait_for(lambda: healthz(port)[0] == 200, 30, "200 once the scan returns")
        (config.watch / "after.png").write_bytes(png(10))  # the loop works again
        wait_for(lambda: daemon.processed == 1, 30, "the image after the hang")
    finally:
        released.set()
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive()


def test_a_wait_for_outbox_room_is_no_stall(tmp_path):
    """A full outbox (the cloud down) keeps the intake waiting inside one image for as long as
    it lasts: a wait the daemon chose and logged (`outbox_full`), not a hang."""
    config = daemon_config(tmp_path, tmp_path, once=False, metrics_port=0,
                           metrics_host="127.0.0.1", stall_after_s=1.0,
                           outbox=OutboxCap(max_items=1, policy="wait"))  # fmt: skip
    for i, level in enumerate((250, 240)):  # both flagged; the second finds the outbox full
        (config.watch / f"{i}.png").write_bytes(png(level))
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        port = wait_for(lambda: daemon.metrics_port, 30, "the metrics endpoint")
        wait_for(
            lambda: daemon.metrics.registry.get_sample_value("splitdet_edge_outbox_full") == 1,
            30,
            "the outbox full",
        )
        threading.Event().wait(3.0)  # three times --stall-after, waiting for room all along
        status, body = healthz(port)
        assert (
            daemon.metrics.registry.get_sample_value("splitdet_edge_outbox_full") == 1
        )  # (still waiting)
        assert status == 200, body
    finally:
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive()


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_stall_after_must_be_a_positive_number_of_seconds(tmp_path, capsys, value):
    argv = ["edge", "run", "--model", str(tmp_path), "--watch", str(tmp_path),
            "--db", str(tmp_path / "e.sqlite"), "--cloud", "127.0.0.1:9",
            f"--stall-after={value}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"--stall-after {float(value):g}: must be a number > 0" in err, err
    assert not (tmp_path / "e.sqlite").exists()


def test_an_idle_poll_longer_than_stall_after_is_no_stall(tmp_path):
    """(A review: an idle daemon on a slow share polled every 10 s with --stall-after 3
    answered 503 between its scans, and a liveness probe would have restarted it for good.)"""
    config = daemon_config(tmp_path, tmp_path, once=False, metrics_port=0,
                           metrics_host="127.0.0.1", stall_after_s=1.0, poll_s=4.0)  # fmt: skip
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        port = wait_for(lambda: daemon.metrics_port, 30, "the metrics endpoint")
        wait_for(lambda: daemon.liveness.age_s() >= 2.0, 30, "two seconds into an idle poll")
        status, body = healthz(port)
        assert status == 200, body
    finally:
        daemon.request_stop()
        thread.join(30)
    assert not thread.is_alive()
