"""One writer per output folder: an flock on a lock file inside it, held while the writer
works (torch-free).

    with folder_lock(out_dir, ".splitdet-bench.lock", "splitdet bench", "--out"):
        ...  # write the folder's files

A second writer at the same time is refused at once with a ValueError naming the folder, the
holder's pid and what to do; the kernel drops the lock when the holder's process ends (kill -9
too), so a lock file left behind never blocks the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def folder_lock(folder: Path, lock_name: str, writer: str, option: str) -> Iterator[None]:
    """Create `folder` and hold its lock file `lock_name` for the `with` block.

    Args:
        folder: the output folder (created with its parents when missing).
        lock_name: the lock file's name inside it (hidden: ".splitdet-....lock").
        writer: what writes there, as the refusal names it ("splitdet export").
        option: the option that chose the folder, as the refusal names it ("--out").

    Raises:
        ValueError: the folder cannot be made or written, or another process holds the lock.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / lock_name, "a+")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise ValueError(f"{option} {folder}: cannot write there ({exc.strerror or exc})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(
                f"{option} {folder}: another {writer} ({holder}) is writing there; wait for it "
                f"to end or give another {option}"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield  # the lock ends with the file's closing, or with the process
