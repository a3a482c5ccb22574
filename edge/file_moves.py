"""Where the daemon puts a processed image, and how it gets there (no torch).

Archived and quarantined files are named ID_NAME (`stored_name`): short enough that
NAME.reason.txt (`reason_path`) and its temporary name fit a file system's 255 bytes, valid
UTF-8 whatever the camera's name was. `move_no_clobber` moves a file there and never over
another file, onto another file system through a hidden partial copy (`partial_path`) that is
whole before it takes the name; `same_file` and `same_bytes` tell a move finished before a
crash or a kill from another image's file under that name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from pathlib import Path

from splitdet.edge.file_identity import file_path
from splitdet.edge.file_names import NAME_MAX, fit_name

#: Beside each quarantined file: why it is there.
REASON_SUFFIX = ".reason.txt"
#: Bytes `atomic_write` adds to a name for its temporary file (".NAME.XXXXXXXX.tmp").
_TEMP_NAME_EXTRA = 14
#: Longest archived or quarantined name, bytes: NAME.reason.txt's temporary name fits NAME_MAX.
STORED_NAME_MAX = NAME_MAX - len(REASON_SUFFIX) - _TEMP_NAME_EXTRA
#: Longest extension kept whole when a stored name is shortened, bytes.
_EXTENSION_MAX = 16
#: link() errors meaning "no hard link here" (another file system, one without hard links,
#: protected_hardlinks refusing another user's file): the move falls back to rename/copy.
_NO_HARD_LINK = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
     errno.ENOSYS}
)  # fmt: skip
#: fsync() errors of a folder on a file system that does not sync folders (some shares).
_NO_FOLDER_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
#: Ends the hidden temporary name of a file being copied into the archive or quarantine on
#: another file system (`partial_path`).
PARTIAL_SUFFIX = ".splitdet-partial"
#: Bytes read at a time when a file in the archive is compared with the image (`same_bytes`).
_COMPARE_CHUNK = 1 << 20


def stored_name(image_id: int, name: str, attempt: int = 0) -> str:
    """The name a processed file gets in the archive or quarantine: ID_NAME, or ID_NAME~N.EXT
    for the N-th other choice when names are taken.

    Valid UTF-8 (an invalid byte becomes U+FFFD; the row's path keeps the original), and at
    most STORED_NAME_MAX bytes: a long camera name is cut short, keeping the id prefix (unique
    per database) and the extension (what tools open it by)."""
    text = os.fsencode(name).decode("utf-8", "replace")
    stem, ext = os.path.splitext(text)
    if len(ext.encode()) > _EXTENSION_MAX:  # not an extension: part of the name
        stem, ext = text, ""
    prefix, tag = f"{image_id:08d}_", f"~{attempt}" if attempt else ""
    return prefix + fit_name(stem, f"{tag}{ext}", STORED_NAME_MAX - len(prefix))


def reason_path(target: Path) -> Path:
    """Where a quarantined file's reason is written."""
    return target.with_name(target.name + REASON_SUFFIX)


def partial_path(target: Path) -> Path:
    """A hidden name beside `target` for a file copied there from another file system until
    it is whole: .NAME.XXXXXXXX.splitdet-partial (XXXXXXXX random), NAME cut so that the
    whole fits NAME_MAX bytes (a stored name may be STORED_NAME_MAX, 230 bytes: 27 more would
    not fit). Hidden and not named as an image: never taken for an archived file, nor by a
    hot folder."""
    room = NAME_MAX - len(f"..{'0' * 8}{PARTIAL_SUFFIX}".encode())
    text = os.fsdecode(os.fsencode(target.name)[:room])  # (a cut character: its bytes kept)
    return target.with_name(f".{text}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def is_partial_name(name: str) -> bool:
    """Whether `name` is one `partial_path` gives (a copy not finished, or cut short)."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def move_no_clobber(source: Path, target: Path) -> None:
    """Move a file to `target`, never replacing a file there (FileExistsError instead).

    A hard link then the source's removal is atomic about that; where there can be no hard
    link on one file system (a share without them, protected_hardlinks) the name is checked,
    then the file renamed: only a writer taking the same name in that instant could be hit.
    Onto another file system (an archive disk) the file is copied under a hidden temporary
    name beside `target` (`partial_path`), synced, then linked (or renamed) into place: the
    target name only ever holds a whole file. A copy that fails (a full disk) removes its
    temporary file and leaves the source as it was; one cut short by a kill leaves only the
    hidden temporary file, which `EdgeDaemon` removes at its next start."""
    try:
        linked = _name_no_clobber(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(source, target)
        linked = True
    if linked:
        try:
            source.unlink()
        except OSError:
            # the source stays (a read-only or append-only share): take our copy back, or a
            # retry would find the name taken, copy again under NAME~1, and so on
            with contextlib.suppress(OSError):
                target.unlink()
            raise


def _name_no_clobber(source: Path, target: Path) -> bool:
    """Give `source`'s file the name `target` too, never over a file there (FileExistsError):
    a hard link (True: `source` still names it), or, where the file system has none, a check
    then a rename (False). OSError EXDEV: `target` is on another file system."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINK:
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return False
    return True


def _copy_across(source: Path, target: Path) -> None:
    """Copy `source` to `target` on another file system, never leaving part of a file under
    `target` nor replacing a file there (FileExistsError); the source is left in place."""
    temp = partial_path(target)
    try:
        shutil.copyfile(source, temp)
        with contextlib.suppress(OSError):  # times and mode: best effort (some shares refuse)
            shutil.copystat(source, temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name says the file is there
        finally:
            os.close(fd)
        _place_no_clobber(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _sync_folder(target.parent)  # the name is on disk before the source goes


def _place_no_clobber(temp: Path, target: Path) -> None:
    """Give the complete file `temp` the name `target` (both in one folder), never over a
    file there (`_name_no_clobber`), the temporary name then gone."""
    if not _name_no_clobber(temp, target):
        return
    with contextlib.suppress(OSError):  # the file is in place; a name left is swept at start
        temp.unlink()


def _sync_folder(folder: Path) -> None:
    """fsync a folder (its new names durable); skipped where the file system cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. a folder we may write but not read
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_SYNC:
            raise
    finally:
        os.close(fd)


def stored_file(stored_path: str) -> Path:
    """The file a row's stored path names. Stored names are valid UTF-8 (stored_name), so only
    a folder not in UTF-8 was escaped (path_text): the text as it is, unless only its unescaped
    folder exists."""
    target = Path(stored_path)
    if not target.parent.is_dir():
        unescaped = Path(file_path(stored_path))
        if unescaped.parent.is_dir():
            return unescaped
    return target


def same_bytes(source: Path, copy: Path) -> bool:
    """Whether `copy` is a regular file (not a link) on another file system than `source`,
    holding exactly its bytes: equal sizes, then compared chunk by chunk (as equal SHA-256s
    would say, without reading past the first difference). False if either cannot be read.
    On `source`'s own file system a move is a link then an unlink, so its leftover is the same
    file (`same_file`), and a file of the same bytes is another image's (another daemon
    sharing the archive): never this image's copy."""
    try:
        copied, original = os.lstat(copy), os.stat(source)
        if not stat.S_ISREG(copied.st_mode) or copied.st_size != original.st_size:
            return False
        if copied.st_dev == original.st_dev:
            return False
        with open(source, "rb") as a, open(copy, "rb") as b:
            while True:
                chunk = a.read(_COMPARE_CHUNK)
                if chunk != b.read(_COMPARE_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (a hard link made before a crash); False if either is
    missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
