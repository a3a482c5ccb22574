"""The camera-side edge daemon: hot folder in, durable results out, nothing lost (no torch).

    config = DaemonConfig(model_dir=Path("model"), watch=Path("incoming"),
                          cloud="10.0.0.5:50051", db=Path("edge.sqlite"))
    sys.exit(EdgeDaemon(config).run())     # until SIGTERM; `once=True` for batch mode

The loop, per file, in arrival order:

    candidate = folder.next_candidate()             # size + mtime stable for settle_s
    ready = folder.read(candidate)                  # bytes + decoded image, or a final error
    result = pipeline.process_array(ready.image)    # gate; for flagged images FPN + encode
    store.record_ok(...) | store.record_pending(..., payload)   # one commit each
    finish(...)                                     # keep | archive | delete | quarantine

Only files named as images are candidates (`DaemonConfig.extensions`); the companion files
camera software and Windows write beside them (Thumbs.db, sidecars) are never touched or
recorded, only logged once each and counted (see `splitdet.edge.watcher`).

Beside the loop the Sender thread delivers the outbox. Nothing is acknowledged before it is durable:
the file is moved or deleted only after its row is committed, and a file whose row exists when it is
found again (a crash between commit and move, or --after keep) is only moved, never processed twice.
SIGTERM/SIGINT finish the current image, then exit 0 (with --once, 1 while requests are pending),
also while the daemon waits to start on a --db another program holds locked; pending requests stay
in the outbox for the next start. One daemon per database (`WriterLock`) and per hot folder
(`DirectoryLock`: none either in a subfolder of a --recursive daemon's folder, nor --recursive above
another's; a hot folder removed and made again is locked anew, or the daemon stops when another
holds it, `_follow_watch_lock`); a database deleted or replaced while the daemon runs stops it
(`ResultStore.check_file`) before it moves or deletes another image.

Archived and quarantined files are named ID_NAME (`file_moves.stored_name`): short enough that
NAME.reason.txt and its temporary name fit a file system's 255 bytes, valid UTF-8 whatever the
camera's name was, and never over another file: a name taken (another daemon sharing the folder,
a database made anew whose ids start at 1 again) gets a ~N before its extension, and the row
records the name used; but a recorded name already holding the image's very bytes (a copy onto
another file system, whole before a kill stopped the image's removal) is that image's copy, and
kept.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from prometheus_client import start_http_server

from splitdet.edge import file_moves
from splitdet.edge.client import AnswerRules, CloudClient, ImageMeta, build_request
from splitdet.edge.daemon_config import DaemonConfig, check_paths
from splitdet.edge.daemon_log import log, log_event
from splitdet.edge.daemon_metrics import MOVE_ERROR, EdgeMetrics, model_labels, threshold_text
from splitdet.edge.file_identity import path_text
from splitdet.edge.model_probe import ModelProbe
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.predict import request_id_for
from splitdet.edge.preprocess import ImageError
from splitdet.edge.runtime import EdgeRuntime
from splitdet.edge.sender import Backoff, Sender, annotate_hook
from splitdet.edge.store import Arrival, KnownFile, OutboxFull, ResultStore, StoredPath
from splitdet.edge.store_busy import BusyStore
from splitdet.edge.store_file import StoreLocked, WriterLock, is_busy, refuse_foreign_file
from splitdet.edge.watcher import Candidate, HotFolder, Ready, enters_subfolder
from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.cli import remove_ready_file, write_ready_file
from splitdet.shared.folder_lock import DirectoryLock, FolderInUse
from splitdet.shared.manifest import file_sha256

#: Seconds between two prunes of the results (DaemonConfig.keep_results_s).
PRUNE_EVERY_S = 3600.0
#: Milliseconds each try to open a --db another program holds locked at start waits for it
#: (short: a SIGTERM is only seen between tries), and seconds between two tries.
OPEN_TRY_MS = 1000
OPEN_RETRY_S = 1.0
#: Seconds between two checks that --db still names the file the store has open (one stat).
STORE_CHECK_EVERY_S = 5.0
#: A file move (archive, quarantine, delete) that failed is tried again after this many
#: seconds, doubling each time up to MOVE_RETRY_MAX_S (e.g. a share read-only for a while).
MOVE_RETRY_INITIAL_S = 5.0
MOVE_RETRY_MAX_S = 300.0
#: Partial copies changed less than this before a start are not swept (s): file times lag
#: the clock by up to a timer tick, and this daemon's own copies must never look older.
_SWEEP_MARGIN_S = 1.0


# ---------------------------------------------------------------------------------- the daemon


class StoppedBeforeStart(BaseException):
    """SIGTERM or SIGINT before the daemon started (while it waited for a --db held locked,
    or earlier: `cli_edge_run.run`): exit 0, or 1 with --once (its images are all left). A
    BaseException, as KeyboardInterrupt: no `except Exception` on the way turns it into an
    error of what it interrupted (loading the model, reading a token)."""


class EdgeDaemon:
    """The hot-folder loop with its sender thread; see the module docstring."""

    def __init__(self, config: DaemonConfig, pipeline: EdgePipeline | None = None) -> None:
        config = replace(  # absolute paths in the database and the logs
            config,
            watch=config.watch.resolve(),
            archive_dir=config.archive.resolve(),
            quarantine_dir=config.quarantine.resolve(),
        )
        check_paths(config)
        self.config = config
        self._stop = threading.Event()  # (set by SIGTERM/SIGINT from the start-up wait on)
        self.signalled = False  # a SIGTERM or SIGINT asked it to stop
        refuse_foreign_file(config.db)  # another program's file: refused before its lock file
        # two daemons on one hot folder would each classify and send every image; taken first:
        # it writes nothing, so a daemon refused here leaves no file for the --db it never used
        self._watch_lock = DirectoryLock(  # (and one in another's subfolder: see there)
            config.watch, "--watch", "`splitdet edge run`", "one daemon per hot folder",
            subfolders="--recursive" if config.recursive else None,
            # what --recursive never enters is no one's to share (see HotFolder._files)
            enters=enters_subfolder,
            exclude=[folder for _, folder in config.output_folders()],
        )  # fmt: skip
        try:  # before anything touches the database: a second daemon on it would record the
            # same files again (UNIQUE file_key) and race the first for every move
            self._writer_lock = WriterLock(config.db)
        except BaseException:
            self._watch_lock.release()
            raise
        try:
            self._build(config, pipeline)
        except BaseException:
            self._writer_lock.release()
            self._watch_lock.release()
            raise

    def _build(self, config: DaemonConfig, pipeline: EdgePipeline | None) -> None:
        """The rest of __init__: the pipeline, the store, the hot folder, metrics, sender."""
        if config.ready_file is not None:  # (an earlier run's: not ready while this one loads)
            remove_ready_file(config.ready_file, unless_running=True)
        self.pipeline = pipeline or EdgePipeline(
            EdgeRuntime(config.model_dir, threads=config.threads, device=config.device),
            codec=config.codec,
            threshold=config.threshold,
        )
        self.fingerprint = self.pipeline.manifest.fingerprint
        # answers for this export are checked by its own manifest (no GetManifest to fetch it)
        CloudClient.expect(AnswerRules.from_manifest(self.pipeline.manifest))
        self._busy = BusyStore(
            config.db, once_wait_s=config.drain_timeout_s if config.once else None
        )
        self.store = self._open_store()
        try:  # what `edge status` and `edge abandon` learn of this daemon
            self.store.record_daemon(self.fingerprint)
        except sqlite3.Error as exc:  # (held locked just now: they see less, nothing breaks)
            log.warning("--db %s: this daemon's record not written (%s)", config.db, exc)
        self.folder = HotFolder(
            config.watch,
            config.settle_s,
            config.unreadable_grace_s,
            recursive=config.recursive,
            exclude=tuple(folder for _, folder in config.output_folders()),
            extensions=config.extensions,
            pixel_bits=self.pipeline.manifest.model_config.pixel_bits,
        )
        self.metrics = EdgeMetrics(self.store, self.folder, model_labels(self.pipeline))
        client_config = config.client_config
        self.sender = Sender(
            self.store,
            lambda: CloudClient(client_config),
            Backoff(config.retry_initial_s, config.retry_max_s),
            timeout_s=client_config.timeout_s,
            metrics=self.metrics,
            on_answer=(
                annotate_hook(config.save_annotated, self.pipeline.manifest.model_config.pixel_bits)
                if config.save_annotated
                else None
            ),
        )
        self._metrics_httpd = None
        self.metrics_port: int | None = None
        self.processed = 0
        self._next_prune = 0.0  # monotonic s: at start
        self._pruner: threading.Thread | None = None
        self._pruner_stop = threading.Event()
        self._sweeper: threading.Thread | None = None  # removes partial copies left by a kill
        self._probe: ModelProbe | None = None  # asks the cloud about our exports
        self._move_retries: dict[str, _MoveRetry] = {}  # file_key -> when to try its move again
        self._outbox_gave_up: str | None = None  # --once: the outbox, full past --drain-timeout
        self._store_gave_up: str | None = None  # --once: the --db, held locked past it
        self._drain_timed_out = False  # --once: requests left at --drain-timeout (`_drain`)

    def _open_store(self) -> ResultStore:
        """The --db's ResultStore. While another program holds it locked (a backup, an `sqlite3`
        shell), a daemon waits to start, as it waits for it while running (WARNING
        `store_busy` at most once a minute, INFO `store_resumed`), each try waiting
        OPEN_TRY_MS; SIGTERM or SIGINT meanwhile: StoppedBeforeStart. With `once` it waits up
        to drain_timeout_s, then logs ERROR `store_busy_stopped` and raises StoreLocked
        (exit 1: nothing taken, the images left for the next run)."""
        with self._signals_stop():
            while True:
                began = time.monotonic()
                try:
                    store = ResultStore(
                        self.config.db, self.config.outbox, open_wait_ms=OPEN_TRY_MS
                    )
                except StoreLocked as exc:
                    self._busy.failed(exc, None, began)
                    if self.config.once and self._busy.waited_s() >= self.config.drain_timeout_s:
                        self._report_store_held(str(exc.cause), None)
                        raise
                    if self._stop.wait(OPEN_RETRY_S):
                        raise StoppedBeforeStart(
                            f"stopped while --db {self.config.db} was held locked by another "
                            "program, before the daemon started (nothing was taken)"
                        ) from None
                    continue
                self._busy.succeeded()
                return store

    @contextlib.contextmanager
    def _signals_stop(self) -> Iterator[None]:
        """Within the block, SIGTERM and SIGINT set `_stop` (in the main thread; tests run
        the daemon in others), as they do once `run` has begun."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.request_stop)
                    for sig in (signal.SIGTERM, signal.SIGINT)}  # fmt: skip
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -------------------------------------------------------------------------- lifecycle

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Finish the current image, then leave the loop (signal-handler safe)."""
        if signum is not None:
            self.signalled = True
        self._stop.set()

    def run(self) -> int:
        """Run until stopped (or, with `once`, until the folder is done); returns the exit
        status: 0, or with `once` 1 when requests are still pending (sent on the next run) or
        images were left in the folder because the outbox stayed full, the database stayed
        locked by another program for drain_timeout_s, or a signal stopped it (processed next
        run)."""
        config = self.config
        self._prepare_folders()
        previous = {}
        if threading.current_thread() is threading.main_thread():  # (tests run it in a thread)
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.request_stop)
        try:
            self._start_services()
            self._start_sweep()
            self._loop()
            if self._store_gave_up is not None:  # (the sender could not deliver either)
                self.sender.cancel()
                self.folder.scan()
                self._report_store_held(self._store_gave_up, self.folder.pending())
            elif self._outbox_gave_up is not None:  # --drain-timeout spent waiting for room
                self._drain_timed_out = True  # (the run ends now: its call in flight too)
                self.sender.cancel()
                self._report_left_behind()
            elif config.once:
                self._drain(config.drain_timeout_s)
        finally:
            try:  # (another signal meanwhile only sets _stop again: not the default action)
                pending = self._shutdown()
            finally:  # (the CLI's, put back: they keep the ending process from the default)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        log_event(logging.INFO, "stopped", processed=self.processed, outbox_depth=pending)
        gave_up = self._outbox_gave_up is not None or self._store_gave_up is not None
        if config.once and self.signalled and not gave_up:  # stopped with images left?
            self.folder.scan()
            gave_up = self.folder.pending() > 0
        return 1 if config.once and (pending or gave_up) else 0

    def _prepare_folders(self) -> None:
        """Create the folders the daemon writes into; OSError naming the option when one cannot
        be created or written, so it fails at start-up rather than file by file."""
        config = self.config
        try:
            os.scandir(config.watch).close()
        except OSError as exc:
            raise OSError(f"--watch {config.watch}: cannot list ({exc.strerror or exc})") from None
        if config.after != "keep" and not os.access(config.watch, os.W_OK | os.X_OK):
            raise OSError(f"--watch {config.watch}: --after {config.after} removes files from "
                          "it, but it is not writable")  # fmt: skip
        for flag, folder in config.output_folders():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(f"{flag} {folder}: cannot create ({exc.strerror or exc})") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OSError(f"{flag} {folder}: not writable")

    def _start_services(self) -> None:
        config = self.config
        if config.metrics_port is not None:
            try:
                self._metrics_httpd, _ = start_http_server(
                    config.metrics_port, config.metrics_host, registry=self.metrics.registry
                )
            except OSError as exc:
                where = f"{config.metrics_host}:{config.metrics_port}"
                raise OSError(f"metrics endpoint {where}: {exc.strerror or exc}") from None
            self.metrics_port = self._metrics_httpd.server_port
        self.sender.start()
        stats = self.store.outbox_stats()
        calibrated = getattr(self.pipeline.manifest, "gate_threshold", None)
        log_event(
            logging.INFO,
            "started",
            watch=str(config.watch),
            db=str(config.db),
            cloud=config.cloud,
            edge_name=config.client_config.edge_name,
            fingerprint=self.fingerprint,
            threshold=self.pipeline.threshold,
            calibrated_threshold=calibrated,
            codec=self.pipeline.codec,
            after=config.after,
            extensions=list(self.folder.extensions) if self.folder.extensions else "any",
            outbox_depth=stats.depth,
            metrics_port=self.metrics_port,
            once=config.once,
        )
        if calibrated is not None and self.pipeline.threshold != calibrated:
            self._warn_threshold_override(calibrated)
        earlier = {fingerprint: n for fingerprint, n in self.store.outbox_fingerprints().items()
                   if fingerprint != self.fingerprint}  # fmt: skip
        for fingerprint, n in earlier.items():  # e.g. made before this edge's model upgrade
            log_event(logging.INFO, "outbox_other_export", fingerprint=fingerprint, pending=n,
                      note="sent with their own model: the cloud must serve it too")  # fmt: skip
        if config.ready_file is not None:
            info = {"pid": os.getpid(), "metrics_port": self.metrics_port,
                    "fingerprint": self.fingerprint}  # fmt: skip
            write_ready_file(config.ready_file, info)
        self._probe = ModelProbe(
            config.client_config, self.fingerprint, tuple(earlier), config.retry_max_s,
            self._pruner_stop,
        )  # fmt: skip
        self._probe.start()

    def _warn_threshold_override(self, calibrated: float) -> None:
        """WARNING: --threshold overrides the export's calibrated gate threshold. The override
        shows in this line, the `started` line, splitdet_edge_model_info and each result's
        threshold."""
        model, used = self.config.model_dir, threshold_text(self.pipeline.threshold)
        log.warning(
            f"--threshold {used} overrides the gate threshold {threshold_text(calibrated)} "
            f"calibrated into the export {model} (fingerprint {self.fingerprint[:12]}): this "
            f"edge sends images with p(defect) >= {used} to the cloud; its results record "
            "the threshold they were judged at. `splitdet eval --model "
            f"{model} --threshold {used}` measures the export at that threshold",
            extra={"fields": {"event": "threshold_override", "threshold": self.pipeline.threshold,
                              "calibrated_threshold": calibrated, "model": str(model),
                              "fingerprint": self.fingerprint}},
        )  # fmt: skip

    def _start_sweep(self) -> None:
        """Remove the partial copies (`partial_path`) a kill left in the archive and quarantine,
        in a thread beside the loop: one listing of each folder, which for a large archive on
        a share can take a while, and must not hold up the first image."""
        config = self.config
        folders = [config.quarantine, *([config.archive] if config.after == "archive" else [])]
        self._sweeper = threading.Thread(
            target=self._sweep_partials, args=(folders, time.time() - _SWEEP_MARGIN_S),
            name="splitdet-sweep",
            daemon=True,
        )  # fmt: skip
        self._sweeper.start()

    def _sweep_partials(self, folders: list[Path], started: float) -> None:
        """Delete the partial copies in `folders` not changed since `started` (unix s, a little
        before this start): those a copy under way writes to (this daemon's, or another's
        sharing the folder) are newer. Failures are logged, never fatal."""
        for folder in folders:
            try:
                with os.scandir(folder) as listing:
                    for entry in listing:
                        if self._pruner_stop.is_set():
                            return
                        if file_moves.is_partial_name(entry.name):
                            self._remove_partial(entry, started)
            except OSError as exc:
                log_event(logging.WARNING, "cannot look for partial copies", folder=str(folder),
                          error=path_text(str(exc)))  # fmt: skip

    @staticmethod
    def _remove_partial(entry: os.DirEntry, started: float) -> None:
        """Delete one partial copy left by a kill, unless it changed since `started`."""
        try:
            if entry.stat(follow_symlinks=False).st_ctime >= started:
                return
            os.unlink(entry.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log_event(logging.WARNING, "cannot remove partial copy", path=path_text(entry.path),
                      error=path_text(str(exc)))  # fmt: skip
            return
        log_event(logging.INFO, "partial copy removed", path=path_text(entry.path),
                  note="a copy into this folder, cut short by a kill")  # fmt: skip

    def _shutdown(self) -> int:
        """Stop the sender, a prune (after its batch), the start-up sweep and the metrics
        endpoint; returns the outbox depth left."""
        if self.config.ready_file is not None:  # stopping: no longer ready
            remove_ready_file(self.config.ready_file, os.getpid())
        self._pruner_stop.set()  # (ends the start-up sweep and the cloud probe too)
        for worker in (self._pruner, self._sweeper):
            if worker is not None:
                worker.join(timeout=10.0)
        if self._probe is not None:  # (a call under way: left to end alone, logging nothing;
            # not waited for once --drain-timeout is spent: the run ends at its deadline)
            self._probe.join(timeout=0.0 if self._drain_timed_out else 2.0)
        self.sender.stop()
        if self.sender.is_alive():
            self.sender.join(timeout=5.0)
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
        pending = self.store.outbox_stats().depth
        if not self.sender.is_alive():
            self.store.close()
        # else a call is still in flight: its item stays in the outbox; the process exit ends it
        self._writer_lock.release()
        self._watch_lock.release()
        return pending

    def _follow_watch_lock(self) -> None:
        """Keep the hot-folder lock on the folder --watch names: one removed and made again
        (or another moved into its place) while this daemon ran is locked anew, or a second
        daemon could take it and both would process every image. OSError (the daemon stops,
        exit 2) when another daemon holds the new folder already."""
        if self._watch_lock is None:
            return
        try:
            moved = self._watch_lock.follow()
        except FolderInUse as exc:
            raise OSError(
                f"--watch {self.config.watch} was removed and made again while this daemon "
                f"ran; stopped, as {exc}"
            ) from None
        if moved:
            log_event(logging.INFO, "hot folder locked anew", watch=str(self.config.watch),
                      note="--watch was removed and made again; this daemon holds the new "
                           "folder")  # fmt: skip

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.store.check_file(STORE_CHECK_EVERY_S)  # StoreGone: --db deleted or replaced
            self._prune_when_due()
            self._follow_watch_lock()  # before scanning: a folder made anew is ours first
            self.folder.scan()
            if not self._process_ready():
                if self.config.once and self.folder.pending() == 0:
                    return
                self._stop.wait(self.config.poll_s)

    def _prune_when_due(self) -> None:
        """With keep_results_s: delete the results older than that, at most every PRUNE_EVERY_S,
        in a thread beside the loop (a large database never stalls classification)."""
        keep = self.config.keep_results_s
        busy = self._pruner is not None and self._pruner.is_alive()
        if keep is None or busy or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY_S
        if self.config.once:  # a batch run prunes to the end, then works (nothing to stall)
            self._prune(time.time() - keep)
            return
        self._pruner = threading.Thread(
            target=self._prune, args=(time.time() - keep,), name="splitdet-prune", daemon=True
        )
        self._pruner.start()

    def _prune(self, before: float) -> None:
        """One prune, from the first row to the last: a row kept because its file still lies
        where it arrived (--after keep, or a move that failed) is looked at again by every
        prune, so its result goes within PRUNE_EVERY_S of its file's removal. The cost of
        that: per prune, one read of each such row and one stat() of its file; those files lie
        in --watch, whose scan stats each of them every --poll anyway (the rows deleted are
        not read again, the rows not old enough were read by any prune). A failure is
        logged, never fatal: the next turn tries again."""
        try:
            pruned = self.store.prune(before, should_stop=self._pruner_stop.is_set)
        except Exception as exc:  # e.g. the database locked past its timeout
            log_event(logging.WARNING, "prune_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if pruned.kept_for_clock:
            log.warning(
                f"kept {pruned.kept_for_clock} result(s) stamped older than --keep-results that "
                "this boot wrote more recently: the wall clock was behind when they were "
                "written and has been set forward since; they go once they are as old by the "
                "time since boot",
                extra={"fields": {"event": "prune_kept_for_clock",
                                  "results": pruned.kept_for_clock,
                                  "older_than_s": self.config.keep_results_s}},
            )  # fmt: skip
        if pruned.deleted:
            try:
                freed = self.store.reclaim(should_stop=self._pruner_stop.is_set)
            except Exception as exc:  # (as the prune's: the next turn tries again)
                log_event(logging.WARNING, "reclaim_failed", error=f"{type(exc).__name__}: {exc}")
                freed = 0
            log_event(logging.INFO, "pruned", results=pruned.deleted,
                      older_than_s=self.config.keep_results_s, reclaimed_bytes=freed)  # fmt: skip

    def _process_ready(self) -> bool:
        """Handle every file that is ready now, earliest arrival first; False if none was.

        A database another program holds locked past the busy timeout (an `sqlite3` shell, a
        backup) stops the round: what that image's transaction wrote is rolled back and its
        file stays in --watch, taken again next round (WARNING `store_busy`, at most one a
        minute; INFO `store_resumed` once a file is handled again)."""
        skip: set[str] = set()
        handled = False
        while not self._stop.is_set():
            candidate = self.folder.next_candidate(skip)
            if candidate is None:
                return handled
            began, commits = time.monotonic(), self.store.commits
            try:
                done = self.handle(candidate)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                self._busy.failed(exc, path_text(candidate.path), began)
                if self.config.once and self._busy.waited_s() >= self.config.drain_timeout_s:
                    self._store_gave_up = str(exc)  # a batch run does not wait for good
                    self._stop.set()
                return handled
            if self.store.commits != commits:  # (only a commit says the lock was let go)
                self._busy.succeeded()
            if done:
                handled = True
            else:
                skip.add(candidate.name)
        return handled

    def _drain(self, timeout_s: float) -> None:
        """--once: let the sender deliver the outbox for up to `timeout_s` seconds. Still
        undelivered then, the call in flight is cancelled (`Sender.cancel`: the run ends within
        moments of its --drain-timeout, not at that call's own --timeout deadline) and a
        WARNING `drain_timeout` says how many requests are left: their results stay pending,
        and the next run (or a daemon) on this --db delivers them."""
        deadline = time.monotonic() + timeout_s
        self.sender.wake()
        while not self._stop.is_set():
            self.store.check_file(STORE_CHECK_EVERY_S)  # (answers would go to a lost file)
            if self.store.outbox_stats().depth == 0:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._stop.wait(min(0.1, left))
        if self._stop.is_set():  # stopped (a signal): the call in flight may finish, as always
            return
        self._drain_timed_out = True
        cancelled = self.sender.cancel()
        self.sender.join(timeout=5.0)  # (a cancelled call ends at once; then nothing is sent)
        stats = self.store.outbox_stats()
        if stats.depth == 0:  # (the last answer came in at the deadline)
            return
        local = self.sender.local_error  # (the answers came, and could not be stored)
        ask = (
            f"The last failure was on this side, not the cloud's: {local}"
            if local is not None
            else "Is the cloud up and answering? `splitdet edge check`, `splitdet edge status`"
        )
        log.warning(
            f"--drain-timeout {timeout_s:g}s reached: {stats.depth} request(s) left in the "
            f"outbox{' (the call in flight was cancelled)' if cancelled else ''}; their results "
            f"stay pending in --db {self.config.db} and the next run delivers them (nothing is "
            f"lost). {ask}",
            extra={"fields": {"event": "drain_timeout", "outbox_depth": stats.depth,
                              "outbox_bytes": stats.bytes, "drain_timeout_s": timeout_s,
                              "call_cancelled": cancelled, "local_error": local}},
        )  # fmt: skip

    # -------------------------------------------------------------------------- one file

    def handle(self, candidate: Candidate) -> bool:
        """Process one stable file; False when it is not ready after all (try it later), or
        its move failed and is not due to be tried again yet."""
        self.store.check_file(STORE_CHECK_EVERY_S)  # (a backlog: each image, every few s)
        retry = self._move_retries.get(candidate.file_key)
        if retry is not None and time.monotonic() < retry.due:
            return False
        known = self.store.known(candidate.file_key)
        if known is None and self.config.after == "keep":
            known = self._renumbered(candidate)
        if known is not None:
            self._finish(candidate, known)
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

    def _classify(self, candidate: Candidate, arrival: Arrival, ready: Ready) -> bool:
        """Gate one decoded image, record its result, then move the file; False when it was
        not recorded (stopping, or given up, while waiting for room in the outbox)."""
        try:
            result = self.pipeline.process_array(ready.image)
        except Exception as exc:
            # Quarantined rather than retried: the same file would fail again on every restart.
            detail = str(exc) if isinstance(exc, ImageError) else f"{type(exc).__name__}: {exc}"
            self._quarantine(candidate, arrival, f"{arrival.path}: cannot process ({detail})")
            return True
        timings = {"read": ready.read_s, **result.timings}
        stored = self._stored_path(candidate)
        start = time.perf_counter()
        if not result.flagged:
            image_id, stored_path = self.store.record_ok(
                arrival, result.p_defect, self.fingerprint, timings, stored,
                threshold=self.pipeline.threshold,
            )  # fmt: skip
            verdict = "ok"
        else:
            request_id = request_id_for(ready.data, self.fingerprint, self.pipeline.codec)
            name = Path(arrival.path).name  # (a protobuf string must be valid UTF-8)
            meta = ImageMeta(result.meta.original_hw, result.meta.resized_hw, name)
            payload = build_request(
                result.encoded, meta, request_id, self.fingerprint
            ).SerializeToString()
            record = self._record_pending(
                arrival, result.p_defect, request_id, payload, timings, stored
            )
            if record is None:
                return False  # stopping while the outbox is full: the file stays for the next run
            image_id, stored_path, verdict = record
        self.metrics.stage_seconds.labels("store").observe(time.perf_counter() - start)
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.images.labels(verdict).inc()
        log_event(logging.INFO, "classified", path=arrival.path, image_id=image_id, verdict=verdict,
                  p_defect=round(result.p_defect, 5), bytes=result.bytes_sent,
                  timings={k: round(v, 5) for k, v in timings.items()})  # fmt: skip
        self._move(candidate, image_id, stored_path)
        return True

    def _record_pending(
        self,
        arrival: Arrival,
        p_defect: float,
        request_id: str,
        payload: bytes,
        timings: dict[str, float],
        stored: StoredPath,
    ) -> tuple[int, str | None, str] | None:
        """record_pending, waiting for room under the "wait" policy; None if stopped first, or,
        with `once`, when there was no room for --drain-timeout (`_give_up_on_full_outbox`)."""
        waited = False
        deadline = time.monotonic() + self.config.drain_timeout_s  # (with `once` only)
        while True:
            try:
                record = self.store.record_pending(
                    arrival, p_defect, request_id, payload, self.fingerprint, timings, stored,
                    threshold=self.pipeline.threshold,
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
        self._outbox_gave_up = detail
        self._stop.set()

    def _report_left_behind(self) -> None:
        """Log (ERROR) how many images the run left in the folder for want of outbox room."""
        config = self.config
        self.folder.scan()
        left = self.folder.pending()
        cap = config.outbox
        log.error(
            f"outbox full ({self._outbox_gave_up}; caps {cap.max_items} requests, "
            f"{cap.max_bytes} bytes) and no room made within --drain-timeout "
            f"{config.drain_timeout_s:g}s: stopped taking images; {left} image(s) left untouched "
            f"in --watch {config.watch} for the next run. The cloud must take the outbox first "
            "(check it: splitdet edge check), or raise --outbox-max-items / --outbox-max-mb",
            extra={"fields": {"event": "outbox_full_stopped", "images_left": left,
                              "watch": str(config.watch), "detail": self._outbox_gave_up}},
        )  # fmt: skip

    def _report_store_held(self, error: str, left: int | None) -> None:
        """Log (ERROR `store_busy_stopped`) that --once stopped on a --db held locked past
        --drain-timeout (`error`: SQLite's words), and how many images it left in the folder
        (None: the run stopped before it looked)."""
        config = self.config
        images = "every image" if left is None else f"{left} image(s)"
        log.error(
            f"--db {config.db} stayed locked by another program ({error}) for --drain-timeout "
            f"{config.drain_timeout_s:g}s: stopped; {images} left untouched in --watch "
            f"{config.watch} for the next run (nothing is lost). Is an `sqlite3` shell, a "
            "backup or `splitdet edge requeue` holding it?",
            extra={"fields": {"event": "store_busy_stopped", "images_left": left,
                              "db": str(config.db), "watch": str(config.watch),
                              "waited_s": round(self._busy.waited_s(), 1)}},
        )  # fmt: skip

    def _stored_path(self, candidate: Candidate) -> str | Callable[[int], str] | None:
        """Where the processed file will be: a path, None (deleted) or a function of the id."""
        path = candidate.path
        if self.config.after == "keep":
            return path_text(path)
        if self.config.after == "delete":
            return None
        archive = self.config.archive
        return lambda image_id: str(self._free_target(archive, image_id, path.name))

    @staticmethod
    def _free_target(
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

    def _quarantine(self, candidate: Candidate, arrival: Arrival, reason: str) -> None:
        quarantine = self.config.quarantine
        name = candidate.path.name
        reason = path_text(reason)  # it names the file
        image_id, stored_path = self.store.record_error(
            arrival,
            "quarantine",
            reason,
            self.fingerprint,
            lambda image_id: str(self._free_target(quarantine, image_id, name, quarantine=True)),
        )
        self.metrics.images.labels("error").inc()
        self.metrics.errors.labels("quarantine").inc()
        # logged once the move is done: a quarantine that cannot be written is told as such
        if self._move(candidate, image_id, stored_path, reason):
            log_event(logging.WARNING, "quarantined", path=arrival.path, image_id=image_id,
                      reason=reason, to=stored_path)  # fmt: skip
        else:
            log_event(logging.WARNING, "to be quarantined", path=arrival.path,
                      image_id=image_id, reason=reason, to=stored_path,
                      note="recorded as an error; the move into the quarantine failed (the "
                           "line before says why) and is tried again")  # fmt: skip

    # -------------------------------------------------------------------------- after-actions

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
            digest = file_sha256(candidate.path)
        except OSError:
            return None  # processed as new, which reads it again and says why not
        if content_hash != digest:
            return None
        self.store.rekey(image_id, candidate.file_key)
        log_event(logging.INFO, "recorded_file_renumbered", path=path, image_id=image_id,
                  was=old_key, now=path_text(candidate.file_key))  # fmt: skip
        return self.store.known(candidate.file_key)

    def _finish(self, candidate: Candidate, known: KnownFile) -> None:
        """Complete what a recorded file's row says should happen to the file."""
        quarantined = known.error_kind == "quarantine" and known.stored_path
        reason = (known.reason or "") if quarantined else None
        self._move(candidate, known.id, known.stored_path, reason, adopt=True)

    def _move(
        self,
        candidate: Candidate,
        image_id: int,
        stored_path: str | None,
        reason: str | None = None,
        adopt: bool = False,
    ) -> bool:
        """Do what the row says happens to the file: delete it, keep it, or move it to
        `stored_path` (with `reason`: into the quarantine, its reason file beside it; with
        `adopt`, a row recorded before, a whole copy of it already there is taken as the
        move, see `_move_to`). A failure is logged and counted (errors kind "move"), never
        fatal: the file stays and is tried again (`_retry_move_later`). False after such a
        failure, else True."""
        source = candidate.path
        if stored_path != path_text(source):  # it leaves --watch: only while its row is kept
            self.store.check_file()  # StoreGone when --db was deleted or replaced
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

    def _retry_move_later(self, candidate: Candidate) -> float | None:
        """After a failed move: the seconds until it is tried again, MOVE_RETRY_INITIAL_S
        doubling to MOVE_RETRY_MAX_S (`handle` passes the file over until then). With `once`,
        None: the file is left for the next run."""
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
                    self._adopt(source, target, reason)
                    return
                attempt += 1
                target = self._replan(image_id, target, source, reason is not None, attempt)
                continue
            if reason is not None:
                self._write_reason(target, reason)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if file_moves.same_file(source, target):  # linked before a crash, not yet unlinked
                    source.unlink()
                else:
                    file_moves.move_no_clobber(source, target)
                return
            except FileExistsError:  # taken in the instant since the check: choose again
                continue

    def _adopt(self, source: Path, target: Path, reason: str | None) -> None:
        """Finish a move whose copy is already in place at `target` (the name the row records):
        the reason file beside a quarantined one if it is missing, then the source removed."""
        if reason is not None:
            self._write_reason(target, reason)
        source.unlink()
        log_event(logging.INFO, "copy found in place", path=path_text(source),
                  to=path_text(target),
                  note="its copy was complete before a kill; the image left --watch")  # fmt: skip

    def _replan(
        self, image_id: int, planned: Path, source: Path, quarantine: bool, attempt: int
    ) -> Path:
        """A free name in `planned`'s folder instead of `planned` (taken, or too long), recorded
        in the row before the file moves there: a crash in between leaves the row right."""
        target = self._free_target(planned.parent, image_id, source.name, quarantine, attempt)
        self.store.set_stored_path(image_id, str(target))
        log_event(logging.WARNING, "stored under another name", path=path_text(source),
                  planned=path_text(planned), to=path_text(target))  # fmt: skip
        return target

    @staticmethod
    def _write_reason(target: Path, reason: str) -> None:
        """NAME.reason.txt beside a quarantined file. Best effort: the row holds the reason
        too, and a full disk or a folder made read-only must not end the daemon (the row is
        committed, so every restart would fail on the same file)."""
        path = file_moves.reason_path(target)
        try:
            if path.exists():  # written before a crash
                return
            atomic_write(path, path_text(reason) + "\n")
        except OSError as exc:
            log_event(logging.WARNING, "cannot write reason file", path=path_text(path),
                      error=path_text(str(exc)))  # fmt: skip


@dataclass(frozen=True)
class _MoveRetry:
    """A file whose move failed: when to try again (monotonic s), how many times it failed."""

    path: Path
    due: float
    failures: int
