"""One writer per output folder: an flock on a lock file inside it, held while the writer
works (torch-free).

    with folder_lock(out_dir, ".splitdet-bench.lock", "splitdet bench", "--out"):
        ...  # write the folder's files

A second writer at the same time is refused at once with a ValueError naming the folder, the
holder's pid and what to do. The holder removes the lock file when it ends (so an export folder
copied elsewhere carries none); the kernel drops the lock when the holder's process ends (kill -9
too), so a lock file left behind never blocks the next run, nor does one another user left (it is
opened read-only then). A writer that opened the file just as its holder removed it sees that
after taking the lock (the path no longer names its file) and opens it anew. A file system
that cannot lock (NFS without lockd) gets a warning and no lock, as before there was one.

    lock = DirectoryLock(watch, "--watch", "`splitdet edge run`", "one daemon per hot folder")
    ...
    lock.release()

`DirectoryLock` locks a folder that must not be written into (a camera's hot folder): the flock
is on a read-only descriptor of the folder itself, and its holder's pid is read from
/proc/locks (Linux), not from a file.

Folders in folders: a holder that takes the files of the subfolders too (`subfolders`, the
daemon's --recursive) must be alone in its whole tree. Each holder marks its folder with an
open file description (OFD) read lock beside the flock, on the same descriptor: byte 0 says "a
holder", byte 1 "one taking the subfolders too". A test for them (F_OFD_GETLK) takes nothing,
so it cannot stand in another's way, and the kernel answers it whatever the user or the file
system's device numbers; like the flock, the marks go with the holder's process (kill -9
too), and closing another descriptor of the folder leaves them (unlike POSIX record locks). So
a new holder looks, after taking its own lock, at its folder's ancestors (one of them marked
"subfolders too" refuses it) and, taking subfolders itself, at every folder below (one marked
at all refuses it). Each marks before it looks: of two starting at once, at least one sees the
other. The holder's command line from /proc was the other way to tell: it fails for a daemon
run in-process or through a wrapper, an abbreviated option (`--rec`), or another pid namespace
(a container sharing the folder), where the locks still meet. Where OFD locks are missing
(not Linux, a kernel before 3.15) only the folder itself is locked, as before.

A holder taking subfolders does not take those it never enters (`enters`: for the daemon, the
hot folder's own rule: hidden and in-progress names, folders holding `.splitdet-ignore`; and
its own `exclude`d output folders), nor anything below them: a holder in such a folder shares
no file with it, in whichever order the two start. Looking below, such folders are neither
counted nor entered; looking above, a holder taking subfolders is no reason to refuse when
this folder, or one between the two, is one it never enters (the rule every holder follows,
each asking with its own copy; another's `exclude` cannot be told, so it is not asked).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat as stat_mode
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


@contextlib.contextmanager
def folder_lock(folder: Path, lock_name: str, writer: str, option: str) -> Iterator[None]:
    """Create `folder` and hold its lock file `lock_name` for the `with` block; at its end
    the lock file is removed, and so are the folders this call made while they are empty (a
    writer refused before it wrote anything leaves nothing behind).

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
    path = folder / lock_name
    for _ in range(_LOCK_TRIES):
        made = missing_folders(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            why = "a file is in the way" if folder.is_file() else exc.strerror or exc
            raise ValueError(f"{option} {folder}: cannot make the folder ({why})") from None
        try:
            handle = _open_lock_file(path)
        except FileNotFoundError:  # the folder's last writer removed it just now: anew
            continue
        except OSError as exc:
            raise ValueError(
                f"{option} {folder}: cannot write there or open its {lock_name} "
                f"({exc.strerror or exc})"
            ) from None
        with handle:
            try:
                holder = lock_exclusively(handle, f"pid {os.getpid()}")
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a file system without locks (old NFS)
                why = exc.strerror or str(exc)
                log.warning(
                    "%s %s: its file system cannot lock %s (%s); going on without the lock, "
                    "so make sure no other %s writes there at the same time",
                    option, folder, lock_name, why, writer,
                    extra={"fields": _unlocked_fields(option, folder, why, lock_name)},
                )  # fmt: skip
                yield
                return
            if holder is not None:
                raise ValueError(
                    f"{option} {folder}: another {writer} ({holder or 'another process'}) is "
                    f"writing there; wait for it to end or give another {option}"
                )
            if not _is_file_at(handle, path):  # its holder removed it as we opened it: anew
                continue
            try:
                yield  # the lock ends with the file's closing, or with the process
            finally:  # removed while held: a writer that opens it meanwhile tries anew
                with suppress(OSError):
                    path.unlink()
                for made_here in made:  # deepest first; only while empty
                    try:
                        made_here.rmdir()
                    except OSError:
                        break
            return
    raise ValueError(f"{option} {folder}: its {lock_name} kept being replaced; try again")


def _unlocked_fields(
    option: str, folder: Path, why: str, lock_file: str | None = None
) -> dict[str, str]:
    """The fields of the warning that `folder` (its `lock_file`, or the folder itself) could
    not be locked and its writer goes on without the lock: two writers could share it then."""
    fields = {"event": "lock_unsupported", "option": option, "folder": str(folder)}
    if lock_file is not None:
        fields["lock_file"] = lock_file
    return {**fields, "error": why}


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist, deepest first: what a
    `mkdir(parents=True)` of it makes."""
    missing = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _is_file_at(handle: TextIO, path: Path) -> bool:
    """Whether the open lock file `handle` is still the file at `path` (not removed or
    replaced by its last holder since it was opened)."""
    try:
        there = os.stat(path)
    except OSError:
        return False
    here = os.fstat(handle.fileno())
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


#: Opening the lock file again when its holder removed it in between: a race each time.
_LOCK_TRIES = 20


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
    """Another process holds a `DirectoryLock` on the folder, or on a folder the two may not
    share (one above or below it: see the module docstring)."""


#: The bytes of a locked folder its holder marks with OFD read locks (see the module docstring):
#: "held by a DirectoryLock" and "by one that takes the subfolders' files too".
_MARK_HOLDER = 0
_MARK_SUBFOLDERS = 1
#: struct flock as fcntl(2) takes it: l_type, l_whence, l_start, l_len, l_pid (native alignment).
_FLOCK = "hhqqi4x"
_OFD_SETLK: int | None = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_GETLK: int | None = getattr(fcntl, "F_OFD_GETLK", None)


class DirectoryLock:
    """An exclusive flock on a folder itself (a read-only descriptor of it: nothing is written
    into the folder), held until `release` or the process ends (the kernel drops it then, kill
    -9 included). The same folder reached through a symbolic link is the same lock.

    With `subfolders`, the holder takes the files of the folders below too: no other holder
    may lock any of them, nor may one lock a folder below a holder with `subfolders` (the
    module docstring says how that is told).

    Args:
        folder: the folder to lock.
        option: the option that chose it, as messages name it ("--watch").
        writer: what holds such locks, as the refusal names it ("`splitdet edge run`").
        rule: what the refusal says holds ("one daemon per hot folder").
        subfolders: the option that has this holder take the subfolders' files too, as
            messages name it ("--recursive"); None: only the folder's own files.
        enters: whether a holder taking subfolders enters a folder found in one it takes (the
            rule every such holder follows: the daemon's hot-folder rule); one it does not
            enter, and all below it, it does not take. Asked of the folders below this one
            and of those between a holder above and this one. None: it enters every folder.
        exclude: folders this holder, taking subfolders, never enters besides (its own output
            folders inside its folder); not asked of the folders above.

    Raises:
        FolderInUse: another process (or another lock in this one) holds it, a folder it lies
            in that holds with `subfolders`, or, with `subfolders`, a folder below it; the
            message names that folder and its holder's pid when /proc/locks tells it.
        ValueError: the folder cannot be opened. A file system that cannot lock a folder (NFS
            without lockd, or emulating flock with byte-range locks) gets a warning, no lock.
    """

    def __init__(
        self,
        folder: Path,
        option: str,
        writer: str,
        rule: str,
        subfolders: str | None = None,
        enters: Callable[[Path], bool] | None = None,
        exclude: Iterable[Path] = (),
    ) -> None:
        self.folder = Path(folder)
        self.option, self.writer, self.rule, self.subfolders = option, writer, rule, subfolders
        self._enters = enters or _enters_every
        self._exclude = frozenset(Path(os.path.realpath(p)) for p in exclude)
        self._fd: int | None = None
        try:
            self._fd = self._take()
        except OSError as exc:
            raise ValueError(
                f"{option} {self.folder}: cannot open ({exc.strerror or exc})"
            ) from None

    def _take(self) -> int | None:
        """Lock the folder the path names now: its descriptor, or None on a file system that
        cannot lock (warned). FolderInUse when it or a folder above or below it may not be
        held; OSError when it cannot be opened."""
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _who(flock_holder(fd))
            os.close(fd)
            raise FolderInUse(
                f"{self.option} {self.folder} is in use by another {self.writer} ({who}); "
                f"{self.rule}"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, EBADF (NFS: a write lock needs a writer)
            os.close(fd)
            why = exc.strerror or str(exc)
            log.warning(
                "%s %s: its file system cannot lock it (%s); going on without the lock, so "
                "make sure no other %s uses it at the same time (%s)",
                self.option, self.folder, why, self.writer, self.rule,
                extra={"fields": _unlocked_fields(self.option, self.folder, why)},
            )  # fmt: skip
            return None
        try:
            _mark(fd, self.subfolders is not None)  # before looking: see the module docstring
            self._refuse_nesting()
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refuse_nesting(self) -> None:
        """FolderInUse when a folder this one lies in is held by a holder taking subfolders
        too, or, taking subfolders itself, when a folder below it is held at all; folders such
        a holder never enters (`enters`, and its own `exclude` below it) are not its."""
        real = Path(os.path.realpath(self.folder))
        here = real
        while self._enters(here):  # one not entered keeps every holder above out of this one
            above = here.parent
            if above == here:
                break
            here = above
            who = _marked_by_another(above, _MARK_SUBFOLDERS)
            if who is not None:
                raise FolderInUse(
                    f"{self.option} {self.folder} lies in {above}, the {self.option} of another "
                    f"{self.writer} ({who}) that takes its subfolders too: both would take "
                    f"every file in it; {self.rule}"
                )
        if self.subfolders is None:
            return
        found = next(_held_below(real, self._takes), None)
        if found is not None:
            below, who = found
            raise FolderInUse(
                f"{self.option} {self.folder} {self.subfolders}: its subfolder {below} is the "
                f"{self.option} of another {self.writer} ({who}), and both would take every "
                f"file in it; {self.rule}"
            )

    def _takes(self, folder: Path) -> bool:
        """Whether this holder, taking subfolders, enters `folder` (found below its own)."""
        return folder not in self._exclude and self._enters(folder)

    @property
    def held(self) -> bool:
        """Whether the lock is held (False after `release`, or on a file system without locks)."""
        return self._fd is not None

    def follow(self) -> bool:
        """Lock the folder the path names now when that is another folder than the one held:
        the folder was removed and made again (or another moved into its place) since. True
        when the lock moved to it (the old one dropped); False when the path names the folder
        held, names no folder now (the old lock is kept until one is there), or no lock is
        held. One stat and one fstat when nothing changed.

        Raises:
            FolderInUse: another holds the new folder (or one above or below it that it may
                not share); the old lock is kept, and the caller must stop using the folder.
        """
        if self._fd is None:
            return False
        try:
            now, held = os.stat(self.folder), os.fstat(self._fd)
        except OSError:  # gone for now (an unmounted share): the watcher says so
            return False
        same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
        if same or not stat_mode.S_ISDIR(now.st_mode):
            return False
        try:
            fd = self._take()
        except OSError:  # replaced again meanwhile, or not readable yet: tried again later
            return False
        old, self._fd = self._fd, fd
        with suppress(OSError):
            os.close(old)
        return True

    def release(self) -> None:
        """Drop the lock."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.release()


def _enters_every(folder: Path) -> bool:
    """The `enters` of a DirectoryLock given none: every folder is entered."""
    return True


def _who(pid: int | None) -> str:
    """A lock's holder as a refusal names it."""
    return f"pid {pid}" if pid else "pid unknown; `lslocks` names it"


def _mark(fd: int, subfolders: bool) -> None:
    """Mark the locked folder open as `fd` as held (and taking subfolders): OFD read locks on
    bytes 0 (and 1), dropped with the descriptor. Best effort: without OFD locks (not Linux,
    a kernel before 3.15) the folder is locked, not marked."""
    if _OFD_SETLK is None:
        return
    length = 2 if subfolders else 1
    with suppress(OSError):
        fcntl.fcntl(fd, _OFD_SETLK, struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, 0, length, 0))


def _marked(fd: int, mark: int) -> bool | None:
    """Whether another open file description marks the folder open as `fd` with `mark` (a
    test: nothing is taken); None when it cannot be told."""
    if _OFD_GETLK is None:
        return None
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, mark, 1, 0)
    try:
        answer = fcntl.fcntl(fd, _OFD_GETLK, query)
    except OSError:
        return None
    return struct.unpack(_FLOCK, answer)[0] != fcntl.F_UNLCK


