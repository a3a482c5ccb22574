"""Where the daemon puts a processed image, and how it gets there (no torch).

Archived and quarantined files are named ID_NAME (`stored_name`): short enough that
NAME.reason.txt (`reason_path`) and its temporary name fit a file system's 255 bytes, valid
UTF-8 whatever the camera's name was. `move_no_clobber` moves a file there and never over
another file, onto another file system through a hidden partial copy (`partial_path`) that is
whole before it takes the name; `same_file` and `same_bytes` tell a move finished before a
crash or a kill from another image's file under that name.

The camera's account may write --watch, and the daemon often runs as root: a folder it writes
into that lies inside --watch (WATCH/archive, WATCH/quarantine) is reached by `open_folder`,
one name at a time without following a symbolic link (`LinkedFolder`), right before each
write, move or deletion there: a link put in its place never sends them elsewhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
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
#: How `open_folder` opens the folders on the way (O_PATH: one we may write but not read too).
_PATH_ONLY = getattr(os, "O_PATH", os.O_RDONLY)


class LinkedFolder(OSError):
    """A folder the daemon writes into is, or lies under, a symbolic link inside --watch: not
    followed. The camera's account, which may write --watch, could point it anywhere on the
    machine (the daemon often runs as root). An OSError: a move refused so is logged and
    tried again later, as any failed move."""

    def __init__(self, link: Path | str, watch: Path | str) -> None:
        super().__init__(
            errno.ELOOP,
            f"{link} is a symbolic link inside --watch {watch}: not followed (the camera's "
            "account may write there, and could point it anywhere); replace it with a real "
            "folder",
            str(link),
        )

    def __str__(self) -> str:
        return str(self.strerror)


def open_folder(
    folder: Path, watch: Path | None, flags: int = _PATH_ONLY, create: bool = False
) -> int:
    """A file descriptor of `folder` (the caller closes it), opened with `flags` (os.O_RDONLY
    to list it). When `folder` lies inside `watch` (the --watch folder; both paths made
    absolute, not resolved) it is reached from `watch` one name at a time, never through a
    symbolic link: LinkedFolder when one is on the way. A folder outside --watch is opened as
    its path says (an admin's link there, e.g. to a mount, is followed). With `create`, the
    missing folders on the way are made (mode 0o777 less the umask, as Path.mkdir). OSError
    when the folder is missing (without `create`) or cannot be opened; NotADirectoryError
    when a file is where it should be (never FileExistsError: a caller choosing another name
    on that would choose for good)."""
    names = names_below(folder, watch)
    if names is None or watch is None:
        if create:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # a file there, not a folder: never "choose another name"
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder)) from None
        return os.open(folder, flags | os.O_DIRECTORY)
    fd = os.open(watch, (flags if not names else _PATH_ONLY) | os.O_DIRECTORY)
    reached = Path(watch)
    try:
        for index, name in enumerate(names):
            reached = reached / name
            last = index == len(names) - 1
            inner = _open_below(fd, name, flags if last else _PATH_ONLY, create, reached, watch)
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_folder(folder: Path, watch: Path | None, create: bool = False) -> None:
    """LinkedFolder when `folder`, inside --watch `watch`, is or lies under a symbolic link
    there (`open_folder`); called right before each write into it. OSError when missing
    (without `create`)."""
    os.close(open_folder(folder, watch, create=create))


def names_below(folder: Path, watch: Path | None) -> tuple[str, ...] | None:
    """The names from `watch` down to `folder` when it lies inside `watch` (both made
    absolute, not resolved: a link is what is looked for), else None."""
    if watch is None:
        return None
    inner, outer = Path(os.path.abspath(folder)), Path(os.path.abspath(watch))
    if not inner.is_relative_to(outer):
        return None
    return inner.relative_to(outer).parts


def _open_below(fd: int, name: str, flags: int, create: bool, path: Path, watch: Path) -> int:
    """The folder `name` in the folder open as `fd`, opened without following a link
    (LinkedFolder naming `path` when it is one); made first with `create`."""
    if create:
        try:
            os.mkdir(name, dir_fd=fd)
        except FileExistsError:  # (a link there too: refused below)
            pass
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        return os.open(name, flags | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_link(fd, name):
            raise LinkedFolder(path, watch) from None
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _is_link(fd: int, name: str) -> bool:
    """Whether `name` in the folder open as `fd` is a symbolic link."""
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode)
    except OSError:
        return False


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
    return target.with_name(f".{_cut(target.name, room)}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def is_partial_name(name: str) -> bool:
    """Whether `name` is one `partial_path` gives (a copy not finished, or cut short)."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def move_no_clobber(
    source: Path, target: Path, watch: Path | None = None, create: bool = False
) -> None:
    """Move a file to `target`, never replacing a file there (FileExistsError instead).

    `target`'s folder is opened once (`open_folder`: inside --watch `watch` reached one name
    at a time, never through a symbolic link, LinkedFolder when one is on the way; with
    `create` made if missing) and every name there is made relative to that open folder: a
    link swapped in for the folder after the check never receives the file.

    A hard link then the source's removal is atomic about that; where there can be no hard
    link on one file system (a share without them, protected_hardlinks) the name is checked,
    then the file renamed: only a writer taking the same name in that instant could be hit.
    Onto another file system (an archive disk) the file is copied under a hidden temporary
    name beside `target` (`partial_path`), synced, then linked (or renamed) into place: the
    target name only ever holds a whole file. A copy that fails (a full disk) removes its
    temporary file and leaves the source as it was; one cut short by a kill leaves only the
    hidden temporary file, which `EdgeDaemon` removes at its next start."""
    folder = open_folder(target.parent, watch, create=create)
    try:
        try:
            linked = _name_no_clobber(source, folder, target)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_across(source, folder, target)
            linked = True
        if linked:
            try:
                source.unlink()
            except OSError:
                # the source stays (a read-only or append-only share): take our copy back, or
                # a retry would find the name taken, copy again under NAME~1, and so on
                with contextlib.suppress(OSError):
                    os.unlink(target.name, dir_fd=folder)
                raise
    finally:
        os.close(folder)


