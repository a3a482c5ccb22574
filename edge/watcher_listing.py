"""The hot folder's listing (no torch): which entries it takes (`is_ignored_name`,
`enters_subfolder`, the `extensions`), the folders listed and every file stat'ed, and the
detection of a changed folder through its times fetched afresh on NFS, so that an unchanged
folder is not listed; the part of `splitdet.edge.watcher.HotFolder` that lists. The module
docstring referred to below is `splitdet.edge.watcher`'s."""

from __future__ import annotations

import itertools
import os
import re
import stat as stat_mode
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.edge.ignore_marker import is_marked

if TYPE_CHECKING:
    from splitdet.edge.watcher import Candidate

#: Names of files still being written by common tools; never picked up.
IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".filepart", ".crdownload", ".swp", ".lock")
#: One extension as `normalize_extensions` takes it: letters, digits, "_", "+", "-".
_EXTENSION = re.compile(r"\.?[A-Za-z0-9_+-]+")
#: Why an entry of the hot folder is left alone (`HotFolder.skipped_files`, the field "why" of
#: its `file_skipped` line): its name has no extension taken, it is a symbolic link (to a
#: file, or to a folder), a subfolder without `recursive`, or no file nor folder at all.
EXTENSION, LINK, FOLDER_LINK, SUBFOLDER, SPECIAL = (
    "extension", "link", "folder_link", "subfolder", "special"
)  # fmt: skip
#: Seconds between full scans (every file stat'ed) of a folder whose times say unchanged.
FULL_SCAN_S = 5.0
#: Seconds a file kept in the folder (`HotFolder.ignore`) is still stat'ed on every scan.
RECENT_S = 60.0
#: A folder modified less than this many ns before it was listed is listed again next scan
#: (one whose time lies further ahead of ours, a server's clock running ahead, is not).
RACY_NS = 3_000_000_000

#: (mtime_ns, name below the hot folder, path, stat) of a file a scan looked at.
_Found = tuple[int, str, Path, os.stat_result]


def is_ignored_name(name: str) -> bool:
    """Whether a name is never looked at: hidden, or still being written (in-progress)."""
    return name.startswith(".") or name.lower().endswith(IN_PROGRESS_SUFFIXES)


def enters_subfolder(folder: Path) -> bool:
    """Whether a --recursive hot folder goes into the subfolder `folder` (its own archive and
    quarantine aside): not when its name is ignored (`is_ignored_name`), nor when it holds the
    ignore marker. `HotFolder._files` decides so; the hot-folder lock's nesting check asks
    this (`DirectoryLock(enters=...)`)."""
    return not is_ignored_name(folder.name) and not is_marked(folder)


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """The extensions a hot folder takes as lower-case ".ext" strings, in order, each once
    ("PNG" and ".png" are ".png"). ValueError naming the first that cannot be one: empty, more
    than one extension (".tar.gz"), a path or a pattern ("*.png"), or an in-progress suffix
    (".tmp": such names are never taken, see IN_PROGRESS_SUFFIXES)."""
    taken: list[str] = []
    for raw in extensions:
        text = raw.strip()
        if text == "*":
            raise ValueError("'*' is not an extension; --any-extension takes every file")
        if not _EXTENSION.fullmatch(text):
            raise ValueError(
                f"{text!r} is not a file extension (letters, digits, _ + -, such as .raw16)"
            )
        extension = "." + text.lstrip(".").lower()
        if extension in IN_PROGRESS_SUFFIXES:
            raise ValueError(f"{extension} names files still being written, never taken")
        if extension not in taken:
            taken.append(extension)
    if not taken:
        raise ValueError("no extension given")
    return tuple(taken)


def parse_extensions(text: str) -> tuple[str, ...]:
    """An --extensions value, comma-separated (".raw16,.png", "raw16, PNG"), as
    `normalize_extensions` returns it; ValueError saying what is wrong."""
    return normalize_extensions(part for part in text.split(",") if part.strip())


def _reason(exc: OSError) -> str:
    """An OSError's reason without the path (the log line names it)."""
    return exc.strerror or str(exc) or type(exc).__name__


def _inode(key: str) -> int:
    """The inode a `file_key` ("name|size|mtime_ns|inode") recorded."""
    return int(key.rpartition("|")[2])


