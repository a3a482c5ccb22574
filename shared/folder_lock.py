"""One writer per output folder: an flock on a lock file inside it, held while the writer
works (torch-free).

    with folder_lock(out_dir, ".splitdet-bench.lock", "splitdet bench", "--out"):
        ...  # write the folder's files

A second writer at the same time is refused at once with a ValueError naming the folder, the
holder's pid and what to do; the kernel drops the lock when the holder's process ends (kill -9
too), so a lock file left behind never blocks the next run, nor does one another user left (it is
opened read-only then). A file system that cannot lock (NFS without lockd) gets a warning and
no lock, as before there was one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
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
