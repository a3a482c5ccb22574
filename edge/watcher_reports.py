"""What the hot folder reports (no torch): a folder it cannot list, the entries it leaves alone
(`skipped_files`, event "file_skipped", each told once), and the files this process may not
read, kept pending and read again (events "file_unreadable", "file_readable"); the part of
`splitdet.edge.watcher.HotFolder` that tells of them. The (module) docstring referred to
below is `splitdet.edge.watcher`'s."""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from splitdet.edge.watcher_listing import (
    EXTENSION,
    FOLDER_LINK,
    LINK,
    SUBFOLDER,
    _below_any,
    _reason,
)

if TYPE_CHECKING:
    from splitdet.edge.watcher import Candidate

#: The watcher's logger: its lines keep their name wherever the code logging them lives.
log = logging.getLogger("splitdet.edge.watcher")

#: Skipped names no longer in the folder that are still remembered as told (see the docstring).
SKIPPED_GONE_MEMORY = 4096
#: Entries left alone named at INFO per scan and kind, the first by name; the others new in the
#: same scan (a folder of sidecars at start-up) are counted in one INFO line, each at DEBUG.
SKIPPED_NAMED_PER_SCAN = 10
#: Seconds between reads of a file this process may not read (EACCES, EPERM), and between the
#: WARNINGs saying so while it lasts.
DENIED_RETRY_S = 2.0
DENIED_WARN_EVERY_S = 300.0


@dataclass(frozen=True)
class _Denied:
    """A tracked file this process may not read (or, in a shortage, not read or process):
    since when, when to read it again and when to warn again (monotonic s); `stage` of a
    shortage: "read" or "process" (the model's run)."""

    since: float
    retry_at: float
    warn_at: float
    stage: str = "read"


