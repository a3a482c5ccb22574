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

Beside the loop the Sender thread delivers the outbox. Nothing is acknowledged before it is
durable: the file is moved or deleted only after its row is committed, and a file whose row
exists when it is found again (a crash between commit and move, or --after keep) is only moved,
never processed twice. SIGTERM/SIGINT finish the current image, then exit 0; pending requests
stay in the outbox for the next start. One daemon per database (`WriterLock`) and per hot
folder (`DirectoryLock`); a database deleted or replaced while the daemon runs stops it
(`ResultStore.check_file`) before it moves or deletes another image.

Archived and quarantined files are named ID_NAME (`stored_name`): short enough that NAME.reason.txt
and its temporary name fit a file system's 255 bytes, valid UTF-8 whatever the camera's name was,
and never over another file: a name taken (another daemon sharing the folder, a database made
anew whose ids start at 1 again) gets a ~N before its extension, and the row records the name
used; but a recorded name already holding the image's very bytes (a copy onto another file
system, whole before a kill stopped the image's removal) is that image's copy, and kept.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import secrets
import shutil
import signal
import stat
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

from splitdet.edge.client import (
    AnswerRules,
    ClientConfig,
    CloudClient,
    CloudError,
    ImageMeta,
    RetryLater,
    build_request,
)
from splitdet.edge.file_names import NAME_MAX, fit_name
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.predict import request_id_for
from splitdet.edge.preprocess import IMAGE_SUFFIXES, ImageError
from splitdet.edge.runtime import EdgeRuntime
from splitdet.edge.sender import (
    DEAD_LETTER_CODES,
    OPERATOR_PROBLEMS,
    PER_EXPORT,
    SEND_FAILURE_CODES,
    Backoff,
    Sender,
    annotate_hook,
)
from splitdet.edge.store import (
    ERROR_KINDS,
    VERDICTS,
    Arrival,
    KnownFile,
    OutboxCap,
    OutboxFull,
    ResultStore,
    WriterLock,
    file_path,
    path_text,
    refuse_foreign_file,
)
from splitdet.edge.watcher import Candidate, HotFolder, Ready, normalize_extensions
from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.cli import write_ready_file
from splitdet.shared.folder_lock import DirectoryLock
from splitdet.shared.manifest import file_sha256

log = logging.getLogger("splitdet.edge")

AFTER_POLICIES = ("keep", "archive", "delete")
#: Seconds between two prunes of the results (DaemonConfig.keep_results_s).
PRUNE_EVERY_S = 3600.0
#: Seconds between two checks that --db still names the file the store has open (one stat).
STORE_CHECK_EVERY_S = 5.0
#: Latency histogram buckets, seconds.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
#: Beside each quarantined file: why it is there.
REASON_SUFFIX = ".reason.txt"
#: Bytes `atomic_write` adds to a name for its temporary file (".NAME.XXXXXXXX.tmp").
_TEMP_NAME_EXTRA = 14
#: Longest archived or quarantined name, bytes: NAME.reason.txt's temporary name fits NAME_MAX.
STORED_NAME_MAX = NAME_MAX - len(REASON_SUFFIX) - _TEMP_NAME_EXTRA
#: Longest extension kept whole when a stored name is shortened, bytes.
_EXTENSION_MAX = 16
#: link() errors meaning "no hard link here" (another file system, one without hard links,
#: protected_hardlinks refusing another user's file): the move falls back to rename/copy.
_NO_HARD_LINK = frozenset(
    {errno.EXDEV, errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
     errno.ENOSYS}
)  # fmt: skip
#: fsync() errors of a folder on a file system that does not sync folders (some shares).
_NO_FOLDER_SYNC = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
#: Ends the hidden temporary name of a file being copied into the archive or quarantine on
#: another file system (`partial_path`).
PARTIAL_SUFFIX = ".splitdet-partial"
#: A file move (archive, quarantine, delete) that failed is tried again after this many
#: seconds, doubling each time up to MOVE_RETRY_MAX_S (e.g. a share read-only for a while).
MOVE_RETRY_INITIAL_S = 5.0
MOVE_RETRY_MAX_S = 300.0
#: Partial copies changed less than this before a start are not swept (s): file times lag
#: the clock by up to a timer tick, and this daemon's own copies must never look older.
_SWEEP_MARGIN_S = 1.0
#: The `kind` of splitdet_edge_errors_total counting failed attempts to move a file.
MOVE_ERROR = "move"
#: The labels of splitdet_edge_model_info (`model_labels`).
MODEL_INFO_LABELS = ("fingerprint", "threshold", "calibrated_threshold", "codec")
#: What `EdgeDaemon._probe_one` found: the export served, refused, or no use asking further.
_SERVED, _REFUSED, _UNREACHABLE, _STOP = "served", "refused", "unreachable", "stop"
#: Bytes read at a time when a file in the archive is compared with the image (`_same_bytes`).
_COMPARE_CHUNK = 1 << 20


