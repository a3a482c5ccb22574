"""The intake of one ready file from the hot folder: classify, record, then move (no torch).

`Intake.handle` takes one stable file. A file whose row exists already (a crash between
commit and move, --after keep, or a kept file renumbered by a remount) only has its
after-action completed, never processed twice. Otherwise it is read and gated; an image that
cannot be read or processed is recorded as an error and quarantined, an ok one recorded, a
flagged one recorded with its request in the outbox, waiting for room while the outbox is
full (with --once up to --drain-timeout, then the run stops taking images:
`outbox_gave_up`). Only then is the file moved (`AfterActions`): nothing is acknowledged
before it is durable.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from splitdet.edge.after_actions import AfterActions, free_target
from splitdet.edge.client import ImageMeta, build_request
from splitdet.edge.daemon_config import DaemonConfig
from splitdet.edge.daemon_log import log, log_event
from splitdet.edge.daemon_metrics import EdgeMetrics
from splitdet.edge.file_identity import NOTHING_READ, path_text
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.predict import request_id_for
from splitdet.edge.preprocess import (
    BLANK_FRAME,
    FrameWarning,
    ImageError,
    Pixels,
    frame_warning,
    read_regular_file,
)
from splitdet.edge.runtime import ModelOutputError
from splitdet.edge.sender import Sender
from splitdet.edge.store import Arrival, KnownFile, OutboxFull, ResultStore, StoredPath
from splitdet.edge.watcher import Candidate, HotFolder, Ready
from splitdet.shared.shortage import short_of

#: Seconds between two checks that --db still names the file the store has open (one stat).
STORE_CHECK_EVERY_S = 5.0
#: At most one `blank_frame` (or `dim_wide_frame`) line per this many seconds: a lens cap
#: makes every image one.
FRAME_WARN_EVERY_S = 60.0


def memory_shortage(exc: BaseException) -> str | None:
    """What an exception raised while running the model on an image says ("TYPE: message"),
    when it says that memory or threads ran out (`shared.shortage.short_of`: a MemoryError,
    ONNX Runtime's or numpy's failed allocation), else None: the file is then taken again
    later rather than quarantined for good."""
    return f"{type(exc).__name__}: {exc}" if short_of(exc) is not None else None


def content_sha256(path: Path) -> str:
    """SHA-256 hex of a hot-folder file's bytes, read as the hot folder reads it
    (`read_regular_file`): a file replaced by a FIFO since the scan is never opened (the
    daemon would wait for a writer for good), nor one grown past MAX_FILE_BYTES read whole.
    ImageError for those, OSError when it cannot be read."""
    return hashlib.sha256(read_regular_file(path)).hexdigest()


class FrameWarnings:
    """The daemon's word on images judged whose pixels say the camera may not see the part
    (`preprocess.frame_warning`: a blank frame, a 16-bit one of 12-bit values): each counted
    in splitdet_edge_image_warnings_total{kind}, and logged as a WARNING of its kind
    (`blank_frame`, `dim_wide_frame`) at most once per `every_s` seconds a kind, each line
    counting the images since the last. The image is judged, its result stored, as any."""

    def __init__(self, metrics: EdgeMetrics, every_s: float = FRAME_WARN_EVERY_S) -> None:
        self.metrics = metrics
        self.every_s = every_s
        self._next_line: dict[str, float] = {}  # kind -> monotonic s before which it is counted
        self._unlogged: dict[str, int] = {}  # kind -> images since its last line

    def judged(self, warning: FrameWarning, path: str, image_id: int, verdict: str) -> None:
        """One image of `warning`'s kind judged (row `image_id`, `verdict`): counted, and
        logged unless a line of its kind was within `every_s`."""
        kind = warning.kind
        self.metrics.image_warnings.labels(kind).inc()
        unlogged = self._unlogged.get(kind, 0) + 1
        now = time.monotonic()
        if now < self._next_line.get(kind, float("-inf")):
            self._unlogged[kind] = unlogged
            return
        self._next_line[kind] = now + self.every_s
        self._unlogged[kind] = 0
        also = f" ({unlogged - 1} more since the last line)" if unlogged > 1 else ""
        # (each event spelled out: tests/test_docs_events.py finds the events in the code)
        event = {"event": "blank_frame"} if kind == BLANK_FRAME else {"event": "dim_wide_frame"}
        log.warning(
            f"{warning.message}{also}. Logged at most once per {self.every_s:g} s",
            extra={"fields": {**event, "path": path, "image_id": image_id, "verdict": verdict,
                              "low": warning.low, "high": warning.high,
                              "full_scale": warning.full_scale, "images": unlogged}},
        )  # fmt: skip


class Intake:
    """Handles the hot folder's ready files one at a time; counts them in `processed`."""

    def __init__(
        self,
        config: DaemonConfig,
        store: ResultStore,
        pipeline: EdgePipeline,
        folder: HotFolder,
        metrics: EdgeMetrics,
        sender: Sender,
        after: AfterActions,
        stop: threading.Event,
        beat: Callable[[], None] = lambda: None,
    ) -> None:
        self.config = config
        self.store = store
        self.pipeline = pipeline
        self.fingerprint = pipeline.manifest.fingerprint
        self.folder = folder
        self.metrics = metrics
        self.sender = sender
        self.after = after
        self._stop = stop  # the daemon's: set here when --once gives up on a full outbox
        self._beat = beat  # (`liveness.Liveness.beat`: a wait for outbox room is no stall)
        self.processed = 0
        self.outbox_gave_up: str | None = None  # --once: the outbox, full past --drain-timeout
        self.frame_warnings = FrameWarnings(metrics)

    def handle(self, candidate: Candidate) -> bool:
        """Process one stable file; False when it is not ready after all (try it later), or
        its move failed and is not due to be tried again yet."""
        self.store.check_file(STORE_CHECK_EVERY_S)  # (a backlog: each image, every few s)
        if self.after.retry_not_due(candidate):
            return False
        known = self.store.known(candidate.file_key)
        if known is not None and not self._recorded_contents(candidate, known):
            known = None  # another file under the very same key: a new arrival
        if known is None and self.config.after == "keep":
            known = self._renumbered(candidate)
        if known is not None:
            self.after.finish(candidate, known)
            kept = known.stored_path == path_text(candidate.path)  # --after keep: quiet
            log_event(logging.DEBUG if kept else logging.INFO, "already recorded",
                      path=path_text(candidate.path), image_id=known.id,
                      verdict=known.verdict)  # fmt: skip
            return True
        ready = self.folder.read(candidate)
        if ready is None:
            return False
        start = time.perf_counter()
        arrival = Arrival(  # as stored: a name that is not UTF-8 is escaped (path_text)
            path=path_text(candidate.path),
            file_key=path_text(candidate.file_key),
            content_hash=ready.content_hash,
            size_bytes=len(ready.data),
            arrived=time.time(),
        )
        if ready.error is not None:
            self._quarantine(candidate, arrival, ready.error)
        elif not self._classify(candidate, arrival, ready):
            return True  # not recorded (no room in the outbox): not counted, left in the folder
        self.metrics.stage_seconds.labels("image").observe(
            ready.read_s + time.perf_counter() - start
        )
        self.processed += 1
        return True

    def _recorded_contents(self, candidate: Candidate, known: KnownFile) -> bool:
        """Whether the file found under a recorded `file_key` holds the contents its row
        recorded (one that cannot be read is taken at its key's word: a daemon waiting for it
        would never end a --once run, and said nothing). A row whose file should have left --watch
        (deleted, archived, quarantined) is found again only after a crash between its commit
        and its move, or when another file arrived with the very same key: same name and size,
        a modification time a camera or a copy set alike (whole seconds, `cp -p`, rsync -t)
        and the inode the deleted one freed. Its contents tell the two apart; another file's
        row gives its key up (`supersede`) and the file is taken as the new arrival it is.
        A file --after keep left in place is not read again (its key is its identity there),
        unless the hot folder found it under its key with another ctime (`Candidate.recheck`:
        rewritten in place with the same size and modification time, or only its metadata
        changed): then it is compared once."""
        in_place = known.stored_path == path_text(candidate.path)
        if (in_place and not candidate.recheck) or known.content_hash in (None, NOTHING_READ):
            return True
        try:
            if content_sha256(candidate.path) == known.content_hash:
                return True
        except (OSError, ImageError):  # (stat'ed, not readable: trusted by its key, as before)
            return True
        kept = self.store.supersede(known.id)
        note = (
            "the file kept at this path was rewritten in place with the same name, size, "
            "modification time and inode (its ctime changed): taken as a new arrival"
            if in_place
            else "another file with the name, size, modification time and inode of one "
            "recorded earlier: taken as a new arrival"
        )
        log_event(logging.WARNING, "same file key, other contents", path=path_text(candidate.path),
                  image_id=known.id, row_key_now=kept, note=note)  # fmt: skip
        return False

    def _renumbered(self, candidate: Candidate) -> KnownFile | None:
        """--after keep: the row of this very file recorded under another `file_key`, now
        given this one; None when there is none. A kept file is the same one when a row left
        a file at its path with its name, size and modification time (to the ns) and only
        another inode, and the contents hash alike: a remount that numbered inodes anew (CIFS
        `noserverino`) or a restore that kept the times changed its identity, not the image,
        and it is not processed again. The same bytes written again (an identical shot, a
        test image dropped again) have a new modification time: a new arrival."""
        path = path_text(candidate.path)
        row = self.store.renumbered(path, candidate.file_key)
        if row is None:
            return None
        image_id, old_key, content_hash = row
        try:
            digest = content_sha256(candidate.path)
        except (OSError, ImageError):
            return None  # processed as new, which reads it again and says why not
        if content_hash != digest:
            return None
        self.store.rekey(image_id, candidate.file_key)
        log_event(logging.INFO, "recorded_file_renumbered", path=path, image_id=image_id,
                  was=old_key, now=path_text(candidate.file_key))  # fmt: skip
        return self.store.known(candidate.file_key)

    def _quarantine(self, candidate: Candidate, arrival: Arrival, reason: str) -> None:
        quarantine = self.config.quarantine
        name = candidate.path.name
        reason = path_text(reason)  # it names the file
        image_id, stored_path = self.store.record_error(
            arrival,
            "quarantine",
            reason,
            self.fingerprint,
            lambda image_id: str(free_target(quarantine, image_id, name, quarantine=True)),
        )
        self.metrics.images.labels("error").inc()
        self.metrics.errors.labels("quarantine").inc()
        # logged once the move is done: a quarantine that cannot be written is told as such
        moved = self.after.move(candidate, image_id, stored_path, reason)
        if moved is None:  # replaced meanwhile: its own line said so, nothing is quarantined
            return
        if moved:
            log_event(logging.WARNING, "quarantined", path=arrival.path, image_id=image_id,
                      reason=reason, to=stored_path)  # fmt: skip
        else:
            log_event(logging.WARNING, "to be quarantined", path=arrival.path,
                      image_id=image_id, reason=reason, to=stored_path,
                      note="recorded as an error; the move into the quarantine failed (the "
                           "line before says why) and is tried again")  # fmt: skip

    def _classify(self, candidate: Candidate, arrival: Arrival, ready: Ready) -> bool:
        """Gate one decoded image, record its result, then move the file; False when it was
        not recorded (stopping, or given up, while waiting for room in the outbox)."""
        try:
            result = self.pipeline.process_array(ready.image)
        except ModelOutputError:  # the export's, not the image's: the daemon stops (exit 2),
            raise  # the image stays in --watch for a model that gives a verdict
        except Exception as exc:
            short = memory_shortage(exc)
            if short is not None:  # the machine's, not the image's: taken again later
                self.folder.short_of_memory(candidate, short)
                return False
            # Quarantined rather than retried: the same file would fail again on every restart.
            detail = str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
            self._quarantine(candidate, arrival, f"{arrival.path}: cannot process ({detail})")
            return True
        timings = {"read": ready.read_s, **result.timings}
        stored = self.after.stored_path(candidate)
        # what the pixels say of the camera: kept in the row with its verdict, told once stored
        pixels = ready.image if isinstance(ready.image, Pixels) else None
        warning = None if pixels is None else frame_warning(pixels, arrival.path)
        kinds = () if warning is None else (warning.kind,)
        start = time.perf_counter()
        if not result.flagged:
            image_id, stored_path = self.store.record_ok(
                arrival, result.p_defect, self.fingerprint, timings, stored,
                threshold=self.pipeline.threshold, warnings=kinds,
            )  # fmt: skip
            verdict, request_bytes = "ok", 0
        else:
            request_id = request_id_for(ready.data, self.fingerprint, self.pipeline.codec)
            name = Path(arrival.path).name  # (a protobuf string must be valid UTF-8)
            meta = ImageMeta(result.meta.original_hw, result.meta.resized_hw, name)
            payload = build_request(
                result.encoded, meta, request_id, self.fingerprint
            ).SerializeToString()
            request_bytes = len(payload)  # what the store records and the sender sends
            record = self._record_pending(
                arrival, result.p_defect, request_id, payload, timings, stored, kinds
            )
            if record is None:
                return False  # stopping while the outbox is full: the file stays for the next run
            image_id, stored_path, verdict = record
        store_s = time.perf_counter() - start  # (the row and, flagged, its request: one commit)
        self.metrics.stage_seconds.labels("store").observe(store_s)
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.images.labels(verdict).inc()
        logged = {**timings, "store": store_s}  # (the row's own timings cannot hold its write)
        log_event(logging.INFO, "classified", path=arrival.path, image_id=image_id, verdict=verdict,
                  p_defect=round(result.p_defect, 5), bytes=request_bytes,
                  timings={k: round(v, 5) for k, v in logged.items()})  # fmt: skip
        self.after.move(candidate, image_id, stored_path)
        if warning is not None:  # (judged and stored: now told)
            self.frame_warnings.judged(warning, arrival.path, image_id, verdict)
        return True

    def _record_pending(
        self,
        arrival: Arrival,
        p_defect: float,
        request_id: str,
        payload: bytes,
        timings: dict[str, float],
        stored: StoredPath,
        warnings: Sequence[str] = (),
    ) -> tuple[int, str | None, str] | None:
        """record_pending (its frame `warnings` kept in the row), waiting for room under the
        "wait" policy; None if stopped first, or, with `once`, when there was no room for
        --drain-timeout (`_give_up_on_full_outbox`)."""
        waited = False
        deadline = time.monotonic() + self.config.drain_timeout_s  # (with `once` only)
        while True:
            try:
                record = self.store.record_pending(
                    arrival, p_defect, request_id, payload, self.fingerprint, timings, stored,
                    threshold=self.pipeline.threshold, warnings=warnings,
                )  # fmt: skip
                break
            except OutboxFull as exc:
                if not waited:
                    waited = True
                    self.metrics.outbox_full_waits.inc()
                    self._outbox_stalled(time.time())
                    log_event(logging.WARNING, "outbox_full", path=arrival.path,
                              detail=str(exc))  # fmt: skip
                pause = max(self.config.poll_s, 0.5)
                if self.config.once:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._give_up_on_full_outbox(str(exc))
                        return None
                    pause = min(pause, left)
                if self._stop.wait(pause):
                    return None
                self._beat()
        if waited:
            self._outbox_stalled(None)
        if record[2] == "error":
            self.metrics.outbox_full_rejected.inc()
            self.metrics.errors.labels("outbox_full").inc()
            log_event(logging.WARNING, "outbox full, features dropped", path=arrival.path,
                      image_id=record[0])  # fmt: skip
        else:
            self.sender.wake()
        return record

    def _outbox_stalled(self, since: float | None) -> None:
        """Say, in the daemon record (`edge status`) and splitdet_edge_outbox_full, since when
        intake waits for room in the outbox (None: no more). A store that cannot be written
        just now (held locked) misses it: the wait goes on all the same."""
        try:
            self.store.record_outbox_full(since)
        except sqlite3.Error as exc:
            log.debug("outbox stall not recorded in --db: %s", exc)
        self.metrics.outbox_full.set(0 if since is None else 1)

    def _give_up_on_full_outbox(self, detail: str) -> None:
        """--once, the outbox full for all of --drain-timeout (the cloud took none of it): stop
        taking images; those left stay in the folder as they are, for the next run."""
        self.outbox_gave_up = detail
        self._stop.set()
