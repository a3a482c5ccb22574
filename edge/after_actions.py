"""What becomes of a processed image's file once its row is committed (no torch).

`AfterActions` does what the row says: keep the file in --watch, delete it, or move it into
the archive or the quarantine (NAME.reason.txt beside a quarantined one) under the stored name
the row records, never over another file (`free_target`: the next free ID_NAME~N, recorded
in the row before the move). A whole copy already in place from a move a kill cut short is
adopted rather than copied again. A file recorded by an earlier run and still in --watch is
finished under this run's --after, --archive and --quarantine (`finish`): a folder a row names
and this run does not is never written to, nor made again; --after keep leaves an archive or
delete still due where it is, for a later run to finish. A folder inside --watch that is (or
lies under) a symbolic link is never written through: the camera's account could point it
anywhere (`file_moves.open_folder`, right before each write, which is then made relative to
the folder so opened: a link swapped in after the check receives nothing). A file no longer the
one read when its move comes (removed, replaced, or rewritten in place under its very file key:
its ctime changed and its contents are not its row's) is neither moved nor deleted: it is
another arrival, taken as such (`_file_now`). A move that fails is
logged and counted, never fatal: the file stays and is tried again after MOVE_RETRY_INITIAL_S,
doubling up to MOVE_RETRY_MAX_S (with --once, by the next run). The low-level moves are
`splitdet.edge.file_moves`'.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from splitdet.edge import file_moves
from splitdet.edge.daemon_config import DaemonConfig
from splitdet.edge.daemon_log import log_event
from splitdet.edge.daemon_metrics import MOVE_ERROR, EdgeMetrics
from splitdet.edge.file_identity import NOTHING_READ, file_key, path_text
from splitdet.edge.preprocess import ImageError, read_regular_file
from splitdet.edge.sender import Backoff
from splitdet.edge.store import KnownFile, ResultStore
from splitdet.edge.watcher import Candidate, HotFolder

#: What `AfterActions._file_now` finds at a processed file's path before its move: the file
#: read, none or another file (another key), or other contents under the very same key.
_SAME, _GONE, _REWRITTEN = "same", "gone", "rewritten"

#: A file move (archive, quarantine, delete) that failed is tried again after this many
#: seconds, doubling each time up to MOVE_RETRY_MAX_S (e.g. a share read-only for a while).
MOVE_RETRY_INITIAL_S = 5.0
MOVE_RETRY_MAX_S = 300.0


@dataclass(frozen=True)
class _MoveRetry:
    """A file whose move failed: when to try again (monotonic s), how many times it failed."""

    path: Path
    due: float
    failures: int


class AfterActions:
    """Keeps, deletes, archives or quarantines processed files, and retries failed moves."""

    def __init__(
        self, config: DaemonConfig, store: ResultStore, folder: HotFolder, metrics: EdgeMetrics
    ) -> None:
        self.config = config
        self.store = store
        self.folder = folder
        self.metrics = metrics
        self._move_retries: dict[str, _MoveRetry] = {}  # file_key -> when to try its move again

    def retry_not_due(self, candidate: Candidate) -> bool:
        """Whether the file's move failed and is not due to be tried again yet."""
        retry = self._move_retries.get(candidate.file_key)
        return retry is not None and time.monotonic() < retry.due

    def stored_path(self, candidate: Candidate) -> str | Callable[[int], str] | None:
        """Where the processed file will be: a path, None (deleted) or a function of the id."""
        path = candidate.path
        if self.config.after == "keep":
            return path_text(path)
        if self.config.after == "delete":
            return None
        archive = self.config.archive
        return lambda image_id: str(free_target(archive, image_id, path.name))

    def finish(self, candidate: Candidate, known: KnownFile) -> None:
        """Complete a recorded file's after-action, under THIS run's settings: a row recorded
        by a run with another --after, --archive or --quarantine (a restart after its folder
        filled or its mount went) is first given the path those settings give
        (`_finish_path`), then the file goes there. But --after keep leaves an earlier run's
        archive or delete not done yet as it is (`_left_for_later`)."""
        if self._left_for_later(candidate, known):
            return
        stored_path = self._finish_path(candidate, known)
        quarantined = known.error_kind == "quarantine" and stored_path
        reason = (known.reason or "") if quarantined else None
        self.move(candidate, known.id, stored_path, reason, adopt=True)

    def _left_for_later(self, candidate: Candidate, known: KnownFile) -> bool:
        """Under --after keep, whether the file is one an earlier run with --after archive or
        delete recorded and could not move yet (its row plans it out of --watch): kept where
        it is, as keep promises, its row untouched, so that a later run with --after archive
        or delete finishes it and `edge status` still counts it. Passed over until it changes
        (`HotFolder.ignore`), told once. A quarantine is done under every --after (`finish`)."""
        if self.config.after != "keep" or known.error_kind == "quarantine":
            return False
        if known.stored_path == known.path:  # kept by the run that recorded it: nothing due
            return False
        self.folder.ignore(candidate)
        log_event(logging.INFO, "left in --watch under --after keep",
                  path=path_text(candidate.path), image_id=known.id, planned=known.stored_path,
                  note="recorded by a run with --after archive or delete, not moved yet; a run "
                       "with --after archive or delete finishes it")  # fmt: skip
        return True

    def _finish_path(self, candidate: Candidate, known: KnownFile) -> str | None:
        """Where a recorded file still in --watch goes now: the row's stored path when this
        run's settings give it (the same folder: only a crash or a failed move left the file),
        when its file was kept in place (--after keep: nothing is outstanding; a kept file
        found elsewhere in --watch is recorded there), or when a move
        a kill cut short already placed its whole copy there (adopted: the image is not
        archived twice); else the path this run's --after, --archive or --quarantine gives,
        recorded in the row (one commit) before the file moves, so that a crash at any point
        leaves a row a restart finishes. A folder the row named and this run does not is never
        written to (nor made again: a mount gone would leave its bare mount point)."""
        here = path_text(candidate.path)
        recorded = known.stored_path
        if recorded == here:
            return recorded
        target = None if recorded is None else file_moves.stored_file(recorded)
        if target is not None and (
            file_moves.same_file(candidate.path, target)
            or file_moves.same_bytes(candidate.path, target)
        ):
            return recorded
        quarantine = known.error_kind == "quarantine"
        folder = self.config.quarantine if quarantine else self.config.archive
        if quarantine or self.config.after == "archive":
            if target is not None and _same_folder(target.parent, folder):
                return recorded
            planned: str | None = str(
                free_target(folder, known.id, candidate.path.name, quarantine)
            )
        else:
            planned = here if self.config.after == "keep" else None
        if planned == recorded:
            return recorded
        planned = self.store.set_stored_path(known.id, planned)
        log_event(logging.INFO, "replanned under this run's settings", path=here,
                  image_id=known.id, was=recorded, to=planned,
                  note="recorded by a run with another --after, --archive or --quarantine; "
                       "finished under this run's")  # fmt: skip
        return planned

    def move(
        self,
        candidate: Candidate,
        image_id: int,
        stored_path: str | None,
        reason: str | None = None,
        adopt: bool = False,
    ) -> bool | None:
        """Do what the row says happens to the file: delete it, keep it, or move it to
        `stored_path` (with `reason`: into the quarantine, its reason file beside it; with
        `adopt`, a row recorded before, a whole copy of it already there is taken as the
        move, see `_move_to`). A failure is logged and counted (errors kind "move"), never
        fatal: the file stays and is tried again (`_retry_move_later`). False after such a
        failure, None when the file was replaced before it (`_replaced`: nothing done), else
        True."""
        source = candidate.path
        if stored_path != path_text(source):  # it leaves --watch: only while its row is kept
            self.store.check_file()  # StoreGone when --db was deleted or replaced
            now = self._file_now(candidate, image_id)
            if now != _SAME:
                self._replaced(candidate, image_id, stored_path, rewritten=now == _REWRITTEN)
                return None
        try:
            if stored_path is None:
                source.unlink(missing_ok=True)
            elif stored_path == path_text(source):  # --after keep
                self.folder.ignore(candidate)
                return True
            else:
                target = file_moves.stored_file(stored_path)
                self._move_to(candidate, image_id, target, reason, adopt)
        except OSError as exc:
            self.metrics.errors.labels(MOVE_ERROR).inc()
            delay = self._retry_move_later(candidate)
            when = {"retry": "next run"} if delay is None else {"retry_in_s": round(delay, 1)}
            log_event(logging.ERROR, "cannot move file", path=path_text(source), to=stored_path,
                      error=path_text(str(exc)), **when)  # fmt: skip
            return False
        retried = self._move_retries.pop(candidate.file_key, None)
        if retried is not None:
            log_event(logging.INFO, "file moved after retry", path=path_text(source),
                      to=stored_path, failures=retried.failures)  # fmt: skip
        self.folder.forget(candidate)
        return True

    def _file_now(self, candidate: Candidate, image_id: int) -> str:
        """Whether the file at the candidate's path is still the one read for row `image_id`:
        _SAME; _GONE when it was removed or another file took its name (another `file_key`);
        _REWRITTEN when it was written again in place under the very same key (same name,
        size, modification time and inode: fixed-size BMP or raw frames, `cp -p`, a share
        with 1-2 s times), which only its ctime tells. A ctime other than the one seen before
        the read (`Candidate.ctime_ns`) may also be a chmod alone: the contents are then
        compared with the row's, as `Intake` compares a kept file's (`_recorded_contents`),
        and only other contents are _REWRITTEN. A file that cannot be read for that is taken
        at its key's word, as there."""
        try:
            stat = candidate.path.stat()
        except OSError:
            return _GONE
        if file_key(candidate.path, stat) != candidate.file_key:
            return _GONE
        if stat.st_ctime_ns == candidate.ctime_ns:
            return _SAME
        known = self.store.known(candidate.file_key)
        if known is None or known.id != image_id or known.content_hash in (None, NOTHING_READ):
            return _SAME  # (nothing recorded to compare with: its key's word)
        try:
            digest = hashlib.sha256(read_regular_file(candidate.path)).hexdigest()
            after = candidate.path.stat()
        except (OSError, ImageError):
            return _SAME  # stat'ed, not readable: taken at its key's word
        if digest != known.content_hash:
            return _REWRITTEN
        # its bytes are the row's: a chmod, or the same bytes written again (a ctime moving
        # during the read too); compared once
        candidate.ctime_ns = after.st_ctime_ns
        return _SAME

    def _replaced(
        self,
        candidate: Candidate,
        image_id: int,
        stored_path: str | None,
        rewritten: bool = False,
    ) -> None:
        """The file at the candidate's path is no longer the one processed (the camera wrote
        another under its name meanwhile, or it was removed; `rewritten`: written again in
        place under the very same file key): the new file is not touched (it is another
        arrival, taken as such: a file rewritten in place settles again and is compared with
        the row by `Intake`, which gives the row's key up), and the row, whose file is gone,
        keeps no stored path."""
        if stored_path is not None:
            self.store.set_stored_path(image_id, None)
        self._move_retries.pop(candidate.file_key, None)
        if rewritten:
            self.folder.settle_again(candidate)
        else:
            self.folder.forget(candidate)
        log_event(logging.WARNING, "file replaced before its move", path=path_text(candidate.path),
                  image_id=image_id, planned=stored_path,
                  note="its result is recorded; the file now at the path, if any, is another "
                       "arrival and is taken as such")  # fmt: skip

    def _retry_move_later(self, candidate: Candidate) -> float | None:
        """After a failed move: the seconds until it is tried again, MOVE_RETRY_INITIAL_S
        doubling to MOVE_RETRY_MAX_S (`Intake.handle` passes the file over until then). With
        `once`, None: the file is left for the next run."""
        if self.config.once:
            self.folder.ignore(candidate)  # (tried again when it changes or by the next run)
            return None
        for key, retry in list(self._move_retries.items()):  # files gone since (a few at most)
            if not os.path.lexists(retry.path):
                del self._move_retries[key]
        previous = self._move_retries.get(candidate.file_key)
        failures = 1 if previous is None else previous.failures + 1
        delay = Backoff(MOVE_RETRY_INITIAL_S, MOVE_RETRY_MAX_S).ceiling(failures)  # no jitter
        self._move_retries[candidate.file_key] = _MoveRetry(
            candidate.path, time.monotonic() + delay, failures
        )
        return delay

    def _move_to(
        self,
        candidate: Candidate,
        image_id: int,
        target: Path,
        reason: str | None,
        adopt: bool = False,
    ) -> None:
        """Move the file to `target`, never over another file: when the name is taken (since
        it was chosen: another daemon sharing the folder, or one whose database was made anew)
        the next free name is recorded first, then used. OSError when it cannot be moved.

        With `adopt` (a row recorded by an earlier run, or an earlier try), a regular file at
        `target` holding the very bytes of the source is this image's own copy onto another
        file system, placed before a kill stopped the move short of removing the source: the
        row already names it, so only the source is removed (`_adopt`), rather than a second
        copy made under the next free name and the first left orphaned."""
        source = candidate.path
        attempt = 0
        if len(target.name.encode()) > file_moves.STORED_NAME_MAX:  # by an earlier splitdet
            target = self._replan(image_id, target, source, reason is not None, attempt)
        while True:
            if os.path.lexists(target) and not file_moves.same_file(source, target):
                if adopt and file_moves.same_bytes(source, target):
                    self._check_folder(target)
                    _adopt(source, target, reason, self.config.watch)
                    return
                attempt += 1
                target = self._replan(image_id, target, source, reason is not None, attempt)
                continue
            create = self._configured(target.parent)  # (another folder: never made again)
            if reason is not None:  # (best effort: the row holds the reason too)
                _write_reason(target, reason, self.config.watch, create)
            try:
                if file_moves.same_file(source, target):  # linked before a crash, not yet unlinked
                    source.unlink()
                else:
                    # LinkedFolder: a link inside --watch, not followed (the move fails, and
                    # is tried later); the file is moved relative to the folder so opened
                    file_moves.move_no_clobber(source, target, self.config.watch, create)
                return
            except FileExistsError:  # taken in the instant since the check: choose again
                continue

    def _check_folder(self, target: Path) -> None:
        """LinkedFolder (an OSError: the move fails, and is tried again later) when `target`'s
        folder lies inside --watch and is, or lies under, a symbolic link there: one the
        camera's account put in place of the archive or quarantine would send the file, its
        reason file or the removal of a name anywhere on the machine. Checked right before
        each write, without following links (`file_moves.open_folder`)."""
        file_moves.check_folder(target.parent, self.config.watch)

    def _configured(self, folder: Path) -> bool:
        """Whether `folder` is one this run moves files into (its --quarantine, its --archive
        under --after archive): the daemon makes these at start, and again when they vanish."""
        folders = [self.config.quarantine]
        if self.config.after == "archive":
            folders.append(self.config.archive)
        return any(_same_folder(folder, configured) for configured in folders)

    def _replan(
        self, image_id: int, planned: Path, source: Path, quarantine: bool, attempt: int
    ) -> Path:
        """A free name in `planned`'s folder instead of `planned` (taken, or too long), recorded
        in the row before the file moves there: a crash in between leaves the row right."""
        target = free_target(planned.parent, image_id, source.name, quarantine, attempt)
        self.store.set_stored_path(image_id, str(target))
        log_event(logging.WARNING, "stored under another name", path=path_text(source),
                  planned=path_text(planned), to=path_text(target))  # fmt: skip
        return target


