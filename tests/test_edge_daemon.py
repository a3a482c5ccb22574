"""`splitdet edge run` as users run it: real daemon processes, real `splitdet cloud` processes,
real files in a hot folder, loopback gRPC.

Acceptance of "The camera-side edge daemon" issue:
1. cloud down: ok results keep coming, defects wait pending, the backlog drains when it starts;
2. kill -9 of the daemon >= 20 times over a stream: exactly one final result per image;
3. kill -9 of the cloud during a stream, restarted: nothing lost, nothing doubled;
4. lost answers (a proxy drops the connection after the server replied): no duplicates;
5. corrupt, empty, truncated and non-image files are quarantined with a reason (--once);
6. a large file written slowly is not read early.

Which images are "defective": the tiny random model's p(defect) depends on the image (brightness
mostly), so the test computes every image's p(defect) with the same exported model in-process
(ONNX Runtime, 1 thread, as the daemon runs) and passes the daemon a --threshold halfway between
two neighbouring values: exactly the chosen images are flagged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from cloud_fixtures import CloudProcess, scrape_metrics, start_cloud_process
from PIL import Image

from splitdet.edge.after_actions import AfterActions
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.daemon_config import DaemonConfig
from splitdet.edge.ignore_marker import IGNORE_MARKER
from splitdet.edge.pipeline import EdgePipeline, EdgeResult, ImageMeta
from splitdet.edge.preprocess import Pixels, decode_image
from splitdet.edge.runtime import EdgeRuntime
from splitdet.edge.store import OutboxCap
from splitdet.edge.watcher import HotFolder
from splitdet.shared.config import ModelConfig

from support import Killed, free_port, killed, running, sliver_png, wait_for

pytestmark = pytest.mark.timeout(400)  # (the first test builds the module's fixtures)

#: Short waits so the suite stays fast; production defaults are seconds.
FAST_FLAGS = (
    "--threads", "1",
    "--settle", "0.2",
    "--unreadable-grace", "0.5",
    "--poll", "0.05",
    "--retry-initial", "0.1",
    "--retry-max", "0.5",
    "--timeout", "10",
)  # fmt: skip


# ------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class PoolImage:
    data: bytes
    p_defect: float

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class ImagePool:
    """Distinct small PNGs with their p(defect); each test takes its own (request ids differ)."""

    def __init__(self, images: list[PoolImage]) -> None:
        self._images = images
        self._next = 0

    def take(self, n: int) -> list[PoolImage]:
        taken = self._images[self._next : self._next + n]
        assert len(taken) == n, "image pool exhausted"
        self._next += n
        return taken


def threshold_for(images: list[PoolImage], n_flagged: int) -> tuple[float, set[str]]:
    """A gate threshold flagging exactly the n_flagged highest-p images, and their hashes."""
    ordered = sorted(images, key=lambda im: im.p_defect, reverse=True)
    high, low = ordered[n_flagged - 1].p_defect, ordered[n_flagged].p_defect
    assert high - low > 1e-4, "no clear gap between neighbouring p(defect) values"
    return (high + low) / 2, {im.sha for im in ordered[:n_flagged]}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rows(db_path: Path) -> list[dict]:
    """Every result row (fresh read-only connection; the daemon may be writing)."""
    if not db_path.exists():
        return []
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        db.row_factory = sqlite3.Row
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'images'").fetchone():
            return []
        return [dict(r) for r in db.execute("SELECT * FROM images ORDER BY id")]
    finally:
        db.close()


def outbox_depth(db_path: Path) -> int:
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
    finally:
        db.close()


def verdicts(db_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows(db_path):
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
    return counts


def assert_exactly_one_final_result(db_path: Path, images: list[PoolImage], flagged: set[str]):
    """One row per input image (by content), every one final, defects exactly the flagged."""
    table = rows(db_path)
    by_hash: dict[str, list[dict]] = {}
    for row in table:
        by_hash.setdefault(row["content_hash"], []).append(row)
    expected = {im.sha for im in images}
    assert set(by_hash) == expected, "missing or unknown images"
    doubled = {h: len(r) for h, r in by_hash.items() if len(r) != 1}
    assert not doubled, f"images with more than one result: {doubled}"
    for sha, [row] in by_hash.items():
        want = "defect" if sha in flagged else "ok"
        assert row["verdict"] == want, (row["path"], row["verdict"], row["reason"])
        assert row["finished"] is not None
        if want == "defect":
            assert json.loads(row["boxes"]) is not None and row["request_id"]
    assert outbox_depth(db_path) == 0


class EdgeProcess:
    """One `splitdet edge run` subprocess (stderr, JSON lines, appended to a log file)."""

    def __init__(self, work: Path, watch: Path, cloud: str, db: Path, *extra: str) -> None:
        self.ready_file = work / "edge.ready.json"
        self.log_path = work / "edge.log"
        self.command = [
            sys.executable, "-m", "splitdet.shared.cli", "edge", "run",
            "--model", "<set by the fixture>",
            "--watch", str(watch),
            "--cloud", cloud,
            "--db", str(db),
            "--metrics-port", "0",
            "--metrics-host", "127.0.0.1",
            "--ready-file", str(self.ready_file),
            *FAST_FLAGS,
            *extra,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self, model_dir: Path) -> EdgeProcess:
        self.ready_file.unlink(missing_ok=True)
        self.command[self.command.index("--model") + 1] = str(model_dir)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict:
        def ready():
            if self.process.poll() is not None:
                raise AssertionError(f"edge daemon exited {self.process.returncode}:\n{self.log()}")
            return self.ready_file.exists() and json.loads(self.ready_file.read_text())

        return wait_for(ready, timeout, "the edge daemon to start", 0.02)

    def metrics(self) -> dict[str, float]:
        return scrape_metrics(json.loads(self.ready_file.read_text())["metrics_port"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit status; a daemon still running after `timeout` s is asked for
        its threads' stacks (SIGUSR1) and killed, and the test fails showing its log."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGUSR1)
            time.sleep(2.0)
            self.stop()
            log = self.log()[-20000:]
            raise AssertionError(f"no exit {timeout} s after SIGTERM:\n{log}") from None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=30)


@pytest.fixture
def processes():
    """Everything a test starts; killed in teardown whatever happened."""
    started: list = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def pool(tiny_model_dir) -> ImagePool:
    """~140 distinct 72x96 PNGs of random texture and brightness, with p(defect)."""
    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=1))
    rng = np.random.default_rng(6)
    images = []
    for _ in range(140):
        brightness = rng.uniform(0.05, 1.0)
        array = (rng.random((72, 96, 3)) * 255 * brightness).astype(np.uint8)
        data = png_bytes(array)
        p = pipeline.process_array(decode_image(data)).p_defect
        images.append(PoolImage(data, p))
    return ImagePool(images)


@pytest.fixture(scope="module")
def shared_cloud(tiny_model_dir, tmp_path_factory):
    """One cloud server for the tests that do not kill it; each call takes 0.1 s extra, so
    kills of the daemon often land while a request is in flight."""
    cloud = start_cloud_process(
        tiny_model_dir, tmp_path_factory.mktemp("cloud"), "shared", "--debug-delay", "0.1"
    )
    yield cloud
    cloud.stop()


def start_cloud_on(port: int, model_dir: Path, work: Path, name: str) -> CloudProcess:
    # --listen given again after the helper's own: argparse keeps the last one.
    return start_cloud_process(model_dir, work, name, "--listen", f"127.0.0.1:{port}")


def _events(log: str) -> set[str]:
    """The events of a daemon's JSON log lines."""
    return {json.loads(line).get("event") for line in log.splitlines() if line.startswith("{")}