def _marked_by_another(folder: Path, mark: int) -> str | None:
    """Who holds `folder` with `mark` ("pid N"), or None when no one does or it cannot be
    told. A folder this user may pass through but not read (mode 0711) cannot be opened to
    ask: /proc/locks answers for it."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        try:
            stat = os.stat(folder)
        except OSError:
            return None
        lines = _proc_locks(stat)
        if not any(_marks(fields, mark) for fields in lines):
            return None
        return _who(_flock_pid(lines))
    try:
        if not _marked(fd, mark):
            return None
        return _who(flock_holder(fd))
    finally:
        os.close(fd)


def _held_below(root: Path, enters: Callable[[Path], bool]) -> Iterator[tuple[Path, str]]:
    """(folder, who holds it) of each folder below `root` held by a DirectoryLock, at any
    depth, among those `enters` says are entered: one it does not is neither counted nor
    looked into (symbolic links are not followed; folders that cannot be listed are passed
    over)."""
    stack = [root]
    while stack:
        try:
            with os.scandir(stack.pop()) as listing:
                found = [Path(e.path) for e in listing if _is_folder(e)]
        except OSError:
            continue
        folders = sorted(folder for folder in found if enters(folder))
        for folder in folders:
            who = _marked_by_another(folder, _MARK_HOLDER)
            if who is not None:
                yield folder, who
        stack.extend(reversed(folders))


def _is_folder(entry: os.DirEntry) -> bool:
    """Whether a listed entry is a folder itself (not a link to one); False if unknown."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def flock_holder(fd: int) -> int | None:
    """The pid holding a flock on the file open as `fd`, from /proc/locks (Linux); None when it
    cannot be told (no /proc, another pid namespace, a file system whose stat device is not
    the one /proc/locks shows: btrfs subvolumes, overlayfs)."""
    try:
        stat = os.fstat(fd)
    except OSError:
        return None
    return _flock_pid(_proc_locks(stat))


def _proc_locks(stat: os.stat_result) -> list[list[str]]:
    """The fields of each /proc/locks line of the file `stat` describes (none without
    /proc). "1: FLOCK  ADVISORY  WRITE 4321 fe:00:2155708 0 EOF": its kind, then the pid, then
    major:minor (hex):inode, then the first and last byte; a lock waited for has a "->" more,
    and is left out."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            lines = locks.read().splitlines()
    except OSError:
        return []
    where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    rows = (line.split() for line in lines)
    return [fields for fields in rows if len(fields) >= 8 and fields[5] == where]


def _flock_pid(lines: list[list[str]]) -> int | None:
    """The pid of the flock among `_proc_locks` lines, or None."""
    for fields in lines:
        if fields[1] == "FLOCK":
            pid = int(fields[4]) if fields[4].isdigit() else 0
            if pid > 0:
                return pid
    return None


def _marks(fields: list[str], mark: int) -> bool:
    """Whether a `_proc_locks` line is an OFD read lock covering byte `mark`."""
    if fields[1] != "OFDLCK" or fields[3] != "READ" or not fields[6].isdigit():
        return False
    last = fields[7]
    return int(fields[6]) <= mark and (last == "EOF" or (last.isdigit() and mark <= int(last)))
