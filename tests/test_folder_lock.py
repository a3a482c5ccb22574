"""`shared.folder_lock`: one writer per output folder (export, bench), without blocking a
second user of a shared folder, nor a file system that cannot lock."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from splitdet.edge.ignore_marker import is_marked, mark
from splitdet.edge.watcher import is_ignored_name
from splitdet.shared.folder_lock import DirectoryLock, FolderInUse, folder_lock

from support import as_nobody

LOCK = ".splitdet-test.lock"

TAKE = """
import sys
from splitdet.shared.folder_lock import folder_lock
try:
    with folder_lock(sys.argv[1], ".splitdet-test.lock", "splitdet export", "--out"):
        print("held")
except ValueError as exc:
    print(exc)
"""


def test_a_lock_file_another_user_left_does_not_block_the_next(tmp_path):
    """A group-writable model folder: user A's export leaves the lock file, mode 0644; user
    B's export could still write every file of the folder, and must not be refused for the
    lock file alone (before: "cannot write there (Permission denied)"). A clean end removes
    the lock file; a kill -9 leaves it."""
    prefix = as_nobody()
    if not prefix:
        pytest.skip("needs root and an unprivileged user to run as")
    with tempfile.TemporaryDirectory() as name:  # (pytest's own tmp_path is closed to others)
        shared = Path(name) / "model"
        shared.mkdir()
        Path(name).chmod(0o777)
        shared.chmod(0o777)
        (shared / LOCK).write_text("pid 999999999\n")  # A's export, killed: its lock file
        (shared / LOCK).chmod(0o644)  # left behind, writable by A alone
        assert _take_in_subprocess(shared, prefix) == "held"
        with folder_lock(shared, LOCK, "splitdet export", "--out"):  # A exports again...
            refused = _take_in_subprocess(shared, prefix)  # ...and B at once is refused
        assert "another splitdet export (pid" in refused, refused


def test_the_lock_file_goes_at_the_end_and_a_folder_made_for_nothing_too(tmp_path):
    """An export folder kept its .splitdet-export.lock (copied whole to the edge and the
    cloud), and a train refused for bad data left --out holding only its lock file."""
    kept = tmp_path / "kept"
    kept.mkdir()
    with folder_lock(kept, LOCK, "splitdet export", "--out"):
        assert (kept / LOCK).read_text() == f"pid {os.getpid()}\n"
    assert kept.is_dir() and not list(kept.iterdir())  # there before: stays, without the lock

    (tmp_path / "runs").mkdir()
    made = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError), folder_lock(made, LOCK, "splitdet train", "--out"):
        raise RuntimeError("refused before it wrote anything")
    assert not made.exists() and (tmp_path / "runs").is_dir()  # only the folder it made

    deep = tmp_path / "a" / "b" / "c"
    with folder_lock(deep, LOCK, "splitdet export", "--out"):
        pass
    assert not (tmp_path / "a").exists()  # the parents it made too

    with folder_lock(made, LOCK, "splitdet train", "--out"):
        (made / "last.pt").write_bytes(b"x")
    assert [p.name for p in made.iterdir()] == ["last.pt"]


def test_a_lock_file_removed_as_it_was_opened_is_opened_anew(tmp_path, monkeypatch):
    """Its holder removes it at the end: a writer that opened it in that instant would lock
    a file no longer in the folder while a third locks the new one. It looks again."""
    from splitdet.shared import folder_lock as module

    real_open, opened = module._open_lock_file, []

    def opened_then_removed(path: Path):
        handle = real_open(path)
        if not opened:  # the first time: the holder ends and removes it just now
            path.unlink()
        opened.append(os.fstat(handle.fileno()).st_ino)
        return handle

    monkeypatch.setattr(module, "_open_lock_file", opened_then_removed)
    with folder_lock(tmp_path, LOCK, "splitdet export", "--out"):
        assert len(opened) == 2 and os.stat(tmp_path / LOCK).st_ino == opened[1]
        assert "another splitdet export" in _take_in_subprocess(tmp_path)


def test_a_folder_removed_by_its_last_writer_as_another_starts_is_made_anew(tmp_path, monkeypatch):
    """Writer A made the folder and ended, removing it (empty), between writer B's mkdir and
    its open of the lock file: B was refused, "cannot ... open its lock (No such file)"."""
    from splitdet.shared import folder_lock as module

    real_open, removed = module._open_lock_file, []
    folder = tmp_path / "model"

    def after_a_ended(path: Path):
        if not removed:
            removed.append(True)
            path.parent.rmdir()  # A's end: its lock file gone, then the folder it made
        return real_open(path)

    monkeypatch.setattr(module, "_open_lock_file", after_a_ended)
    with folder_lock(folder, LOCK, "splitdet export", "--out"):
        assert (folder / LOCK).is_file()
    assert removed and not folder.exists()


def _take_in_subprocess(folder: Path, prefix: tuple[str, ...] | list[str] = ()) -> str:
    """What another process taking `folder`'s lock prints ("held", or its refusal); `prefix`:
    the command that runs it as another user."""
    run = subprocess.run([*prefix, sys.executable, "-c", TAKE, str(folder)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    """NFS without lockd: flock fails with ENOLCK. The export worked there before it took a
    lock; it still does, with a warning (before: 'cannot write ... No locks available')."""

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING, logger="splitdet.shared.folder_lock")
    ran = False
    with folder_lock(tmp_path / "nfs", LOCK, "splitdet export", "--out"):
        ran = True
    assert ran
    assert any("cannot lock" in r.getMessage() and "No locks available" in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip


def test_a_folder_lock_on_a_file_system_without_locks_warns_and_goes_on(
    tmp_path, monkeypatch, caplog
):
    """A hot folder on NFS without lockd (ENOLCK), or one emulating flock with byte-range
    locks, which a read-only descriptor cannot take (EBADF): the daemon ran there before it
    locked the folder; it still does, with a warning naming the folder."""
    calls = iter([OSError(errno.ENOLCK, "No locks available"), OSError(errno.EBADF, "Bad fd")])

    def no_locks(fd, operation):
        raise next(calls)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    caplog.set_level(logging.WARNING, logger="splitdet.shared.folder_lock")
    for reason in ("No locks available", "Bad fd"):
        caplog.clear()
        lock = DirectoryLock(tmp_path, "--watch", "`splitdet edge run`", "one per hot folder")
        assert not lock.held
        [warning] = caplog.records
        assert f"--watch {tmp_path}" in warning.getMessage()
        assert "cannot lock" in warning.getMessage() and reason in warning.getMessage()


def test_a_folder_lock_is_one_per_folder_and_writes_nothing_there(tmp_path):
    """Through a symbolic link it is the same lock; the refusal names the holder's pid (read
    from /proc/locks: nothing is written into the folder); released, it can be taken again."""
    folder = tmp_path / "camera"
    folder.mkdir()
    (tmp_path / "link").symlink_to(folder)
    first = DirectoryLock(folder, "--watch", "`splitdet edge run`", "one per hot folder")
    assert first.held
    with pytest.raises(FolderInUse) as refused:
        DirectoryLock(tmp_path / "link", "--watch", "`splitdet edge run`", "one per hot folder")
    assert str(refused.value) == (
        f"--watch {tmp_path / 'link'} is in use by another `splitdet edge run` "
        f"(pid {os.getpid()}); one per hot folder"
    )
    assert not list(folder.iterdir())
    first.release()
    assert DirectoryLock(tmp_path / "link", "--watch", "`splitdet edge run`", "x").held


HOLD_WITH_SUBFOLDERS = """
import sys, time
from splitdet.shared.folder_lock import DirectoryLock
lock = DirectoryLock(sys.argv[1], "--watch", "`splitdet edge run`", "one daemon per hot folder",
                     subfolders="--recursive")
