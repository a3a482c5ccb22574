"""Whether a `splitdet edge run` holds a store's writer lock, asked without taking it (no torch).

    state = writer_state(Path("/data/edge.sqlite"))
    state.state, state.pid   # "running", 1234 / "none", None / "unknown", None

`WriterLock` (edge/store_file.py) is an flock on DB + ".lock" (DB resolved through symbolic
links), and one on the database file itself (the same file under another name: a hard link),
held for the daemon's life. Trying that lock, even a shared one for an instant, would
make a daemon starting at that very moment refuse to start ("in use"); so the lock is looked
up in the kernel's table of locks (/proc/locks, Linux), by the lock file's device and inode,
and that line gives the holder's pid. No lock file and no flock on the database file: no daemon
runs. Where /proc/locks cannot be read (not Linux, a restricted /proc) the
state is "unknown", never a guess.

/proc/locks lists only the locks of processes in the reader's pid namespace: a daemon in
another container sharing the store's folder (or on another NFS client) is not seen there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from splitdet.edge.store_file import writer_lock_path

#: The kernel's table of the file locks held (Linux).
PROC_LOCKS = "/proc/locks"


@dataclass(frozen=True)
class WriterState:
    """Whether a daemon holds a store's writer lock.

    Attributes:
        state: "running" (a process holds it), "none" (none does, or no lock file exists) or
            "unknown" (the lock table cannot be read: `detail` says why).
        pid: the holder's pid as the lock table gives it (running only).
        lock_file: the lock file looked up (the database's resolved path + ".lock").
        detail: why the state is unknown; None otherwise.
    """

    state: str
    pid: int | None
    lock_file: str
    detail: str | None = None

    def to_json(self) -> dict:
        """The state as a JSON object: {"state", "pid", "lock_file", "detail"}."""
        return {"state": self.state, "pid": self.pid, "lock_file": self.lock_file,
                "detail": self.detail}  # fmt: skip


def writer_state(db: Path | str) -> WriterState:
    """Whether a process holds the writer lock of the store `db`, read from PROC_LOCKS by the
    lock file's device and inode, or by the database file's (the same database under another
    name: a hard link, a bind mount); the lock itself is never tried."""
    locks_table = PROC_LOCKS
    lock_file = writer_lock_path(db)
    try:
        st: os.stat_result | None = os.stat(lock_file)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return WriterState("unknown", None, str(lock_file),
                           f"cannot look at {lock_file} ({exc.strerror or exc})")  # fmt: skip
    try:
        with open(locks_table, encoding="ascii", errors="replace") as table:
            lines = table.read().splitlines()
    except OSError as exc:
        if st is None:  # no lock file: no daemon ever ran on that path
            return WriterState("none", None, str(lock_file))
        return WriterState("unknown", None, str(lock_file),
                           f"cannot read {locks_table} ({exc.strerror or exc})")  # fmt: skip
    holder = None
    if st is not None:
        holder = holder_pid(lines, os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    if holder is None:
        holder = _database_flock(db, lines)
    if holder is None:
        return WriterState("none", None, str(lock_file))
    return WriterState("running", holder if holder > 0 else None, str(lock_file))


def _database_flock(db: Path | str, lines: list[str]) -> int | None:
    """The pid of the flock a daemon holds on the database file itself (`WriterLock`), as
    `holder_pid` gives it, from the lines of /proc/locks; None when none does (SQLite's own
    POSIX locks on it aside)."""
    try:
        st = os.stat(db)
    except OSError:
        return None
    flocks = [line for line in lines if line.split()[1:2] == ["FLOCK"]]
    return holder_pid(flocks, os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)


def holder_pid(lines: list[str], major: int, minor: int, inode: int) -> int | None:
    """The pid holding a lock on the file (device major:minor, inode) in the lines of
    /proc/locks ("1: FLOCK  ADVISORY  WRITE 1234 fe:00:2196353 0 EOF"; the device numbers
    in hex), waiters ("1: -> FLOCK ...") aside; 0 when the table gives none (-1: an open file
    description lock); None when no line holds one."""
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":
            continue
        pid, where = fields[4], fields[5]
        parts = where.split(":")
        if len(parts) != 3:
            continue
        try:
            if (int(parts[0], 16), int(parts[1], 16), int(parts[2])) != (major, minor, inode):
                continue
            return max(int(pid), 0)
        except ValueError:
            continue
    return None


def running_record(state: WriterState, record: dict | None) -> dict | None:
    """The daemon record (`store_reads.daemon_record`) when it is that of the daemon `state`
    finds running: its pid the lock holder's (or the holder's pid not visible here); None
    when no daemon runs, or the record is an earlier one's (a daemon of an earlier splitdet
    runs, which writes none)."""
    if state.state != "running" or record is None:
        return None
    return record if state.pid is None or state.pid == record["pid"] else None
