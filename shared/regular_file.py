"""Small files read without waiting on a FIFO (standard library only: the edge imports it).

Opening a FIFO for reading waits for a writer, for good when none comes: a `--token-file`,
`--ready-file` or `--db` naming one (a typo, or a secret-injection tool's pipe) hung a command
at its start with no word. Here a file is opened without waiting (O_NONBLOCK), its kind looked
at on the open descriptor (links followed: a Kubernetes secret's link to its file is fine), and
anything but a regular file refused by name: `file_kind`.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["file_kind", "open_regular", "read_regular"]

#: What `os.stat`'s mode says a file that is not a regular file is, for an error message.
_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a file of `os.stat` mode `mode` is ("a FIFO", ...; "a special file" if unknown)."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


def open_regular(path: Path | str, flags: int = os.O_RDONLY) -> int:
    """A descriptor of the regular file at `path` (opened with `flags`, close-on-exec), never
    waiting on a FIFO: OSError (EINVAL, its strerror "not a regular file (a FIFO)") for
    anything else, FileNotFoundError and the like as `os.open` raises them."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file ({file_kind(mode)})", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: Path | str, limit: int = 1 << 20) -> bytes:
    """The bytes of the regular file at `path` (`open_regular`), at most `limit` of them."""
    with os.fdopen(open_regular(path), "rb") as handle:
        return handle.read(limit)
