"""Processed images whose move failed, as a soak test left them (a review of the daemon as a line
engineer restarts it):

1. An image recorded by a run whose --archive (or --quarantine) filled, or whose mount went, is
   finished under the restarted daemon's settings: its row gets a path in the folder now
   configured (recorded before the file moves), and a folder the row named but the run does not
   is never written to, nor made again. Before: the images stayed in --watch for good, retrying
   the old folder (`cannot move file … to=…/arch2/…`), or the old folder was made again on the
   root disk (a mount gone) and the images archived there.
2. `edge status` counts the processed images whose file still waits in --watch to be moved or
   deleted, with the oldest's age, and points at the log's `cannot move file` lines. Before:
   pending 0, outbox empty, dead letters 0: nothing looked stuck.
3. A run with --after keep (the default: a one-off `edge run --once` on the same --db and
   --watch) leaves such an image as it is, row and file, told once: a later run with --after
   archive finishes it, and status still counts it meanwhile. Before: keep rewrote each row to
   its --watch path, stranding the image there for good (status no longer counted it).
4. `edge status` run by a user who may read --db but not look into --watch says so. Before: a
   path it could not stat counted as moved, a false "no processed image waiting".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import file_moves
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import store_status
from splitdet.shared.cli import main

from support import Killed, daemon_config, image_rows, killed, running, wait_for

CAMERA = [f"cam_{i:05d}.png" for i in range(3)]
BROKEN = "broken.png"


def _shot(path: Path, level: int) -> bytes:
    """A uniform grey PNG at `path`, written under a temporary name and renamed in."""
    Image.fromarray(np.full((64, 80), level, np.uint8)).save(path.with_suffix(".tmp"), "PNG")
    os.replace(path.with_suffix(".tmp"), path)
    return path.read_bytes()


def _camera_writes(watch: Path) -> dict[str, bytes]:
    """Three shots and one file that is not an image (quarantined), by name."""
    shots = {name: _shot(watch / name, 40 + 20 * i) for i, name in enumerate(CAMERA)}
    (watch / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\nthe camera wrote no more")
    return {**shots, BROKEN: (watch / BROKEN).read_bytes()}


def _folders_fail_once_started(daemon: EdgeDaemon, *folders: Path) -> None:
    """The daemon's archive and quarantine become unusable as it reads its first image (after
    it made them at its start): each is a file now, as good as a full disk for a move."""
    read = daemon.folder.read

    def break_them_then_read(candidate):
        for folder in folders:
            if folder.is_dir():
                shutil.rmtree(folder)
                folder.write_text("not a folder any more")
        return read(candidate)

    daemon.folder.read = break_them_then_read


def _stuck_first_run(model_dir: Path, tmp_path: Path, caplog) -> tuple[dict[str, bytes], Path]:
    """A --once run with --archive arch2 --quarantine quar2 whose moves all fail: every image
    recorded, every file still in --watch. Returns the files' bytes and the watch folder."""
    config = daemon_config(model_dir, tmp_path, after="archive", archive_dir=tmp_path / "arch2",
                           quarantine_dir=tmp_path / "quar2")  # fmt: skip
    files = _camera_writes(config.watch)
    daemon = EdgeDaemon(config)
    _folders_fail_once_started(daemon, config.archive, config.quarantine)
    with caplog.at_level(logging.INFO, logger="splitdet"):
        daemon.run()
    failed = [r.fields for r in caplog.records
              if getattr(r, "fields", {}).get("event") == "cannot move file"]  # fmt: skip
    assert len(failed) == len(files)
    assert sorted(p.name for p in config.watch.iterdir()) == sorted(files)
    rows = image_rows(config.db)
    assert len(rows) == len(files)
    assert all(Path(r["stored_path"]).parent.name in ("arch2", "quar2") for r in rows)
    return files, config.watch


def _restart(model_dir: Path, tmp_path: Path) -> EdgeDaemon:
    """The engineer's fix: the daemon run again with --archive arch --quarantine quar."""
    config = daemon_config(model_dir, tmp_path, after="archive", archive_dir=tmp_path / "arch",
                           quarantine_dir=tmp_path / "quar")  # fmt: skip
    return EdgeDaemon(config)


