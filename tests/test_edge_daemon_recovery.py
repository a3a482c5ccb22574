"""The edge daemon recovering from what stops it short: a full outbox under --once with the
cloud down, kept results whose file goes later (--keep-results), an archive on another file
system that fills up or a kill mid-copy, and moves that fail for a while (a share read-only).

Real files, real SQLite, the real daemon (in-process, or `splitdet edge run` as a process); the
cloud address is a closed port, so flagged images stay pending. Where the model does not
matter, a stand-in pipeline flags bright images (`BrightIsDefective`).
"""

from __future__ import annotations

import contextlib
import errno
import io
import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_edge_daemon import BrightIsDefective

from splitdet.edge import after_actions, file_moves, result_pruner
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store import OutboxCap
from splitdet.shared.cli import main

from support import daemon_config, free_port, image_rows, running, wait_for

pytestmark = pytest.mark.timeout(240)

DAY = 86400.0
TESTS = Path(__file__).parent


def png(level: int, size: tuple[int, int] = (24, 32)) -> bytes:
    """A PNG of one grey level (distinct levels: distinct files and request ids)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_png(seed: int = 0) -> bytes:
    """A PNG that compresses badly: large enough for a copy to fail half way through."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 60, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def scrape(port: int) -> dict[str, float]:
    """The daemon's Prometheus endpoint -> {"name{labels}": value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        key: float(value)
        for key, _, value in (line.rpartition(" ") for line in text.splitlines())
        if key and not key.startswith("#")
    }


def sample(metric, name: str, **labels: str) -> float | None:
    """One sample of one metric of the daemon's (not the whole registry: its store gauges
    need the database, closed once the daemon has stopped)."""
    for family in metric.collect():
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


# ------------------------------------------------------- 1. --once, outbox full, cloud down


def test_once_with_a_full_outbox_and_the_cloud_down_exits_after_the_drain_timeout(
    tiny_model_dir, tmp_path
):
    """Before: `outbox full, waiting`, then a hang for good, --drain-timeout ignored."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    images = {f"{i}.png": png(40 + 40 * i) for i in range(5)}
    for name, data in images.items():  # in this arrival order (distinct modification times)
        (watch / name).write_bytes(data)
        time.sleep(0.02)
    command = [
        sys.executable, "-m", "splitdet.shared.cli", "edge", "run", "--model", tiny_model_dir,
        "--watch", watch, "--db", db, "--cloud", f"127.0.0.1:{free_port()}", "--once",
        "--drain-timeout", "2", "--outbox-max-items", "2", "--threshold", "0", "--threads", "1",
        "--settle", "0.05", "--retry-initial", "0.1", "--retry-max", "0.5", "--log-format", "text",
    ]  # fmt: skip
    start = time.monotonic()
    done = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=150,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert time.monotonic() - start < 120
    table = image_rows(db)
    assert [(Path(r["path"]).name, r["verdict"]) for r in table] == [
        ("0.png", "pending"), ("1.png", "pending"),
    ]  # fmt: skip
    for name in ("2.png", "3.png", "4.png"):  # untouched, no row: the next run takes them
        assert (watch / name).read_bytes() == images[name]
    assert "3 image(s) left untouched in --watch" in done.stderr
    assert "--drain-timeout 2s" in done.stderr
    [stopped] = [line for line in done.stderr.splitlines() if "splitdet.edge: stopped " in line]
    assert "processed=2" in stopped


# ------------------------------------------------------- 5. images not recorded, not counted