@dataclass(frozen=True)
class DaemonConfig:
    """Every setting of the edge daemon.

    Attributes:
        model_dir: exported model directory (`splitdet export`).
        watch: the hot folder.
        recursive: take the images of its subfolders too (not the quarantine or archive).
        extensions: take only the files whose name ends in one of these (any case); the
            others (Thumbs.db, desktop.ini, sidecar .json/.xml/.txt files) are left where
            they are, logged once each and counted in `splitdet_edge_skipped_files`. None
            takes every file (what does not decode is quarantined).
        cloud: cloud address(es), as ClientConfig.addresses.
        db: the SQLite results + outbox file.
        after: what happens to a processed image file: keep, archive or delete.
        archive_dir: where --after archive moves files (default WATCH/archive).
        quarantine_dir: where unreadable files go, with a NAME.reason.txt beside each
            (default WATCH/quarantine).
        once: process what is in the folder, try to deliver the outbox, exit.
        drain_timeout_s: with `once`, how long to keep delivering before giving up.
        threshold: gate threshold (default: the manifest's).
        codec: feature codec (default: the manifest's).
        threads, device: ONNX Runtime settings.
        settle_s: a file must be unchanged this long before it is read.
        unreadable_grace_s: an unchanged file that does not decode waits this much longer
            before it is quarantined.
        poll_s: seconds between scans of an idle hot folder.
        outbox: the outbox caps and full policy.
        retry_initial_s, retry_max_s: sender backoff.
        client: how to reach the cloud (timeout, TLS, token), addresses included.
        metrics_port: Prometheus endpoint port (0: any free port; None: off).
        metrics_host: its address.
        save_annotated: write annotated defect images here.
        ready_file: once running, write {"pid", "metrics_port", "fingerprint"} JSON here.
        keep_results_s: delete final results older than this (seconds) from the database,
            checked at start and then hourly (ResultStore.prune); None keeps every result.
    """

    model_dir: Path
    watch: Path
    cloud: str
    db: Path
    after: str = "keep"
    archive_dir: Path | None = None
    quarantine_dir: Path | None = None
    once: bool = False
    drain_timeout_s: float = 60.0
    threshold: float | None = None
    codec: str | None = None
    threads: int | None = None
    device: str = "auto"
    settle_s: float = 1.0
    unreadable_grace_s: float = 10.0
    poll_s: float = 0.25
    outbox: OutboxCap = field(default_factory=OutboxCap)
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    client: ClientConfig | None = None
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    save_annotated: Path | None = None
    ready_file: Path | None = None
    recursive: bool = False
    keep_results_s: float | None = None
    extensions: tuple[str, ...] | None = IMAGE_SUFFIXES

    def __post_init__(self) -> None:
        if self.after not in AFTER_POLICIES:
            raise ValueError(f"--after must be one of {AFTER_POLICIES}, got {self.after!r}")
        if self.save_annotated is not None and self.after == "delete":
            raise ValueError(
                "--save-annotated needs the image after the cloud answers: use --after keep "
                "or archive"
            )
        if min(self.settle_s, self.unreadable_grace_s, self.drain_timeout_s) < 0:
            raise ValueError("settle, grace and drain times must be non-negative")
        if self.poll_s <= 0:
            raise ValueError("--poll must be positive")
        if self.keep_results_s is not None and not 0 <= self.keep_results_s < float("inf"):
            raise ValueError("--keep-results must be a finite age")
        if self.extensions is not None:
            try:
                normalize_extensions(self.extensions)
            except ValueError as exc:
                raise ValueError(f"--extensions: {exc}") from None
        Backoff(self.retry_initial_s, self.retry_max_s)  # validates

    @property
    def archive(self) -> Path:
        return self.archive_dir or self.watch / "archive"

    @property
    def quarantine(self) -> Path:
        return self.quarantine_dir or self.watch / "quarantine"

    def output_folders(self) -> list[tuple[str, Path]]:
        """(option, folder) of every folder the daemon moves or writes images into."""
        folders = [("--quarantine", self.quarantine)]
        if self.after == "archive":
            folders.append(("--archive", self.archive))
        if self.save_annotated is not None:
            folders.append(("--save-annotated", self.save_annotated))
        return folders

    @property
    def client_config(self) -> ClientConfig:
        return self.client or ClientConfig(self.cloud)


def check_paths(config: DaemonConfig) -> None:
    """ValueError when the daemon would write into its own hot folder: files archived,
    quarantined or annotated there come back as new images (again and again), and a database
    or ready file there would be quarantined as an unreadable image."""
    watch = config.watch.resolve()
    for flag, folder in config.output_folders():
        if folder.resolve() == watch:
            raise ValueError(
                f"{flag} {folder} is the --watch folder: its files would be processed again; "
                "give it another folder"
            )
    outputs = [folder.resolve() for _, folder in config.output_folders()]

    def scanned(path: Path) -> bool:  # would the hot folder list this file?
        if not config.recursive:
            return path.parent == watch
        inside = path.is_relative_to(watch)
        return inside and not any(path.is_relative_to(folder) for folder in outputs)

    files = [("--db", config.db), ("--ready-file", config.ready_file)]
    for flag, path in files:
        if path is not None and scanned(path.resolve()):
            raise ValueError(
                f"{flag} {path} is in the --watch folder, which would take it for an image; "
                "put it elsewhere"
            )