def write_in_folder(path: Path, data: bytes, watch: Path | None, create: bool = False) -> None:
    """Write `data` whole as the file `path`, replacing one there, through its folder opened
    once (`open_folder`: inside --watch `watch` never through a symbolic link; with `create`
    made if missing): a temporary name (".NAME.XXXXXXXX.tmp", as `atomic_write` names them)
    created exclusively, never through a link, synced, then renamed into place, all relative
    to that open folder. Nothing is left beside `path` when it fails (OSError)."""
    folder = open_folder(path.parent, watch, create=create)
    try:
        temp = f".{_cut(path.name, NAME_MAX - _TEMP_NAME_EXTRA)}.{secrets.token_hex(4)}.tmp"
        try:
            with _naming(path.parent / temp):
                fd = os.open(temp, _NEW_FILE, 0o666, dir_fd=folder)
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
            with _naming(path.parent / temp, path):
                os.rename(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=folder)
            raise
    finally:
        os.close(folder)


@contextlib.contextmanager
def _naming(path: Path, other: Path | None = None) -> Iterator[None]:
    """An OSError raised inside re-raised naming `path` (and `other`: "PATH -> OTHER", as a
    copy's or a rename's error reads): a call made relative to an open folder names only the
    bare name, or nothing, and the log line would not say where."""
    try:
        yield
    except OSError as exc:
        named = type(exc)(exc.errno, exc.strerror, str(path), None,
                          None if other is None else str(other))  # fmt: skip
        raise named from exc


def _cut(name: str, room: int) -> str:
    """`name`'s first `room` bytes (a character cut in two keeps its bytes, as os.fsdecode
    gives them)."""
    return os.fsdecode(os.fsencode(name)[:room])


#: How a temporary file is made in an open folder: only if the name is free, never through a
#: link put there, not inherited by a child process.
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _name_no_clobber(
    source: Path | str, folder: int, target: Path, source_folder: int | None = None
) -> bool:
    """Give `source`'s file (a name in the folder open as `source_folder`, if given) the name
    `target` too, in the folder open as `folder`, never over a file there (FileExistsError):
    a hard link (True: `source` still names it), or, where the file system has none, a check
    then a rename (False). OSError EXDEV: `target` is on another file system."""
    try:
        os.link(
            source, target.name, src_dir_fd=source_folder, dst_dir_fd=folder, follow_symlinks=False
        )  # (link(2)'s way, as before: a link moved as it is)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINK:
            raise OSError(exc.errno, exc.strerror, str(target)) from None
        if _exists_in(folder, target.name):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        try:
            os.rename(source, target.name, src_dir_fd=source_folder, dst_dir_fd=folder)
        except OSError as renamed:
            raise OSError(renamed.errno, renamed.strerror, str(target)) from None
        return False
    return True


def _exists_in(folder: int, name: str) -> bool:
    """Whether the folder open as `folder` holds `name` (a link there counts)."""
    try:
        os.lstat(name, dir_fd=folder)
    except FileNotFoundError:
        return False
    return True


def _copy_across(source: Path, folder: int, target: Path) -> None:
    """Copy `source` to `target` on another file system, in the folder open as `folder`,
    never leaving part of a file under `target` nor replacing a file there
    (FileExistsError); the source is left in place."""
    temp = partial_path(target)
    try:
        with open(source, "rb") as original, _naming(source, temp):
            fd = os.open(temp.name, _NEW_FILE, 0o666, dir_fd=folder)
            with os.fdopen(fd, "wb") as copy:
                shutil.copyfileobj(original, copy)
                copy.flush()
                with contextlib.suppress(OSError):  # mode and times: best effort (shares)
                    found = os.fstat(original.fileno())
                    os.fchmod(copy.fileno(), stat.S_IMODE(found.st_mode))
                    os.utime(copy.fileno(), ns=(found.st_atime_ns, found.st_mtime_ns))
                os.fsync(copy.fileno())  # the data is on disk before the name says it is there
        if _name_no_clobber(temp.name, folder, target, source_folder=folder):
            with contextlib.suppress(OSError):  # in place; a name left is swept at start
                os.unlink(temp.name, dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp.name, dir_fd=folder)
        raise
    _sync_folder(folder)  # the name is on disk before the source goes


def _sync_folder(folder: int) -> None:
    """fsync the folder open as `folder` (its new names durable); skipped where the file
    system cannot, or the folder cannot be read (one we may write but not read)."""
    try:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY, dir_fd=folder)
    except OSError:
        return
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
