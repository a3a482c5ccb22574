"""The edge daemon's hot folder against a file system review (third round): an image rewritten
in place under its very file key between its read and its move, output folders that are
--watch seen through another mount or a link swapped in, links that loop, control characters
in file names (`edge status`, text logs), and --watch or --archive naming something other than
a folder.

Real files and folders, the real daemon in-process with a stand-in pipeline
(`BrightIsDefective`: no model), `splitdet edge run` / `edge status` in-process for messages.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_edge_daemon import BrightIsDefective

from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.daemon_config import check_paths

from support import daemon_config, image_rows, wait_for

pytestmark = pytest.mark.timeout(60)


def bmp(level: int) -> bytes:
    """A uniform grey 8x8 BMP: every level gives a file of the same size (a fixed-size frame)."""
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(buffer, format="BMP")
    return buffer.getvalue()


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Write `data` (of the file's size) over `path` in place, its modification time set back:
    the same name, size, mtime and inode (a fixed-size frame, `cp -p`); only its ctime moves."""
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns  # (the one trace the rewrite leaves)


class RewrittenWhileProcessed(BrightIsDefective):
    """The stand-in pipeline; while it processes the first image, the camera rewrites that
    image's file in place with other bytes of the same size and the same times."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path, self.data, self.done = path, data, False

    def process_array(self, image: np.ndarray):
        if not self.done:
            self.done = True
            rewrite_in_place(self.path, self.data)
        return super().process_array(image)


# ------------------------------------------------- 1. rewritten in place between read and move


@pytest.mark.parametrize("after", ["delete", "archive"])
def test_a_file_rewritten_in_place_under_its_key_before_its_move_is_a_new_arrival(tmp_path, after):
    """--after delete deleted the new bytes unread (no row, no line); --after archive archived
    them under the old bytes' row. Now the row of the bytes read keeps no file, and the new
    bytes get their own row, then are deleted or archived under it."""
    archive = tmp_path / "archive"
    config = daemon_config(tmp_path, tmp_path, after=after, archive_dir=archive)
    shot = config.watch / "frame.bmp"
    first, second = bmp(30), bmp(40)
    shot.write_bytes(first)
    os.utime(shot, ns=(1_700_000_000_000_000_000,) * 2)  # whole seconds, as `cp -p` sets
    daemon = EdgeDaemon(config, pipeline=RewrittenWhileProcessed(shot, second))
    assert daemon.run() == 0
    rows = image_rows(config.db)
    digests = [hashlib.sha256(data).hexdigest() for data in (first, second)]
    assert [r["content_hash"] for r in rows] == digests  # each version once, in order
    assert rows[0]["stored_path"] is None  # its bytes were overwritten: no file is its
    assert not shot.exists()
    if after == "archive":
        (kept,) = archive.iterdir()
        assert Path(rows[1]["stored_path"]) == kept and kept.read_bytes() == second


def test_a_file_only_chmoded_between_read_and_move_is_moved_under_its_row(tmp_path):
    """Its ctime changed, its contents did not: compared once, then deleted as its row says
    (no second row)."""
    config = daemon_config(tmp_path, tmp_path, after="delete")
    shot = config.watch / "frame.bmp"
    shot.write_bytes(bmp(30))

    class ChmodWhileProcessed(BrightIsDefective):
        def process_array(self, image: np.ndarray):
            before = shot.stat().st_ctime_ns
            shot.chmod(0o600)
            assert shot.stat().st_ctime_ns != before
            return super().process_array(image)

    assert EdgeDaemon(config, pipeline=ChmodWhileProcessed()).run() == 0
    assert len(image_rows(config.db)) == 1 and not shot.exists()


# ---------------------------------------------- 2. an output folder that is --watch, mounted again


@contextlib.contextmanager
def bind_mount(source: Path, target: Path) -> Iterator[Path]:
    """`source` mounted again at `target` (made here), as one NAS share mounted twice; the
    test is skipped where this user may not mount. Unmounted on leaving."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True)
    except OSError as exc:
        pytest.skip(f"cannot bind-mount here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.parametrize("flag", ["archive_dir", "quarantine_dir"])
def test_an_output_folder_that_is_watch_through_another_mount_is_refused(tmp_path, flag):
    """2 files gave 226 rows in one --once run: archived files came back in --watch."""
    config = daemon_config(tmp_path, tmp_path, after="archive")
    with bind_mount(config.watch, tmp_path / "alias") as alias:
        config = daemon_config(tmp_path, tmp_path, after="archive", **{flag: alias})
        with pytest.raises(ValueError) as refused:
            EdgeDaemon(config, pipeline=BrightIsDefective())
    option = "--archive" if flag == "archive_dir" else "--quarantine"
    assert str(refused.value) == (
        f"{option} {alias} is the --watch folder {config.watch} (reached through {alias}, "
        "another mount): its files would be processed again; give it another folder"
    )


def test_recursive_refuses_an_output_folder_inside_watch_through_another_mount(tmp_path):
    """--recursive leaves out the output folders by their paths: one inside --watch reached
    through another mount would be entered. Without --recursive it is never listed."""
    config = daemon_config(tmp_path, tmp_path, after="archive")
    with bind_mount(config.watch, tmp_path / "alias") as alias:
        archive = alias / "done"
        config = daemon_config(tmp_path, tmp_path, after="archive", archive_dir=archive,
                               recursive=True)  # fmt: skip
        with pytest.raises(ValueError) as refused:
            EdgeDaemon(config, pipeline=BrightIsDefective())
        assert str(refused.value) == (
            f"--archive {archive} lies inside the --watch folder {config.watch}, reached through "
            f"{alias} (another mount of it): --recursive would take its files again; give "
            f"--archive {config.watch / 'done'} or a folder outside --watch"
        )
        check_paths(daemon_config(tmp_path, tmp_path, after="archive", archive_dir=archive))


# ------------------------------------------- 3. --watch swapped for a link to its own archive


def test_watch_swapped_for_a_link_to_its_archive_stops_the_daemon(tmp_path):
    """`mv watch watch.old; ln -s archive watch` while it ran: it locked the archive as its
    new hot folder and processed its archive into itself, endlessly. Now it stops (exit 2 in
    the CLI) with the start-up's refusal."""
    archive = tmp_path / "archive"
    config = daemon_config(tmp_path, tmp_path, after="archive", archive_dir=archive, once=False)
    (config.watch / "a.bmp").write_bytes(bmp(30))
    daemon = EdgeDaemon(config, pipeline=BrightIsDefective())
    failed: list[BaseException] = []

    def run() -> None:
        try:
            daemon.run()
        except BaseException as exc:  # (what the CLI turns into its one-line error)
            failed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: len(list(archive.glob("*.bmp"))) == 1, 20, "the image archived")
        config.watch.rename(tmp_path / "hot.old")
        config.watch.symlink_to(archive)
        thread.join(20)
        assert not thread.is_alive(), "the daemon went on in its own archive"
    finally:
        daemon.request_stop()
        thread.join(30)
    (error,) = failed
    assert isinstance(error, OSError)
    assert str(error) == (
        f"--watch {config.watch} was replaced while this daemon ran; stopped, as --archive "
        f"{archive} is the --watch folder: its files would be processed again; give it another "
        "folder"
    )
    assert len(image_rows(config.db)) == 1 and len(list(archive.iterdir())) == 1