print("held", flush=True)
time.sleep(60)
"""

TAKE_BELOW = """
import os, sys
from splitdet.shared.folder_lock import DirectoryLock, FolderInUse
try:
    os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY)
    print("the folder above can be read")
except PermissionError:
    pass
try:
    DirectoryLock(sys.argv[1], "--watch", "`splitdet edge run`", "one daemon per hot folder")
    print("held")
except FolderInUse as exc:
    print(exc)
"""


def test_a_folder_below_one_held_with_subfolders_is_refused_when_that_one_is_unreadable(
    tmp_path,
):
    """The folder above may be one this user can pass through but not read (mode 0711,
    another owner): it cannot be opened to ask whether its holder takes subfolders, and
    /proc/locks answers instead (before: no check at all, both daemons took every file)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root (to give the folder to another owner) and setpriv")
    above, below = tmp_path / "W", tmp_path / "W" / "line1"
    below.mkdir(parents=True)
    os.chown(above, 65534, 65534)
    above.chmod(0o711)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_SUBFOLDERS, str(above)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        no_dac = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]  # reads as users do
        taken = subprocess.run([*no_dac, sys.executable, "-c", TAKE_BELOW, str(below), str(above)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    assert taken.stdout.strip() == (
        f"--watch {below} lies in {above}, the --watch of another `splitdet edge run` "
        f"(pid {holder.pid}) that takes its subfolders too: both would take every file in it; "
        "one daemon per hot folder"
    ), taken.stdout + taken.stderr


# ------------------------------------------ folders a holder taking subfolders never enters


def enters(folder: Path) -> bool:
    """The hot folder's rule, as `EdgeDaemon` gives it: not hidden, in progress, or marked."""
    return not is_ignored_name(folder.name) and not is_marked(folder)


def lock(folder: Path, recursive: bool = False, **more) -> DirectoryLock:
    """A daemon's lock on `folder` (taking subfolders with `recursive`), with the rule."""
    return DirectoryLock(folder, "--watch", "`splitdet edge run`", "one daemon per hot folder",
                         subfolders="--recursive" if recursive else None, enters=enters,
                         **more)  # fmt: skip


@pytest.mark.parametrize("sub", ["marked", ".hidden", "marked/deeper", "copy.part/cam2"])
@pytest.mark.parametrize("recursive_first", [True, False], ids=["recursive-first", "plain-first"])
def test_a_holder_in_a_folder_the_one_taking_subfolders_never_enters_is_let_in(
    tmp_path, sub, recursive_first
):
    """Before: a recursive daemon on W and one on W/marked (holding .splitdet-ignore), on
    W/.hidden or on an in-progress name, none of which the recursive one enters, refused each
    other in either order, though they share no file (the README tells users to mark folders
    so); nor is anything below such a folder the recursive one's."""
    top = tmp_path / "W"
    (top / sub).mkdir(parents=True)
    (top / "marked").mkdir(exist_ok=True)
    mark(top / "marked")
    first, second = (top, top / sub) if recursive_first else (top / sub, top)
    held = [lock(first, recursive=first == top)]
    held.append(lock(second, recursive=second == top))
    assert all(one.held for one in held)


@pytest.mark.parametrize("recursive_first", [True, False], ids=["recursive-first", "plain-first"])
def test_a_holder_in_a_folder_the_one_taking_subfolders_enters_is_still_refused(
    tmp_path, recursive_first
):
    """W/day1 is entered: beside holders in W/marked and W/.hidden (let in), one there is
    refused in either order, and the refusal names W/day1, not the folders let in."""
    top, day = tmp_path / "W", tmp_path / "W" / "day1"
    day.mkdir(parents=True)
    (top / "marked").mkdir()
    mark(top / "marked")
    (top / ".hidden").mkdir()
    held = [lock(top / "marked"), lock(top / ".hidden")]
    if recursive_first:
        held.append(lock(top, recursive=True))
        with pytest.raises(FolderInUse) as refused:
            lock(day)
        said = f"--watch {day} lies in {top}, the --watch of another"
    else:
        held.append(lock(day))
        with pytest.raises(FolderInUse) as refused:
            lock(top, recursive=True)
        said = f"--watch {top} --recursive: its subfolder {day} is the --watch of another"
    assert said in str(refused.value), refused.value
    assert all(one.held for one in held)


def test_a_holder_in_the_output_folder_of_the_one_taking_subfolders(tmp_path):
    """Its own output folders (`exclude`) the one taking subfolders never enters either:
    started after a holder there, it is let in. Another's `exclude` cannot be told from
    below: a holder there started after it is refused."""
    top, out = tmp_path / "W", tmp_path / "W" / "quarantine"
    out.mkdir(parents=True)
    below = lock(out)
    assert lock(top, recursive=True, exclude=[out]).held  # (dropped at once: unreferenced)
    below.release()
    recursive = lock(top, recursive=True, exclude=[out])
    with pytest.raises(FolderInUse):
        lock(out)
    assert recursive.held