def test_an_image_left_for_want_of_outbox_room_is_not_counted(tmp_path):
    """Before: `stopped processed=2` and two images in the stage histogram, one recorded."""
    config = daemon_config(
        tmp_path, tmp_path, after="delete", outbox=OutboxCap(max_items=1),
        drain_timeout_s=0.2, retry_initial_s=5, retry_max_s=5,
    )  # fmt: skip
    for i, level in enumerate((250, 240)):  # both flagged: the second finds the outbox full
        (config.watch / f"{i}.png").write_bytes(png(level))
        time.sleep(0.02)
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    assert daemon.run() == 1
    assert [r["verdict"] for r in image_rows(config.db)] == ["pending"]
    assert sorted(p.name for p in config.watch.iterdir()) == ["1.png", "quarantine"]
    assert daemon.processed == 1
    metrics = daemon.metrics
    assert sample(metrics.stage_seconds, "splitdet_edge_stage_seconds_count", stage="image") == 1
    assert sample(metrics.images, "splitdet_edge_images_total", verdict="pending") == 1


# ------------------------------------------------------- 2. the hourly prune revisits rows


def test_a_kept_result_goes_once_its_file_is_removed_while_the_daemon_runs(tmp_path, monkeypatch):
    """--after keep --keep-results: a result kept by a prune because its image lay in --watch
    goes at a later prune once the image is removed. Before: the prune's resume mark had
    passed it, and it stayed until a restart."""
    monkeypatch.setattr(result_pruner, "PRUNE_EVERY_S", 0.1)
    config = daemon_config(tmp_path, tmp_path, once=False, keep_results_s=30 * DAY)
    image = config.watch / "a.png"
    image.write_bytes(png(20))  # dark: ok
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    real_prune, prunes = daemon.store.prune, []

    def counted_prune(*args, **kwargs):
        pruned = real_prune(*args, **kwargs)
        prunes.append(pruned)
        return pruned

    daemon.store.prune = counted_prune
    with running(daemon):
        [row] = wait_for(lambda: image_rows(config.db), 20, "the image's row")
        with contextlib.closing(sqlite3.connect(config.db)) as conn:  # as if 40 days ago
            # (by the boot clock too: a row only the wall clock calls old is kept)
            conn.execute("UPDATE images SET finished = ?, finished_boot_s = finished_boot_s - ?"
                         " WHERE id = ?",
                         (time.time() - 40 * DAY, 40 * DAY, row["id"]))  # fmt: skip
            conn.commit()
        seen = len(prunes)
        wait_for(lambda: len(prunes) >= seen + 2, 20, "two prunes of the aged row")
        assert [r["id"] for r in image_rows(config.db)] == [row["id"]]  # kept: file there
        image.unlink()  # the operator clears the hot folder
        wait_for(lambda: not image_rows(config.db), 20, "the kept result to be pruned")


# ------------------------------------------------------- 3. an archive on another disk


def _crossing(folder: Path, src, dst, src_dir_fd=None, dst_dir_fd=None, **_) -> bool:
    """Whether a link or rename from `src` to `dst` (names in the folders open as the dir fds,
    if given, as os.link's and os.rename's) crosses `folder`'s border."""
    paths = [
        os.path.join(os.readlink(f"/proc/self/fd/{fd}"), p) if fd is not None else p
        for p, fd in ((src, src_dir_fd), (dst, dst_dir_fd))
    ]
    inside = [Path(os.path.abspath(p)).is_relative_to(folder) for p in paths]
    return inside[0] != inside[1]


def refuse_links_into(folder: Path) -> None:
    """Make `folder` behave as another file system: os.link and os.rename across its border
    fail with EXDEV (for when no tmpfs is at hand)."""
    real_link, real_rename = os.link, os.rename

    def link(src, dst, *args, **kwargs):
        if _crossing(folder, src, dst, **kwargs):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real_link(src, dst, *args, **kwargs)

    def rename(src, dst, *args, **kwargs):
        if _crossing(folder, src, dst, **kwargs):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
        return real_rename(src, dst, *args, **kwargs)

    os.link, os.rename = link, rename