# ------------------------------------------------- 4. control characters in `edge status` paths

HOSTILE = "esc\x1b[7mINVERSE\x1b[0m\nfake line\x9b2J"  # ESC, a newline, a C1 CSI


def test_status_escapes_control_characters_in_the_paths_it_prints(tmp_path, capsys):
    """The oldest path waiting in --watch, and the path (and error) it could not look at,
    were printed raw: a newline split the line, ESC sequences reached the terminal. Escaped
    now as the results table escapes them."""
    from splitdet.edge.file_identity import file_key
    from splitdet.edge.store import Arrival, OutboxCap, ResultStore
    from splitdet.shared.cli import main

    watch = tmp_path / "hot"
    watch.mkdir()
    waiting = watch / f"{HOSTILE}.bmp"
    waiting.write_bytes(bmp(30))
    loop = watch / HOSTILE  # a link to itself: every path below it gives ELOOP
    loop.symlink_to(loop.name)
    store = ResultStore(tmp_path / "edge.sqlite", OutboxCap())
    for image_id, path in enumerate([waiting, loop / "b.bmp"], 1):
        key = file_key(path, waiting.stat())
        arrival = Arrival(str(path), key, "0" * 64, 1, 1_700_000_000.0 + image_id)
        store.record_ok(arrival, 0.1, "f" * 64, {}, str(tmp_path / "archive" / path.name))
    store.close()
    capsys.readouterr()
    assert main(["edge", "status", "--db", str(tmp_path / "edge.sqlite")]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x9b"), out
    escaped = "esc\\x1b[7mINVERSE\\x1b[0m\\nfake line\\x9b2J"
    (oldest,) = [line for line in out.splitlines() if "processed image not yet" in line]
    assert oldest.endswith(f"ago: {watch}/{escaped}.bmp")
    (unreadable,) = [line for line in out.splitlines() if "could not be looked into" in line]
    assert f"(Too many levels of symbolic links: {watch}/{escaped}/b.bmp)" in unreadable


# ------------------------------------------------------------ 5. symbolic links that loop


def test_links_that_loop_are_skipped_as_links_and_do_not_force_listings(
    tmp_path, caplog, monkeypatch
):
    """`ln -s loop.jpg loop.jpg` and l1 -> l2 -> l1 gave WARNING folder_unreadable ("Too many
    levels of symbolic links ... tried again on every scan"), were missing from
    splitdet_edge_skipped_files, and had every idle poll list the whole folder."""
    import logging

    from splitdet.edge.watcher import HotFolder

    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "loop.jpg").symlink_to("loop.jpg")
    (watch / "l1.png").symlink_to("l2.png")
    (watch / "l2.png").symlink_to("l1.png")
    past = time.time_ns() - 10 * 10**9  # (not changed within RACY_NS: no listing needed)
    os.utime(watch, ns=(past, past))
    folder = HotFolder(watch, settle_s=0.0, unreadable_grace_s=0.0)
    with caplog.at_level(logging.INFO, logger="splitdet"):
        folder.scan()
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == [], [r.getMessage() for r in warned]
    skipped = {
        r.fields["path"]: r.fields["why"]
        for r in caplog.records
        if getattr(r, "fields", {}).get("event") == "file_skipped"
    }
    assert skipped == {str(watch / n): "link" for n in ("loop.jpg", "l1.png", "l2.png")}
    assert folder.skipped_files() == 3
    listings = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": listings.append(path) or real_scandir(path))
    folder.scan()  # an idle poll: the folder's times are as when listed
    assert listings == []