def _assert_finished_in_new_folders(tmp_path: Path, watch: Path, files: dict[str, bytes]) -> None:
    """Every file left --watch for arch (or quar), under the name its row records now."""
    assert not list(watch.iterdir())
    rows = image_rows(tmp_path / "edge.sqlite")
    assert len(rows) == len(files)  # nothing processed twice
    for row in rows:
        stored = Path(row["stored_path"])
        name = Path(row["path"]).name
        expected = "quar" if name == BROKEN else "arch"
        assert stored.parent == tmp_path / expected, row
        assert stored.name == file_moves.stored_name(row["id"], name)  # no ~N: nothing taken
        assert stored.read_bytes() == files[name]
        if name == BROKEN:
            assert file_moves.reason_path(stored).read_text().strip() == row["reason"]
    assert sorted(p.name for p in (tmp_path / "arch").iterdir()) == sorted(
        Path(r["stored_path"]).name for r in rows if Path(r["path"]).name != BROKEN
    )


@pytest.mark.parametrize("old_folders", ["still_full", "mount_gone"])
def test_a_restart_finishes_stuck_images_under_its_own_archive(
    tiny_model_dir, tmp_path, caplog, old_folders
):
    files, watch = _stuck_first_run(tiny_model_dir, tmp_path, caplog)
    if old_folders == "mount_gone":  # (the folders were on a mount that is gone: no folder)
        for name in ("arch2", "quar2"):
            (tmp_path / name).unlink()
    with caplog.at_level(logging.INFO, logger="splitdet"):
        assert _restart(tiny_model_dir, tmp_path).run() == 0
    _assert_finished_in_new_folders(tmp_path, watch, files)
    replanned = [
        r.fields
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == "replanned under this run's settings"
    ]
    assert len(replanned) == len(files)  # fmt: skip
    if old_folders == "mount_gone":  # never made again on the disk under the mount point
        assert not (tmp_path / "arch2").exists() and not (tmp_path / "quar2").exists()
    else:
        assert (tmp_path / "arch2").is_file() and (tmp_path / "quar2").is_file()


def test_a_restart_archives_into_its_own_folder_even_when_the_old_one_works_again(
    tiny_model_dir, tmp_path, caplog
):
    """The old archive usable again makes no difference: the run's --archive is the one; but a
    move a kill cut short, its file already placed in the old archive (a hard link not yet
    unlinked), is finished there, not archived a second time."""
    files, watch = _stuck_first_run(tiny_model_dir, tmp_path, caplog)
    for name in ("arch2", "quar2"):
        (tmp_path / name).unlink()
        (tmp_path / name).mkdir()
    rows = {Path(r["path"]).name: r for r in image_rows(tmp_path / "edge.sqlite")}
    placed = rows[CAMERA[0]]
    os.link(watch / CAMERA[0], placed["stored_path"])  # killed between link and unlink
    assert _restart(tiny_model_dir, tmp_path).run() == 0
    assert not list(watch.iterdir())
    after = {Path(r["path"]).name: r for r in image_rows(tmp_path / "edge.sqlite")}
    assert after[CAMERA[0]]["stored_path"] == placed["stored_path"]  # adopted where it was
    assert Path(placed["stored_path"]).read_bytes() == files[CAMERA[0]]
    assert [p.name for p in (tmp_path / "arch2").iterdir()] == [Path(placed["stored_path"]).name]
    assert not list((tmp_path / "quar2").iterdir())
    for name in CAMERA[1:]:
        stored = Path(after[name]["stored_path"])
        assert stored.parent == tmp_path / "arch" and stored.read_bytes() == files[name]
    assert Path(after[BROKEN]["stored_path"]).parent == tmp_path / "quar"


def test_a_crash_after_the_row_is_replanned_is_finished_by_the_next_start(
    tiny_model_dir, tmp_path, caplog, monkeypatch
):
    """The row names the new folder before the file moves: a kill in between leaves a row the
    next start finishes (the file moved once, under that name, no ~1)."""
    files, watch = _stuck_first_run(tiny_model_dir, tmp_path, caplog)

    with monkeypatch.context() as patch:
        patch.setattr(file_moves, "move_no_clobber", killed)
        with pytest.raises(Killed):
            _restart(tiny_model_dir, tmp_path).run()
    rows = image_rows(tmp_path / "edge.sqlite")
    assert sum(Path(r["stored_path"]).parent.name in ("arch", "quar") for r in rows) == 1
    assert sorted(p.name for p in watch.iterdir()) == sorted(files)
    assert _restart(tiny_model_dir, tmp_path).run() == 0
    _assert_finished_in_new_folders(tmp_path, watch, files)


def _status(db: Path, capsys, *extra: str) -> str:
    assert main(["edge", "status", "--db", str(db), *extra]) == 0
    return capsys.readouterr().out


