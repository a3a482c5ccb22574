"""Rolling a model out to the edges, and back out of trouble (rollout and failure-injection
reviews):

1. which export an edge runs shows in its metrics (`splitdet_edge_model_info`) even when it is
   idle, and `splitdet edge status` counts the results by the export that judged them;
2. an `edge run --threshold` override of the calibrated gate threshold is warned about at start
   and shown in that gauge;
3. a kill -9 after a copy onto the archive's file system is in place, before the image's
   removal from --watch: the restart adopts the copy instead of archiving a second one;
4. `edge status` shows the outbox's last error whole; an idle edge whose refused export the
   cloud serves again logs so (`model_served_again`).

Real daemons (in-process, or `splitdet edge run` as a process killed with SIGKILL), real SQLite,
real files; item 4's cloud is a real `splitdet cloud` process reloading its folder on SIGHUP.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_edge_daemon_recovery as recovery
from PIL import Image
from test_edge_daemon_recovery import scrape

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.file_identity import file_key
from splitdet.edge.store import Arrival, ResultStore
from splitdet.shared.cli import main
from splitdet.shared.manifest import read_manifest

from support import Killed, daemon_config, image_rows, running, wait_for

pytestmark = pytest.mark.timeout(240)

TESTS = Path(__file__).parent


def png(seed: int, size: tuple[int, int] = (128, 128)) -> bytes:
    """A noise PNG (distinct per seed; large enough that a copy is not one write)."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 60, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def events(caplog) -> list[dict]:
    return [getattr(r, "fields", {}) | {"_level": r.levelno, "_message": r.getMessage()}
            for r in caplog.records]  # fmt: skip


# ------------------------------------------------------- 1. which export an edge runs


def test_an_idle_edge_shows_its_export_and_threshold_in_its_metrics(
    tiny_model_dir, tmp_path, caplog
):
    """An edge that has seen no image shows nothing of its export in the outbox gauges: the
    README's retirement test passed for it. Its model_info gauge names the export, the
    threshold in use (here the calibrated one) and the codec; no override warning."""
    manifest = read_manifest(tiny_model_dir)
    config = daemon_config(tiny_model_dir, tmp_path, once=False, threshold=None,
                           metrics_port=0, metrics_host="127.0.0.1")  # fmt: skip
    daemon = EdgeDaemon(config)
    with caplog.at_level(logging.INFO, logger="splitdet.edge"), running(daemon):
        wait_for(lambda: daemon.metrics_port, 20, "the metrics endpoint")
        metrics = scrape(daemon.metrics_port)
    info = {key: value for key, value in metrics.items()
            if key.startswith("splitdet_edge_model_info{")}  # fmt: skip
    assert info == {
        f'splitdet_edge_model_info{{calibrated_threshold="0.5",codec="int8",'
        f'fingerprint="{manifest.fingerprint}",threshold="0.5"}}': 1.0
    }
    assert not any(k.startswith("splitdet_edge_outbox_model_requests{") for k in metrics)
    [started] = [e for e in events(caplog) if e.get("event") == "started"]
    assert started["fingerprint"] == manifest.fingerprint and started["threshold"] == 0.5
    from splitdet.shared.version import splitdet_version  # (which splitdet: upgraded apart)

    assert started["version"] == splitdet_version()
    assert not [e for e in events(caplog) if e.get("event") == "threshold_override"]


def test_a_new_database_is_said_so_at_start_and_an_existing_one_is_not(
    tiny_model_dir, tmp_path, caplog
):
    """A --db with a typo in its folder would start afresh (its folder made) without a word:
    the start names a new database, and only a new one."""
    config = daemon_config(tiny_model_dir, tmp_path, once=False, threshold=None,
                           db=tmp_path / "typo" / "edge.sqlite")  # fmt: skip
    created = []
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="splitdet.edge"), running(EdgeDaemon(config)):
            wait_for(lambda: any(e.get("event") == "started" for e in events(caplog)), 20, "start")
        created.append([e for e in events(caplog) if e.get("event") == "db_created"])
    assert [len(lines) for lines in created] == [1, 0]
    assert created[0][0]["db"] == str(tmp_path / "typo" / "edge.sqlite")


