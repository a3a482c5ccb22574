"""The edge daemon never writes, moves or deletes through a symbolic link inside --watch.

The camera's upload account may write --watch, and the daemon often runs as root: a link that
account puts in place of WATCH/archive or WATCH/quarantine (at start, or swapped in while the
daemon runs) would send images, reason files and the sweep's deletions anywhere on the
machine. Real files and folders, the real daemon in-process with a stand-in pipeline
(`BrightIsDefective`: no model), `splitdet edge run` for the start refusal.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_edge_daemon import BrightIsDefective
from test_edge_daemon_faults import png

from splitdet.edge import after_actions, file_moves
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.partial_sweep import start_partial_sweep
from splitdet.shared.cli import main

from support import daemon_config, image_rows, running, wait_for

pytestmark = pytest.mark.timeout(120)

BROKEN = b"\x89PNG\r\n\x1a\n not really a png"


def outside_target(tmp_path: Path) -> Path:
    """A folder outside --watch the camera's account must never get the daemon to write in."""
    outside = tmp_path / "outside" / "rootonly"
    outside.mkdir(parents=True)
    return outside


def moves_failed(daemon: EdgeDaemon) -> float:
    """splitdet_edge_errors_total{kind="move"} of a running daemon."""
    for family in daemon.metrics.errors.collect():
        for found in family.samples:
            if found.name == "splitdet_edge_errors_total" and found.labels == {"kind": "move"}:
                return found.value
    return 0.0


def test_links_in_place_of_the_archive_and_quarantine_refuse_the_start(tmp_path, capsys):
    """The reviewer's reproduction: WATCH/archive and WATCH/quarantine links to a folder
    outside. Before: the image was archived and the unreadable file quarantined (with a reason
    file) in that folder. Now the start is refused (exit 2), naming the folder and the
    remedy, and nothing lands outside."""
    outside = outside_target(tmp_path)
    watch = tmp_path / "hot"
    watch.mkdir()
    for name in ("archive", "quarantine"):
        (watch / name).symlink_to(outside, target_is_directory=True)
    (watch / "img.png").write_bytes(png(20))
    (watch / "payload.png").write_bytes(BROKEN)

    with pytest.raises(ValueError, match="symbolic link inside --watch") as refused:
        EdgeDaemon(daemon_config(tmp_path, tmp_path, after="archive"), BrightIsDefective())
    assert "\n" not in str(refused.value)

    status = main(["edge", "run", "--model", str(tmp_path / "model"), "--watch", str(watch),
                   "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9", "--once",
                   "--after", "archive", "--unreadable-grace", "0",
                   "--log-format", "text"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    [line] = [x for x in err.splitlines() if "error:" in x]
    assert f"--quarantine {watch / 'quarantine'} is a symbolic link inside --watch" in line
    assert "remove the link" in line and "give --quarantine a folder outside --watch" in line
    assert os.listdir(outside) == []
    assert sorted(os.listdir(watch)) == ["archive", "img.png", "payload.png", "quarantine"]


def test_a_link_on_the_way_to_an_explicit_folder_in_watch_is_refused(tmp_path):
    """--archive WATCH/day/archive with WATCH/day a link: refused too (the account could
    change it at any time); the message names the link."""
    outside = outside_target(tmp_path)
    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "day").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=f"leads through {watch / 'day'}, a symbolic link"):
        daemon_config(tmp_path, tmp_path, after="archive", archive_dir=watch / "day" / "a")
    assert os.listdir(outside) == []


def test_an_archive_given_as_a_link_outside_watch_is_followed(tmp_path):
    """An admin's --archive outside --watch that is a link (to a mount) stays allowed."""
    real = tmp_path / "mount" / "archive"
    real.mkdir(parents=True)
    link = tmp_path / "archive"
    link.symlink_to(real, target_is_directory=True)
    config = daemon_config(tmp_path, tmp_path, after="archive", archive_dir=link)
    (config.watch / "a.png").write_bytes(png(20))
    assert EdgeDaemon(config, pipeline=BrightIsDefective()).run() == 0
    [row] = image_rows(config.db)
    assert os.listdir(real) == [Path(row["stored_path"]).name]


def test_links_swapped_in_while_running_are_not_followed(tmp_path, monkeypatch):
    """WATCH/archive and WATCH/quarantine replaced by links while the daemon runs. Before:
    the next image was archived and the next unreadable file quarantined through them. Now
    each move fails (counted, logged naming the link), the files stay in --watch, and they
    are moved once real folders are back, as any failed move is retried."""
    monkeypatch.setattr(after_actions, "MOVE_RETRY_INITIAL_S", 0.1)
    monkeypatch.setattr(after_actions, "MOVE_RETRY_MAX_S", 0.2)
    outside = outside_target(tmp_path)
    config = daemon_config(tmp_path, tmp_path, after="archive", once=False)
    watch, archive, quarantine = config.watch, config.archive, config.quarantine
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    with running(daemon):
        (watch / "first.png").write_bytes(png(20))
        wait_for(lambda: not (watch / "first.png").exists(), 30, "the first image archived")
        archive.rename(tmp_path / "archive.was")
        for folder in (archive, quarantine):
            if folder.exists():
                folder.rmdir()
            folder.symlink_to(outside, target_is_directory=True)
        (watch / "img.png").write_bytes(png(30))
        (watch / "payload.png").write_bytes(BROKEN)
        wait_for(lambda: moves_failed(daemon) >= 4, 30, "both moves to fail, then again")
        assert os.listdir(outside) == []
        assert (watch / "img.png").exists() and (watch / "payload.png").exists()
        for folder in (archive, quarantine):
            folder.unlink()
        wait_for(
            lambda: not (watch / "img.png").exists() and not (watch / "payload.png").exists(),
            30,
            "the moves retried into real folders",
        )
    assert os.listdir(outside) == []
    rows = {Path(r["path"]).name: Path(r["stored_path"]) for r in image_rows(config.db)}
    assert rows["img.png"].parent == archive and rows["img.png"].is_file()
    assert rows["payload.png"].parent == quarantine and rows["payload.png"].is_file()
    assert file_moves.reason_path(rows["payload.png"]).is_file()