@pytest.fixture
def other_disk(tmp_path, monkeypatch):
    """(a folder on another file system than tmp_path, simulated): a folder in /dev/shm when
    that is another file system (tmpfs), else one os.link and os.rename cannot cross into."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        folder = Path(tempfile.mkdtemp(prefix="splitdet-test-", dir=shm))
        yield folder, False
        shutil.rmtree(folder, ignore_errors=True)
        return
    folder = tmp_path / "other_disk"
    folder.mkdir()
    monkeypatch.setattr(os, "link", os.link)  # restored after the test
    monkeypatch.setattr(os, "rename", os.rename)
    refuse_links_into(folder)
    yield folder, True


def archive_run_args(model_dir: Path, watch: Path, db: Path, archive: Path) -> list[str]:
    """`splitdet edge run --once` arguments that archive every image of `watch` into `archive`
    as ok (threshold 2), no cloud to reach."""
    return ["edge", "run", "--model", str(model_dir), "--watch", str(watch), "--db", str(db),
            "--cloud", "127.0.0.1:9", "--once", "--drain-timeout", "0", "--threshold", "2",
            "--threads", "1", "--settle", "0.05", "--after", "archive", "--archive", str(archive),
            "--log-format", "text"]  # fmt: skip


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_an_archive_disk_filling_up_leaves_no_partial_file_and_the_move_is_retried(
    tmp_path, other_disk, monkeypatch
):
    """The copy onto the archive's file system fails half way (ENOSPC): nothing under the
    archive name, no temporary file left, the image still in --watch; the move is counted,
    tried again after a backoff while the daemon runs, and succeeds once there is room.
    Before: a truncated file under the archive name, for good, and the image archived beside
    it as ~1 after a restart."""
    folder, _ = other_disk
    archive = folder / "archive"
    monkeypatch.setattr(after_actions, "MOVE_RETRY_INITIAL_S", 0.2)
    monkeypatch.setattr(after_actions, "MOVE_RETRY_MAX_S", 0.4)
    image, data = tmp_path / "hot" / "a.png", noise_png()
    real_copy, attempts, seen = shutil.copyfileobj, [], []

    def disk_full_twice(source, copy, *args):
        attempts.append(time.monotonic())
        writing = os.fstat(copy.fileno()).st_ino  # (the try's own partial file: not counted)
        left = [n for n in os.listdir(archive) if (archive / n).lstat().st_ino != writing]
        seen.append((sorted(left), Path(source.name).read_bytes() == data))
        if len(attempts) > 2:
            return real_copy(source, copy, *args)
        copy.write(data[: len(data) // 2])  # then the disk is full
        copy.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "archive")

    monkeypatch.setattr(shutil, "copyfileobj", disk_full_twice)
    config = daemon_config(tmp_path, tmp_path, once=False, after="archive", archive_dir=archive,
                           metrics_port=0, metrics_host="127.0.0.1")  # fmt: skip
    image.write_bytes(data)
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    with running(daemon):
        wait_for(lambda: not image.exists(), 20, "the move to be retried and succeed")
        assert scrape(daemon.metrics_port)['splitdet_edge_errors_total{kind="move"}'] == 2
    # before each try: no partial file under any name, the image whole where it arrived
    assert seen == [([], True)] * 3
    assert len(attempts) == 3 and attempts[2] - attempts[1] >= 0.35  # the backoff doubled
    [row] = image_rows(config.db)
    assert os.listdir(archive) == [Path(row["stored_path"]).name] == ["00000001_a.png"]
    assert (archive / "00000001_a.png").read_bytes() == data


KILLED_MID_COPY = """
import os, shutil, signal, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
if sys.argv[2]:  # no tmpfs: the archive folder behaves as another file system
    from test_edge_daemon_recovery import refuse_links_into

    refuse_links_into(Path(sys.argv[2]))

