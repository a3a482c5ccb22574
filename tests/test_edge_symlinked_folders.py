"""The edge daemon never writes, moves or deletes through a symbolic link inside --watch.

The camera's upload account may write --watch, and the daemon often runs as root: a link that
account puts in place of WATCH/archive or WATCH/quarantine (at start, or swapped in while the
daemon runs) would send images, reason files and the sweep's deletions anywhere on the
machine. Real files and folders, the real daemon in-process with a stand-in pipeline
(`BrightIsDefective`: no model), `splitdet edge run` for the start refusal.
"""

from __future__ import annotations

import os
import shutil
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


def defect_answer(image: Path) -> tuple[object, object]:
    """(the outbox item of `image`, the cloud's answer with one box): what the sender hands
    the annotate hook."""
    from splitdet.edge.client_answers import CloudDetections
    from splitdet.edge.store_types import OutboxItem

    item = OutboxItem(1, "req", b"", time.time(), 1, None, str(image), "f" * 64, None)
    answer = CloudDetections(
        request_id="req", fingerprint="f" * 64, boxes=np.array([[1.0, 1.0, 9.0, 9.0]]),
        scores=np.array([0.9]), labels=np.array([1]), class_names=("scratch",), timings={},
        cached=False,
    )  # fmt: skip
    return item, answer


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
    from splitdet.edge.sender import annotate_hook

    outside = outside_target(tmp_path)
    watch = tmp_path / "hot"
    (watch / "annotated").mkdir(parents=True)
    image = watch / "a.png"
    image.write_bytes(png(200))
    (watch / "annotated").rmdir()
    (watch / "annotated").symlink_to(outside, target_is_directory=True)
    hook = annotate_hook(watch / "annotated", watch=watch)
    hook(*defect_answer(image))
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


def swap_after_opening(monkeypatch, folder: Path, outside: Path, keep: Path) -> None:
    """Right after `file_moves.open_folder` first opens `folder` for a write (the check a
    write relies on), the camera's account renames it to `keep` and puts a link to `outside`
    in its place: the race a check, then a write by path, loses."""
    real, swapped = file_moves.open_folder, []

    def opened_then_swapped(path, watch, *args, **kwargs):
        fd = real(path, watch, *args, **kwargs)
        if not swapped and not args and os.path.abspath(path) == os.path.abspath(folder):
            swapped.append(path)  # (positional flags: the start-up sweep's listing, not a write)
            folder.rename(keep)
            folder.symlink_to(outside, target_is_directory=True)
        return fd

    monkeypatch.setattr(file_moves, "open_folder", opened_then_swapped)


def test_an_archive_swapped_for_a_link_after_its_check_does_not_receive_the_image(
    tmp_path, monkeypatch
):
    """The last reviewer won the race once in 56 images: the archive was checked, then the
    image moved by its path, through the link swapped in between. The image is now moved
    relative to the folder the check opened: it lands in that folder (renamed by the
    account), never outside."""
    outside, keep = outside_target(tmp_path), tmp_path / "archive.was"
    config = daemon_config(tmp_path, tmp_path, after="archive")
    (config.watch / "img.png").write_bytes(png(20))
    swap_after_opening(monkeypatch, config.watch / "archive", outside, keep)
    assert EdgeDaemon(config, pipeline=BrightIsDefective()).run() == 0
    assert os.listdir(outside) == []
    assert [p.name for p in keep.iterdir()] == ["00000001_img.png"]
    assert (keep / "00000001_img.png").read_bytes() == png(20)
    assert not (config.watch / "img.png").exists()