def free_target(
    folder: Path, image_id: int, name: str, quarantine: bool = False, first: int = 0
) -> Path:
    """The first stored name (from attempt `first`) under which `folder` holds no file,
    nor, for the quarantine, a reason file."""
    for attempt in itertools.count(first):
        target = folder / file_moves.stored_name(image_id, name, attempt)
        if os.path.lexists(target):
            continue
        if quarantine and os.path.lexists(file_moves.reason_path(target)):
            continue
        return target
    raise AssertionError("unreachable")


def _same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one folder: the same folder when both exist (through a link,
    or written otherwise), else the same absolute path."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def _adopt(source: Path, target: Path, reason: str | None, watch: Path) -> None:
    """Finish a move whose copy is already in place at `target` (the name the row records):
    the reason file beside a quarantined one if it is missing, then the source removed."""
    if reason is not None:
        _write_reason(target, reason, watch)
    source.unlink()
    log_event(logging.INFO, "copy found in place", path=path_text(source),
              to=path_text(target),
              note="its copy was complete before a kill; the image left --watch")  # fmt: skip


def _write_reason(target: Path, reason: str, watch: Path, create: bool = False) -> None:
    """NAME.reason.txt beside a quarantined file. Best effort: the row holds the reason
    too, and a full disk or a folder made read-only must not end the daemon (the row is
    committed, so every restart would fail on the same file). Never through a symbolic link
    inside --watch `watch` (`file_moves.write_in_folder`; with `create` its folder is made
    if missing)."""
    path = file_moves.reason_path(target)
    try:
        if os.path.lexists(path):  # written before a crash
            return
        file_moves.write_in_folder(path, f"{path_text(reason)}\n".encode(), watch, create)
    except OSError as exc:
        log_event(logging.WARNING, "cannot write reason file", path=path_text(path),
                  error=path_text(str(exc)))  # fmt: skip
