"""Which file a row of the edge store stands for, and its path as SQLite text (no torch).

Identity of an arrival is the file as it was found (`file_key`: name, size, mtime in ns, inode)
plus its content hash: the same name may arrive many times, and after a crash the daemon
recognises a file it already recorded (UNIQUE file_key) and only finishes moving it.

Paths are stored as text (`path_text`): SQLite text is UTF-8, and a file name that is not (a
Latin-1 name from an SMB or FTP share) is stored with each invalid byte as ``\\xNN``;
`file_path` gives the path back for file operations.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

_ESCAPED_BYTE = re.compile(rb"\\x([0-9a-f]{2})")
#: The content hash of a row whose file was never read (too large, unreadable): nothing to
#: compare a file found again under its key with.
NOTHING_READ = hashlib.sha256(b"").hexdigest()


def path_text(value: str | os.PathLike[str]) -> str:
    """A path (or any text holding one: a file key, a reason) as text SQLite accepts.

    A name that is not valid UTF-8 reaches Python with surrogate escapes (PEP 383), which
    SQLite refuses ("surrogates not allowed"); such bytes become ``\\xNN`` (backslashreplace).
    Valid UTF-8 text, every usual name, is returned unchanged."""
    text = os.fspath(value)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate not from a file name: keep it visible
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # its own backslashes escaped too: `file_path` reads it back
        return raw.replace(b"\\", b"\\x5c").decode("utf-8", "backslashreplace")


def file_path(text: str) -> str:
    """The file system path a stored path stands for: `path_text` reversed. A valid UTF-8 name
    that itself holds a literal ``\\xNN`` would be misread, so callers that test for a file
    try the text as it is first."""
    if "\\x" not in text:
        return text
    raw = _ESCAPED_BYTE.sub(lambda m: bytes([int(m[1], 16)]), text.encode("utf-8"))
    return os.fsdecode(raw)


def file_key(path: Path, stat: os.stat_result) -> str:
    """The identity of one arrival of a file: "name|size|mtime_ns|inode"."""
    return f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}"


def same_but_inode(key: str, other: str) -> bool:
    """Whether two `file_key`s differ at most in their inode: the same file after a remount
    that numbers inodes anew (CIFS `noserverino`, some NFS servers) or a restore that keeps
    modification times."""
    return key.rpartition("|")[0] == other.rpartition("|")[0]


def lies_there(path_stored: str, key_stored: str) -> bool | None:
    """Whether the very file a row recorded still lies at its stored path: a file there under
    its key (as written, or unescaped), or under it but for the inode (`same_but_inode`). A
    file the camera wrote since under the same name (--after keep, `latest.png`) is another
    arrival, with a row of its own. None when it cannot be told: no file found there, and a
    stat of the path failed otherwise than with ENOENT, ENOTDIR or ENAMETOOLONG (EACCES: a
    user who may read --db but not look into the folder; EIO, ESTALE: a share in trouble)."""
    return look_at(path_stored, key_stored)[0]


def look_at(path_stored: str, key_stored: str) -> tuple[bool | None, str | None]:
    """`lies_there`'s answer, and when it is None why (the failed stat's error text)."""
    why = None
    for candidate in dict.fromkeys((path_stored, file_path(path_stored))):
        try:
            stat = os.stat(candidate)
        except OSError as exc:
            # no such file; or a name too long for one (a stored name's escaped form: its
            # undecodable bytes as \xNN, four times as long, past 255)
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                why = exc.strerror or str(exc)
            continue
        if same_but_inode(path_text(file_key(Path(candidate), stat)), key_stored):
            return True, None
    return (None, why) if why is not None else (False, None)