def test_a_quarantine_swapped_for_a_link_after_its_check_gets_no_reason_file_outside(
    tmp_path, monkeypatch
):
    """The reason file was written by its path after the check: through a link swapped in
    between, a file of the daemon's (root's) anywhere. It is now written relative to the
    folder the check opened; the move after it finds the link and fails, as any move into a
    link does, and the unreadable file stays in --watch."""
    outside, keep = outside_target(tmp_path), tmp_path / "quarantine.was"
    config = daemon_config(tmp_path, tmp_path)
    (config.watch / "payload.png").write_bytes(BROKEN)
    swap_after_opening(monkeypatch, config.watch / "quarantine", outside, keep)
    assert EdgeDaemon(config, pipeline=BrightIsDefective()).run() == 0
    assert os.listdir(outside) == []
    [reason] = keep.iterdir()
    assert reason.name.endswith(file_moves.REASON_SUFFIX) and reason.read_text().strip()
    assert (config.watch / "payload.png").read_bytes() == BROKEN


def test_an_annotated_folder_swapped_for_a_link_after_its_check_gets_the_image(
    tmp_path, monkeypatch
):
    """--save-annotated inside --watch: the annotated image was written by its path after
    the check. It is now written relative to the folder the check opened."""
    from splitdet.edge.sender import annotate_hook

    outside, keep = outside_target(tmp_path), tmp_path / "annotated.was"
    watch = tmp_path / "hot"
    (watch / "annotated").mkdir(parents=True)
    image = watch / "a.png"
    image.write_bytes(png(200))
    swap_after_opening(monkeypatch, watch / "annotated", outside, keep)
    hook = annotate_hook(watch / "annotated", watch=watch)
    hook(*defect_answer(image))
    assert os.listdir(outside) == []
    assert [p.name for p in keep.iterdir()] == ["00000001_a.jpg"]


def test_an_archive_outside_watch_turned_into_a_file_fails_the_move_and_the_daemon_goes_on(
    tmp_path, monkeypatch
):
    """An --archive outside --watch replaced by a file while the daemon runs: making it
    again raises FileExistsError, which a move must not take for "the name was taken
    meanwhile" (a draft of the move through the open folder did, and chose another name for
    good: the daemon spun, counted nothing, took no further image and ignored SIGTERM; a
    reviewer caught it). The move fails (counted, tried later), the next images are taken,
    and the daemon stops when told."""
    monkeypatch.setattr(after_actions, "MOVE_RETRY_INITIAL_S", 0.1)
    monkeypatch.setattr(after_actions, "MOVE_RETRY_MAX_S", 0.2)
    archive = tmp_path / "elsewhere" / "archive"
    config = daemon_config(tmp_path, tmp_path, after="archive", once=False, archive_dir=archive)
    watch = config.watch
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    with running(daemon):
        (watch / "one.png").write_bytes(png(20))
        wait_for(lambda: not (watch / "one.png").exists(), 30, "the first image archived")
        shutil.rmtree(archive)
        archive.write_text("a file now")
        (watch / "two.png").write_bytes(png(30))
        wait_for(lambda: moves_failed(daemon) >= 2, 30, "the move to fail, then again")
        (watch / "three.png").write_bytes(png(40))
        wait_for(lambda: len(image_rows(config.db)) == 3, 30, "the next image taken")
    assert (watch / "two.png").exists() and (watch / "three.png").exists()


def test_a_symbolic_link_moved_is_moved_as_a_link(tmp_path):
    """A performance review's note: the move through the open folder became linkat with
    AT_SYMLINK_FOLLOW where link(2) was used before, so a link handed to it would have put its
    target's file in the archive. A link is moved as it is, as before."""
    target_file = outside_target(tmp_path) / "real.png"
    target_file.write_bytes(png(20))
    link = tmp_path / "a.png"
    link.symlink_to(target_file)
    archive = tmp_path / "archive"
    archive.mkdir()
    file_moves.move_no_clobber(link, archive / "00000001_a.png")
    moved = archive / "00000001_a.png"
    assert moved.is_symlink() and os.readlink(moved) == str(target_file)
    assert target_file.read_bytes() == png(20) and not os.path.lexists(link)
