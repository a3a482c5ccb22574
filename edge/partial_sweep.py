"""The start-up sweep of partial copies a kill left in the archive and quarantine (no torch).

A move onto another file system copies the image under a hidden temporary name first
(`file_moves.partial_path`); a daemon killed mid-copy leaves that file behind. At start the
daemon removes those older than its start (`start_partial_sweep`), in a thread beside its
loop: one listing of each folder, which for a large archive on a share can take a while, and
must not hold up the first image. Newer ones are a copy under way (this daemon's, or another's
sharing the folder) and are left alone; failures are logged, never fatal. A folder inside
--watch that is a symbolic link (the camera's account may write there) is never swept.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from splitdet.edge import file_moves
from splitdet.edge.daemon_config import DaemonConfig
from splitdet.edge.daemon_log import log_event
from splitdet.edge.file_identity import path_text

#: Partial copies changed less than this before a start are not swept (s): file times lag
#: the clock by up to a timer tick, and this daemon's own copies must never look older.
_SWEEP_MARGIN_S = 1.0


def start_partial_sweep(config: DaemonConfig, stop: threading.Event) -> threading.Thread:
    """Start the thread that removes the partial copies (`partial_path`) a kill left in the
    quarantine and, with --after archive, the archive; `stop` set ends it early."""
    folders = [config.quarantine, *([config.archive] if config.after == "archive" else [])]
    sweeper = threading.Thread(
        target=sweep_partials,
        args=(folders, time.time() - _SWEEP_MARGIN_S, stop, config.watch),
        name="splitdet-sweep",
        daemon=True,
    )  # fmt: skip
    sweeper.start()
    return sweeper


def sweep_partials(
    folders: list[Path], started: float, stop: threading.Event, watch: Path | None = None
) -> None:
    """Delete the partial copies in `folders` not changed since `started` (unix s, a little
    before this start): those a copy under way writes to (this daemon's, or another's
    sharing the folder) are newer. A folder inside --watch `watch` that is, or lies under, a
    symbolic link there is not swept (`file_moves.open_folder`: the camera's account could
    point it anywhere); each is listed and its files removed through one open folder, so a
    link swapped in meanwhile is not followed either. Failures are logged, never fatal."""
    for folder in folders:
        try:
            fd = file_moves.open_folder(folder, watch, os.O_RDONLY)
        except OSError as exc:
            log_event(logging.WARNING, "cannot look for partial copies", folder=str(folder),
                      error=path_text(str(exc)))  # fmt: skip
            continue
        try:
            if not _sweep_folder(folder, fd, started, stop):
                return
        finally:
            os.close(fd)


def _sweep_folder(folder: Path, fd: int, started: float, stop: threading.Event) -> bool:
    """Sweep the folder open as `fd` (`folder` names it in the logs); False when `stop` ended
    it early."""
    try:
        with os.scandir(fd) as listing:
            for entry in listing:
                if stop.is_set():
                    return False
                if file_moves.is_partial_name(entry.name):
                    _remove_partial(folder, fd, entry, started)
    except OSError as exc:
        log_event(logging.WARNING, "cannot look for partial copies", folder=str(folder),
                  error=path_text(str(exc)))  # fmt: skip
    return True


def _remove_partial(folder: Path, fd: int, entry: os.DirEntry, started: float) -> None:
    """Delete one partial copy left by a kill (in the folder open as `fd`), unless it changed
    since `started`."""
    path = path_text(str(folder / entry.name))
    try:
        if entry.stat(follow_symlinks=False).st_ctime >= started:
            return
        os.unlink(entry.name, dir_fd=fd)
    except FileNotFoundError:
        return
    except OSError as exc:
        log_event(logging.WARNING, "cannot remove partial copy", path=path,
                  error=path_text(str(exc)))  # fmt: skip
        return
    log_event(logging.INFO, "partial copy removed", path=path,
              note="a copy into this folder, cut short by a kill")  # fmt: skip