def test_status_counts_the_results_by_the_export_that_judged_them(tmp_path, capsys):
    """`edge status` names the export of the latest result first, then the others."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    old, new = "a" * 64, "b" * 64
    for i, fingerprint in enumerate([old, old, old, new, new]):
        arrival = Arrival(f"/hot/{i}.png", f"{i}.png|1|{i}|{i}", "0" * 64, 1, time.time())
        store.record_ok(arrival, 0.1, fingerprint, {}, None)
    store.close()
    assert main(["edge", "status", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "results by export: bbbbbbbbbbbb 2 (the latest result's); aaaaaaaaaaaa 3" in lines
    assert main(["edge", "status", "--db", str(db), "--json"]) == 0
    by_model = json.loads(capsys.readouterr().out)["results_by_model"]
    assert list(by_model) == [new, old]
    assert [m["results"] for m in by_model.values()] == [2, 3]


# ------------------------------------------------------- 2. a threshold override


def test_a_threshold_override_is_warned_at_start_and_shown_in_the_metrics(tiny_model_dir, tmp_path):
    """`edge run --threshold 0.3` on an export calibrated at 0.5: a WARNING at start names
    both and the eval command that measures it; model_info shows 0.3 in use."""
    manifest = read_manifest(tiny_model_dir)
    watch = tmp_path / "hot"
    watch.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", "edge", "run", "--model",
         str(tiny_model_dir), "--watch", str(watch), "--db", str(tmp_path / "edge.sqlite"),
         "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--threshold", "0.3",
         "--threads", "1", "--log-format", "text"],
        capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [warning] = [line for line in done.stderr.splitlines() if "event=threshold_override" in line]
    assert "WARNING" in warning
    assert "--threshold 0.3 overrides the gate threshold 0.5" in warning
    assert f"splitdet eval --model {tiny_model_dir} --threshold 0.3" in warning

    config = daemon_config(tiny_model_dir, tmp_path / "in-process", once=False, threshold=0.3,
                           metrics_port=0, metrics_host="127.0.0.1")  # fmt: skip
    daemon = EdgeDaemon(config)
    with running(daemon):
        wait_for(lambda: daemon.metrics_port, 20, "the metrics endpoint")
        metrics = scrape(daemon.metrics_port)
    key = (f'splitdet_edge_model_info{{calibrated_threshold="0.5",codec="int8",'
           f'fingerprint="{manifest.fingerprint}",threshold="0.3"}}')  # fmt: skip
    assert metrics[key] == 1.0


def test_each_result_records_the_threshold_it_was_judged_at(tiny_model_dir, tmp_path, capsys):
    """Two runs of one export at two overrides, and a file never judged: each row keeps the
    threshold that judged it (None for the unreadable one); `edge status` shows each
    threshold's count beside the export, `edge results --json` each row's."""
    fingerprint = read_manifest(tiny_model_dir).fingerprint
    watch = tmp_path / "hot"
    for run, (threshold, names) in enumerate([(1.5, ["a", "b"]), (2.0, ["c"])]):
        for name in names:
            (watch / f"{name}.png").parent.mkdir(exist_ok=True)
            (watch / f"{name}.png").write_bytes(png(ord(name)))
        if run == 1:
            (watch / "broken.png").write_bytes(b"not an image")
        assert EdgeDaemon(daemon_config(tiny_model_dir, tmp_path, threshold=threshold)).run() == 0
    rows = {Path(r["path"]).name: r for r in image_rows(tmp_path / "edge.sqlite")}
    assert {name: row["threshold"] for name, row in rows.items()} == {
        "a.png": 1.5, "b.png": 1.5, "c.png": 2.0, "broken.png": None,
    }  # fmt: skip
    assert rows["broken.png"]["error_kind"] == "quarantine"
    assert main(["edge", "status", "--db", str(tmp_path / "edge.sqlite")]) == 0
    out = capsys.readouterr().out
    # the unreadable file was judged at none: not counted as judged at a threshold
    judged = "at thresholds 1.5 (2), 2.0 (1), none (1)"
    assert f"{fingerprint[:12]} 4 (the latest result's) {judged}" in out
    assert main(["edge", "results", "--db", str(tmp_path / "edge.sqlite"), "--json"]) == 0
    listed = {Path(r["path"]).name: r["threshold"] for r in json.loads(capsys.readouterr().out)}
    assert listed == {name: row["threshold"] for name, row in rows.items()}


# ------------------------------------------------------- 3. killed before the unlink


@pytest.fixture
def archive_disk(tmp_path, monkeypatch):
    """(a folder on another file system than tmp_path, simulated?): test_edge_daemon_recovery's
    other_disk fixture."""
    yield from recovery.other_disk.__wrapped__(tmp_path, monkeypatch)


KILLED_BEFORE_UNLINK = """
import os, signal, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
if sys.argv[2]:  # no tmpfs: the archive folder behaves as another file system
    from test_edge_daemon_recovery import refuse_links_into

    refuse_links_into(Path(sys.argv[2]))
