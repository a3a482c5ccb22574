"""The camera-side edge daemon: hot folder in, durable results out, nothing lost (no torch).

    config = DaemonConfig(model_dir=Path("model"), watch=Path("incoming"),
                          cloud="10.0.0.5:50051", db=Path("edge.sqlite"))
    sys.exit(EdgeDaemon(config).run())     # until SIGTERM; `once=True` for batch mode

The loop, per file, in arrival order:

    candidate = folder.next_candidate()             # size + mtime stable for settle_s
    ready = folder.read(candidate)                  # bytes + decoded image, or a final error
    result = pipeline.process_array(ready.image)    # gate; for flagged images FPN + encode
    store.record_ok(...) | store.record_pending(..., payload)   # one commit each
    after.move(...)                                 # keep | archive | delete | quarantine

Each file is taken by `Intake.handle` (splitdet.edge.intake), its file then kept, moved or
deleted by `AfterActions` (splitdet.edge.after_actions); beside the loop `ResultPruner`
(splitdet.edge.result_pruner) applies --keep-results and a start-up thread removes the partial
copies a kill left (splitdet.edge.partial_sweep).

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
import errno
import logging
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from types import FrameType

from splitdet.edge.after_actions import AfterActions
from splitdet.edge.client import AnswerRules, CloudClient
from splitdet.edge.daemon_config import (
    DaemonConfig,
    check_paths,
    folder_problem,
    resolved_below,
)
from splitdet.edge.daemon_log import log, log_event
from splitdet.edge.daemon_metrics import EdgeMetrics, model_labels, threshold_text
from splitdet.edge.file_identity import path_text
from splitdet.edge.intake import STORE_CHECK_EVERY_S, Intake
from splitdet.edge.liveness import Liveness
from splitdet.edge.model_probe import ModelOnDisk, ModelProbe
from splitdet.edge.partial_sweep import start_partial_sweep
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.result_pruner import ResultPruner
from splitdet.edge.runtime import EdgeRuntime
from splitdet.edge.sender import Backoff, Sender, annotate_hook
from splitdet.edge.store import ResultStore
from splitdet.edge.store_busy import BusyStore
from splitdet.edge.store_file import (
    FREE_DB_SPACE,
    StoreError,
    StoreLocked,
    WriterLock,
    is_busy,
    refuse_foreign_file,
)
from splitdet.edge.watcher import Candidate, HotFolder, enters_subfolder
from splitdet.shared.cli import (
    privileged_port_hint,
    remove_ready_file,
    thread_limit_message,
    write_ready_file,
)
from splitdet.shared.folder_lock import DirectoryLock, FolderInUse
from splitdet.shared.metrics_http import start_metrics_server
from splitdet.shared.shortage import short_of
from splitdet.shared.signal_event import event_setter
from splitdet.shared.version import splitdet_version

#: --once ends waiting for files still being written after --drain-timeout, never sooner than
#: this (seconds): a --drain-timeout 0 means "do not wait for the cloud", not for the files.
ONCE_UNSETTLED_MIN_S = 10.0
#: Milliseconds each try to open a --db another program holds locked at start waits for it
#: (short: a SIGTERM is only seen between tries), and seconds between two tries.
OPEN_TRY_MS = 1000
OPEN_RETRY_S = 1.0


# ---------------------------------------------------------------------------------- the daemon


class ThreadLimit(OSError):
    """A thread the daemon needs could not be started (the process/thread limit, RLIMIT_NPROC,
    too low): an OSError, so `edge run` says it in one line, exit 2 (`threads_started`)."""


@contextlib.contextmanager
def threads_started(taken: str = "nothing was taken") -> Iterator[None]:
    """Within the block, CPython's RuntimeError "can't start new thread" becomes ThreadLimit,
    one line naming the limit to raise; `taken` says what became of the images."""
    try:
        yield
    except RuntimeError as exc:
        if short_of(exc) != "threads":
            raise
        raise ThreadLimit(f"{thread_limit_message(exc)}; {taken}") from None


class StoppedBeforeStart(BaseException):
    """SIGTERM or SIGINT before the daemon started (while it waited for a --db held locked,
    or earlier: `cli_edge_run.run`): exit 0, or 1 with --once (its images are all left). A
    BaseException, as KeyboardInterrupt: no `except Exception` on the way turns it into an
    error of what it interrupted (loading the model, reading a token)."""

    def __init__(self, message: str, signum: int | None = None) -> None:
        """`signum`: the signal whose handler raised it, if one did (`sigterm.SIGNUM_ATTRIBUTES`:
        one a finaliser swallowed is sent again, not lost)."""
        super().__init__(message)
        self.signum = None if signum is None else signal.Signals(signum)


class EdgeDaemon:
    """The hot-folder loop with its sender thread; see the module docstring."""

    def __init__(self, config: DaemonConfig, pipeline: EdgePipeline | None = None) -> None:
        watch = config.watch.resolve()
        config = replace(  # absolute paths in the database and the logs
            config,
            watch=watch,
            archive_dir=resolved_below(config.archive, config.watch, watch),
            quarantine_dir=resolved_below(config.quarantine, config.watch, watch),
            save_annotated=(
                resolved_below(config.save_annotated, config.watch, watch)
                if config.save_annotated is not None
                else None
            ),
        )
        check_paths(config)
        self.config = config
        self._stop = threading.Event()  # (set by SIGTERM/SIGINT from the start-up wait on)
        with threads_started():  # (the first setter starts the signal events' thread)
            self._set_stop = event_setter(self._stop)
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
            log.warning("--db %s: this daemon's record not written (%s)", config.db, exc,
                        extra={"fields": {"event": "daemon_record_failed", "db": str(config.db),
                                          "error": str(exc)}})  # fmt: skip
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
        self.liveness = Liveness(config.stall_after_s)  # (/healthz: the loop still goes round)
        self.metrics.watch_loop(self.liveness)
        # a re-export into --model while it runs: noticed and said, never taken up by itself
        self.model_on_disk = ModelOnDisk(config.model_dir, self.fingerprint, metrics=self.metrics)
        client_config = config.client_config
        self.sender = Sender(
            self.store,
            lambda: CloudClient(client_config),
            Backoff(config.retry_initial_s, config.retry_max_s),
            timeout_s=client_config.timeout_s,
            metrics=self.metrics,
            on_answer=(
                annotate_hook(
                    config.save_annotated,
                    self.pipeline.manifest.model_config.pixel_bits,
                    watch=config.watch,
                )
                if config.save_annotated
                else None
            ),
            on_fatal=lambda _exc: self._stop.set(),  # (raised by `run`: `_sender_failure`)
            refusal_hint=self.model_on_disk.refusal_hint,
        )
        self._metrics_httpd = None
        self.metrics_port: int | None = None
        self._pruner_stop = threading.Event()  # (ends the sweep and the cloud probe too)
        self._pruner = ResultPruner(self.store, config.keep_results_s, config.once,
                                    self._pruner_stop, beat=self.liveness.beat)  # fmt: skip
        self._sweeper: threading.Thread | None = None  # removes partial copies left by a kill
        self._probe: ModelProbe | None = None  # asks the cloud about our exports
        after = AfterActions(config, self.store, self.folder, self.metrics)
        self._intake = Intake(config, self.store, self.pipeline, self.folder, self.metrics,
                              self.sender, after, self._stop, beat=self.liveness.beat)  # fmt: skip
        self._store_gave_up: str | None = None  # --once: the --db, held locked past it
        self._once_idle_since = time.monotonic()  # --once: last file recorded or moved
        self._left_unsettled = 0  # --once: files left still changing (`_once_waited_out`)
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
                        self.config.db, self.config.outbox, open_wait_ms=OPEN_TRY_MS,
                        edge_name=self.config.client_config.edge_name,  # (as sent and logged)
                    )  # fmt: skip
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
        """Finish the current image, then leave the loop. As a signal's handler (`signum`
        given) it takes no lock (`event_setter`: the Event is set by a helper thread)."""
        if signum is None:
            self._stop.set()
            return
        self.signalled = True
        self._set_stop(signum, _frame)

    @property
    def processed(self) -> int:
        """How many files this daemon has processed (recorded, or quarantined)."""
        return self._intake.processed

    def handle(self, candidate: Candidate) -> bool:
        """Process one stable file (`Intake.handle`); False when it is not ready after all
        (try it later), or its move failed and is not due to be tried again yet."""
        return self._intake.handle(candidate)

    def _prune(self, before: float) -> None:
        """One prune of the results older than `before` (unix s), now (`ResultPruner.prune`)."""
        self._pruner.prune(before)

    def run(self) -> int:
        """Run until stopped (or, with `once`, until the folder is done); returns the exit
        status: 0, or with `once` 1 when requests are still pending (sent on the next run) or
        images were left in the folder because the outbox stayed full, the database stayed
        locked by another program for drain_timeout_s, files were still changing after it
        (`_once_waited_out`), or a signal stopped it (processed next run)."""
        config = self.config
        self._prepare_folders()
        previous = {}
        if threading.current_thread() is threading.main_thread():  # (tests run it in a thread)
            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[sig] = signal.signal(sig, self.request_stop)
        try:
            with threads_started():  # (the sender, metrics, cloud probe, sweep: before any image)
                self._start_services()
                self._sweeper = start_partial_sweep(config, self._pruner_stop)
            self._loop()
            self._sender_failure()
            if self._store_gave_up is not None:  # (the sender could not deliver either)
                self.sender.cancel()
                self.folder.scan()
                self._report_store_held(self._store_gave_up, self.folder.pending())
            elif self._intake.outbox_gave_up is not None:  # --drain-timeout spent waiting for room
                self._drain_timed_out = True  # (the run ends now: its call in flight too)
                self.sender.cancel()
                self._report_left_behind()
            elif config.once:  # (files left unsettled: the sender had --drain-timeout already)
                self._drain(0.0 if self._left_unsettled else config.drain_timeout_s)
                self._sender_failure()
        finally:
            try:  # (another signal meanwhile only sets _stop again: not the default action)
                pending = self._shutdown()
            finally:  # (the CLI's, put back: they keep the ending process from the default)
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        log_event(logging.INFO, "stopped", processed=self.processed, outbox_depth=pending,
                  dead_letters=self.sender.dead_lettered)  # fmt: skip
        gave_up = self._intake.outbox_gave_up is not None or self._store_gave_up is not None
        gave_up = gave_up or self._left_unsettled > 0 or self.folder.held_back() > 0
        gave_up = gave_up or self.folder.listing_short()  # (folder_unreadable, EMFILE...)
        if config.once and self.signalled and not gave_up:  # stopped with images left?
            self.folder.scan()
            gave_up = self.folder.pending() > 0
        return 1 if config.once and (pending or gave_up) else 0

    def _sender_failure(self) -> None:
        """Raise StoreError (exit 2, as when the loop's own write fails so) when the sender
        stopped the daemon on a store failure (`sender.stops_the_daemon`: the disk holding --db
        full, an I/O error), which its ERROR `sender_error` line (`fatal`) said."""
        exc = self.sender.fatal
        if exc is None:
            return
        fix = (
            f"{FREE_DB_SPACE}, then start it again"
            if "full" in str(exc)
            else "fix the file system holding it, then start it again"
        )
        raise StoreError(
            f"{self.config.db}: {exc} (met by the sender, storing a request's outcome); "
            f"stopped: {fix}. Nothing is lost: the requests wait in the outbox"
        ) from exc

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
            except FileExistsError:  # a file, a FIFO, a link to one: not the folder asked for
                there = folder_problem(flag, folder, "give a folder (made if missing), or move "
                                       "what is there away")  # fmt: skip
                raise OSError(there or f"{flag} {folder}: cannot create (File exists)") from None
            except OSError as exc:
                raise OSError(f"{flag} {folder}: cannot create ({exc.strerror or exc})") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OSError(f"{flag} {folder}: not writable")

    def _start_services(self) -> None:
        config = self.config
        if config.metrics_port is not None:
            try:
                self._metrics_httpd = start_metrics_server(
                    config.metrics_port, config.metrics_host, self.metrics.registry,
                    health=self.liveness.health,
                )  # fmt: skip
            except OSError as exc:
                where = f"{config.metrics_host}:{config.metrics_port}"
                denied = exc.errno == errno.EACCES  # (a port below 1024, not root)
                hint = privileged_port_hint(config.metrics_port) if denied else ""
                raise OSError(f"metrics endpoint {where}: {exc.strerror or exc}{hint}") from None
            self.metrics_port = self._metrics_httpd.server_port
        self.sender.start()
        stats = self.store.outbox_stats()
        calibrated = getattr(self.pipeline.manifest, "gate_threshold", None)
        log_event(
            logging.INFO,
            "started",
            version=splitdet_version(),  # (which splitdet: an edge and a cloud are upgraded apart)
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
        if self.store.created:  # a typo in --db would otherwise start afresh without a word
            log_event(logging.INFO, "db_created", db=str(config.db),
                      note="a new database: no earlier results or outbox in it")  # fmt: skip
        given = config.threshold  # (None: the export's own, which overrides nothing)
        if given is not None and calibrated is not None and given != calibrated:
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
        probe = ModelProbe(
            config.client_config, self.fingerprint, tuple(earlier), config.retry_max_s,
            self._pruner_stop, on_served=self.sender.release_export,
        )  # fmt: skip
        probe.start()
        self._probe = probe  # (once started: `_shutdown` joins it)

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

    def _shutdown(self) -> int:
        """Stop the sender, a prune (after its batch), the start-up sweep and the metrics
        endpoint; returns the outbox depth left."""
        if self.config.ready_file is not None:  # stopping: no longer ready
            remove_ready_file(self.config.ready_file, os.getpid())
        self._pruner_stop.set()  # (ends the start-up sweep and the cloud probe too)
        with contextlib.suppress(RuntimeError):  # (a prune whose thread could not start:
            self._pruner.join(timeout=10.0)  # "cannot join thread before it is started")
        if self._sweeper is not None:
            self._sweeper.join(timeout=10.0)
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
        exit 2) when another daemon holds the new folder already, or when the new folder is
        one it writes into (`check_paths`, as at start: a link to its own archive swapped in
        for --watch would have it process its archive into itself)."""
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
            try:  # (a link inside it: each move refuses it, as when swapped in alone)
                check_paths(self.config)
            except ValueError as exc:
                raise OSError(
                    f"--watch {self.config.watch} was replaced while this daemon ran; stopped, "
                    f"as {exc}"
                ) from None
            log_event(logging.INFO, "hot folder locked anew", watch=str(self.config.watch),
                      note="--watch was removed and made again; this daemon holds the new "
                           "folder")  # fmt: skip

    def _loop(self) -> None:
        self._once_idle_since = time.monotonic()
        while not self._stop.is_set():
            self.liveness.beat()
            self.store.check_file(STORE_CHECK_EVERY_S)  # StoreGone: --db deleted or replaced
            with threads_started("the images not yet recorded stay in --watch"):
                self._pruner.prune_when_due()  # (its own thread)
            self._follow_watch_lock()  # before scanning: a folder made anew is ours first
            self.model_on_disk.check()  # (a stat every MODEL_CHECK_EVERY_S: a re-export said)
            self.folder.scan()
            commits = self.store.commits
            took = self._process_ready()
            if self.store.commits != commits:  # (a file recorded, moved: the run goes on)
                self._once_idle_since = time.monotonic()
            if self._stop.is_set():  # (a --db held locked past --drain-timeout, a signal)
                return
            done = not took and self.folder.pending() == 0
            if self.config.once and (done or self._once_waited_out()):
                return
            if not took:
                self.liveness.beat(idle_s=self.config.poll_s)  # (a long --poll is no stall)
                self._stop.wait(self.config.poll_s)

    def _once_waited_out(self) -> bool:
        """--once: whether the files still pending (being written, changing, or a move that
        keeps failing) have kept the run waiting for --drain-timeout since it last recorded or
        moved a file, or waited for a locked --db (never less than ONCE_UNSETTLED_MIN_S, nor
        twice --settle plus --unreadable-grace: a file written at an ordinary pace settles
        within that): they are left for the next run (WARNING `once_left_unsettled`), the run
        ends with status 1. A camera writing without a pause, or a file whose move keeps
        failing, would otherwise keep it running."""
        config = self.config
        waited = time.monotonic() - self._once_idle_since
        bound = max(config.drain_timeout_s, 2 * config.settle_s + config.unreadable_grace_s,
                    ONCE_UNSETTLED_MIN_S)  # fmt: skip
        if waited < bound:
            return False
        left = self.folder.pending()
        self._left_unsettled = left
        note = (f"{left} file(s) still being written or changing after --drain-timeout "
                f"{self.config.drain_timeout_s:g} s: left in --watch for the next run")  # fmt: skip
        log_event(logging.WARNING, "once_left_unsettled", files=left, waited_s=round(waited, 1),
                  note=note)  # fmt: skip
        return True

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
            self.model_on_disk.check()  # (also while images keep coming)
            began, commits = time.monotonic(), self.store.commits
            try:
                done = self._intake.handle(candidate)
            except sqlite3.OperationalError as exc:
                if not is_busy(exc):
                    raise
                self._busy.failed(exc, path_text(candidate.path), began)
                self._once_idle_since = time.monotonic()  # (the lock is waited for: not the files)
                if self.config.once and self._busy.waited_s() >= self.config.drain_timeout_s:
                    self._store_gave_up = str(exc)  # a batch run does not wait for good
                    self._stop.set()
                return handled
            self.liveness.beat()  # (an image handled: a backlog is no stall)
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
            self.liveness.beat()
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
        refused = self.sender.refused_by_cloud  # (a token, a model not served: a person's fix)
        if local is not None:
            ask = f"The last failure was on this side, not the cloud's: {local}"
        elif refused is not None:
            ask = (f"The cloud refuses them ({refused}): fix what the refusal above says; "
                   "running again will not help until then")  # fmt: skip
        else:
            ask = "Is the cloud up and answering? `splitdet edge check`, `splitdet edge status`"
        log.warning(
            f"--drain-timeout {self.config.drain_timeout_s:g}s reached: {stats.depth} "
            "request(s) left in the "
            f"outbox{' (the call in flight was cancelled)' if cancelled else ''}; their results "
            f"stay pending in --db {self.config.db} and the next run delivers them (nothing is "
            f"lost). {ask}",
            extra={"fields": {"event": "drain_timeout", "outbox_depth": stats.depth,
                              "outbox_bytes": stats.bytes, "drain_timeout_s": timeout_s,
                              "call_cancelled": cancelled, "local_error": local,
                              "refused": refused}},
        )  # fmt: skip

    def _report_left_behind(self) -> None:
        """Log (ERROR) how many images the run left in the folder for want of outbox room."""
        config = self.config
        self.folder.scan()
        left = self.folder.pending()
        cap = config.outbox
        log.error(
            f"outbox full ({self._intake.outbox_gave_up}; caps {cap.max_items} requests, "
            f"{cap.max_bytes} bytes) and no room made within --drain-timeout "
            f"{config.drain_timeout_s:g}s: stopped taking images; {left} image(s) left untouched "
            f"in --watch {config.watch} for the next run. The cloud must take the outbox first "
            "(check it: splitdet edge check), or raise --outbox-max-items / --outbox-max-mb",
            extra={"fields": {"event": "outbox_full_stopped", "images_left": left,
                              "watch": str(config.watch),
                              "detail": self._intake.outbox_gave_up}},
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