def _folder_stat(folder: str | os.PathLike[str]) -> os.stat_result:
    """A folder's stat through an open descriptor of it: opening it makes an NFS client fetch
    its attributes afresh (close-to-open consistency), where a plain stat may answer from its
    attribute cache for up to a minute. OSError when it cannot be opened."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _links_to_folder(entry: os.DirEntry) -> bool:
    """Whether the symbolic link `entry` leads to a folder. A link that cannot be followed (a
    loop: ELOOP, a target this user may not look at) is no folder: told of as a link, as the
    others are, not as a folder that cannot be read (which would be warned about, left out of
    `skipped_files`, and listed again at every scan)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _folder_times(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells a folder changed: its device and inode (replaced, remounted) and its mtime
    and ctime (an entry added, removed or renamed)."""
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns


def _below_any(name: str, failed: dict[str, str]) -> bool:
    """Whether `name` is, or lies below, something that could not be listed this scan: its
    state is unknown, so it is kept as it was rather than taken as removed."""
    return bool(failed) and any(
        not where or name == where or name.startswith(where + "/") for where in failed
    )


class FolderListing:
    """The listing part of `HotFolder` (`splitdet.edge.watcher`), which sets the attributes
    below in its `__init__`."""

    extensions: tuple[str, ...] | None
    recursive: bool
    _exclude: set[Path]
    _tracked: OrderedDict[str, Candidate]
    _ignored: dict[str, tuple[str, int]]
    _recent: OrderedDict[str, tuple[Path, float]]
    _folders: dict[str, tuple[int, int, int, int]]
    _racy: bool

    def accepts(self, name: str) -> bool:
        """Whether a file of this name (not hidden, not in progress) is taken: its name ends
        in one of `extensions`, in any case."""
        return self.extensions is None or name.lower().endswith(self.extensions)

    def _files(
        self,
        folder: Path,
        failed: dict[str, str],
        skipped: dict[str, str],
        prefix: str = "",
    ) -> Iterator[tuple[str, Path, os.stat_result]]:
        """(name below the hot folder, path, stat) of every file to consider in `folder`.

        What cannot be listed or looked at is left out and noted in `failed` (its name below
        the hot folder, "" for the hot folder itself -> why), never raised: one bad folder must
        not stop the others from being processed. What is left alone is left out and its name
        added to `skipped` with why: files the folder does not `accept` (EXTENSION),
        symbolic links (LINK, FOLDER_LINK), subfolders without `recursive` (SUBFOLDER; not the
        `exclude`d ones nor those holding IGNORE_MARKER), FIFOs, sockets and devices
        (SPECIAL). Each folder's times are noted before it is listed (`_note_folder`)."""
        self._note_folder(folder)
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except (FileNotFoundError, NotADirectoryError) as exc:
            if not prefix:  # the hot folder itself is gone (an unmounted share?)
                failed[""] = _reason(exc)
            return  # else a subfolder removed while scanning: its files are gone
        except OSError as exc:  # e.g. EACCES on lost+found, EIO/ESTALE on a network share
            failed[prefix.rstrip("/")] = _reason(exc)
            return
        for entry in entries:
            if is_ignored_name(entry.name):
                continue
            name = prefix + entry.name
            try:
                if entry.is_file(follow_symlinks=False):
                    if not self.accepts(entry.name):  # a companion file: Thumbs.db, a sidecar
                        skipped[name] = EXTENSION
                        continue
                    yield name, Path(entry.path), entry.stat(follow_symlinks=False)
                elif entry.is_dir(follow_symlinks=False):
                    subfolder = Path(entry.path)
                    if subfolder.resolve() in self._exclude:  # the daemon's own
                        continue
                    # (its name is not ignored, see above: only the marker can keep it out)
                    enters = enters_subfolder(subfolder)
                    if not self.recursive:  # (a marked one, edge collect's output: not told of)
                        if enters:
                            skipped[name] = SUBFOLDER
                    elif not enters:  # its times change when the marker goes
                        self._note_folder(subfolder)
                    else:
                        yield from self._files(subfolder, failed, skipped, f"{name}/")
                elif entry.is_symlink():  # never followed: see the module docstring
                    if _links_to_folder(entry):
                        skipped[name] = FOLDER_LINK
                    else:
                        skipped[name] = LINK if self.accepts(entry.name) else EXTENSION
                else:  # a FIFO, a socket, a device
                    skipped[name] = SPECIAL
            except FileNotFoundError:
                continue
            except OSError as exc:
                failed[name] = _reason(exc)

    def _note_folder(self, folder: Path) -> None:
        """Note a folder's times as it is about to be listed (see `_folders_changed`); one
        changed less than RACY_NS ago is listed again at the next scan, since a change in the
        same timestamp tick would leave its times as they are. A modification time more than
        RACY_NS ahead of our clock (a file server's clock running ahead) says nothing of when
        the change was: such a folder is listed again when its times change, and at the full
        scans (every `full_scan_s`), not at every scan."""
        try:
            stat = _folder_stat(folder)
        except OSError:  # its listing says why, or it was removed meanwhile
            self._racy = True
            return
        self._folders[str(folder)] = _folder_times(stat)
        if abs(stat.st_mtime_ns - time.time_ns()) <= RACY_NS:
            self._racy = True

    def _folders_changed(self) -> bool:
        """Whether a folder listed at the last scan has other times now (or cannot be
        stat'ed): an entry was added, removed or renamed."""
        for folder, times in self._folders.items():
            try:
                if _folder_times(_folder_stat(folder)) != times:
                    return True
            except OSError:
                return True
        return False

    def _restat(self) -> list[_Found] | None:
        """The files still pending and those kept in the folder lately, stat'ed without
        listing a folder; None when one is gone, not a regular file any more, or another file
        (another inode: renamed over): the folders must be listed."""
        found: list[_Found] = []
        watched = itertools.chain(
            ((name, c.path, c.file_key) for name, c in self._tracked.items()),
            ((name, path, self._ignored[name][0]) for name, (path, _) in self._recent.items()
             if name not in self._tracked),
        )  # fmt: skip
        for name, path, key in watched:
            try:
                stat = os.lstat(path)
            except OSError:
                return None
            if not stat_mode.S_ISREG(stat.st_mode) or stat.st_ino != _inode(key):
                return None
            found.append((stat.st_mtime_ns, name, path, stat))
        return found