def stored_name(image_id: int, name: str, attempt: int = 0) -> str:
    """The name a processed file gets in the archive or quarantine: ID_NAME, or ID_NAME~N.EXT
    for the N-th other choice when names are taken.

    Valid UTF-8 (an invalid byte becomes U+FFFD; the row's path keeps the original), and at
    most STORED_NAME_MAX bytes: a long camera name is cut short, keeping the id prefix (unique
    per database) and the extension (what tools open it by)."""
    text = os.fsencode(name).decode("utf-8", "replace")
    stem, ext = os.path.splitext(text)
    if len(ext.encode()) > _EXTENSION_MAX:  # not an extension: part of the name
        stem, ext = text, ""
    prefix, tag = f"{image_id:08d}_", f"~{attempt}" if attempt else ""
    return prefix + fit_name(stem, f"{tag}{ext}", STORED_NAME_MAX - len(prefix))


def reason_path(target: Path) -> Path:
    """Where a quarantined file's reason is written."""
    return target.with_name(target.name + REASON_SUFFIX)


def partial_path(target: Path) -> Path:
    """A hidden name beside `target` for a file copied there from another file system until
    it is whole: .NAME.XXXXXXXX.splitdet-partial (XXXXXXXX random), NAME cut so that the
    whole fits NAME_MAX bytes (a stored name may be STORED_NAME_MAX, 230 bytes: 27 more would
    not fit). Hidden and not named as an image: never taken for an archived file, nor by a
    hot folder."""
    room = NAME_MAX - len(f"..{'0' * 8}{PARTIAL_SUFFIX}".encode())
    text = os.fsdecode(os.fsencode(target.name)[:room])  # (a cut character: its bytes kept)
    return target.with_name(f".{text}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def is_partial_name(name: str) -> bool:
    """Whether `name` is one `partial_path` gives (a copy not finished, or cut short)."""
    return name.startswith(".") and name.endswith(PARTIAL_SUFFIX)


def move_no_clobber(source: Path, target: Path) -> None:
    """Move a file to `target`, never replacing a file there (FileExistsError instead).

    A hard link then the source's removal is atomic about that; where there can be no hard
    link on one file system (a share without them, protected_hardlinks) the name is checked,
    then the file renamed: only a writer taking the same name in that instant could be hit.
    Onto another file system (an archive disk) the file is copied under a hidden temporary
    name beside `target` (`partial_path`), synced, then linked (or renamed) into place: the
    target name only ever holds a whole file. A copy that fails (a full disk) removes its
    temporary file and leaves the source as it was; one cut short by a kill leaves only the
    hidden temporary file, which `EdgeDaemon` removes at its next start."""
    try:
        linked = _name_no_clobber(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_across(source, target)
        linked = True
    if linked:
        try:
            source.unlink()
        except OSError:
            # the source stays (a read-only or append-only share): take our copy back, or a
            # retry would find the name taken, copy again under NAME~1, and so on
            with contextlib.suppress(OSError):
                target.unlink()
            raise


def _name_no_clobber(source: Path, target: Path) -> bool:
    """Give `source`'s file the name `target` too, never over a file there (FileExistsError):
    a hard link (True: `source` still names it), or, where the file system has none, a check
    then a rename (False). OSError EXDEV: `target` is on another file system."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_HARD_LINK:
            raise
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)
        return False
    return True


def _copy_across(source: Path, target: Path) -> None:
    """Copy `source` to `target` on another file system, never leaving part of a file under
    `target` nor replacing a file there (FileExistsError); the source is left in place."""
    temp = partial_path(target)
    try:
        shutil.copyfile(source, temp)
        with contextlib.suppress(OSError):  # times and mode: best effort (some shares refuse)
            shutil.copystat(source, temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data is on disk before the name says the file is there
        finally:
            os.close(fd)
        _place_no_clobber(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    _sync_folder(target.parent)  # the name is on disk before the source goes


def _place_no_clobber(temp: Path, target: Path) -> None:
    """Give the complete file `temp` the name `target` (both in one folder), never over a
    file there (`_name_no_clobber`), the temporary name then gone."""
    if not _name_no_clobber(temp, target):
        return
    with contextlib.suppress(OSError):  # the file is in place; a name left is swept at start
        temp.unlink()


def _sync_folder(folder: Path) -> None:
    """fsync a folder (its new names durable); skipped where the file system cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. a folder we may write but not read
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FOLDER_SYNC:
            raise
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- logging


def _event(level: int, msg: str, **fields) -> None:
    log.log(level, msg, extra={"fields": {"event": msg, **fields}})


def threshold_text(value: float | None) -> str:
    """A gate threshold as a label or log value: the shortest text that reads back as the same
    float ("0.5", "0.24612345"); "" for none."""
    return "" if value is None else repr(float(value))


def model_labels(pipeline) -> dict[str, str]:
    """splitdet_edge_model_info's labels for the export `pipeline` runs (MODEL_INFO_LABELS)."""
    return {
        "fingerprint": pipeline.manifest.fingerprint,
        "threshold": threshold_text(pipeline.threshold),
        "calibrated_threshold": threshold_text(getattr(pipeline.manifest, "gate_threshold", None)),
        "codec": str(pipeline.codec),
    }


# ---------------------------------------------------------------------------------- metrics


class _StoreCollector:
    """Gauges read from the store at scrape time (durable truth, not process counters)."""

    def __init__(self, store: ResultStore) -> None:
        self.store = store

    def collect(self):
        stats = self.store.outbox_stats()
        depth = GaugeMetricFamily("splitdet_edge_outbox_depth", "Requests waiting in the outbox.")
        depth.add_metric([], stats.depth)
        size = GaugeMetricFamily("splitdet_edge_outbox_bytes", "Payload bytes in the outbox.")
        size.add_metric([], stats.bytes)
        age = GaugeMetricFamily(
            "splitdet_edge_oldest_pending_age_seconds",
            "Age of the oldest request in the outbox (0 when empty).",
        )
        age.add_metric(  # not below 0 after a backward clock step: the > 600 s alert compares it
            [],
            0.0 if stats.oldest_created is None else max(0.0, time.time() - stats.oldest_created),
        )
        by_model = GaugeMetricFamily(
            "splitdet_edge_outbox_model_requests",
            "Requests waiting in the outbox, by the model export that made them (an earlier "
            "export's drain after an upgrade when the cloud serves it too).",
            labels=["fingerprint"],
        )
        for fingerprint, n in self.store.outbox_fingerprints().items():
            by_model.add_metric([fingerprint], n)
        dead = self.store.dead_letter_stats()
        kept = GaugeMetricFamily(
            "splitdet_edge_dead_letter_requests",
            "Requests the cloud refused for good, kept for `splitdet edge requeue`.",
        )
        kept.add_metric([], dead.depth)
        results = GaugeMetricFamily(
            "splitdet_edge_results", "Result rows in the store, by verdict.", labels=["verdict"]
        )
        for verdict, n in self.store.verdict_counts().items():
            results.add_metric([verdict], n)
        return [depth, size, age, by_model, kept, results]


class _FolderCollector:
    """Gauges read from the hot folder's last scan at scrape time."""

    def __init__(self, folder: HotFolder) -> None:
        self.folder = folder

    def collect(self) -> list[GaugeMetricFamily]:
        skipped = GaugeMetricFamily(
            "splitdet_edge_skipped_files",
            "Files in the hot folder left alone at the last scan: not images by their name "
            "(Thumbs.db, sidecars; --extensions says which are taken).",
        )
        skipped.add_metric([], self.folder.skipped_files())
        return [skipped]


class EdgeMetrics:
    """The daemon's Prometheus metrics, in their own registry (with `folder`, the hot
    folder's too).

    Every series of a labelled counter whose labels are known in advance (each verdict, error
    kind, and status code a failure or dead letter can carry) is exported at 0 from the start:
    a series that first appears at 1 (its first event, and the first after each restart) is
    one Prometheus' increase() and rate() see no increase in, so the alerts on dead letters
    and quarantined images would miss it."""

    def __init__(
        self,
        store: ResultStore,
        folder: HotFolder | None = None,
        model: dict[str, str] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model_info = Gauge(
            "splitdet_edge_model_info",
            "The model export this edge runs (1): its fingerprint, the gate threshold in use "
            "(an `edge run --threshold` override, or the export's calibrated one), the "
            "export's calibrated threshold and the feature codec. An idle edge shows its export "
            "here only: retire an export when no edge's fingerprint names it.",
            list(MODEL_INFO_LABELS),
            registry=r,
        )
        if model is not None:
            self.model_info.labels(**model).set(1)
        self.images = Counter(
            "splitdet_edge_images",
            "Images handled by this process, by verdict: ok, pending (flagged, queued for the "
            "cloud), defect (the cloud answered), error (quarantined, dead letter, outbox full).",
            ["verdict"],
            registry=r,
        )
        for verdict in VERDICTS:
            self.images.labels(verdict)
        self.errors = Counter(
            "splitdet_edge_errors",
            "Errors by kind: error results (quarantine, dead_letter, outbox_full), and failed "
            "attempts to archive, quarantine or delete a processed file (move).",
            ["kind"],
            registry=r,
        )
        for kind in (*ERROR_KINDS, MOVE_ERROR):  # (each at 0 from the start: see the docstring)
            self.errors.labels(kind)
        self.bytes_sent = Counter(
            "splitdet_edge_bytes_sent", "Request bytes sent to the cloud (all attempts).",
            registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "splitdet_edge_stage_seconds",
            "Seconds per stage: read, preprocess, gate, complete, encode, store, send, image.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.delivery_seconds = Histogram(
            "splitdet_edge_delivery_seconds",
            "Seconds from outbox insert to the committed answer.",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.send_failures = Counter(
            "splitdet_edge_send_failures", "Failed Detect calls by status code.", ["code"],
            registry=r,
        )  # fmt: skip
        for code in SEND_FAILURE_CODES:
            self.send_failures.labels(code)
        self.dead_letters = Counter(
            "splitdet_edge_dead_letters", "Requests refused permanently, by code.", ["code"],
            registry=r,
        )  # fmt: skip
        for code in DEAD_LETTER_CODES:
            self.dead_letters.labels(code)
        self.outbox_full_waits = Counter(
            "splitdet_edge_outbox_full_waits",
            "Flagged images that had to wait for room in the outbox (policy wait).",
            registry=r,
        )
        self.outbox_full_rejected = Counter(
            "splitdet_edge_outbox_full_rejected",
            "Flagged images recorded as error because the outbox was full (policy reject).",
            registry=r,
        )
        r.register(_StoreCollector(store))
        if folder is not None:
            r.register(_FolderCollector(folder))

    def answered(self, round_trip_s: float, delivery_s: float) -> None:
        self.images.labels("defect").inc()
        self.stage_seconds.labels("send").observe(round_trip_s)
        self.delivery_seconds.observe(delivery_s)

    def send_failed(self, code: str) -> None:
        self.send_failures.labels(code).inc()

    def dead_letter(self, code: str) -> None:
        self.dead_letters.labels(code).inc()
        self.images.labels("error").inc()
        self.errors.labels("dead_letter").inc()


# ---------------------------------------------------------------------------------- the daemon


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
        refuse_foreign_file(config.db)  # another program's file: refused before its lock file
        # before anything touches the database: a second daemon on it would record the same
        # files again (UNIQUE file_key) and race the first for every move
        self._writer_lock = WriterLock(config.db)
        self._watch_lock: DirectoryLock | None = None
        try:  # two daemons on one hot folder would each classify and send every image
            self._watch_lock = DirectoryLock(
                config.watch, "--watch", "`splitdet edge run`", "one daemon per hot folder"
            )
            self._build(config, pipeline)
        except BaseException:
            self._writer_lock.release()
            if self._watch_lock is not None:
                self._watch_lock.release()
            raise

    def _build(self, config: DaemonConfig, pipeline: EdgePipeline | None) -> None:
        """The rest of __init__: the pipeline, the store, the hot folder, metrics, sender."""
        self.pipeline = pipeline or EdgePipeline(
            EdgeRuntime(config.model_dir, threads=config.threads, device=config.device),
            codec=config.codec,
            threshold=config.threshold,
        )
        self.fingerprint = self.pipeline.manifest.fingerprint
        # answers for this export are checked by its own manifest (no GetManifest to fetch it)
        CloudClient.expect(AnswerRules.from_manifest(self.pipeline.manifest))
        self.store = ResultStore(config.db, config.outbox)
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
        self._stop = threading.Event()
        self._metrics_httpd = None
        self.metrics_port: int | None = None
        self.processed = 0
        self._next_prune = 0.0  # monotonic s: at start
        self._pruner: threading.Thread | None = None
        self._pruner_stop = threading.Event()
        self._sweeper: threading.Thread | None = None  # removes partial copies left by a kill
        self._prober: threading.Thread | None = None  # asks the cloud about our exports
        self._move_retries: dict[str, _MoveRetry] = {}  # file_key -> when to try its move again
        self._outbox_gave_up: str | None = None  # --once: the outbox, full past --drain-timeout

    # -------------------------------------------------------------------------- lifecycle

    def request_stop(self, signum: int | None = None, _frame=None) -> None:
        """Finish the current image, then leave the loop (signal-handler safe)."""
        self._stop.set()

    def run(self) -> int:
        """Run until stopped (or, with `once`, until the folder is done); returns the exit
        status: 0, or with `once` 1 when requests are still pending (sent on the next run) or
        images were left in the folder because the outbox stayed full (processed next run)."""
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
            if self._outbox_gave_up is not None:  # --drain-timeout spent waiting for room
                self._report_left_behind()
            elif config.once:
                self._drain(config.drain_timeout_s)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            pending = self._shutdown()
        _event(logging.INFO, "stopped", processed=self.processed, outbox_depth=pending)
        return 1 if config.once and (pending or self._outbox_gave_up is not None) else 0

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
        _event(
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
            _event(logging.INFO, "outbox_other_export", fingerprint=fingerprint, pending=n,
                   note="sent with their own model: the cloud must serve it too")  # fmt: skip
        if config.ready_file is not None:
            info = {"pid": os.getpid(), "metrics_port": self.metrics_port,
                    "fingerprint": self.fingerprint}  # fmt: skip
            write_ready_file(config.ready_file, info)
        self._prober = threading.Thread(
            target=self._probe_cloud, args=((self.fingerprint, *earlier),), name="cloud-probe",
            daemon=True,
        )  # fmt: skip
        self._prober.start()

    def _warn_threshold_override(self, calibrated: float) -> None:
        """WARNING: --threshold overrides the export's calibrated gate threshold. The results
        record the export's fingerprint only, not the threshold that judged them; the override
        shows in this line, the `started` line and splitdet_edge_model_info."""
        model, used = self.config.model_dir, threshold_text(self.pipeline.threshold)
        log.warning(
            f"--threshold {used} overrides the gate threshold {threshold_text(calibrated)} "
            f"calibrated into the export {model} (fingerprint {self.fingerprint[:12]}): this "
            f"edge sends images with p(defect) >= {used} to the cloud; its results do not "
            "record the override. `splitdet eval --model "
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
                        if is_partial_name(entry.name):
                            self._remove_partial(entry, started)
            except OSError as exc:
                _event(logging.WARNING, "cannot look for partial copies", folder=str(folder),
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
            _event(logging.WARNING, "cannot remove partial copy", path=path_text(entry.path),
                   error=path_text(str(exc)))  # fmt: skip
            return
        _event(logging.INFO, "partial copy removed", path=path_text(entry.path),
               note="a copy into this folder, cut short by a kill")  # fmt: skip

    def _probe_cloud(self, fingerprints: tuple[str, ...]) -> None:
        """Ask the cloud, at start-up and beside the work, whether it serves each model
        export the edge sends for: its own, and any earlier one whose requests wait in the
        outbox. A cloud on another export, or refusing the credentials, is logged now, not at
        the first defect, which on a good line may come hours later. Nothing waits for the
        answer: the outbox holds requests until the cloud takes them, whatever the probe found.
        An unreachable cloud is asked again every --retry-max seconds until it answers (logged
        once), and an export it refused until it is served (`_probe_again`): an idle edge has
        no send to show the fix."""
        try:
            client = CloudClient(self.config.client_config)
        except Exception as exc:  # e.g. certificate files gone since start-up
            _event(logging.WARNING, "cloud_check_failed", error=str(exc))
            return
        try:
            pending, refused, quiet = list(fingerprints), [], False
            while pending:
                outcome = self._probe_one(client, pending[0], quiet)
                if outcome == _UNREACHABLE:  # (a cloud booting after its edges): ask again
                    quiet = True  # logged once
                    if self._pruner_stop.wait(self.config.retry_max_s):
                        return
                    continue
                if outcome == _STOP:
                    return
                if outcome == _REFUSED:
                    refused.append(pending[0])
                pending.pop(0)
            self._probe_again(client, refused)
        finally:
            client.close()

    def _probe_again(self, client: CloudClient, refused: list[str]) -> None:
        """Ask the cloud every --retry-max seconds whether it serves the exports it refused at
        start-up, until it serves each or the daemon stops; log `model_served_again` (INFO)
        for each one it serves now. Failures meanwhile (the cloud down, still refusing) are
        logged at DEBUG only: the refusal was logged once, and the sender logs its own."""
        pending = list(refused)
        while pending and not self._pruner_stop.wait(self.config.retry_max_s):
            for fingerprint in list(pending):
                try:
                    served = client.manifest(fingerprint)
                except Exception as exc:  # (CloudError, or anything: a probe never ends it)
                    _event(logging.DEBUG, "model_probe", fingerprint=fingerprint,
                           error=f"{type(exc).__name__}: {exc}")  # fmt: skip
                    continue
                if served.fingerprint != fingerprint:
                    continue
                pending.remove(fingerprint)
                if self._pruner_stop.is_set():
                    return  # (the daemon has stopped meanwhile: no line after "stopped")
                role = "current" if fingerprint == self.fingerprint else "earlier"
                _event(logging.INFO, "model_served_again", fingerprint=fingerprint, role=role,
                       served=list(served.served),
                       note="the cloud serves this export now: its requests go out")  # fmt: skip

    def _probe_one(self, client: CloudClient, fingerprint: str, quiet: bool = False) -> str:
        """Log whether the cloud serves `fingerprint`: _SERVED, _REFUSED (it does not serve
        that export; ask about the next), _UNREACHABLE (ask again later; logged at DEBUG when
        `quiet`), or _STOP when asking again is pointless (the cloud refuses us)."""
        role = "current" if fingerprint == self.fingerprint else "earlier"  # (outbox requests)
        try:
            served = client.manifest(fingerprint)
        except RetryLater as exc:
            cause = exc.likely_cause  # a TLS handshake refused, or None
            _event(logging.DEBUG if quiet else logging.WARNING, "cloud_unreachable",
                   code=exc.code.name, error=exc.message,
                   note="requests wait in the outbox until it answers; asked again every "
                   "--retry-max", **({"likely_cause": cause} if cause else {}))  # fmt: skip
            return _UNREACHABLE
        except CloudError as exc:
            event = OPERATOR_PROBLEMS.get(exc.code, ("cloud_check_failed", ""))[0]
            _event(logging.ERROR, event, code=exc.code.name, error=exc.message,
                   fingerprint=fingerprint, role=role,
                   note="requests wait in the outbox until this is fixed")  # fmt: skip
            return _REFUSED if exc.code in PER_EXPORT else _STOP
        except Exception as exc:  # a probe never ends the daemon
            _event(logging.WARNING, "cloud_check_failed", error=f"{type(exc).__name__}: {exc}")
            return _STOP
        if served.fingerprint != fingerprint:  # a server too old to choose by model
            note = "requests wait in the outbox until the cloud serves this model"
            _event(logging.ERROR, "model_refused", served=list(served.served),
                   fingerprint=fingerprint, role=role, note=note)  # fmt: skip
            return _REFUSED
        _event(logging.INFO, "cloud_checked", served=list(served.served),
               fingerprint=fingerprint, role=role)  # fmt: skip
        return _SERVED

    def _shutdown(self) -> int:
        """Stop the sender, a prune (after its batch), the start-up sweep and the metrics
        endpoint; returns the outbox depth left."""
        self._pruner_stop.set()  # (ends the start-up sweep and the cloud probe too)
        for worker in (self._pruner, self._sweeper):
            if worker is not None:
                worker.join(timeout=10.0)
        if self._prober is not None:  # (a call under way: left to end alone, logging nothing)
            self._prober.join(timeout=2.0)
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
        if self._watch_lock is not None:
            self._watch_lock.release()
        return pending

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.store.check_file(STORE_CHECK_EVERY_S)  # StoreGone: --db deleted or replaced
            self._prune_when_due()
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
            _event(logging.WARNING, "prune_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if pruned.deleted:
            _event(logging.INFO, "pruned", results=pruned.deleted,
                   older_than_s=self.config.keep_results_s)  # fmt: skip

    def _process_ready(self) -> bool:
        """Handle every file that is ready now, earliest arrival first; False if none was."""
        skip: set[str] = set()
        handled = False
        while not self._stop.is_set():
            candidate = self.folder.next_candidate(skip)
            if candidate is None:
                return handled
            if self.handle(candidate):
                handled = True
            else:
                skip.add(candidate.name)
        return handled

    def _drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        self.sender.wake()
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.store.check_file(STORE_CHECK_EVERY_S)  # (answers would go to a lost file)
            if self.store.outbox_stats().depth == 0:
                return
            self._stop.wait(0.1)

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
            _event(logging.DEBUG if kept else logging.INFO, "already recorded",
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
                arrival, result.p_defect, self.fingerprint, timings, stored
            )
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
        _event(logging.INFO, "classified", path=arrival.path, image_id=image_id, verdict=verdict,
               p_defect=round(result.p_defect, 5), bytes=result.bytes_sent,
               timings={k: round(v, 5) for k, v in timings.items()})  # fmt: skip
        self._move(candidate, image_id, stored_path)
        return True

    def _record_pending(self, arrival, p_defect, request_id, payload, timings, stored):
        """record_pending, waiting for room under the "wait" policy; None if stopped first, or,
        with `once`, when there was no room for --drain-timeout (`_give_up_on_full_outbox`)."""
        waited = False
        deadline = time.monotonic() + self.config.drain_timeout_s  # (with `once` only)
        while True:
            try:
                record = self.store.record_pending(
                    arrival, p_defect, request_id, payload, self.fingerprint, timings, stored
                )
                break
            except OutboxFull as exc:
                if not waited:
                    waited = True
                    self.metrics.outbox_full_waits.inc()
                    _event(logging.WARNING, "outbox full, waiting", path=arrival.path,
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
        if record[2] == "error":
            self.metrics.outbox_full_rejected.inc()
            self.metrics.errors.labels("outbox_full").inc()
            _event(logging.WARNING, "outbox full, features dropped", path=arrival.path,
                   image_id=record[0])  # fmt: skip
        else:
            self.sender.wake()
        return record

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

    def _stored_path(self, candidate: Candidate):
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
            target = folder / stored_name(image_id, name, attempt)
            if os.path.lexists(target):
                continue
            if quarantine and os.path.lexists(reason_path(target)):
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
        _event(logging.WARNING, "quarantined", path=arrival.path, image_id=image_id,
               reason=reason, to=stored_path)  # fmt: skip
        self._move(candidate, image_id, stored_path, reason)

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
        _event(logging.INFO, "recorded_file_renumbered", path=path, image_id=image_id,
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
    ) -> None:
        """Do what the row says happens to the file: delete it, keep it, or move it to
        `stored_path` (with `reason`: into the quarantine, its reason file beside it; with
        `adopt`, a row recorded before, a whole copy of it already there is taken as the
        move, see `_move_to`). A failure is logged and counted (errors kind "move"), never
        fatal: the file stays and is tried again (`_retry_move_later`)."""
        source = candidate.path
        if stored_path != path_text(source):  # it leaves --watch: only while its row is kept
            self.store.check_file()  # StoreGone when --db was deleted or replaced
        try:
            if stored_path is None:
                source.unlink(missing_ok=True)
            elif stored_path == path_text(source):  # --after keep
                self.folder.ignore(candidate)
                return
            else:
                self._move_to(candidate, image_id, _stored_file(stored_path), reason, adopt)
        except OSError as exc:
            self.metrics.errors.labels(MOVE_ERROR).inc()
            delay = self._retry_move_later(candidate)
            when = {"retry": "next run"} if delay is None else {"retry_in_s": round(delay, 1)}
            _event(logging.ERROR, "cannot move file", path=path_text(source), to=stored_path,
                   error=path_text(str(exc)), **when)  # fmt: skip
            return
        retried = self._move_retries.pop(candidate.file_key, None)
        if retried is not None:
            _event(logging.INFO, "file moved after retry", path=path_text(source),
                   to=stored_path, failures=retried.failures)  # fmt: skip
        self.folder.forget(candidate)

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
        if len(target.name.encode()) > STORED_NAME_MAX:  # recorded by an earlier splitdet
            target = self._replan(image_id, target, source, reason is not None, attempt)
        while True:
            if os.path.lexists(target) and not _same_file(source, target):
                if adopt and _same_bytes(source, target):
                    self._adopt(source, target, reason)
                    return
                attempt += 1
                target = self._replan(image_id, target, source, reason is not None, attempt)
                continue
            if reason is not None:
                self._write_reason(target, reason)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                if _same_file(source, target):  # linked before a crash, not yet unlinked
                    source.unlink()
                else:
                    move_no_clobber(source, target)
                return
            except FileExistsError:  # taken in the instant since the check: choose again
                continue

    def _adopt(self, source: Path, target: Path, reason: str | None) -> None:
        """Finish a move whose copy is already in place at `target` (the name the row records):
        the reason file beside a quarantined one if it is missing, then the source removed."""
        if reason is not None:
            self._write_reason(target, reason)
        source.unlink()
        _event(logging.INFO, "copy found in place", path=path_text(source),
               to=path_text(target),
               note="its copy was complete before a kill; the image left --watch")  # fmt: skip

    def _replan(
        self, image_id: int, planned: Path, source: Path, quarantine: bool, attempt: int
    ) -> Path:
        """A free name in `planned`'s folder instead of `planned` (taken, or too long), recorded
        in the row before the file moves there: a crash in between leaves the row right."""
        target = self._free_target(planned.parent, image_id, source.name, quarantine, attempt)
        self.store.set_stored_path(image_id, str(target))
        _event(logging.WARNING, "stored under another name", path=path_text(source),
               planned=path_text(planned), to=path_text(target))  # fmt: skip
        return target

    @staticmethod
    def _write_reason(target: Path, reason: str) -> None:
        """NAME.reason.txt beside a quarantined file. Best effort: the row holds the reason
        too, and a full disk or a folder made read-only must not end the daemon (the row is
        committed, so every restart would fail on the same file)."""
        path = reason_path(target)
        try:
            if path.exists():  # written before a crash
                return
            atomic_write(path, path_text(reason) + "\n")
        except OSError as exc:
            _event(logging.WARNING, "cannot write reason file", path=path_text(path),
                   error=path_text(str(exc)))  # fmt: skip


@dataclass(frozen=True)
class _MoveRetry:
    """A file whose move failed: when to try again (monotonic s), how many times it failed."""

    path: Path
    due: float
    failures: int


def _stored_file(stored_path: str) -> Path:
    """The file a row's stored path names. Stored names are valid UTF-8 (stored_name), so only
    a folder not in UTF-8 was escaped (path_text): the text as it is, unless only its unescaped
    folder exists."""
    target = Path(stored_path)
    if not target.parent.is_dir():
        unescaped = Path(file_path(stored_path))
        if unescaped.parent.is_dir():
            return unescaped
    return target


def _same_bytes(source: Path, copy: Path) -> bool:
    """Whether `copy` is a regular file (not a link) on another file system than `source`,
    holding exactly its bytes: equal sizes, then compared chunk by chunk (as equal SHA-256s
    would say, without reading past the first difference). False if either cannot be read.
    On `source`'s own file system a move is a link then an unlink, so its leftover is the same
    file (`_same_file`), and a file of the same bytes is another image's (another daemon
    sharing the archive): never this image's copy."""
    try:
        copied, original = os.lstat(copy), os.stat(source)
        if not stat.S_ISREG(copied.st_mode) or copied.st_size != original.st_size:
            return False
        if copied.st_dev == original.st_dev:
            return False
        with open(source, "rb") as a, open(copy, "rb") as b:
            while True:
                chunk = a.read(_COMPARE_CHUNK)
                if chunk != b.read(_COMPARE_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths are one file (a hard link made before a crash); False if either is
    missing."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
