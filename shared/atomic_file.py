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
import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = [
    "FULL_BELOW_BYTES",
    "WriteError",
    "atomic_write",
    "disk_full",
    "free_bytes",
    "replacing",
    "stale_temporaries",
    "write_problem",
]

#: The temporary names `replacing` gives: "." + the target's name + "." + mkstemp's 8 random
#: characters + ".tmp" (".last.pt.k2x9_q0a.tmp"); a target's name cut to `_TEMP_TARGET_BYTES`
#: so that the whole stays within the 255 bytes a file name may have.
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")
_TEMP_TARGET_BYTES = 255 - len(".") - len(".k2x9_q0a.tmp")


def _temp_target(name: str) -> str:
    """`name` as a temporary name holds it: whole, or its longest start within
    `_TEMP_TARGET_BYTES` bytes (never cutting a character in two)."""
    raw = os.fsencode(name)
    if len(raw) <= _TEMP_TARGET_BYTES:
        return name
    return os.fsdecode(raw[:_TEMP_TARGET_BYTES].decode("utf-8", "ignore").encode("utf-8"))


#: Free bytes below which a file system counts as full (`disk_full`): when a write failed
#: without saying why (torch.save's "unexpected pos"), it stopped short of the end by less
#: than this; and a store that failed to open needed less (its -shm file is 32 kB).
FULL_BELOW_BYTES = 1 << 20


class WriteError(OSError):
    """A file that could not be written; str() is one line naming it and why ("PATH: cannot
    write it (no space left on device)", or `message`), for a command to print as it is.

    Attributes: `filename` the file, `reason` why in words (`write_problem`), `errno` the failed
    call's when known (None when torch.save said nothing more than "unexpected pos")."""

    def __init__(
        self, path: Path | str, reason: str, number: int | None = None, message: str | None = None
    ) -> None:
        super().__init__(number, message or f"{path}: cannot write it ({reason})", str(path))
        self.reason = reason

    def __str__(self) -> str:
        return str(self.strerror)


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


def folder_mode() -> int:
    """The mode ``mkdir`` gives a new folder (``0o777`` less the umask): for a folder made by
    ``tempfile.mkdtemp`` (``0o700``) that is renamed into place as the user's."""
    return 0o777 & ~_umask()


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


def temporary_beside(path: Path) -> Path:
    """A new, empty file in `path`'s folder under the temporary name `replacing` gives
    (".NAME.k2x9_q0a.tmp", which `stale_temporaries` knows), mode 0o600 until its writer sets
    another: made exclusively, never another's file."""
    prefix = f".{_temp_target(path.name)}."
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


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
    tmp = temporary_beside(path)
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


def stale_temporaries(folder: Path | str, targets: Iterable[str] | None) -> list[Path]:
    """The temporary files `replacing` left in `folder` for the files named `targets` (None:
    for any file), a process killed while it wrote them; only that naming pattern, nothing
    else."""
    names = None if targets is None else {_temp_target(name) for name in targets}
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        ours = match is not None and (names is None or match["target"] in names)
        if ours and entry.is_file() and not entry.is_symlink():
            found.append(entry)
    return sorted(found)


def free_bytes(folder: Path | str) -> int | None:
    """The bytes this process may still write on the file system holding `folder` (root may
    use the blocks reserved for it); None when it cannot be told (os.statvfs failed)."""
    try:
        vfs = os.statvfs(folder)
    except OSError:
        return None
    free = vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail
    return free * vfs.f_frsize


def disk_full(folder: Path | str) -> bool:
    """Whether the file system holding `folder` has (next to) no space left for this process
    (root may use the blocks reserved for it)."""
    free = free_bytes(folder)
    return free is not None and free < FULL_BELOW_BYTES


def write_problem(path: Path | str, exc: BaseException) -> str:
    """Why writing `path` failed, in words: "no space left on device" (ENOSPC, or a failure
    that does not say why on a full file system), "disk quota exceeded", "file too large" (the
    process's file size limit, `ulimit -f`, or the file system's largest file), else the
    error's own first line."""
    number = getattr(exc, "errno", None)
    if number == errno.ENOSPC:
        return "no space left on device"
    if number == errno.EDQUOT:
        return "disk quota exceeded"
    if number == errno.EFBIG:
        return (
            "file too large: past the file size limit (`ulimit -f`) or the largest file its "
            "file system holds"
        )
    if number is None and disk_full(Path(path).parent):
        return "no space left on device"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def atomic_write(
    path: Path | str, data: bytes | str, *, fsync: bool = False, parents: bool = True
) -> None:
    """Write `data` (str: as UTF-8) to `path` whole; see `replacing`."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with replacing(path, fsync=fsync, parents=parents) as tmp:
        tmp.write_bytes(data)