def test_status_counts_processed_images_stuck_in_watch(tiny_model_dir, tmp_path, caplog, capsys):
    """A running daemon whose archive and quarantine fill: status says how many processed
    images wait in --watch, the oldest's age, and where to look; zero once they are moved."""
    folders = {"archive_dir": tmp_path / "arch2", "quarantine_dir": tmp_path / "quar2"}
    config = daemon_config(tiny_model_dir, tmp_path, after="archive", once=False, **folders)
    daemon = EdgeDaemon(config)
    _folders_fail_once_started(daemon, config.archive, config.quarantine)
    with caplog.at_level(logging.INFO, logger="splitdet"), running(daemon):
        files = _camera_writes(config.watch)

        def failed() -> int:
            return sum(getattr(r, "fields", {}).get("event") == "cannot move file"
                       for r in caplog.records)  # fmt: skip

        wait_for(lambda: failed() >= len(files), 30, "every move to fail")
        summary = json.loads(_status(config.db, capsys, "--json"))
        text = _status(config.db, capsys)
    stuck = summary["in_watch"]
    assert stuck["images"] == len(files)
    assert stuck["oldest_age_s"] is not None and stuck["oldest_age_s"] >= 0
    assert Path(stuck["oldest_path"]).parent == config.watch
    assert stuck["rows_checked"] == len(files) and stuck["rows_not_checked"] == 0
    assert summary["outbox"]["requests"] == 0 and summary["verdicts"]["pending"] == 0
    assert f"in --watch    {len(files)} processed images not yet archived" in text
    assert "`cannot move file`" in text

    with contextlib.closing(open_readonly(config.db)) as db:  # the bound: the newest rows only
        bounded = store_status(db, in_watch_rows=2)["in_watch"]
    assert (bounded["images"], bounded["rows_checked"], bounded["rows_not_checked"]) == (2, 2, 2)

    assert _restart(tiny_model_dir, tmp_path).run() == 0  # (--once: moved under arch, quar)
    summary = json.loads(_status(config.db, capsys, "--json"))
    assert summary["in_watch"]["images"] == 0 and summary["in_watch"]["oldest_age_s"] is None
    assert "in --watch    no processed image waiting to be moved or deleted" in _status(
        config.db, capsys
    )
    with contextlib.closing(sqlite3.connect(config.db)) as db:
        assert db.execute("SELECT COUNT(*) FROM images").fetchone()[0] == len(files)


def _events(caplog, event: str) -> list[dict]:
    return [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == event]


def test_a_keep_run_leaves_an_earlier_runs_stuck_images_for_a_later_archive_run(
    tiny_model_dir, tmp_path, caplog, capsys
):
    """Run 1 (--after archive) could not move its images; its archive is repaired; run 2 with
    the default --after keep runs for many polls: it keeps the files where they are and their
    rows as they are, says so once per file, processes nothing again; status still counts them;
    run 3 (--after archive) archives them where their rows say."""
    files, watch = _stuck_first_run(tiny_model_dir, tmp_path, caplog)
    for name in ("arch2", "quar2"):
        (tmp_path / name).unlink()
        (tmp_path / name).mkdir()
    planned = {r["id"]: r["stored_path"] for r in image_rows(tmp_path / "edge.sqlite")}
    caplog.clear()
    config = daemon_config(tiny_model_dir, tmp_path, once=False,
                           quarantine_dir=tmp_path / "quar2")  # fmt: skip
    assert config.after == "keep"
    daemon = EdgeDaemon(config)
    with caplog.at_level(logging.DEBUG, logger="splitdet"), running(daemon):
        wait_for(lambda: len(_events(caplog, "already recorded")) >= len(files), 30,
                 "the stuck images to be looked at")  # fmt: skip
        polls = daemon.folder.scan  # many polls more: nothing is taken or told again
        scans = []

        def counted_scan():
            scans.append(1)
            return polls()

        daemon.folder.scan = counted_scan
        wait_for(lambda: len(scans) >= 20, 30, "20 more polls")
    rows = image_rows(tmp_path / "edge.sqlite")
    assert len(rows) == len(files)  # nothing processed twice
    assert {r["id"]: r["stored_path"] for r in rows} == planned  # rows untouched
    assert not _events(caplog, "replanned under this run's settings")
    assert daemon.processed == 0
    left = _events(caplog, "left in --watch under --after keep")
    assert sorted(Path(e["path"]).name for e in left) == sorted(CAMERA)  # once each
    assert len(_events(caplog, "already recorded")) == len(files)  # the quarantined one too
    assert sorted(p.name for p in watch.iterdir()) == sorted(CAMERA)  # the quarantine is done
    summary = json.loads(_status(config.db, capsys, "--json"))
    assert summary["in_watch"]["images"] == len(CAMERA)

    caplog.clear()
    run3 = daemon_config(tiny_model_dir, tmp_path, after="archive", archive_dir=tmp_path / "arch2",
                         quarantine_dir=tmp_path / "quar2")  # fmt: skip
    with caplog.at_level(logging.INFO, logger="splitdet"):
        assert EdgeDaemon(run3).run() == 0
    assert not list(watch.iterdir())
    assert not _events(caplog, "replanned under this run's settings")
    for row in image_rows(tmp_path / "edge.sqlite"):
        assert row["stored_path"] == planned[row["id"]]
        assert Path(row["stored_path"]).read_bytes() == files[Path(row["path"]).name]
    assert json.loads(_status(config.db, capsys, "--json"))["in_watch"]["images"] == 0