def half_then_killed(source, copy, *args):
    data = source.read()
    copy.write(data[: len(data) // 2])
    copy.flush()
    os.kill(os.getpid(), signal.SIGKILL)

shutil.copyfileobj = half_then_killed
from splitdet.shared.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_kill_mid_copy_to_an_archive_disk_leaves_only_a_hidden_partial_swept_at_start(
    tiny_model_dir, tmp_path, other_disk
):
    """kill -9 while the image is copied onto the archive's file system: the archive shows no
    file under the image's name (only a hidden .splitdet-partial one), the next start removes
    that and archives the image under its name. Before: a truncated 00000001_a.png for good,
    and the image archived beside it as 00000001_a~1.png."""
    folder, simulated = other_disk
    archive = folder / "archive"
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    data = noise_png(1)
    (watch / "a.png").write_bytes(data)
    args = archive_run_args(tiny_model_dir, watch, db, archive)
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_COPY, str(TESTS), str(folder) if simulated else "",
         *args],
        capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert visible(archive) == []  # nothing that looks archived
    [partial] = os.listdir(archive)
    assert partial.startswith(".00000001_a.png.") and partial.endswith(".splitdet-partial")
    stale = archive / ".00000009_gone.png.0123abcd.splitdet-partial"  # its image gone since
    stale.write_bytes(b"half")
    (archive / ".not-ours").write_bytes(b"left alone")
    time.sleep(1.1)  # (the sweep spares what changed in the second before the start)

    assert main(args) == 0
    assert sorted(os.listdir(archive)) == [".not-ours", "00000001_a.png"]
    assert (archive / "00000001_a.png").read_bytes() == data
    [row] = image_rows(db)
    assert row["stored_path"] == str(archive / "00000001_a.png") and not (watch / "a.png").exists()


def test_a_move_across_file_systems_never_replaces_a_file(tmp_path, other_disk):
    """move_no_clobber onto another file system: a name taken is FileExistsError, the file
    there and the source unchanged, no temporary file left."""
    from splitdet.edge.file_moves import move_no_clobber

    folder, _ = other_disk
    source, target = tmp_path / "a.png", folder / "a.png"
    source.write_bytes(b"new")
    target.write_bytes(b"already here")
    with pytest.raises(FileExistsError):
        move_no_clobber(source, target)
    assert os.listdir(folder) == ["a.png"] and target.read_bytes() == b"already here"
    assert source.read_bytes() == b"new"
    target.unlink()
    move_no_clobber(source, target)
    assert os.listdir(folder) == ["a.png"] and target.read_bytes() == b"new"
    assert not source.exists()


def test_a_longest_stored_name_is_copied_across_file_systems(tmp_path, other_disk):
    """A stored name may be STORED_NAME_MAX (230) bytes; its temporary name added 27 and
    passed the 255-byte limit: every move of such an image failed (ENAMETOOLONG)."""
    from splitdet.edge.file_moves import STORED_NAME_MAX, move_no_clobber, partial_path

    folder, _ = other_disk
    name = "é" * ((STORED_NAME_MAX - 4) // 2) + ".png"  # two bytes a character: cut inside one
    assert len(name.encode()) <= STORED_NAME_MAX
    source, target = tmp_path / "a.png", folder / name
    source.write_bytes(b"image")
    assert len(os.fsencode(partial_path(target).name)) <= 255
    move_no_clobber(source, target)
    assert os.listdir(folder) == [name] and target.read_bytes() == b"image"


def test_a_copy_whose_source_cannot_be_removed_is_taken_back(tmp_path, other_disk, monkeypatch):
    """Onto another disk, from a folder that refuses removals (append-only, a share without
    delete rights): the copy stayed under the target name, each retry found the name taken,
    copied again under NAME~1, ~2... Now the copy is taken back and the error raised."""
    from splitdet.edge.file_moves import move_no_clobber

    folder, _ = other_disk
    source, target = tmp_path / "a.png", folder / "a.png"
    source.write_bytes(b"image")
    real_unlink = Path.unlink

    def refuse_source(self, *args, **kwargs):
        if self == source:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(self))
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", refuse_source)
    for _ in range(2):  # as the retries would
        with pytest.raises(PermissionError):
            move_no_clobber(source, target)
        assert os.listdir(folder) == [] and source.read_bytes() == b"image"


# ------------------------------------------------------- 4. moves retried while running


def test_a_quarantine_move_refused_for_a_while_is_retried_and_counted(tmp_path, monkeypatch):
    """A share refusing writes for a few seconds (EROFS): the unreadable file is moved once it
    accepts them again, while the daemon runs; each failure counts in
    splitdet_edge_errors_total{kind="move"}, which is there at 0 from the start. Before: the
    file was passed over until it changed or the daemon restarted, and nothing counted it."""
    monkeypatch.setattr(after_actions, "MOVE_RETRY_INITIAL_S", 0.1)
    monkeypatch.setattr(after_actions, "MOVE_RETRY_MAX_S", 0.2)
    real_move, refused = file_moves.move_no_clobber, []

    def read_only_for_a_while(source, target, *args):
        if len(refused) < 3:
            refused.append(time.monotonic())
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(target))
        real_move(source, target, *args)

    monkeypatch.setattr(file_moves, "move_no_clobber", read_only_for_a_while)
    config = daemon_config(tmp_path, tmp_path, once=False, metrics_port=0,
                           metrics_host="127.0.0.1")  # fmt: skip
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    with running(daemon):
        wait_for(lambda: daemon.metrics_port, 20, "the metrics endpoint")
        assert scrape(daemon.metrics_port)['splitdet_edge_errors_total{kind="move"}'] == 0
        broken = config.watch / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        wait_for(lambda: not broken.exists(), 20, "the quarantine move to succeed")
        assert scrape(daemon.metrics_port)['splitdet_edge_errors_total{kind="move"}'] == 3
    gaps = [b - a for a, b in itertools.pairwise(refused)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # 0.1 s, then doubled to the 0.2 s cap
    [row] = image_rows(config.db)
    assert Path(row["stored_path"]).read_bytes().startswith(b"\x89PNG")
    assert row["error_kind"] == "quarantine"


def test_once_leaves_a_file_it_could_not_move_for_the_next_run(tmp_path, monkeypatch):
    """--once does not wait to retry a failed move: it counts it, exits, and the next run
    moves the file (its row is not written again)."""
    real_move = file_moves.move_no_clobber

    def refused(source, target, *args):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    config = daemon_config(tmp_path, tmp_path, after="archive")
    (config.watch / "a.png").write_bytes(png(20))
    monkeypatch.setattr(file_moves, "move_no_clobber", refused)
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    assert daemon.run() == 0
    assert sample(daemon.metrics.errors, "splitdet_edge_errors_total", kind="move") == 1
    assert (config.watch / "a.png").exists()
    monkeypatch.setattr(file_moves, "move_no_clobber", real_move)
    assert EdgeDaemon(config, pipeline=BrightIsDefective()).run() == 0
    [row] = image_rows(config.db)
    assert Path(row["stored_path"]).is_file() and not (config.watch / "a.png").exists()


def test_a_write_or_copy_that_fails_names_its_paths(tmp_path, small_disk):
    """A review: the moves and reason files made relative to the open folder failed with
    "[Errno 28] No space left on device" and no path, or only the bare temporary name; the
    error (logged as `cannot move file`, `cannot write reason file`) names them again."""
    from splitdet.edge.file_moves import move_no_clobber, write_in_folder

    (small_disk / "filler").write_bytes(b"\0" * (1 << 20))
    with pytest.raises(OSError) as failed:
        write_in_folder(small_disk / "a.reason.txt", b"x" * (2 << 20), None)
    assert failed.value.errno == errno.ENOSPC
    assert str(small_disk / ".a.reason.txt.") in str(failed.value), failed.value
    assert os.listdir(small_disk) == ["filler"]  # nothing left beside it

    source = tmp_path / "big.png"
    source.write_bytes(b"y" * (2 << 20))
    with pytest.raises(OSError) as failed:
        move_no_clobber(source, small_disk / "00000001_big.png")  # (another file system)
    assert failed.value.errno == errno.ENOSPC
    text = str(failed.value)
    assert f"'{source}' -> '{small_disk}/.00000001_big.png." in text, text
    assert os.listdir(small_disk) == ["filler"] and source.is_file()