def write_files(watch: Path, images: list[PoolImage], names: list[str]) -> None:
    for image, name in zip(images, names, strict=True):
        (watch / name).write_bytes(image.data)


# ------------------------------------------------------------------------------- 1. cloud down


def test_cloud_down_then_up_backlog_drains(tiny_model_dir, pool, tmp_path, processes):
    images = pool.take(16)
    threshold, flagged = threshold_for(images, 4)
    watch, db, port = tmp_path / "hot", tmp_path / "edge.sqlite", free_port()
    watch.mkdir()
    edge = EdgeProcess(
        tmp_path, watch, f"127.0.0.1:{port}", db, "--threshold", str(threshold),
        "--after", "archive",
    )  # fmt: skip
    processes.append(edge.start(tiny_model_dir))
    edge.wait_ready()

    # Names repeat: the second batch reuses the first batch's names once those are archived.
    names = [f"cam_{i}.png" for i in range(8)]
    write_files(watch, images[:8], names)
    wait_for(lambda: len(rows(db)) == 8, 30, "the first batch")
    wait_for(lambda: not any(watch.glob("*.png")), 10, "the first batch to be archived")
    write_files(watch, images[8:], names)
    wait_for(lambda: verdicts(db) == {"ok": 12, "pending": 4}, 30, "12 ok + 4 pending")

    def failed_sends():
        metrics = edge.metrics()
        return metrics.get('splitdet_edge_send_failures_total{code="UNAVAILABLE"}') and metrics

    metrics = wait_for(failed_sends, 15, "failed sends to show in the metrics")
    assert metrics["splitdet_edge_outbox_depth"] == 4
    assert metrics["splitdet_edge_oldest_pending_age_seconds"] > 0
    assert metrics['splitdet_edge_images_total{verdict="ok"}'] == 12
    assert metrics['splitdet_edge_images_total{verdict="pending"}'] == 4
    assert metrics['splitdet_edge_stage_seconds_count{stage="gate"}'] == 16
    assert metrics['splitdet_edge_results{verdict="pending"}'] == 4
    assert sorted(p.name.split("_", 1)[1] for p in (watch / "archive").iterdir()) == sorted(
        names * 2
    )

    cloud = start_cloud_on(port, tiny_model_dir, tmp_path / "cloud", "late")
    processes.append(cloud)
    wait_for(lambda: verdicts(db) == {"ok": 12, "defect": 4}, 40, "the backlog to drain")
    assert_exactly_one_final_result(db, images, flagged)

    def drained():  # (a result is counted just after its row is written: a CI run read 3)
        metrics = edge.metrics()
        return metrics.get('splitdet_edge_images_total{verdict="defect"}') == 4 and metrics

    metrics = wait_for(drained, 10, "the metrics to count the 4 defects")
    assert metrics["splitdet_edge_outbox_depth"] == 0
    assert metrics["splitdet_edge_bytes_sent_total"] > 0

    assert edge.terminate() == 0
    # the cloud was down at start-up: the probe said so at once
    assert {"started", "cloud_unreachable", "classified", "send_retry", "defect", "stopped"} <= (
        _events(edge.log())
    )
    # the outage's end is in the log too, with how long the sends failed
    resumed = [json.loads(line) for line in edge.log().splitlines() if '"send_resumed"' in line]
    assert resumed and resumed[0]["failures"] >= 1 and resumed[0]["failing_for_s"] > 0
    # each "classified" line's bytes are the request the database recorded (and the sender
    # sent), not the features alone; 0 for a defect-free image
    classified = [
        record
        for record in (json.loads(line) for line in edge.log().splitlines() if line[:1] == "{")
        if record.get("event") == "classified"
    ]
    logged = {record["image_id"]: record["bytes"] for record in classified}
    assert logged == {row["id"]: row["bytes_sent"] for row in rows(db)}
    # and their timings include the store's write (a 14 MB request's took 0.2 s, unseen)
    assert all(record["timings"]["store"] > 0 for record in classified), classified


# ------------------------------------------------------------------------------- 2. kill -9


