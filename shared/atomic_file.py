"""Whole-file writes: a temporary file beside the target, renamed over it only once complete.

A reader (another process, a supervisor, the next run after a crash or a full disk) sees either
the old file or the new one, never a torn one. The temporary name is unique per writer, so two
processes writing the same target cannot interleave; a failed write removes its temporary file,
so a full disk does not also keep a half-written checkpoint. The file gets the mode an ordinary
``open()`` would give (``0o666`` less the umask), not ``mkstemp``'s ``0o600``, so that tools
running as another user (an annotation tool, a web server) can read it. A target that is not a
regular file (a symbolic link, a FIFO, /dev/stdout) is written in place instead: a rename would
replace it.

Pure standard library: the edge imports it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "replacing"]


def _umask() -> int:
    """The process's file mode creation mask: from /proc (Linux) where it can be read without
    changing it, else by setting it and back (a moment another thread could notice)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _written_through(path: Path) -> bool:
    """Whether `path` is written in place rather than replaced: a symbolic link (the file it
    points at is meant), a FIFO, a device (/dev/stdout) or a /dev/fd pipe, which a rename
    would replace with a regular file nobody reads."""
    if path.is_symlink():
        return True
    try:
        return not stat.S_ISREG(path.stat().st_mode)
    except OSError:  # not there yet (or unreadable: the write will say)
        return False


@contextlib.contextmanager
def replacing(path: Path | str, *, fsync: bool = False, parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an exception the
    temporary file is renamed over `path`, else it is removed and the exception propagates.

    The block writes the temporary path by any means (``torch.save``, ``Image.save``...).
    `fsync`: flush the file to the disk before the rename (a power cut then keeps the old
    or the new file, not an empty one); for files a restart depends on. `parents`: create
    the missing folders above `path` (else a missing one is FileNotFoundError: a user's typo
    in an output path is named, not made).
    """
    path = Path(path)
    if _written_through(path):
        yield path
        return
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(
    path: Path | str, data: bytes | str, *, fsync: bool = False, parents: bool = True
) -> None:
    """Write `data` (str: as UTF-8) to `path` whole; see `replacing`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with replacing(path, fsync=fsync, parents=parents) as tmp:
        tmp.write_bytes(data)