watch = os.path.abspath(sys.argv[3])
real_unlink = os.unlink

def unlink(path, *args, **kwargs):  # the image leaving --watch: the process dies first
    if os.path.dirname(os.path.abspath(path)) == watch:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(path, *args, **kwargs)

os.unlink = unlink
from splitdet.shared.cli import main
sys.exit(main(sys.argv[4:]))
"""


def test_a_kill_after_the_copy_onto_an_archive_disk_is_in_place_keeps_one_copy(
    tiny_model_dir, tmp_path, archive_disk, caplog
):
    """kill -9 once the copy is whole under its archive name, before the image is removed
    from --watch (what `strace -e inject=unlink:signal=SIGKILL` did): the restart finds the
    name holding the image's very bytes, removes the image and keeps that copy, the one the
    row names. Before: a second copy as 00000001_a~1.png, the row moved to it, the first
    orphaned for good."""
    folder, simulated = archive_disk
    if simulated:  # adoption asks the file system: a copy is on another device
        pytest.skip("needs a second file system (/dev/shm as tmpfs)")
    archive = folder / "archive"
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    data = png(1)
    (watch / "a.png").write_bytes(data)
    args = recovery.archive_run_args(tiny_model_dir, watch, db, archive)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BEFORE_UNLINK, str(TESTS), str(folder) if simulated else "",
         str(watch), *args],
        capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    planned = archive / "00000001_a.png"
    assert os.listdir(archive) == [planned.name] and planned.read_bytes() == data  # whole
    assert (watch / "a.png").read_bytes() == data  # and the image still in --watch
    [row] = image_rows(db)
    assert row["stored_path"] == str(planned) and row["content_hash"] == sha(data)

    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        assert main(args) == 0
    assert os.listdir(archive) == [planned.name] and planned.read_bytes() == data
    assert image_rows(db) == [row]  # the row as it was: it named this copy already
    assert not (watch / "a.png").exists()
    assert "copy found in place" in [e.get("event") for e in events(caplog)]


@pytest.mark.parametrize("where", ["archive", "quarantine"])
def test_a_restart_adopts_a_whole_copy_left_at_the_recorded_name(
    tiny_model_dir, tmp_path, archive_disk, monkeypatch, where
):
    """The same crash state made in-process (the source's removal interrupted), for an
    archived and a quarantined image: one file under the recorded name, the row naming it,
    the image gone from --watch, a quarantined one's reason file beside it."""
    folder, simulated = archive_disk
    if simulated:  # adoption asks the file system: a copy is on another device
        pytest.skip("needs a second file system (/dev/shm as tmpfs)")
    out = folder / where
    data = png(2) if where == "archive" else b"not an image at all"
    config = daemon_config(
        tiny_model_dir, tmp_path, after="archive", archive_dir=folder / "archive",
        quarantine_dir=folder / "quarantine",
    )  # fmt: skip
    source = config.watch / "a.png"
    source.write_bytes(data)
    real_unlink = Path.unlink

    def unlink(path, *args, **kwargs):
        if path == source:
            raise Killed
        return real_unlink(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "unlink", unlink)
        with pytest.raises(Killed):
            EdgeDaemon(config).run()
    planned = out / "00000001_a.png"
    assert planned.read_bytes() == data and source.read_bytes() == data
    [row] = image_rows(config.db)
    assert row["stored_path"] == str(planned)

    assert EdgeDaemon(config).run() == 0
    assert image_rows(config.db) == [row] and not source.exists()
    names = sorted(p.name for p in out.iterdir())
    if where == "archive":
        assert names == [planned.name]
    else:
        assert names == [planned.name, planned.name + ".reason.txt"]
    assert planned.read_bytes() == data


def test_a_file_of_other_bytes_at_the_recorded_name_is_not_adopted(tiny_model_dir, tmp_path):
    """The name holds a file of the same size but other bytes (another camera's image): it is
    left as it is, and the image archived under the next free name, as before."""
    config = daemon_config(tiny_model_dir, tmp_path, after="archive")
    source = config.watch / "a.png"
    data = png(3)
    source.write_bytes(data)
    planned = config.archive / "00000001_a.png"
    store = ResultStore(config.db)
    key = file_key(source, source.stat())  # as the daemon's hot folder will find it
    store.record_ok(Arrival(str(source), key, sha(data), len(data), time.time()), 0.1,
                    "f" * 64, {}, str(planned))  # fmt: skip
    store.close()
    planned.parent.mkdir()
    other = bytes(reversed(data))
    planned.write_bytes(other)
    assert EdgeDaemon(config).run() == 0
    [row] = image_rows(config.db)
    assert planned.read_bytes() == other and row["stored_path"] == str(
        config.archive / "00000001_a~1.png"
    )
    assert Path(row["stored_path"]).read_bytes() == data and not source.exists()


def test_the_same_bytes_on_the_same_file_system_are_another_images_not_adopted(
    tiny_model_dir, tmp_path
):
    """Two daemons sharing one archive on their own file system, the same frame (a black
    image) arriving at both under one name, each with its own row 1: the second to move finds
    the name taken by bytes equal to its own. On one file system a move is a link then an
    unlink, so that file is never this image's leftover: it is archived beside it as ~1.
    Before: taken as its own copy, the image deleted, two rows naming one file."""
    data = png(4)
    archive = tmp_path / "shared-archive"
    a = daemon_config(tiny_model_dir, tmp_path / "A", after="archive", archive_dir=archive)
    b = daemon_config(tiny_model_dir, tmp_path / "B", after="archive", archive_dir=archive)
    source = a.watch / "a.png"
    source.write_bytes(data)
    planned = archive / "00000001_a.png"
    store = ResultStore(a.db)  # A recorded its image under the free name, not moved yet
    store.record_ok(Arrival(str(source), file_key(source, source.stat()), sha(data), len(data),
                            time.time()), 0.1, "f" * 64, {}, str(planned))  # fmt: skip
    store.close()
    (b.watch / "a.png").write_bytes(data)
    assert EdgeDaemon(b).run() == 0  # B takes the name first
    assert image_rows(b.db)[0]["stored_path"] == str(planned)
    assert EdgeDaemon(a).run() == 0
    assert sorted(os.listdir(archive)) == ["00000001_a.png", "00000001_a~1.png"]
    assert image_rows(a.db)[0]["stored_path"] == str(archive / "00000001_a~1.png")


# ------------------------------------------------------- 4. status's last error; served again


def test_status_shows_the_last_error_whole(tmp_path, capsys):
    """A send error longer than 200 characters, its remedy at the end: shown to the end."""
    db = tmp_path / "edge.sqlite"
    store = ResultStore(db)
    arrival = Arrival("/hot/a.png", "a.png|1|1|1", "0" * 64, 1, time.time())
    image_id, _, _ = store.record_pending(arrival, 0.9, "r" * 64, b"x", "f" * 64, {}, None)
    error = ("UNAVAILABLE: failed to connect to all addresses; last error: UNKNOWN: "
             "ipv4:10.0.0.5:50051: Failed to connect to remote host: Connection refused "
             "(likely cause: the cloud is down or the firewall drops the port) " + "x" * 80
             + "; do: start the cloud, or check --cloud and the firewall")  # fmt: skip
    assert len(error) > 250
    store.retry_later(image_id, time.time() + 60, error)
    store.close()
    assert main(["edge", "status", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert f"last error: {error}" in out


def test_an_idle_edge_logs_when_the_cloud_serves_its_refused_export_again(
    tiny_model_dir, tmp_path, caplog, monkeypatch
):
    """The cloud serves another export: the start-up probe logs model_refused. The operator
    adds the edge's export (a folder reload on SIGHUP); the idle edge, which sends nothing,
    logs model_served_again within --retry-max. Before: nothing, ever."""
    from cloud_fixtures import shared_model_dir, start_cloud_process

    _, other_dir, other = shared_model_dir(0)
    edge_fingerprint = read_manifest(tiny_model_dir).fingerprint
    assert other.fingerprint != edge_fingerprint
    folder = tmp_path / "models"
    shutil.copytree(other_dir, folder / "other")
    cloud = start_cloud_process(other_dir, tmp_path / "cloud", "cloud", "--models-dir",
                                str(folder))  # fmt: skip
    try:
        config = daemon_config(tiny_model_dir, tmp_path, once=False, cloud=cloud.address,
                               retry_initial_s=0.1, retry_max_s=0.3)  # fmt: skip
        daemon = EdgeDaemon(config)
        with caplog.at_level(logging.DEBUG, logger="splitdet.edge"), running(daemon):

            def seen(event: str) -> list[dict]:
                return [e for e in events(caplog) if e.get("event") == event]

            [refused] = wait_for(lambda: seen("model_refused"), 30, "model_refused")
            assert refused["fingerprint"] == edge_fingerprint and refused["role"] == "current"
            time.sleep(1.0)  # a few probes while still refused: no line above DEBUG
            assert not seen("model_served_again")
            shutil.copytree(tiny_model_dir, folder / ".edge")  # a reload never meets half
            (folder / ".edge").rename(folder / "edge")
            cloud.process.send_signal(signal.SIGHUP)
            [again] = wait_for(lambda: seen("model_served_again"), 60, "model_served_again")
        assert again["fingerprint"] == edge_fingerprint and again["_level"] == logging.INFO
        assert edge_fingerprint in again["served"]
        assert len(seen("model_refused")) == 1  # the refusal was logged once
    finally:
        cloud.stop()


def test_an_edge_started_before_its_cloud_checks_once_the_cloud_answers(
    tiny_model_dir, tmp_path, caplog
):
    """After a power cut the edge boots before its cloud: the start-up probe met no cloud
    and was never made again, so a cloud that came up serving another export went unreported
    until the first defect (and `model_served_again` could never follow). Now an unreachable
    cloud is asked again every --retry-max, the first miss logged once."""
    from cloud_fixtures import shared_model_dir

    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig

    _, other_dir, other = shared_model_dir(0)
    with contextlib.closing(socket.socket()) as probe:  # a port nothing listens on, yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = daemon_config(tiny_model_dir, tmp_path, once=False, cloud=f"127.0.0.1:{port}",
                           retry_initial_s=0.1, retry_max_s=0.3)  # fmt: skip
    daemon = EdgeDaemon(config)
    with caplog.at_level(logging.DEBUG, logger="splitdet.edge"), running(daemon):

        def seen(event: str, level: int = logging.DEBUG) -> list[dict]:
            return [e for e in events(caplog) if e.get("event") == event and e["_level"] >= level]

        wait_for(lambda: seen("cloud_unreachable"), 30, "cloud_unreachable")
        time.sleep(1.0)  # several probes: the miss is logged once above DEBUG
        assert len(seen("cloud_unreachable", logging.WARNING)) == 1
        served = ServerConfig(model_dir=other_dir, listen=f"127.0.0.1:{port}", threads=1,
                              answers_db=tmp_path / "a.sqlite")  # fmt: skip
        server = CloudServer(served).start()
        try:
            [refused] = wait_for(lambda: seen("model_refused"), 30, "model_refused")
        finally:
            server.stop(0)
    assert refused["fingerprint"] == daemon.fingerprint and refused["role"] == "current"
    assert other.fingerprint != daemon.fingerprint