@pytest.mark.timeout(400)  # (20 restarts, each importing the runtime: 150 s on a loaded box)
def test_kill_9_the_daemon_20_times_exactly_one_result_each(
    tiny_model_dir, pool, shared_cloud, tmp_path, processes
):
    images = pool.take(44)
    threshold, flagged = threshold_for(images, 12)
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    edge = EdgeProcess(
        tmp_path, watch, shared_cloud.address, db, "--threshold", str(threshold),
        "--after", "archive",
    )  # fmt: skip
    processes.append(edge)
    rng = random.Random(20)

    # The camera: one image every ~0.5 s, whether the daemon is up or not.
    def camera():
        for i, image in enumerate(images):
            (watch / f"frame_{i:03d}.png").write_bytes(image.data)
            time.sleep(rng.uniform(0.2, 0.8))

    feeder = threading.Thread(target=camera, daemon=True)
    feeder.start()
    kills = 0
    while kills < 22 or feeder.is_alive():
        edge.start(tiny_model_dir)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.05, 1.0))  # during startup
        else:
            edge.wait_ready()
            time.sleep(rng.uniform(0.0, 1.5))
        edge.process.send_signal(signal.SIGKILL)
        edge.process.wait(timeout=10)
        kills += 1
    feeder.join()
    partial = verdicts(db)

    edge.start(tiny_model_dir)
    edge.wait_ready()
    wait_for(
        lambda: len(rows(db)) == len(images) and outbox_depth(db) == 0, 60, "all final results"
    )
    wait_for(lambda: not any(watch.glob("*.png")), 10, "every file to be archived")
    assert edge.terminate() == 0
    assert kills >= 20
    assert_exactly_one_final_result(db, images, flagged)
    archived = sorted((watch / "archive").iterdir())
    assert len(archived) == len(images)
    assert {hashlib.sha256(p.read_bytes()).hexdigest() for p in archived} == {
        im.sha for im in images
    }
    events = [json.loads(line) for line in edge.log().splitlines() if line.startswith("{")]
    recovered = sum(e.get("event") == "already recorded" for e in events)  # killed before move
    resent = sum(e.get("event") == "defect" and e.get("cached") for e in events)
    print(
        f"{kills} kills; before the last start: {partial}; files recorded but not yet moved "
        f"when killed: {recovered}; answers re-fetched from the cloud's store: {resent}"
    )


# ------------------------------------------------------------------------------- 3. cloud kill -9


def test_kill_9_the_cloud_during_a_stream(tiny_model_dir, pool, tmp_path, processes):
    images = pool.take(20)
    threshold, flagged = threshold_for(images, 8)
    watch, db, port = tmp_path / "hot", tmp_path / "edge.sqlite", free_port()
    watch.mkdir()
    cloud = start_cloud_process(
        tiny_model_dir, tmp_path / "cloud", "victim", "--listen", f"127.0.0.1:{port}",
        "--debug-delay", "0.3",
    )  # fmt: skip
    processes.append(cloud)
    edge = EdgeProcess(tmp_path, watch, f"127.0.0.1:{port}", db, "--threshold", str(threshold))
    processes.append(edge.start(tiny_model_dir))
    edge.wait_ready()

    write_files(watch, images, [f"f{i:02d}.png" for i in range(len(images))])
    wait_for(lambda: verdicts(db).get("defect", 0) >= 2, 30, "the first defects")
    cloud.process.send_signal(signal.SIGKILL)
    cloud.process.wait(timeout=10)
    wait_for(lambda: len(rows(db)) == len(images), 30, "every image classified")
    assert verdicts(db).get("pending", 0) > 0

    restarted = start_cloud_on(port, tiny_model_dir, tmp_path / "cloud", "victim")
    processes.append(restarted)
    wait_for(lambda: outbox_depth(db) == 0, 40, "the outbox to drain")
    assert_exactly_one_final_result(db, images, flagged)


# ------------------------------------------------------------------------------- 4. lost answers