def test_a_link_swapped_in_between_the_check_and_the_start_is_not_followed(tmp_path):
    """A review: the settings were checked, then the daemon made its folders absolute with
    resolve(), which followed a link put in place of WATCH/archive in between: the archive
    became the link's target, outside --watch, for the whole run (and, resolved, was never
    looked at as a folder inside --watch again). Folders inside --watch are now kept as
    --watch resolved joined with their names: the link is found, and the start refused."""
    outside = outside_target(tmp_path)
    config = daemon_config(tmp_path, tmp_path, after="archive")  # (checked: no link yet)
    (config.watch / "archive").symlink_to(outside, target_is_directory=True)
    (config.watch / "a.png").write_bytes(png(20))
    with pytest.raises(ValueError, match="symbolic link inside --watch"):
        EdgeDaemon(config, pipeline=BrightIsDefective()).run()
    assert os.listdir(outside) == []
    assert (config.watch / "a.png").exists()


def test_an_annotated_folder_swapped_for_a_link_is_not_written_through(tmp_path):
    """A review: --save-annotated inside --watch was checked at start only, and the annotated
    images were then written through a link swapped in for it. Each one now checks the folder
    first: not written (annotate_failed), the result stored all the same."""
    from splitdet.edge.client_answers import CloudDetections
    from splitdet.edge.sender import annotate_hook
    from splitdet.edge.store_types import OutboxItem

    outside = outside_target(tmp_path)
    watch = tmp_path / "hot"
    (watch / "annotated").mkdir(parents=True)
    image = watch / "a.png"
    image.write_bytes(png(200))
    (watch / "annotated").rmdir()
    (watch / "annotated").symlink_to(outside, target_is_directory=True)
    hook = annotate_hook(watch / "annotated", watch=watch)
    item = OutboxItem(1, "req", b"", time.time(), 1, None, str(image), "f" * 64, None)
    answer = CloudDetections(
        request_id="req", fingerprint="f" * 64, boxes=np.array([[1.0, 1.0, 9.0, 9.0]]),
        scores=np.array([0.9]), labels=np.array([1]), class_names=("scratch",), timings={},
        cached=False,
    )  # fmt: skip
    hook(item, answer)
    assert os.listdir(outside) == []


def test_check_folder_refuses_a_link_anywhere_below_watch(tmp_path):
    """check_folder right before each write: a link anywhere from --watch down to the
    folder is refused (LinkedFolder, an OSError naming it), a real folder passes, and a
    folder outside --watch is opened as its path says."""
    outside = outside_target(tmp_path)
    watch = tmp_path / "hot"
    (watch / "day").mkdir(parents=True)
    file_moves.check_folder(watch / "day" / "archive", watch, create=True)
    assert (watch / "day" / "archive").is_dir()
    (watch / "day" / "archive").rmdir()
    (watch / "day").rmdir()
    (watch / "day").symlink_to(outside, target_is_directory=True)
    with pytest.raises(file_moves.LinkedFolder, match=f"{watch / 'day'} is a symbolic link"):
        file_moves.check_folder(watch / "day" / "archive", watch, create=True)
    assert os.listdir(outside) == []
    file_moves.check_folder(watch / "day", tmp_path / "elsewhere")  # (outside it: followed)


def test_the_sweep_does_not_follow_a_link_swapped_in_for_the_archive(tmp_path):
    """The start-up sweep of partial copies, WATCH/archive a link to a folder outside by the
    time it lists it. Before: it deleted outside/.victim.splitdet-partial through the link.
    Now that folder is not swept (logged); a real quarantine's partial copy still is."""
    outside = outside_target(tmp_path)
    config = daemon_config(tmp_path, tmp_path, after="archive")
    victim = outside / ".victim.splitdet-partial"
    victim.write_bytes(b"someone else's")
    config.archive.symlink_to(outside, target_is_directory=True)
    config.quarantine.mkdir()
    stale = config.quarantine / ".00000001_a.png.0123abcd.splitdet-partial"
    stale.write_bytes(b"half")
    time.sleep(1.1)  # (the sweep spares what changed in the second before the start)
    start_partial_sweep(config, threading.Event()).join(30)
    assert victim.read_bytes() == b"someone else's"
    assert not stale.exists()
