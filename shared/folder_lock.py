"""One writer per output folder: an flock on a lock file inside it, held while the writer
works (torch-free).

    with folder_lock(out_dir, ".splitdet-bench.lock", "splitdet bench", "--out"):
        ...  # write the folder's files

A second writer at the same time is refused at once with a ValueError naming the folder, the
holder's pid and what to do; the kernel drops the lock when the holder's process ends (kill -9
too), so a lock file left behind never blocks the next run, nor does one another user left (it is
opened read-only then). A file system that cannot lock (NFS without lockd) gets a warning and
no lock, as before there was one.

    lock = DirectoryLock(watch, "--watch", "`splitdet edge run`", "one daemon per hot folder")
    ...
    lock.release()

`DirectoryLock` locks a folder that must not be written into (a camera's hot folder): the flock
is on a read-only descriptor of the folder itself, and its holder's pid is read from
/proc/locks (Linux), not from a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


@contextlib.contextmanager
def folder_lock(folder: Path, lock_name: str, writer: str, option: str) -> Iterator[None]:
    """Create `folder` and hold its lock file `lock_name` for the `with` block.

    Args:
        folder: the output folder (created with its parents when missing).
        lock_name: the lock file's name inside it (hidden: ".splitdet-....lock").
        writer: what writes there, as the refusal names it ("splitdet export").
        option: the option that chose the folder, as the refusal names it ("--out").

    Raises:
        ValueError: the folder cannot be made or its lock file opened, or another process
            holds the lock. On a file system without locks (old NFS) it warns and goes on.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = _open_lock_file(folder / lock_name)
    except OSError as exc:
        raise ValueError(
            f"{option} {folder}: cannot write there or open its {lock_name} ({exc.strerror or exc})"
        ) from None
    with handle:
        try:
            holder = lock_exclusively(handle, f"pid {os.getpid()}")
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks (old NFS)
            log.warning(
                "%s %s: its file system cannot lock %s (%s); going on without the lock, so "
                "make sure no other %s writes there at the same time",
                option, folder, lock_name, exc.strerror or exc, writer,
            )  # fmt: skip
            yield
            return
        if holder is not None:
            raise ValueError(
                f"{option} {folder}: another {writer} ({holder or 'another process'}) is "
                f"writing there; wait for it to end or give another {option}"
            )
        yield  # the lock ends with the file's closing, or with the process


def lock_exclusively(handle: TextIO, stamp: str) -> str | None:
    """Take an exclusive flock on an open lock file without waiting.

    Returns None when taken, `stamp` (who holds it: a pid) then written in the file when it is
    writable (a lock file another user made is held, not written); else what the holder wrote
    there ("" in the instant before it writes). The kernel drops the lock when the file is
    closed or the process ends.

    Raises:
        OSError: the file system cannot lock (ENOLCK, EOPNOTSUPP).
    """
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        return handle.read().strip()
    if handle.writable():
        handle.truncate(0)
        handle.write(f"{stamp}\n")
        handle.flush()
    return None


def _open_lock_file(path: Path) -> TextIO:
    """The lock file, opened to be written (made if missing); read-only when it exists and
    belongs to another user who left it unwritable to us: flock needs only an open file."""
    try:
        return open(path, "a+")
    except PermissionError:
        if not path.is_file():
            raise
        return open(path)


class FolderInUse(ValueError):
    """Another process holds a `DirectoryLock` on the folder."""


class DirectoryLock:
    """An exclusive flock on a folder itself (a read-only descriptor of it: nothing is written
    into the folder), held until `release` or the process ends (the kernel drops it then, kill
    -9 included). The same folder reached through a symbolic link is the same lock.

    Args:
        folder: the folder to lock.
        option: the option that chose it, as messages name it ("--watch").
        writer: what holds such locks, as the refusal names it ("`splitdet edge run`").
        rule: what the refusal says holds ("one daemon per hot folder").

    Raises:
        FolderInUse: another process (or another lock in this one) holds it; the message
            names its pid when /proc/locks tells it.
        ValueError: the folder cannot be opened. A file system that cannot lock a folder (NFS
            without lockd, or emulating flock with byte-range locks) gets a warning, no lock.
    """

    def __init__(self, folder: Path, option: str, writer: str, rule: str) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None
        try:
            fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise ValueError(
                f"{option} {self.folder}: cannot open ({exc.strerror or exc})"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = flock_holder(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "pid unknown; `lslocks` names it"
            raise FolderInUse(
                f"{option} {self.folder} is in use by another {writer} ({who}); {rule}"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, EBADF (NFS: a write lock needs a writer)
            os.close(fd)
            log.warning(
                "%s %s: its file system cannot lock it (%s); going on without the lock, so "
                "make sure no other %s uses it at the same time (%s)",
                option, self.folder, exc.strerror or exc, writer, rule,
            )  # fmt: skip
            return
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether the lock is held (False after `release`, or on a file system without locks)."""
        return self._fd is not None

    def release(self) -> None:
        """Drop the lock."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.release()


def flock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd`, from /proc/locks (Linux); None when it
    cannot be told (no /proc, another pid namespace, a file system whose stat device is not
    the one /proc/locks shows: btrfs subvolumes, overlayfs)."""
    try:
        stat = os.fstat(fd)
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return None
    # "1: FLOCK  ADVISORY  WRITE 4321 fe:00:2155708 0 EOF": pid, then major:minor (hex):inode
    where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            pid = int(fields[4]) if fields[4].isdigit() else 0
            if pid > 0:
                return pid
    return None