class FolderReports:
    """The reporting part of `HotFolder` (`splitdet.edge.watcher`), which sets the attributes
    below in its `__init__`."""

    folder: Path
    extensions: tuple[str, ...] | None
    _warned: dict[str, str]
    _denied: dict[str, _Denied]
    _skipped: dict[str, str]
    _told: OrderedDict[str, str]

    def _report(self, failed: dict[str, str]) -> None:
        """Log each unlistable folder (or file) once per reason, and when it can be read again:
        a scan runs every poll (0.25 s), a log line per scan would flood the log."""
        for name, reason in failed.items():
            if self._warned.get(name) != reason:
                path = str(self.folder / name)
                what = (  # (the hot folder itself: nothing else to go on with)
                    f"{path} ({reason}): skipped, tried again on every scan; the other files "
                    "go on" if name else f"the hot folder {path} ({reason}): no image is taken "
                    "until it can be listed again; tried again on every scan"
                )  # fmt: skip
                log.warning(
                    f"cannot read {what}",
                    extra={"fields": {"event": "folder_unreadable", "path": path, "error": reason}},
                )
        for name in self._warned.keys() - failed.keys():
            path = str(self.folder / name)
            log.info(f"{path} can be listed again",
                     extra={"fields": {"event": "folder_readable", "path": path}})  # fmt: skip
        self._warned = dict(failed)

    def _note_skipped(self, skipped: dict[str, str], failed: dict[str, str]) -> None:
        """Log each entry left alone once (INFO, see the module docstring), and keep what
        `skipped_files` reports. Entries below a folder that could not be listed this scan
        are taken to be still there, as tracked files are."""
        if failed:
            skipped |= {name: why for name, why in self._skipped.items()
                        if _below_any(name, failed)}  # fmt: skip
        new = [name for name in sorted(skipped) if self._told.get(name) != skipped[name]]
        # the first few of each kind are named (a link or a FIFO is not hidden behind
        # sidecars), the rest counted: a folder of thousands of sidecars, or of links
        told: dict[str, int] = {}
        more = {}
        for name in new:
            why = skipped[name]
            named = told.get(why, 0) < SKIPPED_NAMED_PER_SCAN
            told[why] = told.get(why, 0) + 1
            self._tell_skipped(name, why, named)
            if not named:
                more[name] = why
            self._told[name] = why
            self._told.move_to_end(name)
        if more:
            self._tell_more_skipped(more)
        self._skipped = skipped
        excess = len(self._told) - len(skipped) - SKIPPED_GONE_MEMORY
        if excess > 0:  # forget the names gone longest ago (the oldest told first)
            gone = (name for name in self._told if name not in skipped)
            for name in list(itertools.islice(gone, excess)):
                del self._told[name]

    def _tell_skipped(self, name: str, why: str, named: bool) -> None:
        """The `file_skipped` line of one entry left alone: INFO when `named`, else DEBUG (one
        of many new in a scan, counted by `_tell_more_skipped`)."""
        path = str(self.folder / name)
        extension = os.path.splitext(name)[1].lower() or "(none)"
        log.log(
            logging.INFO if named else logging.DEBUG,
            f"{path}: left alone, {self._why_skipped(why, extension)}",
            extra={"fields": {"event": "file_skipped", "path": path, "why": why,
                              "extension": extension}},
        )  # fmt: skip

    def _tell_more_skipped(self, more: dict[str, str]) -> None:
        """One INFO line (event "files_skipped") for the entries left alone that a scan found
        new past the first SKIPPED_NAMED_PER_SCAN of their kind: how many, by kind and
        extension (the most first), so that a folder of thousands of sidecars (or links) is
        not a line each at every start."""
        counts: dict[tuple[str, str], int] = {}
        for name, why in more.items():
            extension = os.path.splitext(name)[1].lower() or "(none)"
            counts[why, extension] = counts.get((why, extension), 0) + 1
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        text = ", ".join(f"{n} {why} {extension}" for (why, extension), n in ranked)
        path = str(self.folder)
        log.info(
            f"{path}: {len(more)} more entries left alone ({text}); each is named at DEBUG "
            "(--log-level DEBUG)",
            extra={"fields": {"event": "files_skipped", "path": path, "count": len(more),
                              "by": {f"{why} {ext}": n for (why, ext), n in ranked}}},
        )  # fmt: skip

    def _why_skipped(self, why: str, extension: str) -> str:
        """What the `file_skipped` line says after "left alone, " for an entry left alone
        (`why`: EXTENSION, LINK, FOLDER_LINK, SUBFOLDER or SPECIAL)."""
        if why == EXTENSION:
            return (f"not an image by its name ({extension}; taken: "
                    f"{' '.join(self.extensions or ())}); if the camera writes its images "
                    "under this extension, give it to --extensions")  # fmt: skip
        if why == LINK:
            return ("a symbolic link: links are not followed (the daemon takes only files it "
                    "can move or delete, and sees a file change by its own times); have the "
                    "camera write or move the image itself into the folder")  # fmt: skip
        if why == FOLDER_LINK:
            return ("a symbolic link to a folder: links are not followed, nor entered with "
                    "--recursive; move the folder in, or watch it with a daemon of its "
                    "own")  # fmt: skip
        if why == SUBFOLDER:
            return ("a folder: the images in subfolders are taken only with --recursive "
                    "(a folder holding a .splitdet-ignore file is never entered)")  # fmt: skip
        return "not a regular file, nor a folder (a FIFO, socket or device)"

    def skipped_files(self) -> int:
        """Entries the last scan found and left alone: files whose name has no extension
        taken, symbolic links, subfolders without `recursive`, FIFOs, sockets, devices."""
        return len(self._skipped)

    def _deny(self, candidate: Candidate, exc: OSError) -> None:
        """A file this process may not read (EACCES, EPERM: a camera writing as another user
        with mode 0600, a security module): not the image's fault, so it is not quarantined
        but kept pending and read again every DENIED_RETRY_S until it can be. A WARNING when
        first met and every DENIED_WARN_EVERY_S while it lasts (event "file_unreadable")."""
        now = time.monotonic()
        denied = self._denied.get(candidate.name)
        since, warn_at = (now, now) if denied is None else (denied.since, denied.warn_at)
        if now >= warn_at:
            path, reason = str(candidate.path), _reason(exc)
            lasting = f" for {now - since:.0f} s" if denied is not None else ""
            log.warning(
                f"cannot read {path} ({reason}){lasting}: left where it is, not quarantined, "
                f"and tried again every {DENIED_RETRY_S:g} s; let the daemon's user read it "
                "(the camera writing it under another user, or with mode 0600?)",
                extra={"fields": {"event": "file_unreadable", "path": path, "error": reason,
                                  "denied_s": round(now - since, 1)}},
            )  # fmt: skip
            warn_at = now + DENIED_WARN_EVERY_S
        self._denied[candidate.name] = _Denied(since, now + DENIED_RETRY_S, warn_at)

    def _allowed(self, candidate: Candidate) -> None:
        """A file `_deny` kept back could be read after all (INFO, event "file_readable")."""
        denied = self._denied.pop(candidate.name)
        path = str(candidate.path)
        log.info(f"{path} can be read now, after {time.monotonic() - denied.since:.0f} s",
                 extra={"fields": {"event": "file_readable", "path": path}})  # fmt: skip
