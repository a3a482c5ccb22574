"""The edge store's SQLite file (no torch): telling a store from any other file, opening it
read-only, locking it for its one writer, and the transaction helper its writers share.

A store is marked by `PRAGMA application_id` (`APPLICATION_ID`); one written before the mark
was set (application_id 0) is known by its tables and user_version, and marked when next opened
for writing. Any other SQLite file (another program's, a cloud answers database) is refused
before anything is written to it; an empty one becomes a store. A writer checks an existing
file read only first (`check_before_writing`: what it holds, then `PRAGMA quick_check`), so that
neither a damaged store nor a refused file is written to (a read-write connection's close
would checkpoint a -wal beside it into it); the readers meet damage only where they read it
(`read_failure`). `damaged_store` words what to do about a damaged one.

One `splitdet edge run` per database: `WriterLock` (an flock on DB.lock, and one on the database
file itself, held for the daemon's life) refuses a second, also one given the same file under
another name; the maintenance and read-only commands do not take it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from splitdet.edge.store_schema import (
    _TABLES,
    ANSWERS_APPLICATION_ID,
    APPLICATION_ID,
    REQUIRED_COLUMNS,
    SCHEMA_VERSION,
)
from splitdet.shared.atomic_file import FULL_BELOW_BYTES, free_bytes
from splitdet.shared.folder_lock import flock_holder, lock_exclusively
from splitdet.shared.one_line import one_line
from splitdet.shared.regular_file import open_regular

#: What to do about a --db whose disk filled while the daemon ran (its intake's or its
#: sender's write failed): said by `edge run`'s last line.
FREE_DB_SPACE = "free space there, or bound the database (--keep-results, --outbox-max-mb)"


class StoreError(RuntimeError):
    """The database cannot be used (newer schema, not a splitdet store, ...)."""


class StoreLocked(StoreError):
    """The database could not be opened because another program held it locked past the busy
    timeout: worth waiting for, unlike the rest. `cause`: SQLite's words ("database is
    locked")."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause


#: SQLite's primary result codes for a file it could not read, write or create: the disk or
#: the permissions are at fault, not the file (as against SQLITE_NOTADB, SQLITE_CORRUPT).
_IO_CODES = frozenset({sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL, sqlite3.SQLITE_CANTOPEN,
                       sqlite3.SQLITE_READONLY, sqlite3.SQLITE_PERM})  # fmt: skip