class LostAnswerProxy:
    """TCP proxy to a gRPC server that loses answers: when the server's reply to a call (an
    HTTP/2 DATA frame on a stream) arrives, it closes both connections instead of forwarding it,
    for every other reply, up to `drops` times. The server has finished (and stored) the answer;
    the client sees a broken connection and must retry."""

    def __init__(self, upstream_port: int, drops: int = 3) -> None:
        self.upstream_port = upstream_port
        self.drops = drops
        self.replies = 0
        self.dropped = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _cut(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        self._cut(source, sink)

    def _replies(self, upstream: socket.socket, client: socket.socket) -> None:
        buffer = b""
        try:
            while data := upstream.recv(65536):
                buffer += data
                out = b""
                while len(buffer) >= 9:  # HTTP/2 frame: length(3) type(1) flags(1) stream(4)
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    frame, buffer = buffer[: 9 + length], buffer[9 + length :]
                    stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if frame[3] == 0 and stream and length:  # DATA on a call: the reply
                        with self._lock:
                            self.replies += 1
                            drop = self.dropped < self.drops and self.replies % 2 == 1
                            self.dropped += drop
                        if drop:
                            client.sendall(out)
                            self._cut(upstream, client)
                            return
                    out += frame
                if out:
                    client.sendall(out)
        except OSError:
            pass
        self._cut(upstream, client)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._cut(*self._sockets)

    def stop(self) -> None:  # the `processes` fixture's teardown
        self.close()


def test_sigusr1_logs_every_threads_stack_and_both_sides_go_on(
    tiny_model_dir, pool, shared_cloud, tmp_path, processes
):
    """What an operator runs on a daemon or server that seems stuck: the stacks land in the
    log as one record (one JSON line: a log shipper parses every line), naming the daemon's
    and the server's own code, and both keep working, also through a burst of signals while
    images flow (faulthandler's dump, tried first, crashed a busy server), without a dump for
    every signal of the burst."""
    images = pool.take(4)
    threshold, _ = threshold_for(images, 2)
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    edge = EdgeProcess(tmp_path, watch, shared_cloud.address, db, "--threshold", str(threshold))
    processes.append(edge.start(tiny_model_dir))
    edge.wait_ready()
    cloud_log = len(shared_cloud.log())
    for process in (edge.process, shared_cloud.process):
        process.send_signal(signal.SIGUSR1)

    def edge_stacks() -> list[dict]:
        lines = edge.log().splitlines(keepends=True)  # every whole line is JSON
        records = [json.loads(line) for line in lines if line.endswith("\n")]
        return [r for r in records if r.get("event") == "stacks"]

    [stacks] = wait_for(edge_stacks, 30, "the edge's stacks")
    # (the daemon's own code: its loop, or the folder scan it calls; the main thread's stack
    # can end at a generator frame such as watcher.py's, without the loop's frame under it)
    assert "/edge/" in stacks["msg"] and stacks["threads"] >= 3, stacks
    wait_for(lambda: "stacks of" in shared_cloud.log()[cloud_log:], 30, "the cloud's stacks")
    assert "/cloud/serve_loop.py" in shared_cloud.log()[cloud_log:]  # (its main thread's wait)
    write_files(watch, images, ["a.png", "b.png", "c.png", "d.png"])
    for _ in range(30):
        for process in (edge.process, shared_cloud.process):
            process.send_signal(signal.SIGUSR1)
        time.sleep(0.02)
    wait_for(lambda: verdicts(db) == {"ok": 2, "defect": 2}, 30, "every image's result")
    assert shared_cloud.process.poll() is None
    assert edge.terminate() == 0
    assert len(edge_stacks()) <= 3  # at most one dump a second: the burst did not flood the log


def test_lost_answers_make_no_duplicates(tiny_model_dir, pool, shared_cloud, tmp_path, processes):
    images = pool.take(10)
    threshold, flagged = threshold_for(images, 5)
    proxy = LostAnswerProxy(shared_cloud.port, drops=3)
    processes.append(proxy)
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    edge = EdgeProcess(
        tmp_path, watch, f"127.0.0.1:{proxy.port}", db, "--threshold", str(threshold)
    )
    processes.append(edge.start(tiny_model_dir))
    edge.wait_ready()
    # the daemon's start-up probe (GetManifest) goes through the proxy too: its answer is not
    # one of the Detect answers to lose
    probe_events = {"cloud_checked", "cloud_unreachable", "model_refused", "auth_refused"}
    wait_for(lambda: probe_events & _events(edge.log()), 30, "the start-up probe")
    with proxy._lock:
        proxy.replies = proxy.dropped = 0
    runs_before = shared_cloud.metrics().get("splitdet_cloud_heads_runs_total", 0.0)

    write_files(watch, images, [f"f{i}.png" for i in range(len(images))])
    wait_for(
        lambda: len(rows(db)) == len(images) and outbox_depth(db) == 0, 60, "all final results"
    )
    assert_exactly_one_final_result(db, images, flagged)
    assert proxy.dropped == 3
    # Every lost answer was re-sent with the same id and answered without running the heads
    # again: from the cloud's store, or, a re-send arriving before the answer was stored (a
    # loaded machine), by joining the call still running.
    runs = shared_cloud.metrics()["splitdet_cloud_heads_runs_total"] - runs_before
    assert runs == len(flagged)
    # (re-sent: more attempts than images; not one per drop: on a loaded machine a call can
    # pass its deadline first, and its answer, dropped later, was already counted as failed)
    attempts = sorted(r["attempts"] for r in rows(db) if r["verdict"] == "defect")
    assert sum(attempts) > len(flagged)


# ------------------------------------------------------------------------------- 5. quarantine


def test_bad_files_are_quarantined_with_a_reason_and_the_daemon_goes_on(
    tiny_model_dir, pool, tmp_path, processes
):
    good = pool.take(4)
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    whole = good[0].data
    bad = {
        "empty.png": b"",
        "corrupt.png": whole[:16] + bytes(random.Random(5).randrange(256) for _ in range(4000)),
        "truncated.png": whole[: len(whole) // 2],
        "notes.png": b"camera log: not an image\n",  # named as an image, but is none
        "sliver.png": sliver_png(),  # decodes, but resizes to 0 rows: fails in the pipeline
    }
    write_files(watch, good[:2], ["a1.png", "a2.png"])
    for name, data in bad.items():
        (watch / name).write_bytes(data)
    write_files(watch, good[2:], ["z1.png", "z2.png"])
    (watch / ".hidden.png").write_bytes(whole)  # ignored: hidden
    (watch / "incoming.png.part").write_bytes(whole)  # ignored: still being written
    (watch / "notes.txt").write_bytes(b"camera log\n")  # not an image by its name: left alone

    # Batch mode, nothing flagged (threshold above 1), no cloud needed.
    edge = EdgeProcess(tmp_path, watch, "127.0.0.1:9", db, "--once", "--threshold", "2")
    processes.append(edge.start(tiny_model_dir))
    assert edge.process.wait(timeout=60) == 0, edge.log()

    table = rows(db)
    errors = {Path(r["path"]).name: r for r in table if r["verdict"] == "error"}
    assert sorted(errors) == sorted(bad)
    assert "empty file" in errors["empty.png"]["reason"]
    assert "not an image" in errors["notes.png"]["reason"]
    assert "truncated" in errors["truncated.png"]["reason"]
    assert "too elongated" in errors["sliver.png"]["reason"]
    assert (
        "corrupt" in errors["corrupt.png"]["reason"]
        or "not an image" in (errors["corrupt.png"]["reason"])
    )
    assert {r["error_kind"] for r in errors.values()} == {"quarantine"}
    assert sorted(Path(r["path"]).name for r in table if r["verdict"] == "ok") == [
        "a1.png", "a2.png", "z1.png", "z2.png",
    ]  # fmt: skip
    quarantine = watch / "quarantine"
    for name, row in errors.items():
        moved = Path(row["stored_path"])
        assert moved.parent == quarantine and moved.name.endswith(name)
        assert moved.read_bytes() == bad[name]
        assert Path(str(moved) + ".reason.txt").read_text().strip() == row["reason"]
    # --after keep: good images stay; hidden, in-progress and non-image names are untouched.
    assert sorted(p.name for p in watch.iterdir() if p.is_file()) == sorted(
        [".hidden.png", "incoming.png.part", "notes.txt", "a1.png", "a2.png", "z1.png", "z2.png"]
    )
    # A second batch run finds nothing new: kept files are recognised, not processed again.
    edge.start(tiny_model_dir)
    assert edge.process.wait(timeout=60) == 0
    assert len(rows(db)) == len(table)


def test_recursive_takes_subfolders_but_not_its_own_outputs(
    tiny_model_dir, pool, tmp_path, processes
):
    """A camera writing a folder per day: --recursive processes every subfolder's images (the
    same name in two folders is two images), quarantines a bad one from a subfolder, and never
    enters hidden folders, its own archive and quarantine inside --watch, or a folder marked
    with IGNORE_MARKER; without it,
    subfolders are left alone."""
    images = pool.take(4)
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    for sub in ("2026-12-03", "2026-12-04/line-b", ".trash", "archive", "quarantine", "review"):
        (watch / sub).mkdir(parents=True)
    (watch / "review" / IGNORE_MARKER).write_text("")  # e.g. `splitdet edge collect --out`
    write_files(watch, images[:1], ["top.png"])
    write_files(watch / "2026-12-03", images[1:2], ["a.png"])
    write_files(watch / "2026-12-04/line-b", images[2:3], ["a.png"])  # the same name again
    (watch / "2026-12-04" / "broken.png").write_bytes(images[3].data[:40])
    for skipped in (".trash", "archive", "quarantine", "review"):  # hidden, own, or marked
        write_files(watch / skipped, images[3:], ["old.png"])

    flat = EdgeProcess(tmp_path / "flat", watch, "127.0.0.1:9", tmp_path / "flat.sqlite",
                       "--once", "--threshold", "2")  # fmt: skip
    (tmp_path / "flat").mkdir()
    processes.append(flat.start(tiny_model_dir))
    assert flat.process.wait(timeout=60) == 0, flat.log()
    assert [Path(r["path"]).name for r in rows(tmp_path / "flat.sqlite")] == ["top.png"]

    edge = EdgeProcess(tmp_path, watch, "127.0.0.1:9", db, "--once", "--threshold", "2",
                       "--recursive", "--after", "archive")  # fmt: skip
    processes.append(edge.start(tiny_model_dir))
    assert edge.process.wait(timeout=60) == 0, edge.log()
    table = rows(db)
    by_path = {Path(r["path"]).relative_to(watch).as_posix(): r for r in table}
    assert sorted(by_path) == [
        "2026-12-03/a.png", "2026-12-04/broken.png", "2026-12-04/line-b/a.png", "top.png",
    ]  # fmt: skip
    assert by_path["2026-12-04/broken.png"]["verdict"] == "error"
    assert {by_path[k]["verdict"] for k in by_path if k.endswith("a.png") or k == "top.png"} == {
        "ok"
    }
    archived = sorted(p.name for p in (watch / "archive").iterdir())
    assert len(archived) == 4 and "old.png" in archived  # three images moved in beside old.png
    for skipped in (".trash", "quarantine", "review"):
        assert (watch / skipped / "old.png").exists()
    # a second run finds nothing new: the archive and quarantine are not read back
    edge.start(tiny_model_dir)
    assert edge.process.wait(timeout=60) == 0, edge.log()
    assert len(rows(db)) == len(table)


# ------------------------------------------------------------------------------- 6. slow writes


def test_a_large_file_written_slowly_is_not_read_early(tiny_model_dir, pool, tmp_path, processes):
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    rng = np.random.default_rng(0)
    big = png_bytes((rng.random((1200, 1600, 3)) * 255).astype(np.uint8))  # ~5.8 MB
    small = pool.take(1)[0]
    # settle 12x the pause between writes: a loaded machine may stall the writer for a while
    edge = EdgeProcess(
        tmp_path, watch, "127.0.0.1:9", db, "--threshold", "2", "--settle", "1.5",
        "--unreadable-grace", "0.5",
    )  # fmt: skip
    processes.append(edge.start(tiny_model_dir))
    edge.wait_ready()

    n = len(big) // 50 + 1  # 50 writes over ~6 s: the small image settles long before the last
    chunks = [big[i : i + n] for i in range(0, len(big), n)]
    with open(watch / "big.png", "wb") as f:
        for i, chunk in enumerate(chunks):
            f.write(chunk)
            f.flush()
            if i == 3:  # a small image arriving meanwhile is not held back
                (watch / "small.png").write_bytes(small.data)
            time.sleep(0.12)  # shorter than --settle: still "being written"
    last_write = time.time()
    small_row = wait_for(
        lambda: next((r for r in rows(db) if r["path"].endswith("small.png")), None),
        5,
        "the small image",
    )
    assert small_row["arrived"] < last_write
    big_row = wait_for(
        lambda: next((r for r in rows(db) if r["path"].endswith("big.png")), None),
        20,
        "the big image",
    )
    assert big_row["verdict"] == "ok", big_row["reason"]
    assert big_row["content_hash"] == hashlib.sha256(big).hexdigest()
    assert big_row["size_bytes"] == len(big)
    assert big_row["arrived"] >= last_write
    assert len(rows(db)) == 2
    assert not any((watch / "quarantine").iterdir())
    assert edge.terminate() == 0


def test_hot_folder_waits_for_settle_and_orders_by_arrival(tmp_path):
    """The watcher alone: a growing file is not a candidate; arrival order; repeated names."""
    folder = HotFolder(tmp_path, settle_s=0.3, unreadable_grace_s=0.3)
    first = png_bytes(np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "b.png").write_bytes(first)
    time.sleep(0.02)
    (tmp_path / "a.png").write_bytes(first[:20])  # partial
    folder.scan()
    assert folder.next_candidate() is None  # not settled yet
    time.sleep(0.35)
    folder.scan()
    candidate = folder.next_candidate()
    assert candidate.path.name == "b.png"  # arrived first
    ready = folder.read(candidate)
    assert ready.error is None and ready.image.shape == (3, 8, 8)
    (tmp_path / "b.png").unlink()  # archived, as the daemon does
    folder.forget(candidate)
    partial = folder.next_candidate()
    assert partial.path.name == "a.png" and folder.read(partial) is None  # in its grace period
    with open(tmp_path / "a.png", "ab") as f:  # the writer goes on
        f.write(first[20:])
    folder.scan()
    assert folder.next_candidate() is None  # changed: settles again
    time.sleep(0.35)
    folder.scan()
    ready = folder.read(folder.next_candidate())
    assert ready.error is None and ready.data == first
    key = ready.candidate.file_key
    folder.ignore(ready.candidate)  # kept in place
    folder.scan()
    assert folder.next_candidate() is None
    time.sleep(0.01)
    (tmp_path / "a.png").write_bytes(first)  # same name, same bytes, new arrival
    folder.scan()
    time.sleep(0.35)
    assert folder.next_candidate().file_key != key


# ------------------------------------------------------------------------------- outbox cap


class BrightIsDefective:
    """A stand-in pipeline (no model): bright images are flagged, with an empty payload."""

    codec = "int8"
    threshold = 0.5
    manifest = type("Manifest", (), {"fingerprint": "f" * 64, "model_config": ModelConfig()})()

    def process_array(self, image: Pixels) -> EdgeResult:
        image = image.to_unit_float()  # (the hot folder hands over the decoder's pixels)
        p = float(image.mean())
        hw = (image.shape[1], image.shape[2])
        flagged = p >= self.threshold
        return EdgeResult(p, flagged, ImageMeta(hw, hw), [] if flagged else None, 0, {"gate": 0})


@pytest.mark.parametrize("policy", ["wait", "reject"])
def test_outbox_cap_policies_are_explicit_and_counted(tmp_path, policy):
    watch = tmp_path / "hot"
    watch.mkdir()
    for i, level in enumerate([250, 20, 240, 230, 10]):  # 3 bright (flagged), 2 dark
        (watch / f"{i}.png").write_bytes(png_bytes(np.full((8, 8, 3), level, np.uint8)))
        time.sleep(0.01)
    config = DaemonConfig(
        model_dir=tmp_path, watch=watch, cloud="127.0.0.1:9", db=tmp_path / "edge.sqlite",
        settle_s=0.05, poll_s=0.05, once=True, drain_timeout_s=0.0, after="delete",
        outbox=OutboxCap(max_items=2, policy=policy), retry_initial_s=5, retry_max_s=5,
    )  # fmt: skip
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    status = []
    thread = threading.Thread(target=lambda: status.append(daemon.run()))
    thread.start()
    db = config.db
    if policy == "wait":
        # The third flagged image waits for room: nothing after it is processed, nothing lost.
        wait_for(lambda: daemon.metrics.outbox_full_waits._value.get() == 1, 10, "a wait")
        time.sleep(0.3)
        assert verdicts(db) == {"pending": 2, "ok": 1}
        daemon.request_stop()
        thread.join(10)
        assert sorted(p.name for p in watch.glob("*.png")) == ["3.png", "4.png"]
    else:
        thread.join(20)
        table = rows(db)
        assert [r["verdict"] for r in table] == ["pending", "ok", "pending", "error", "ok"]
        assert table[3]["error_kind"] == "outbox_full" and "outbox full" in table[3]["reason"]
        assert daemon.metrics.outbox_full_rejected._value.get() == 1
    assert status == [1]  # requests still pending (the cloud is unreachable)


def test_a_crash_between_commit_and_move_only_finishes_the_move(tmp_path, monkeypatch):
    """The window kill -9 rarely hits, made certain: the row is committed, the process dies
    before the file is archived; the next run moves the file and records nothing new."""
    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "a.png").write_bytes(png_bytes(np.full((8, 8, 3), 30, np.uint8)))
    config = DaemonConfig(
        model_dir=tmp_path, watch=watch, cloud="127.0.0.1:9", db=tmp_path / "edge.sqlite",
        settle_s=0.05, poll_s=0.05, once=True, drain_timeout_s=0.0, after="archive",
    )  # fmt: skip

    with monkeypatch.context() as patch:
        patch.setattr(AfterActions, "move", killed)
        with pytest.raises(Killed):
            EdgeDaemon(config, pipeline=BrightIsDefective()).run()
    [row] = rows(config.db)
    assert (watch / "a.png").exists() and row["verdict"] == "ok"

    assert EdgeDaemon(config, pipeline=BrightIsDefective()).run() == 0
    assert rows(config.db) == [row]
    assert not (watch / "a.png").exists() and Path(row["stored_path"]).is_file()


def test_the_sender_outlives_an_unexpected_failure(tiny_model_dir, pool, shared_cloud, tmp_path):
    """An exception no handler expects (here the channel cannot be built once) is logged and
    retried after a backoff step; before, it ended the sender thread and nothing more was
    delivered until a restart. A request that no longer parses is dead-lettered by name."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    write_files(watch, pool.take(2), ["a.png", "b.png"])
    config = DaemonConfig(
        model_dir=tiny_model_dir, watch=watch, cloud=shared_cloud.address, db=db, settle_s=0.05,
        poll_s=0.05, once=True, drain_timeout_s=60, threshold=0.0, retry_initial_s=0.05,
        retry_max_s=0.1,
    )  # fmt: skip
    daemon = EdgeDaemon(config)
    build, calls = daemon.sender._make_client, []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError("root certificates vanished")
        return build()

    daemon.sender._make_client = flaky
    assert daemon.run() == 0
    assert verdicts(db) == {"defect": 2} and len(calls) == 2
    assert daemon.sender.delivered == 2

    # A damaged outbox row: dead-lettered with the reason, the rest of the outbox still sent.
    write_files(watch, pool.take(2), ["c.png", "d.png"])
    daemon = EdgeDaemon(replace(config, cloud="127.0.0.1:9", drain_timeout_s=0.0))
    assert daemon.run() == 1  # nothing reachable: both wait in the outbox
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        first = con.execute("SELECT min(image_id) FROM outbox").fetchone()[0]
        con.execute("UPDATE outbox SET payload = ? WHERE image_id = ?", (b"\xff" * 40, first))
    assert EdgeDaemon(config).run() == 0
    table = {Path(r["path"]).name: r for r in rows(db)}
    damaged = next(r for r in table.values() if r["id"] == first)
    assert damaged["error_kind"] == "dead_letter" and "corrupt request" in damaged["reason"]
    assert sorted(n for n, r in table.items() if r["verdict"] == "defect") == sorted(
        {"a.png", "b.png", "c.png", "d.png"} - {Path(damaged["path"]).name}
    )


def test_an_idle_sender_gives_a_delivered_backlogs_pages_back(
    tiny_model_dir, pool, shared_cloud, tmp_path, monkeypatch, caplog
):
    """Once the outbox's backlog is delivered and nothing is due, the sender gives the freed
    pages back (here from any size on: RECLAIM_ABOVE_BYTES lowered to 0) and logs it."""
    from splitdet.edge import sender as sender_module

    monkeypatch.setattr(sender_module, "RECLAIM_ABOVE_BYTES", 0)
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    write_files(watch, pool.take(3), ["a.png", "b.png", "c.png"])
    config = DaemonConfig(
        model_dir=tiny_model_dir, watch=watch, cloud=shared_cloud.address, db=db, settle_s=0.05,
        poll_s=0.05, once=False, threshold=0.0, retry_initial_s=0.05, retry_max_s=0.1,
    )  # fmt: skip
    daemon = EdgeDaemon(config)
    with caplog.at_level(logging.INFO, logger="splitdet"), running(daemon):
        wait_for(lambda: verdicts(db) == {"defect": 3}, 30, "the three answers")
        wait_for(lambda: any(getattr(r, "fields", {}).get("event") == "store_reclaimed"
                             for r in caplog.records), 10, "store_reclaimed")  # fmt: skip
    with contextlib.closing(sqlite3.connect(db)) as con:
        assert con.execute("PRAGMA freelist_count").fetchone()[0] == 0


def test_send_resumed_times_the_outage_by_the_monotonic_clock(
    tiny_model_dir, pool, shared_cloud, tmp_path, caplog, monkeypatch
):
    """A clock review: an outage of a minute, with the wall clock stepped a day forward during
    it (NTP), was logged `failing_for_s=86448.9`; stepped back, 0.0."""
    import grpc

    from splitdet.edge.client import ClientConfig, CloudClient, RetryLater
    from splitdet.edge.sender import Backoff, Sender
    from splitdet.edge.store import ResultStore

    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    write_files(watch, pool.take(1), ["a.png"])
    config = DaemonConfig(
        model_dir=tiny_model_dir, watch=watch, cloud="127.0.0.1:9", db=db, settle_s=0.05,
        poll_s=0.05, once=True, drain_timeout_s=0.0, threshold=0.0,
    )  # fmt: skip
    assert EdgeDaemon(config).run() == 1  # the cloud down: the request waits
    store = ResultStore(db)
    wall = time.time
    down = [True, True]

    class SteppedDuringTheOutage(CloudClient):
        def send_request(self, request, timeout=None):
            if down:
                down.pop()
                if not down:  # the second failure: NTP steps the clock a day forward
                    monkeypatch.setattr(time, "time", lambda: wall() + 86400.0)
                raise RetryLater(grpc.StatusCode.UNAVAILABLE, "down")
            return super().send_request(request, timeout=timeout)

    sender = Sender(store, lambda: SteppedDuringTheOutage(ClientConfig(shared_cloud.address)),
                    Backoff(0.01, 0.02))  # fmt: skip
    try:
        with caplog.at_level(logging.INFO, logger="splitdet"):
            deadline = time.monotonic() + 30
            while sender.delivered == 0 and time.monotonic() < deadline:
                item = store.next_due(max_wait_s=1.0)
                if item is None:
                    time.sleep(0.01)  # (its retry is due in 0.01-0.02 s)
                else:
                    sender.send(item)
    finally:
        sender._drop_client()
        store.close()
    resumed = [r.fields for r in caplog.records
               if getattr(r, "fields", {}).get("event") == "send_resumed"]  # fmt: skip
    assert len(resumed) == 1 and resumed[0]["failures"] == 2, resumed
    assert 0 <= resumed[0]["failing_for_s"] < 600, resumed


def test_send_resumed_closes_an_outage_also_when_its_first_answer_is_a_refusal(
    tiny_model_dir, pool, shared_cloud, tmp_path, caplog
):
    """Review findings: an outage whose first answer was a dead letter never logged its end;
    the depth it reported counted the request just answered; and a local sender error (no
    call failed) was reported as an outage ended, without a duration."""
    import grpc

    from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry, RetryLater
    from splitdet.edge.sender import Backoff, Sender
    from splitdet.edge.store import ResultStore

    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    write_files(watch, pool.take(4), ["a.png", "b.png", "c.png", "d.png"])
    config = DaemonConfig(
        model_dir=tiny_model_dir, watch=watch, cloud="127.0.0.1:9", db=db, settle_s=0.05,
        poll_s=0.05, once=True, drain_timeout_s=0.0, threshold=0.0,
    )  # fmt: skip
    assert EdgeDaemon(config).run() == 1  # the cloud down: four requests wait
    store = ResultStore(db)
    scripted = [RetryLater(grpc.StatusCode.UNAVAILABLE, "down"),
                RetryLater(grpc.StatusCode.UNAVAILABLE, "down"),
                NeverRetry(grpc.StatusCode.INVALID_ARGUMENT, "bad")]  # fmt: skip

    class Scripted(CloudClient):
        def send_request(self, request, timeout=None):
            if scripted:
                raise scripted.pop(0)
            return super().send_request(request, timeout=timeout)

    def resumed() -> list[dict]:
        return [r.fields for r in caplog.records
                if getattr(r, "fields", {}).get("event") == "send_resumed"]  # fmt: skip

    cloud = ClientConfig(shared_cloud.address)
    sender = Sender(store, lambda: Scripted(cloud), Backoff(0.01, 0.02))
    try:
        with caplog.at_level(logging.INFO, logger="splitdet"):
            first = store.next_due(max_wait_s=1.0)
            for _ in range(3):  # down, down, refused for good: a dead letter
                sender.send(first)
            assert [(r["failures"], r["outbox_depth"]) for r in resumed()] == [(2, 3)]
            assert resumed()[0]["failing_for_s"] >= 0
            while (item := store.next_due(max_wait_s=1.0)) is not None:
                sender.send(item)
            assert len(resumed()) == 1  # answers with nothing failed before them: no line

            # a local failure (the channel cannot be built once) is not a cloud outage
            write_files(watch, pool.take(1), ["e.png"])
            assert EdgeDaemon(config).run() == 1
            builds = []

            def flaky() -> CloudClient:
                builds.append(1)
                if len(builds) == 1:
                    raise FileNotFoundError("root certificates vanished")
                return CloudClient(cloud)

            local = Sender(store, flaky, Backoff(0.01, 0.02))
            local.start()
            wait_for(lambda: local.delivered == 1, 30, "the delivery after the local error")
            local.stop()
            local.join(10)
            assert len(resumed()) == 1
    finally:
        sender._drop_client()
        store.close()


def test_the_channel_is_rebuilt_for_a_cloud_not_reached_not_for_a_busy_one(
    tiny_model_dir, pool, shared_cloud, tmp_path
):
    """A code review found the channel dropped at every retry from the third transient failure
    on, whatever the failure: a busy cloud (RESOURCE_EXHAUSTED) was reached, and each retry
    paid a new connection (with TLS, a handshake). Only a cloud not reached (UNAVAILABLE, three
    in a row) gets a fresh channel."""
    import grpc

    from splitdet.edge.client import ClientConfig, CloudClient, RetryLater
    from splitdet.edge.sender import REBUILD_AFTER_FAILURES, Backoff, Sender
    from splitdet.edge.store import ResultStore

    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    write_files(watch, pool.take(2), ["a.png", "b.png"])
    config = DaemonConfig(
        model_dir=tiny_model_dir, watch=watch, cloud="127.0.0.1:9", db=db, settle_s=0.05,
        poll_s=0.05, once=True, drain_timeout_s=0.0, threshold=0.0,
    )  # fmt: skip
    assert EdgeDaemon(config).run() == 1  # the cloud down: two requests wait
    scripted: list[grpc.StatusCode] = []

    class Scripted(CloudClient):
        def send_request(self, request, timeout=None):
            if scripted:
                raise RetryLater(scripted.pop(0), "scripted")
            return super().send_request(request, timeout=timeout)

    builds: list[Scripted] = []

    def build() -> Scripted:
        builds.append(Scripted(ClientConfig(shared_cloud.address)))
        return builds[-1]

    store = ResultStore(db)
    sender = Sender(store, build, Backoff(0.01, 0.02))
    try:
        busy = 2 * REBUILD_AFTER_FAILURES
        scripted += [grpc.StatusCode.RESOURCE_EXHAUSTED] * busy
        first = store.next_due(now=time.time() + 3600)  # (due now or later)
        for _ in range(busy + 1):
            sender.send(first)
        assert sender.delivered == 1 and len(builds) == 1  # busy, not unreached: one channel
        scripted += [grpc.StatusCode.UNAVAILABLE] * (REBUILD_AFTER_FAILURES + 1)
        second = store.next_due(now=time.time() + 3600)  # (due now or later)
        for _ in range(REBUILD_AFTER_FAILURES + 2):
            sender.send(second)
        assert sender.delivered == 2
        assert len(builds) == 3  # rebuilt at the third and the fourth UNAVAILABLE in a row
    finally:
        sender._drop_client()
        store.close()


def test_signals_repeated_while_the_daemon_stops_do_not_kill_it(
    tiny_model_dir, tmp_path, processes
):
    """The daemon put the default SIGTERM back before its shutdown (the sender's join, the
    store's close), and again before the process ended: a second SIGTERM there, as a
    supervisor repeating its signal sends, ended it with 143 instead of its own 0."""
    watch = tmp_path / "hot"
    watch.mkdir()
    edge = EdgeProcess(tmp_path, watch, "127.0.0.1:9", tmp_path / "edge.sqlite")
    processes.append(edge.start(tiny_model_dir))
    edge.wait_ready()
    deadline = time.monotonic() + 60
    for sig in itertools.cycle((signal.SIGTERM, signal.SIGINT)):  # until it has exited
        if edge.process.poll() is not None or time.monotonic() > deadline:
            break
        edge.process.send_signal(sig)
        time.sleep(0.0005)  # (the gap a late signal could fall in was under 1 ms)
    assert edge.process.wait(timeout=30) == 0, edge.log()[-3000:]
    assert '"event": "stopped"' in edge.log()


def test_a_batch_run_stopped_with_images_left_exits_1(tiny_model_dir, tmp_path, processes):
    """`--once` stopped by SIGTERM before it took every image exited 0, which a cron wrapper
    reads as "batch done"; as for the other runs that leave images, it is 1."""
    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "late.png").write_bytes(png_bytes(np.full((24, 32, 3), 90, np.uint8)))
    edge = EdgeProcess(
        tmp_path, watch, "127.0.0.1:9", tmp_path / "edge.sqlite", "--once", "--settle", "300"
    )  # fmt: skip  (the file waits to settle meanwhile)
    processes.append(edge.start(tiny_model_dir))
    edge.wait_ready()
    assert edge.terminate() == 1, edge.log()[-3000:]
    assert (watch / "late.png").exists()