# ------------------------------------------------------ 6. C1 controls in text log fields


def test_text_logs_escape_c1_controls_in_field_values(tmp_path):
    """A file name holding U+009B (a terminal's CSI) was written raw in a field of a
    `--log-format text` line, while U+0085 and U+2028 were escaped."""
    import logging

    from splitdet.edge.watcher import HotFolder
    from splitdet.shared.logs import TextLogFormatter

    watch = tmp_path / "hot"
    watch.mkdir()
    (watch / "a\x9b2J.txt").write_text("a sidecar")  # (one word: it could go unquoted)
    (watch / "b \x9b2J\x85\u2028\x7f.json").write_text("another")  # (quoted)
    written = io.StringIO()
    handler = logging.StreamHandler(written)
    handler.setFormatter(TextLogFormatter())
    logger = logging.getLogger("splitdet")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        HotFolder(watch).scan()  # each sidecar told once: event=file_skipped path=...
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = written.getvalue()
    assert text.count("event=file_skipped") == 2, text
    assert not any(0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in text), repr(text)
    assert f'path="{watch}/a\\u009b2J.txt"' in text
    assert f'path="{watch}/b \\u009b2J\\u0085\\u2028\\u007f.json"' in text


# ------------------------------------------------ 7. --watch or --archive that is no folder


WATCH_FIX = "give the folder the camera writes into"


@pytest.mark.parametrize(
    ("make", "said"),
    [
        (os.mkfifo, f"is not a folder (a FIFO); {WATCH_FIX}"),
        (lambda p: p.write_bytes(b"x"), f"is not a folder (a file); {WATCH_FIX}"),
        (
            lambda p: p.symlink_to("/dev/zero"),
            f"is not a folder (a symbolic link to a character device); {WATCH_FIX}",
        ),
        (lambda p: None, "no such folder"),
    ],
    ids=["fifo", "file", "link-to-dev-zero", "missing"],
)
def test_a_watch_that_is_no_folder_is_named_for_what_it_is(tmp_path, capsys, make, said):
    """A FIFO, a file or a link to /dev/zero was told "no such folder"."""
    from splitdet.shared.cli import main

    watch = tmp_path / "hot"
    make(watch)
    code = main(["edge", "run", "--model", str(tmp_path / "model"), "--watch", str(watch),
                 "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9", "--once",
                 "--log-format", "text"])  # fmt: skip
    assert code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"splitdet edge: error: --watch {watch}: {said}"


def test_an_archive_that_is_a_file_is_named_as_a_file(tmp_path):
    """It said "cannot create (File exists)"."""
    archive = tmp_path / "archive"
    archive.write_bytes(b"not a folder")
    config = daemon_config(tmp_path, tmp_path, after="archive", archive_dir=archive)
    with pytest.raises(OSError) as refused:
        EdgeDaemon(config, pipeline=BrightIsDefective()).run()
    assert str(refused.value) == (
        f"--archive {archive}: is not a folder (a file); give a folder (made if missing), or "
        "move what is there away"
    )


def test_status_escapes_control_characters_in_the_last_error_keeping_its_lines():
    """The outbox's last error may quote a name the camera's account chose (a cloud's message):
    ESC reached the terminal; its own line breaks stay, indented."""
    from splitdet.edge.cli_edge_status import _error_lines

    lines = _error_lines(
        {"last_error": "UNAVAILABLE: a\x1b[7mb.png\ndo this", "last_error_age_s": 5}
    )
    text = "\n".join(lines)
    assert "\x1b" not in text and "a\\x1b[7mb.png" in text, text
    assert text.splitlines()[1] == " " * 26 + "do this", text