#: ... and for a file another connection holds locked (past the busy timeout).
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def is_busy(exc: sqlite3.Error) -> bool:
    """True when `exc` says another connection held the database locked past the busy timeout
    (an `sqlite3` shell, a backup, a long `edge requeue`): worth waiting for, unlike the rest."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _BUSY_CODES


def open_failure(path: Path | str, exc: sqlite3.Error, verb: str = "open") -> StoreError:
    """The StoreError for a store SQLite failed to open (connect, first read, set-up), naming
    the file and what to do by what failed: a full file system (the store is probably fine
    and must not be deleted: it may hold results still to deliver), another I/O error (the
    disk, its space or the permissions to check), a lock another program holds, or, only when
    the file itself is at fault (not a database, damaged), "not a usable SQLite database".
    `verb`: what failed, in "cannot VERB it" ("read": `read_failure`'s)."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    if is_busy(exc):
        return StoreLocked(
            f"{path}: cannot {verb} it ({exc}): another program holds it locked; try again "
            "once it lets go",
            str(exc),
        )
    if primary not in _IO_CODES:
        return StoreError(f"{path}: not a usable SQLite database ({exc})")
    if os.path.isdir(path):
        return StoreError(_folder_given(path))
    folder = Path(os.path.realpath(path)).parent  # (of the file a symbolic link names)
    disk = disk_problem(path, f"cannot {verb} it ({exc})")
    if disk is not None:
        return disk
    free = free_bytes(folder)
    space = "" if free is None else f" ({_amount(free)} free)"
    return StoreError(
        f"{path}: cannot {verb} it ({exc}); check the disk holding it: its free space{space}, "
        f"the permissions of the file and of {folder}, and the kernel log (dmesg) for disk "
        "errors. This says nothing against the database itself: do not delete or replace it "
        "(it may hold results not yet delivered)"
    )


#: SQLite's primary result codes for a file whose bytes are not a sound database: damaged
#: (a page overwritten, a -wal of another database or of the file's earlier self beside it).
_DAMAGED_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def damaged_store(path: Path | str, what: str) -> StoreError:
    """The StoreError for a store found damaged (`what`: "quick_check: FIRST LINE", or
    SQLite's words met while reading it), with what to do: restore a backup the way that
    leaves no -wal of the damaged file beside it, or start on a new --db. The one wording of
    it, for the writers' open (`check_before_writing`) and the reading commands
    (`read_failure`)."""
    return StoreError(
        f"{path} is damaged ({what}): restore it from a backup (stop the daemon, remove "
        f"{path}-wal and {path}-shm, then put the backup in place) or start on a new --db "
        "(every image still in --watch is then processed again)"
    )


def is_damage(exc: sqlite3.Error) -> bool:
    """Whether SQLite's `exc` says the file is damaged (SQLITE_CORRUPT, SQLITE_NOTADB: "database
    disk image is malformed"), not busy, full or failing."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _DAMAGED_CODES


def read_failure(path: Path | str, exc: sqlite3.DatabaseError) -> StoreError:
    """The StoreError for an opened store that failed while being read (`edge status`,
    `edge results`): `damaged_store` for a damaged file ("database disk image is
    malformed", or a text column whose bytes are not UTF-8: "Could not decode to UTF-8
    column ..."), `open_failure`'s for a lock another program holds or a failing disk, and
    "cannot read it (...)" for anything else SQLite says.

    Raises:
        sqlite3.DatabaseError: `exc` itself for a misuse of the connection here (a
            ProgrammingError: a closed connection, a wrong parameter), not a fault of the file.
    """
    if isinstance(exc, sqlite3.ProgrammingError):
        raise exc
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None or code & 0xFF in _DAMAGED_CODES:  # (None: Python's own, e.g. UTF-8)
        return damaged_store(path, one_line(str(exc), at_most=120))
    if is_busy(exc) or code & 0xFF in _IO_CODES:
        return open_failure(path, exc, verb="read")
    return StoreError(f"{path}: cannot read it ({one_line(str(exc), at_most=120)})")


def quick_check(db: sqlite3.Connection, path: Path | str) -> None:
    """`PRAGMA quick_check` of the store open as `db` (the pages and their b-trees, without
    matching each index to its table: about a read of the whole file).

    Raises:
        StoreError: `damaged_store` naming its first finding ("quick_check: On tree page 59
            cell 0: ..."), also when SQLite gives up on the file with an error
            ("quick_check: database disk image is malformed"); `open_failure`'s for a lock
            another program holds or a failing disk.
    """
    try:
        findings = quick_check_findings(db, 1)
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _DAMAGED_CODES:
            raise damaged_store(path, f"quick_check: {exc}") from None
        raise open_failure(path, exc) from None
    if findings:
        raise damaged_store(path, f"quick_check: {findings[0]}")


def quick_check_findings(db: sqlite3.Connection, most: int) -> list[str]:
    """What `PRAGMA quick_check(most)` of the database open as `db` finds wrong, a line each
    (without SQLite's "*** in database main ***" heading); [] when it finds the file sound.
    The edge store's check (`quick_check`) and the cloud's answers file's
    (`IdempotencyStore`) both read it so. sqlite3.DatabaseError when SQLite gives up on the
    file instead."""
    found = [str(row[0]) for row in db.execute(f"PRAGMA quick_check({int(most)})")]
    if not found or found == ["ok"]:
        return []
    lines = [
        line.strip()
        for finding in found
        for line in finding.splitlines()
        if line.strip() and not line.startswith("***")
    ]
    return lines or [finding.strip() for finding in found]


def check_before_writing(path: Path | str, wait_ms: int) -> None:
    """For a writer (`ResultStore`'s open), before it connects to `path` read-write:
    StoreError when the file there is not a store it may write (`check_contents`) or, when a
    -wal holding frames lies beside it, is damaged (`quick_check`), read through a read-only
    connection. Only then: a store its writer closed cleanly has no -wal, and its check, a
    read of the whole file, would cost every start about a second per GB from the page cache
    and ten times that from a cold disk; a -wal is what a crash or a kill leaves, and what a
    backup restored by copying over the file meets, whose pages SQLite reads over the older
    file's (damaging it). Read only, as a read-write connection checkpoints the -wal beside
    the file into it as it closes: refusing a file whose -wal came from another database (a
    restore by copying) would have overwritten it with the other's pages.
    Nothing for a file that is not there (made by the writer), an empty database (made a
    store), or one SQLite cannot open read only for want of access (the read-write open then
    says why); waits up to `wait_ms` for a lock another program holds.

    Raises:
        StoreError: as `check_contents`, `quick_check`; "not a usable SQLite database" for a
            file SQLite cannot read as one.
        StoreLocked: another program held it locked past `wait_ms`.
    """
    path = Path(path)
    if not path.is_file():
        return
    try:
        db, contents = _connect_readonly(path.resolve().as_uri() + "?mode=ro", wait_ms)
    except sqlite3.Error as exc:
        if is_busy(exc) or (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF not in _IO_CODES:
            raise open_failure(path, exc) from None
        return  # (e.g. no -shm allowed here: the read-write open says what is wrong)
    try:
        if not check_contents(path, contents) and has_wal(path):
            quick_check(db, path)
    finally:
        db.close()


def disk_problem(path: Path | str, failed: str) -> StoreError | None:
    """The StoreError for a store (or its lock file) that `failed` ("cannot open it (...)")
    on a file system that is full (less than FULL_BELOW_BYTES free) or mounted read-only:
    what to do, and, when the database exists, that it is probably fine and must not be
    deleted (it may hold results not yet delivered); None when the file system is neither."""
    folder = Path(os.path.realpath(path)).parent  # (of the file a symbolic link names)
    keep = (  # (nothing to keep where no database is yet)
        "; the database itself is probably fine: do not delete or replace it (it may hold "
        "results not yet delivered)"
        if os.path.exists(path)
        else ""
    )
    if _read_only(folder):
        return StoreError(
            f"{path}: {failed}: the file system holding it ({folder}) is mounted read-only; "
            f"remount it read-write, or give a --db on a writable disk{keep}"
        )
    free = free_bytes(folder)
    if free is not None and free < FULL_BELOW_BYTES:
        return StoreError(
            f"{path}: {failed}: the file system holding it is full ({_amount(free)} free in "
            f"{folder}); free space there and start again{keep}"
        )
    return None


def _read_only(folder: Path) -> bool:
    """Whether the file system holding `folder` is mounted read-only (False when unknown)."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _amount(n_bytes: int) -> str:
    """A byte count for a message: "0 bytes", "512 kB", "3.2 MB", "41.0 GB"."""
    if n_bytes < 1000:
        return f"{n_bytes} bytes"
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{n_bytes // 1000} kB"


class StoreInUse(StoreError):
    """Another `splitdet edge run` holds the database's writer lock."""


@dataclass(frozen=True)
class Contents:
    """What a SQLite file holds, as far as telling an edge store from any other file goes.

    Attributes:
        application_id: its `PRAGMA application_id` (APPLICATION_ID, 0, or another program's).
        user_version: its `PRAGMA user_version` (an edge store's schema version).
        names: its tables and views, SQLite's own (sqlite_*) aside, sorted.
        columns: (table, its column names) of each of its tables an edge store has
            (`REQUIRED_COLUMNS`).
    """

    application_id: int
    user_version: int
    names: tuple[str, ...]
    columns: tuple[tuple[str, frozenset[str]], ...] = ()

    def lacking_columns(self, tables: frozenset[str]) -> list[str]:
        """The columns `REQUIRED_COLUMNS` gives `tables` that the file's lack, as
        "table.column", sorted (a table it lacks altogether is not named here)."""
        held = dict(self.columns)
        return sorted(
            f"{table}.{column}"
            for table in tables
            if table in held
            for column in REQUIRED_COLUMNS.get(table, frozenset()) - held[table]
        )


def read_contents(db: sqlite3.Connection) -> Contents:
    """`Contents` of an open connection, read in one transaction (one snapshot: a store another
    process creates meanwhile is seen empty or whole); inside the caller's transaction when it
    has one. Reads only."""
    own = not db.in_transaction
    if own:
        db.execute("BEGIN")
    try:
        application_id = int(db.execute("PRAGMA application_id").fetchone()[0])
        user_version = int(db.execute("PRAGMA user_version").fetchone()[0])
        names = tuple(sorted(row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
            " AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'"
        )))  # fmt: skip
        columns = tuple(
            (table, frozenset(str(row[1]) for row in db.execute(f"PRAGMA table_info({table})")))
            for table in sorted(REQUIRED_COLUMNS)
            if table in names
        )
    finally:
        if own and db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
    return Contents(application_id, user_version, names, columns)


def check_contents(path: Path | str, contents: Contents) -> bool:
    """Whether the file is an empty database (to make a store of), or False when it is an edge
    store this splitdet can use: ours by its application_id, or written before the id was set
    (application_id 0) and ours by its tables at its user_version (all of them; more, such as
    an operator's view, are left alone).

    Raises:
        StoreError: anything else, naming the file and what it holds: another program's
            database (another application_id, not our tables, or none but a user_version), a
            store of a newer splitdet, or one of ours that lacks tables.
    """
    found = set(contents.names)
    if contents.application_id == APPLICATION_ID:
        if contents.user_version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {contents.user_version} is newer than this splitdet's "
                f"{SCHEMA_VERSION}; upgrade splitdet"
            )
        if contents.user_version == 0 and not found:
            return True
        expected = _TABLES.get(contents.user_version)
        lacking = sorted(expected - found) if expected is not None else []
        if expected is None or lacking:
            lacks = f", lacking {', '.join(lacking)}" if lacking else ""
            raise StoreError(
                f"{path}: a damaged splitdet edge store ({describe_contents(contents)}{lacks});"
                f" give another --db{_wal_beside(path)}"
            )
        _check_columns(path, contents, expected)
        return False
    if contents.application_id == 0:
        if contents.user_version == 0 and not found:
            return True
        expected = _TABLES.get(contents.user_version)
        if expected is not None and expected <= found:  # written before APPLICATION_ID (an
            _check_columns(path, contents, expected)  # operator's own view or table beside
            return False  # ours stays welcome)
    held = describe_contents(
        contents, {ANSWERS_APPLICATION_ID: "a splitdet cloud answers database"}
    )
    raise StoreError(
        f"{path}: not a splitdet edge store ({held}); give another --db{_wal_beside(path)}"
    )


def _check_columns(path: Path | str, contents: Contents, tables: frozenset[str]) -> None:
    """Refuse an edge store whose `tables` lack a column every store of theirs has
    (`REQUIRED_COLUMNS`: a copy altered by hand, a table rebuilt by another tool), naming the
    columns, before anything reads or writes it: the first query naming one would fail, in
    the middle of a command's work."""
    lacking = contents.lacking_columns(tables)
    if lacking:
        raise StoreError(
            f"{path}: a damaged splitdet edge store (schema version {contents.user_version}, "
            f"but lacking the column(s) {', '.join(lacking[:8])} every store of that version "
            "has: altered by another program?); nothing was written to it: restore it from "
            "a backup, or give another --db"
        )


def _wal_beside(path: Path | str) -> str:
    """What check_contents adds to its refusal of `path` when a -wal holding frames lies
    beside it: SQLite reads the file through it, and one left from another database (a
    restore by copying, a copied folder) makes a sound store look like that other file; ""
    when there is none (or it is empty)."""
    if not has_wal(Path(path)):
        return ""
    return (
        f"; {path}-wal lies beside it: a -wal left from another database (e.g. after a "
        "restore by copying) makes it look like another file: stop every program using it, "
        f"move {path}-wal and {path}-shm aside and try again"
    )


@contextmanager
def immediate(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT on `db` (the write lock taken at once); ROLLBACK on any
    exception, which is raised on."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")  # a failed COMMIT (disk full) stays open: rolled back below
    except BaseException:
        # SQLite has already rolled back after some errors (SQLITE_FULL); a failing ROLLBACK
        # must not hide the cause either
        if db.in_transaction:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise


def refuse_foreign_file(path: Path | str) -> None:
    """Raise StoreError when the existing file at `path` is another program's SQLite database
    (`check_contents`), reading it only: for a writer to call before it makes anything beside
    the file (its lock file). Nothing for a file that is not there, or that SQLite cannot
    read (the store's own open then says why)."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        db, contents = _connect_readonly(path.resolve().as_uri() + "?mode=ro")
    except sqlite3.Error:
        return
    db.close()
    check_contents(path, contents)


def describe_contents(contents: Contents, known: dict[int, str] | None = None) -> str:
    """What a SQLite file holds, for a message refusing it: "it holds tables a, b", with its
    application_id (said as `known` names it) and user_version when they are set."""
    if contents.names:
        shown = ", ".join(contents.names[:8])
        more = f" and {len(contents.names) - 8} more" if len(contents.names) > 8 else ""
        parts = [f"it holds tables {shown}{more}"]
    else:
        parts = ["it holds no tables"]
    application_id = contents.application_id & 0xFFFFFFFF  # (SQLite's is signed)
    if application_id in (known or {}):
        parts.insert(0, f"it is {(known or {})[application_id]}")
    elif application_id and application_id != APPLICATION_ID:  # (ours goes without saying)
        parts.append(f"application_id {application_id:#010x}, another program's")
    if contents.user_version:
        parts.append(f"user_version {contents.user_version}")
    return "; ".join(parts)


def writer_lock_path(db: Path | str) -> Path:
    """The one-daemon lock file of the store `db` (`WriterLock`): DB resolved (through any
    symbolic link, of the file or of a folder above it) + ".lock"."""
    return Path(f"{Path(db).resolve()}.lock")


class WriterLock:
    """The one-daemon-per-database lock, held for as long as this object is open (the kernel
    drops it when the process ends, kill -9 included, so a stale lock file never blocks a
    restart): an exclusive flock on DB + ".lock", holding the holder's pid, DB the resolved
    path (a database reached through a symbolic link, of the file or of a folder above it,
    has the lock of the file it names); and one on the database file itself, which follows
    its inode: the same file under another name (a hard link, a file bind-mounted into two
    containers at different paths) is refused too. That flock is independent of SQLite's
    own (POSIX byte-range) locks on the file, and stays until `release` whatever descriptors
    SQLite opens and closes. A database missing at start is made (empty: SQLite makes a
    store of it) to be locked before SQLite writes to it; removed again if still empty on a
    `release` before the store was opened.

    Raises:
        StoreInUse: another process holds either.
        StoreError: the lock file or the database cannot be created, opened or locked.
    """

    def __init__(self, db: Path | str) -> None:
        resolved = Path(db).resolve()
        self.path = writer_lock_path(db)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{db}: cannot create its folder ({exc.strerror or exc})") from None
        self._file = _open_lock_file(db, self.path)
        try:
            holder = lock_exclusively(self._file, str(os.getpid()))
        except OSError as exc:  # e.g. ENOLCK on a share without locks; ENOSPC writing our pid
            with suppress(OSError):  # (the pid still buffered: its flush fails again)
                self._file.close()
            raise _failure(db, f"lock {self.path}", exc) from None
        if holder is not None:
            self._file.close()
            via = "" if resolved == Path(os.path.abspath(db)) else f", as {resolved}"
            raise _in_use(db, holder or "unknown", via)
        try:
            self._db_fd, self._made = _lock_database_file(db, resolved)
        except BaseException:
            self._file.close()
            raise

    def release(self) -> None:
        """Drop the locks (the lock file stays: removing it would race a newcomer's lock); a
        database this lock made, still empty (no store was opened), is removed first."""
        if self._file.closed:
            return
        if self._db_fd is not None:
            if self._made is not None:
                _remove_if_still_empty(self._made, self._db_fd)
            os.close(self._db_fd)
            self._db_fd = None
        self._file.close()


def _in_use(db: Path | str, holder: object, via: str) -> StoreInUse:
    """The refusal of a second writer: "DB is in use by another `splitdet edge run` (pid N)"."""
    return StoreInUse(
        f"{db} is in use by another `splitdet edge run` (pid {holder}{via}); one daemon per "
        "database"
    )


def _open_lock_file(db: Path | str, path: Path) -> TextIO:
    """The writer lock file `path` of the store `db`, opened to be locked (made if missing);
    StoreError saying whether making it or opening the one there failed, and why."""
    try:
        return open(path, "a+", encoding="utf-8")  # (held open by the caller)
    except OSError as exc:
        verb = "open" if os.path.lexists(path) else "create"
        raise _failure(db, f"{verb} its lock file {path}", exc) from None


def _lock_database_file(db: Path | str, resolved: Path) -> tuple[int | None, Path | None]:
    """An exclusive flock on the database file itself (made, empty, when missing): its
    descriptor, held open, and the path when this made the file (else None). StoreInUse when
    another process holds it (the same file under another name); a file system that cannot
    flock gets no lock (None), as the lock file would have failed there first."""
    try:  # (never waiting on a FIFO named as --db: refused as not a regular file)
        fd = open_regular(resolved)
        made = None
    except FileNotFoundError:
        fd, made = _make_database_file(db, resolved), resolved
    except OSError as exc:
        if os.path.isdir(resolved):
            raise StoreError(_folder_given(db)) from None
        raise _failure(db, "open it", exc) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = flock_holder(fd)
        os.close(fd)
        raise _in_use(db, holder or "unknown", ", the same database file under another "
                      "name: a hard link or a bind mount") from None  # fmt: skip
    except OSError:
        os.close(fd)
        return None, None
    return fd, made


def _make_database_file(db: Path | str, resolved: Path) -> int:
    """Make the missing database file (empty, mode 0644 less the umask, as SQLite makes one)
    and open it; StoreError naming why it cannot be."""
    try:
        return os.open(resolved, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:  # made meanwhile by another process: lock that one
        return os.open(resolved, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _failure(db, "create it", exc) from None


def _failure(db: Path | str, what: str, exc: OSError) -> StoreError:
    """The StoreError of the writer lock of `db` failing to `what` ("lock DB.lock", "open
    it"): "DB: cannot WHAT (why)", or the full-disk one `disk_problem` words."""
    failed = f"cannot {what} ({exc.strerror or exc})"
    return disk_problem(db, failed) or StoreError(f"{db}: {failed}")


def _remove_if_still_empty(path: Path, fd: int) -> None:
    """Remove the database file `WriterLock` made (open as `fd`) when it is still that empty
    file: the daemon stopped before its store was opened (a bad --model, ...)."""
    with suppress(OSError):
        held, now = os.fstat(fd), os.stat(path)
        same = (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)
        if same and now.st_size == 0 and not os.path.lexists(f"{path}-wal"):
            path.unlink()


def _folder_given(path: Path | str) -> str:
    """What --db `path`, a folder, is told: it names the database file, not its folder."""
    return f"{path}: is a folder; --db names the database file (e.g. {path}/edge.sqlite)"


def missing_store(path: Path | str) -> str | None:
    """Why no store can be read at `path` ("PATH: is a folder; --db names the database file
    (...)", "PATH: no such results database"), or None when it is a file; for the commands
    that read or maintain an existing store and never create one."""
    if os.path.isdir(path):
        return _folder_given(path)
    return None if os.path.isfile(path) else f"{path}: no such results database"


def open_readonly(path: Path | str) -> sqlite3.Connection:
    """A read-only connection to a store (works while the daemon writes: WAL).

    Another user (an operator, a dashboard) may read a store whose folder only the daemon's
    user may write: with the daemon stopped there is no -shm file, and SQLite cannot create one
    there; the store is then opened immutable (nothing can change it meanwhile: its writer has
    stopped, and its WAL is checkpointed)."""
    path = Path(path)
    missing = missing_store(path)
    if missing is not None:
        raise StoreError(missing)
    # as a URI: a '#', '?' or '%' in the name must not be read as URI syntax
    uri = path.resolve().as_uri() + "?mode=ro"
    try:
        db, contents = _connect_readonly(uri)
    except sqlite3.OperationalError as exc:
        if not _no_shm_allowed(path):
            raise open_failure(path, exc) from None
        if has_wal(path):  # commits only in the WAL: an immutable read would miss them
            raise StoreError(
                f"{path}: cannot be read by this user: its writer left commits in {path}-wal "
                f"and SQLite cannot create {path}-shm (the folder is not writable); run as the "
                "daemon's user, or start the daemon (it checkpoints them)"
            ) from None
        try:
            db, contents = _connect_readonly(uri + "&immutable=1")
        except sqlite3.DatabaseError as retry:
            raise open_failure(path, retry) from None
    except sqlite3.DatabaseError as exc:
        raise open_failure(path, exc) from None
    try:  # a store written before APPLICATION_ID was set is read as it is, not marked
        if check_contents(path, contents):
            raise StoreError(
                f"{path}: not a splitdet edge store yet (an empty database; `splitdet edge "
                "run` makes it one)"
            )
    except StoreError:
        db.close()
        raise
    return db


def _connect_readonly(uri: str, wait_ms: int = 10_000) -> tuple[sqlite3.Connection, Contents]:
    """A connection to `uri` and what the file holds (the first read: where SQLite finds out
    whether it can use the file), waiting up to `wait_ms` for a lock another program holds."""
    db = sqlite3.connect(uri, uri=True)
    try:
        db.execute(f"PRAGMA busy_timeout={int(wait_ms)}")
        return db, read_contents(db)
    except BaseException:
        db.close()
        raise


def _no_shm_allowed(path: Path) -> bool:
    """True when a reader cannot create the store's -shm file: there is none, and the folder
    is not writable by this user."""
    shm = Path(f"{path}-shm")
    return not shm.exists() and not os.access(path.parent, os.W_OK | os.X_OK)


def has_wal(path: Path | str) -> bool:
    """True when the database's -wal file holds frames (commits not yet in the main file): a
    writer killed, a writer at work, or a -wal left from another file (a restore by
    copying)."""
    try:
        return Path(f"{path}-wal").stat().st_size > 0
    except OSError:
        return False
