"""The hot folder: files the camera software drops, handed over only once they are complete
(no torch).

    folder = HotFolder(Path("incoming"), settle_s=1.0, unreadable_grace_s=10.0)
    folder.scan()
    candidate = folder.next_candidate()          # stable for settle_s, earliest arrival first
    ready = folder.read(candidate)               # bytes + decoded image, or a final error
    ...
    folder.forget(candidate)                     # processed (moved, deleted) or ignored for good

A camera may write a file in several steps, so a file is a candidate only once its size and mtime
have not changed for `settle_s` (polling `os.scandir`: it works on network shares, unlike
inotify). It is then read and decoded; if the bytes changed meanwhile it waits again. A file that
stays unchanged but does not decode is given `unreadable_grace_s` more (a slow writer pausing
longer than settle_s), then handed over as a final error for quarantine. That includes a JPEG
or PNG whose writer sized the file first (a Windows copy to a share) and stalled: its
zero-filled end does not decode (`preprocess.UNWRITTEN_TAIL_BYTES`). An uncompressed BMP or TIFF so
written cannot be told from one with black rows, and a stall past settle_s hands it over
half written.

A file that keeps changing is told of once at INFO (event "file_still_changing") when it has
changed at least STILL_CHANGING_CHANGES times, never pausing for settle_s in between, over
STILL_CHANGING_SETTLES times settle_s (at least STILL_CHANGING_MIN_S): a writer that never
pauses that long is never taken. The time told is that run of changes' (from when it was first
seen, or from its first change after a pause of settle_s): a file changed once while it waited
its turn behind a backlog is not told of. A file this process may not read (EACCES, EPERM:
the camera's user wrote it with mode 0600) is no broken image: it is never quarantined but
stays pending, read again every DENIED_RETRY_S, with a WARNING (event "file_unreadable") when
first met and every DENIED_WARN_EVERY_S while it lasts, and an INFO once it can be read;
`pending()` leaves it out (it waits for its permissions, not for the daemon: a batch run ends).
Nor is a file whose read fails for want of something the process or the machine runs short of
(SHORTAGES: EMFILE, ENFILE, ENOMEM, ENOBUFS, EAGAIN; a daemon at its open-files limit, a
machine out of memory): the image is not at fault, so it stays pending, read again every
SHORTAGE_RETRY_S, with a WARNING naming the shortage and what to raise (event
"file_read_shortage") when first met and every SHORTAGE_WARN_EVERY_S while it lasts, and the
same INFO once it can be read; `pending()` leaves it out too (a batch run ends, and the next
takes it). Any other OSError (EIO, ...) is the file's: quarantined after the grace.

Names may repeat: an arrival is identified by `file_key` (name, size, mtime in ns, inode) plus
its content hash, so the same name written again is a new arrival. A file kept in the folder
(`ignore`) is remembered with its ctime beside its key: found again under its very key but
another ctime (rewritten in place with the same size and a whole-second time set alike, `cp
-p`; or only chmod'ed), it is handed over once more marked `recheck`, and the intake compares
its contents with its row's (read once, then remembered with its new ctime). The ctime is not
part of the key: the rows' keys stay as they were, and a metadata change alone makes no new
row. An untouched kept file is never read again. Arrival order is the order
in which files were first seen (mtime, then name, for files found in the same scan); a file still
being written does not hold back complete ones behind it.

Ignored names: hidden files (".name") and the usual in-progress suffixes (IN_PROGRESS_SUFFIXES),
so writers that write to a temporary name and rename are picked up only after the rename.

Only images are taken: files whose name ends in one of `extensions` (by default the image
extensions IMAGE_SUFFIXES, .jpg .jpeg .png .bmp .tif .tiff, in any case; None takes every
file). The companion files camera software and Windows write beside the images (Thumbs.db,
desktop.ini, .json/.xml/.txt sidecars) are left alone: never read, moved, deleted or
quarantined, and never recorded. Each is logged once at INFO (event "file_skipped", not a
WARNING: they are expected and need no action, and a sidecar per image would bury the
warnings that do) when first seen; of those a scan finds new, the first SKIPPED_NAMED_PER_SCAN
of each kind (sidecar, link, subfolder, FIFO) by name are, the others are counted in one INFO
line (event "files_skipped") and each named at DEBUG (a folder of 10 000 sidecars at
start-up). `skipped_files()` says how many the last scan found (the daemon serves it as the
`splitdet_edge_skipped_files` gauge: a camera writing its images under another extension
shows there, not as quarantined files). "Once" holds while the file stays and for the
SKIPPED_GONE_MEMORY names last gone, so a status file the camera deletes and writes again is
not logged each time; memory stays bounded by the folder's contents.

So are the other entries never taken, each with its own reason (the line's "why"): a subfolder
without `recursive` (told once as a folder, its files not listed), a symbolic link, to a file
or to a folder, and a FIFO, socket or device. Links are not followed: a link is not the image
(moving or deleting it after processing leaves the image where it was, to be taken again
through another link), a write to its target does not change the link's own times (the
settling would not see it), and the target may lie anywhere, outside the folder the daemon
was given. Not told of: hidden and in-progress names, the daemon's own quarantine and
archive, and folders holding IGNORE_MARKER.

With `recursive`, files in subfolders count too (camera software that writes a folder per day or
per line), tracked by their path below the hot folder; hidden folders, symbolic links to folders
and the `exclude`d folders (the daemon's own quarantine and archive, when they lie inside) are
not entered, nor any folder holding a file named IGNORE_MARKER (`splitdet edge collect` puts
one in its output: the collected copies are not new images; see `edge.ignore_marker`).

A folder that cannot be listed (a root-only `lost+found`, an I/O error on a network share) is
skipped with a WARNING naming it and why, once until it can be listed again or the reason
changes; everything else goes on, and the files already tracked below it are kept as they were
(a passing error does not make them new arrivals). The same holds for the hot folder itself
once running: the daemon checks it can list it at start-up, and a later failure only pauses
the scans until it can be listed again.

Cost: a scan runs every poll (0.25 s), and a folder kept with `--after keep` holds thousands
of files already done, so a scan does only what the folder's state calls for:

- nothing changed (the times of the hot folder and of each folder entered are as when they
  were last listed; each is opened and fstat'ed, which on NFS fetches them afresh): nothing
  is listed; stat'ed are only the files still pending (being written, settling, waiting) and
  those kept in the last `recent_s` (RECENT_S, 60 s). A camera that writes one name again in
  place (`latest.png`, same inode: its folder's times do not change) is so seen at once;
- a folder's times changed (a file added, removed or renamed), or it was listed less than
  3 s (RACY_NS) after its last change (a change in the same timestamp tick, FAT's 2 s or a
  clock tick, leaves them as they were), every `full_scan_s` (FULL_SCAN_S, 5 s), and on
  every scan while a folder cannot be listed: the folders are listed and every file stat'ed
  (a file removed and written again may get its old inode back at once, so only its stat
  tells it from the one done). The full scan is when a file done long ago and written
  again in place is seen: at most FULL_SCAN_S late, so a version of it that stays longer
  than that (and `--settle`) is never missed, and with `recent_s` at least as long a camera
  rewriting one name at a steady pace has none missed. It also bounds the delay on a network
  share whose folder times come from a clock behind ours, and the listings of a folder whose
  modification time lies more than RACY_NS ahead of ours (a file server's clock running
  ahead: when it changed cannot be told, so it is not listed again at every scan). Measured
  with 20 000 kept files polled every 0.25 s: 4% of a core idle, against 45% when every poll
  stat'ed them all.

Handing files over is O(1) per file in arrival order (tracked files are kept in arrival order,
see `next_candidate`), so the thousands of files of a folder kept with `--after keep` are handed
over again quickly after a restart.

The parts: the listing, the names taken and the detection of a changed folder
(`watcher_listing`), the reports of what is left alone, cannot be listed or may not be read
(`watcher_reports`); this module holds the settling and the reading, and every name its
callers import from here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from splitdet.edge.file_identity import file_key
from splitdet.edge.preprocess import (
    IMAGE_SUFFIXES,
    MAX_FILE_BYTES,
    ImageError,
    Pixels,
    decode_pixels,
    read_regular_file,
    too_large_text,
)
from splitdet.edge.watcher_listing import (
    FULL_SCAN_S,
    RECENT_S,
    FolderListing,
    _below_any,
    _Found,
    enters_subfolder,
    is_ignored_name,
    normalize_extensions,
    parse_extensions,
)
from splitdet.edge.watcher_reports import (
    SKIPPED_GONE_MEMORY,
    SKIPPED_NAMED_PER_SCAN,
    FolderReports,
    _Denied,
)

#: What callers import from here, wherever it is defined.
__all__ = [
    "SKIPPED_GONE_MEMORY",
    "SKIPPED_NAMED_PER_SCAN",
    "STILL_CHANGING_CHANGES",
    "STILL_CHANGING_MIN_S",
    "STILL_CHANGING_SETTLES",
    "Candidate",
    "HotFolder",
    "Ready",
    "enters_subfolder",
    "file_key",
    "is_ignored_name",
    "normalize_extensions",
    "parse_extensions",
]

log = logging.getLogger(__name__)

#: A file still changing after this many settle times (and STILL_CHANGING_MIN_S) is told of,
#: once it changed at least STILL_CHANGING_CHANGES times without a pause of settle_s between.
STILL_CHANGING_SETTLES = 10
STILL_CHANGING_MIN_S = 5.0
STILL_CHANGING_CHANGES = 3

#: A read failing with one of these errnos says the process or the machine is short of
#: something, not that the file is bad: it is kept pending and read again (`_short_of`),
#: never quarantined. By errno, what the WARNING tells the operator. EAGAIN (EWOULDBLOCK): an
#: open without blocking of a file another program holds a lease on, or a busy share.
SHORTAGES: dict[int, str] = {
    errno.EMFILE: "too many open files in this process: raise its limit on open files "
    "(LimitNOFILE= in its systemd unit, ulimit -n)",
    errno.ENFILE: "too many open files on this machine: raise fs.file-max (sysctl), or stop "
    "what holds them",
    errno.ENOMEM: "out of memory: check ulimit -v / the container's memory limit, and what "
    "else runs here",
    errno.ENOBUFS: "no buffer space available: the machine is short of memory",
    errno.EAGAIN: "busy for now: another program holds a lease or lock on it, or the share is busy",
}
#: Seconds between reads of a file met in a shortage, and between the WARNINGs saying so.
SHORTAGE_RETRY_S = 2.0
SHORTAGE_WARN_EVERY_S = 300.0
#: The SHORTAGES of the process or the machine, met by every file alike (not EAGAIN: one file's
#: lease): told in one WARNING for all the files they hold back, at most every
#: SHORTAGE_WARN_EVERY_S, with how many wait.
PROCESS_SHORTAGES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass
class Candidate:
    """A file in the hot folder that has been unchanged for the settle period.

    Attributes:
        path: the file.
        file_key: "name|size|mtime_ns|inode": this arrival's identity.
        first_seen: unix s when the watcher first saw the file (kept while it is still being
            written: when it appeared).
        stable_since: monotonic s since when size and mtime have not changed.
        name: the file's path below the hot folder, "/"-separated; what the folder tracks it by.
        seen: monotonic s when the watcher first saw it (kept while it changes).
        told_changing: whether "still changing" was logged for it (`HotFolder._changing`).
        changing_since: monotonic s when its current run of changes began: when first seen,
            or at the first change after it stayed unchanged for settle_s (`_changing`).
        changes: changes seen in that run.
        ctime_ns: its st_ctime_ns when found: a file kept in the folder (`ignore`) found
            again under its key with another ctime may have been rewritten in place.
        recheck: found under the key of a file kept in the folder, with another ctime: its
            contents are compared with its row's once (`Intake`), not taken at its key's word.
    """

    path: Path
    file_key: str
    size: int
    mtime_ns: int
    first_seen: float
    stable_since: float
    order: int = 0
    name: str = ""  # the path below the hot folder ("a.png", "2026-12-04/a.png"): its key
    seen: float = 0.0  # monotonic s when first seen (kept while it changes)
    told_changing: bool = False  # "still changing" logged (`HotFolder._changing`)
    changing_since: float = 0.0  # monotonic s its current run of changes began
    changes: int = 0  # changes seen in that run
    ctime_ns: int = 0  # st_ctime_ns when found
    recheck: bool = False  # a kept file's key, another ctime: compare its contents once


@dataclass(frozen=True)
class Ready:
    """A complete file: its bytes and either the decoded image or why it is unusable.

    Attributes:
        data: the file's bytes.
        content_hash: SHA-256 hex of `data`.
        image: the decoded image's integer pixels (`preprocess.Pixels`, which the pipeline's
            `process_array` takes; `Pixels.to_unit_float()` is its Float32[3, H, W] in
            [0, 1]), or None when `error` is set.
        error: why the file cannot be used (names the file), None for a good image.
        read_s: seconds spent reading and decoding.
    """

    candidate: Candidate
    data: bytes
    content_hash: str
    image: Pixels | None
    error: str | None
    read_s: float


class HotFolder(FolderListing, FolderReports):
    """Tracks files in one folder until they are complete; see the module docstring.

    Args:
        folder: the hot folder.
        settle_s: seconds a file's size and mtime must stay unchanged before it is read.
        unreadable_grace_s: seconds an unchanged file that does not decode is given before it
            is handed over as an error (quarantine).
        recursive: take the files of subfolders too (see the module docstring).
        exclude: folders never entered with `recursive` (where the daemon moves files to).
        extensions: take only files whose name ends in one of these, case-insensitive
            (`normalize_extensions`); None takes every file. The others are left alone.
        pixel_bits: the bits 16-bit grayscale values use (the model's `ModelConfig.
            pixel_bits`): how images are decoded, and which are refused.
        full_scan_s: seconds between full scans of a folder whose times say unchanged.
        recent_s: seconds a file kept in the folder (`ignore`) is stat'ed on every scan; at
            least `full_scan_s`, or a camera rewriting one name in place may have a version
            missed (see the module docstring's "Cost").
    """

    def __init__(
        self,
        folder: Path,
        settle_s: float = 1.0,
        unreadable_grace_s: float = 10.0,
        recursive: bool = False,
        exclude: tuple[Path, ...] = (),
        extensions: Iterable[str] | None = IMAGE_SUFFIXES,
        pixel_bits: int = 16,
        full_scan_s: float = FULL_SCAN_S,
        recent_s: float = RECENT_S,
    ) -> None:
        if min(settle_s, unreadable_grace_s, full_scan_s, recent_s) < 0:
            raise ValueError("settle, grace and scan times must be non-negative")
        self.extensions = None if extensions is None else normalize_extensions(extensions)
        self.folder = Path(folder)
        self.settle_s = settle_s
        self.unreadable_grace_s = unreadable_grace_s
        self.recursive = recursive
        self.pixel_bits = pixel_bits
        self.full_scan_s = full_scan_s
        self.recent_s = recent_s
        self._exclude = {Path(p).resolve() for p in exclude}
        # By name (path below the folder). Only `scan` adds, always with the next `order`, so
        # this is in arrival order: `next_candidate` stops at the first ready file instead of
        # comparing them all (an OrderedDict: a plain dict gets slow to iterate once many of
        # its first entries are deleted, as handing files over does).
        self._tracked: OrderedDict[str, Candidate] = OrderedDict()
        # name -> (file_key, st_ctime_ns) to skip (kept files already done); the same key with
        # another ctime (rewritten in place?) is handed over once more, marked `recheck`
        self._ignored: dict[str, tuple[str, int]] = {}
        self._next_order = 0
        self._warned: dict[str, str] = {}  # unlistable name -> the reason already logged
        self._denied: dict[str, _Denied] = {}  # tracked files we may not read (`_deny`)
        self._short: dict[str, _Denied] = {}  # tracked files read in a shortage (`_short_of`)
        #: when a process-wide shortage may be told again, by (errno, stage)
        self._process_short_warn_at: dict[tuple[int | None, str], float] = {}
        self._skipped: dict[str, str] = {}  # names the last scan left alone -> why (EXTENSION...)
        # Skipped names already logged, oldest first: those in the folder, and up to
        # SKIPPED_GONE_MEMORY of those gone since (a name written again is not logged again).
        self._told: OrderedDict[str, str] = OrderedDict()  # name -> why it was left alone
        # Files kept in the folder lately, oldest first: name -> (path, monotonic s of `ignore`)
        self._recent: OrderedDict[str, tuple[Path, float]] = OrderedDict()
        # Each folder listed (or left for its ignore marker) -> `_folder_times` before listing
        self._folders: dict[str, tuple[int, int, int, int]] = {}
        self._racy = True  # a folder was listed within RACY_NS of its change: list again
        self._last_full = -math.inf  # monotonic s of the last listing (every file stat'ed)
        # `order` of the first file found after the first listing: those below it lay in the
        # folder when this HotFolder started (`ignore` tells them from this run's arrivals)
        self._first_new_order: int | None = None

    def scan(self) -> None:
        """Look at the folder once: note new files, changes and removals. Only as much is
        listed and stat'ed as the folder's state calls for (the module docstring's "Cost")."""
        now_wall, now = time.time(), time.monotonic()
        while self._recent and next(iter(self._recent.values()))[1] < now - self.recent_s:
            self._recent.popitem(last=False)
        due = bool(self._warned) or now - self._last_full >= self.full_scan_s
        if not due and not self._racy and not self._folders_changed():
            found = self._restat()
            if found is not None:
                self._note_found(found, now_wall, now)
                return
        self._list(now_wall, now)

    def _list(self, now_wall: float, now: float) -> None:
        """List the folders and stat every file: note new files, changes and removals."""
        self._last_full = now
        self._folders, self._racy = {}, False
        seen: set[str] = set()
        found: list[_Found] = []
        failed: dict[str, str] = {}
        skipped: dict[str, str] = {}
        for name, path, stat in self._files(self.folder, failed, skipped):
            seen.add(name)
            found.append((stat.st_mtime_ns, name, path, stat))
        if failed or self._warned:
            self._report(failed)
        if skipped or self._skipped:
            self._note_skipped(skipped, failed)
        for name in list(self._tracked):
            if name not in seen and not _below_any(name, failed):
                del self._tracked[name]
                self._denied.pop(name, None)
                self._short.pop(name, None)
        for name in list(self._ignored):
            if name not in seen and not _below_any(name, failed):
                del self._ignored[name]
                self._recent.pop(name, None)
        self._note_found(found, now_wall, now)
        if self._first_new_order is None:  # (the start's listing: what lay there already)
            self._first_new_order = self._next_order

    def _note_found(self, found: list[_Found], now_wall: float, now: float) -> None:
        """Track the files found new or changed, in arrival order (mtime, then name)."""
        for mtime_ns, name, path, stat in sorted(found):
            key = file_key(path, stat)
            ignored = self._ignored.get(name)
            recheck = ignored is not None and ignored[0] == key
            if recheck and ignored[1] == stat.st_ctime_ns:  # the kept file, untouched
                continue
            tracked = self._tracked.get(name)
            if tracked is not None and (tracked.size, tracked.mtime_ns) == (stat.st_size, mtime_ns):
                continue
            if tracked is not None:  # still being written: it settles again from now
                settled = now - tracked.stable_since >= self.settle_s  # (paused before this)
                tracked.size, tracked.mtime_ns, tracked.file_key = stat.st_size, mtime_ns, key
                tracked.ctime_ns, tracked.recheck = stat.st_ctime_ns, recheck
                tracked.stable_since = now
                self._changing(tracked, now, settled)
                continue
            self._tracked[name] = Candidate(
                path, key, stat.st_size, mtime_ns, now_wall, now, self._next_order, name, now,
                changing_since=now, ctime_ns=stat.st_ctime_ns, recheck=recheck,
            )  # fmt: skip
            self._next_order += 1

    def _changing(self, candidate: Candidate, now: float, settled: bool) -> None:
        """A tracked file changed again (`settled`: after it had stayed unchanged for settle_s,
        which begins a new run of changes): DEBUG, and INFO once when it has kept changing,
        STILL_CHANGING_CHANGES times or more without such a pause, for STILL_CHANGING_SETTLES
        times the settle time (at least STILL_CHANGING_MIN_S) since that run began (event
        "file_still_changing", `changing_s` that run's length in s): a writer that never
        pauses for --settle (a log, a preview rewritten in place) is never taken. A file that
        changed once after waiting its turn (behind a backlog) is not told of."""
        if settled:
            candidate.changing_since, candidate.changes = now, 0
        candidate.changes += 1
        path, changing_s = str(candidate.path), now - candidate.changing_since
        log.debug(f"{path} changed, settles again",
                  extra={"fields": {"event": "file_changing", "path": path,
                                    "size": candidate.size}})  # fmt: skip
        long = max(STILL_CHANGING_SETTLES * self.settle_s, STILL_CHANGING_MIN_S)
        if (
            candidate.told_changing
            or candidate.changes < STILL_CHANGING_CHANGES
            or changing_s < long
        ):
            return
        candidate.told_changing = True
        log.info(
            f"{path} is still changing after {changing_s:.0f} s: taken once its size and "
            f"modification time stay the same for --settle {self.settle_s:g} s",
            extra={"fields": {"event": "file_still_changing", "path": path,
                              "changing_s": round(changing_s, 1)}},
        )  # fmt: skip

    def listing_short(self) -> bool:
        """Whether the last scan could not list the folder, or a folder or file in it, for a
        shortage of the process or the machine (PROCESS_SHORTAGES: open files, memory): what
        lies there was not seen (a --once run that ends so exits 1, as for `held_back`)."""
        shortages = {os.strerror(number) for number in PROCESS_SHORTAGES}
        return any(reason in shortages for reason in self._warned.values())

    def held_back(self) -> int:
        """Files met in a shortage (`_short_of`: open files, memory) and not taken since: not
        `pending`, but not done either (a --once run that leaves them exits 1)."""
        return len(self._short)

    def pending(self) -> int:
        """Files seen and not yet handed over for good, but for those this process may not
        read (`_deny`) or met in a shortage (`_short_of`): they wait for a change of
        permissions, or for the shortage to end, not for the daemon."""
        return len(self._tracked) - len(self._denied) - len(self._short)

    def next_candidate(self, skip: set[str] | None = None) -> Candidate | None:
        """The earliest-arrived file that has been stable for the settle period, or None.

        `_tracked` is in arrival order, so the first one that qualifies is the answer: the
        files passed over are only those still settling or in `skip`."""
        now = time.monotonic()
        for name, candidate in self._tracked.items():
            if skip and name in skip:
                continue
            denied = self._denied.get(name) if self._denied else None
            if denied is None and self._short:
                denied = self._short.get(name)
            if denied is not None and now < denied.retry_at:
                continue
            if now - candidate.stable_since >= self.settle_s:
                return candidate
        return None

    def read(self, candidate: Candidate) -> Ready | None:
        """Read and decode a candidate. None means "not yet" (it changed, vanished, may not
        be read (`_deny`), could not be read for a shortage of open files or memory
        (`_short_of`), or does not decode and its grace period is not over); the caller moves
        on to other files.
        It is read as `read_regular_file` reads (`_read_file`): a FIFO put in its place since
        the scan is never opened (that would block the daemon for good), nor a file grown past
        MAX_FILE_BYTES read whole."""
        start = time.perf_counter()
        try:
            if candidate.size > MAX_FILE_BYTES:
                data = b""
                error = too_large_text(candidate.path, candidate.size)
            else:
                data, error = _read_file(candidate.path)
            stat = candidate.path.stat()
        except FileNotFoundError:
            self._tracked.pop(candidate.name, None)
            self._denied.pop(candidate.name, None)
            self._short.pop(candidate.name, None)
            return None
        except PermissionError as exc:  # EACCES, EPERM: the folder's setup, not the image
            self._short.pop(candidate.name, None)
            self._deny(candidate, exc)
            return None
        except OSError as exc:
            if exc.errno in SHORTAGES:  # the process's or the machine's, not the image's
                self._denied.pop(candidate.name, None)
                self._short_of(candidate, exc)
                return None
            data, error, stat = b"", f"{candidate.path}: cannot read ({exc.strerror or exc})", None
        short = self._short.get(candidate.name)
        if short is not None and short.stage == "read":  # (a model run's: over once it runs)
            self._shortage_over(candidate, error is None)
        if candidate.name in self._denied:
            if error is None:
                self._allowed(candidate)
            else:  # opened or stat'ed, but not read: no "can be read now"
                self._denied.pop(candidate.name)
        if stat is not None and file_key(candidate.path, stat) != candidate.file_key:
            self.scan()  # written to meanwhile: settle again
            return None
        image = None
        if error is None:
            try:
                image = decode_pixels(data, str(candidate.path), self.pixel_bits)
            except ImageError as exc:
                error = str(exc)
        unchanged_s = time.monotonic() - candidate.stable_since
        if error is not None and unchanged_s < self.settle_s + self.unreadable_grace_s:
            return None  # maybe a writer pausing longer than settle_s: give it the grace
        return Ready(
            candidate=candidate,
            data=data,
            content_hash=hashlib.sha256(data).hexdigest(),
            image=image,
            error=error,
            read_s=time.perf_counter() - start,
        )

    def _short_of(self, candidate: Candidate, exc: OSError, doing: str = "read") -> None:
        """A read (or, `doing` "process", the model's run on it: `Intake`) failed for want of
        something the process or the machine runs short of (SHORTAGES: open files, memory):
        not the image's fault, so it is not quarantined but kept pending and read again every
        SHORTAGE_RETRY_S. A WARNING naming the shortage when first met and every
        SHORTAGE_WARN_EVERY_S while it lasts (event "file_read_shortage"): per file for EAGAIN,
        once for all the files a shortage of the whole process holds back
        (PROCESS_SHORTAGES: a backlog of 300 gave 300 lines)."""
        now = time.monotonic()
        short = self._short.get(candidate.name)
        since, warn_at = (now, now) if short is None else (short.since, short.warn_at)
        whole = exc.errno in PROCESS_SHORTAGES  # (not this file's: one line for all of them)
        kind = (exc.errno, doing)  # (another shortage, or stage, is told on its own)
        if now >= (self._process_short_warn_at.get(kind, 0.0) if whole else warn_at):
            path, code = str(candidate.path), errno.errorcode.get(exc.errno, str(exc.errno))
            reason = exc.strerror or str(exc)
            lasting = f" for {now - since:.0f} s" if short is not None else ""
            waiting = len(self._short) + (short is None)  # (held so far, every kind)
            others = f" ({waiting} files held so far)" if whole and waiting > 1 else ""
            log.warning(
                f"cannot {doing} {path}{lasting}: {SHORTAGES[exc.errno]} ({code}: {reason}); not "
                "the image's fault: left where it is, not quarantined, and tried again every "
                f"{SHORTAGE_RETRY_S:g} s{others}",
                extra={"fields": {"event": "file_read_shortage", "path": path, "errno": code,
                                  "error": reason, "short_s": round(now - since, 1),
                                  "stage": doing, "files_waiting": waiting}},
            )  # fmt: skip
            warn_at = now + SHORTAGE_WARN_EVERY_S
            if whole:
                self._process_short_warn_at[kind] = warn_at
        self._short[candidate.name] = _Denied(since, now + SHORTAGE_RETRY_S, warn_at, doing)

    def short_of_memory(self, candidate: Candidate, reason: str) -> None:
        """The model's run on a candidate read whole failed for want of memory (`reason`: what
        the library said): as a read in a shortage (`_short_of`), the file waits in --watch,
        unrecorded, and is taken again after SHORTAGE_RETRY_S."""
        self._short_of(candidate, OSError(errno.ENOMEM, reason), doing="process")

    def _shortage_over(self, candidate: Candidate, read: bool) -> None:
        """A file `_short_of` kept back was read again: INFO (event "file_readable") when it
        could be, silence when it failed otherwise (its error goes the usual way)."""
        short = self._short.pop(candidate.name)
        if read:
            path = str(candidate.path)
            log.info(f"{path} can be read now, after {time.monotonic() - short.since:.0f} s",
                     extra={"fields": {"event": "file_readable", "path": path}})  # fmt: skip

    def forget(self, candidate: Candidate) -> None:
        """The file was handled (moved or deleted): stop tracking it."""
        self._tracked.pop(candidate.name, None)
        self._denied.pop(candidate.name, None)
        self._short.pop(candidate.name, None)

    def settle_again(self, candidate: Candidate) -> None:
        """The file was written again in place after it was read, under its very key (its
        ctime, and its contents, changed: `AfterActions`): it stays tracked (as a new arrival:
        `Intake` compares it with its row), settling from now, with the ctime it has now
        (kept if it cannot be stat'ed: the next scan tells)."""
        with contextlib.suppress(OSError):
            candidate.ctime_ns = candidate.path.stat().st_ctime_ns
        candidate.stable_since = time.monotonic()

    def ignore(self, candidate: Candidate) -> None:
        """The file stays in the folder but is done: skip it until it changes (for `recent_s`
        it is stat'ed on every scan, later when its folder changed or at a full scan).

        A file that already lay in the folder at start and last changed (ctime) more than
        `recent_s` ago (a kept image an earlier run recorded, found again after a restart) is
        not stat'ed on every scan: a camera rewriting it is seen by its folder's times or the
        next full scan, as for any file kept long ago. Otherwise a restart on a folder of
        20 000 kept files stat'ed all of them every --poll for a minute (a fifth of a core
        for 10 000 files)."""
        self._tracked.pop(candidate.name, None)
        self._denied.pop(candidate.name, None)
        self._short.pop(candidate.name, None)
        self._ignored[candidate.name] = (candidate.file_key, candidate.ctime_ns)
        at_start = self._first_new_order is not None and candidate.order < self._first_new_order
        changed_s = (time.time_ns() - candidate.ctime_ns) / 1e9
        if at_start and changed_s >= self.recent_s:
            self._recent.pop(candidate.name, None)
            return
        self._recent[candidate.name] = (candidate.path, time.monotonic())
        self._recent.move_to_end(candidate.name)


def _read_file(path: Path) -> tuple[bytes, str | None]:
    """A candidate's bytes and None, or b"" and why it cannot be used (no longer a regular
    file: replaced by a FIFO or device since the scan; grown past MAX_FILE_BYTES), read by
    `read_regular_file`: never blocking, never past the limit. FileNotFoundError,
    PermissionError and other OSErrors are raised, for `HotFolder.read` to tell apart."""
    try:
        return read_regular_file(path), None
    except ImageError as exc:
        return b"", str(exc)