@pytest.mark.parametrize(
    "blocked",
    [
        "loop",  # (any stat error but ENOENT and ENOTDIR: what root meets too)
        pytest.param(
            "no_search",
            marks=pytest.mark.skipif(os.geteuid() == 0, reason="root looks into any folder"),
        ),
    ],
)
def test_status_says_when_it_cannot_look_into_watch(tiny_model_dir, tmp_path, caplog, capsys,
                                                    blocked):  # fmt: skip
    """A --watch this user cannot look into (EACCES; here also ELOOP) is not taken for an
    empty one: status counts the rows it could not check and says so, never "none waiting"."""
    files, watch = _stuck_first_run(tiny_model_dir, tmp_path, caplog)
    db = tmp_path / "edge.sqlite"
    assert json.loads(_status(db, capsys, "--json"))["in_watch"]["images"] == len(files)
    if blocked == "loop":
        watch.rename(tmp_path / "hot.away")
        watch.symlink_to(watch.name)  # hot -> hot: every path below it gives ELOOP
    else:
        watch.chmod(0o600)  # listed by its owner, not entered
    try:
        stuck = json.loads(_status(db, capsys, "--json"))["in_watch"]
        text = _status(db, capsys)
    finally:
        if blocked != "loop":
            watch.chmod(0o755)
    assert stuck["images"] == 0 and stuck["rows_unreadable"] == len(files)
    assert Path(stuck["unreadable_path"]).parent == watch
    assert stuck["unreadable_error"]
    assert f"could not be looked into for {len(files)} processed images" in text
    assert "no processed image waiting" not in text


def test_prune_keeps_the_rows_of_files_it_cannot_look_at(tmp_path):
    """prune deletes a final row only once its file has left --watch (else the file would be
    processed again); a path it could not stat (EACCES for a user who may not look into --watch;
    here ELOOP) counted as gone, and its row went."""
    import time

    from splitdet.edge.file_identity import file_key
    from splitdet.edge.store import Arrival, OutboxCap, ResultStore

    watch = tmp_path / "hot"
    watch.mkdir()
    image = watch / "kept.png"
    image.write_bytes(b"an image kept in place")
    key = file_key(image, image.stat())
    store = ResultStore(tmp_path / "edge.sqlite", OutboxCap())
    try:
        store.record_ok(Arrival(str(image), key, "0" * 64, 22, time.time()), 0.1, "f" * 64, {},
                        stored_path=str(image))  # fmt: skip
        watch.rename(tmp_path / "hot.away")
        watch.symlink_to(watch.name)  # hot -> hot: every path below it gives ELOOP
        pruned = store.prune(time.time() + 60)
        assert pruned.deleted == 0 and pruned.kept_in_place == 1, pruned
    finally:
        store.close()


def test_a_long_undecodable_name_gone_from_watch_counts_as_gone(tmp_path):
    """A file name of undecodable bytes is stored escaped (each byte as \\xNN, four times as
    long): past 255 characters, a stat of that form fails with ENAMETOOLONG, which made its row
    'cannot be told' for good once the file had gone: never pruned, and a false alarm in edge
    status. A name too long for a file is no file there."""
    import os

    from splitdet.edge.file_identity import file_key, lies_there, path_text

    raw = os.fsencode(str(tmp_path)) + b"/" + b"\xe9" * 70 + b"_cam3.png"
    with open(raw, "wb") as file:
        file.write(b"an image")
    stored = path_text(os.fsdecode(raw))
    key = path_text(file_key(Path(os.fsdecode(raw)), os.stat(raw)))
    assert len(Path(stored).name) > 255 and lies_there(stored, key) is True
    os.unlink(raw)
    assert lies_there(stored, key) is False
