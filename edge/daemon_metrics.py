"""The edge daemon's Prometheus metrics (no torch): `EdgeMetrics`, the process's counters and
histograms beside gauges read at scrape time from the store and the hot folder, and
`model_labels`, the labels of splitdet_edge_model_info."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from splitdet.edge.sender import DEAD_LETTER_CODES, SEND_FAILURE_CODES
from splitdet.edge.store import ResultStore
from splitdet.edge.store_schema import ERROR_KINDS, FRAME_WARNINGS, VERDICTS
from splitdet.edge.watcher import HotFolder

if TYPE_CHECKING:
    from splitdet.edge.liveness import Liveness
    from splitdet.edge.pipeline import EdgePipeline

#: Latency histogram buckets, seconds.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
DELIVERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)
#: The `kind` of splitdet_edge_errors_total counting failed attempts to move a file.
MOVE_ERROR = "move"
#: The labels of splitdet_edge_model_info (`model_labels`).
MODEL_INFO_LABELS = ("fingerprint", "threshold", "calibrated_threshold", "codec")


def threshold_text(value: float | None) -> str:
    """A gate threshold as a label or log value: the shortest text that reads back as the same
    float ("0.5", "0.24612345"); "" for none."""
    return "" if value is None else repr(float(value))


def model_labels(pipeline: EdgePipeline) -> dict[str, str]:
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

    def collect(self) -> list[GaugeMetricFamily]:
        """The outbox, dead-letter and result gauges, as the store has them now."""
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
        """splitdet_edge_skipped_files, as the hot folder's last scan counted them, and
        splitdet_edge_files_held_back, the images it holds back in a shortage now."""
        skipped = GaugeMetricFamily(
            "splitdet_edge_skipped_files",
            "Entries in the hot folder left alone at the last scan: files not images by their "
            "name (Thumbs.db, sidecars; --extensions says which are taken), symbolic links "
            "(never followed), subfolders without --recursive, FIFOs and devices.",
        )
        skipped.add_metric([], self.folder.skipped_files())
        held = GaugeMetricFamily(
            "splitdet_edge_files_held_back",
            "Images in the hot folder held back by a shortage of the process or the machine "
            "(open files, memory: file_read_shortage), taken again once it ends; not in the "
            "database, so not in edge status.",
        )
        held.add_metric([], self.folder.held_back())
        return [skipped, held]


class EdgeMetrics:
    """The daemon's Prometheus metrics, in their own registry (with `folder`, the hot
    folder's too).

    Every series of a labelled counter whose labels are known in advance (each verdict, error
    kind, image warning kind, and status code a failure or dead letter can carry) is exported at
    0 from the start:
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
        self.model_changed_on_disk = Gauge(
            "splitdet_edge_model_changed_on_disk",
            "1 while the --model folder holds another export than the one this edge runs "
            "(loaded at its start; a re-export into the folder is not taken up while it runs): "
            "restart the edge to run it. Else 0.",
            registry=r,
        )
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
        self.image_warnings = Counter(
            "splitdet_edge_image_warnings",
            "Images judged whose pixels say the camera may not see the part, by kind: "
            "blank_frame (all within 1% of full scale: black, white or flat), dim_wide_frame "
            "(16-bit grayscale below 1/16 of full scale: a 12-bit camera's values unscaled?). "
            "Each is logged as a WARNING of that name, at most one line a minute a kind.",
            ["kind"],
            registry=r,
        )
        for kind in FRAME_WARNINGS:  # (each at 0 from the start: see the docstring)
            self.image_warnings.labels(kind)
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
        self._outbox_gauges(store)
        r.register(_StoreCollector(store))
        if folder is not None:
            r.register(_FolderCollector(folder))

    def _outbox_gauges(self, store: ResultStore) -> None:
        """splitdet_edge_outbox_full (0/1: intake stalled, `outbox_full`) and the outbox caps
        the daemon runs with."""
        self.outbox_full = Gauge(
            "splitdet_edge_outbox_full",
            "1 while the daemon takes no image because the outbox is at its cap (policy wait: "
            "new images wait in --watch until the cloud takes requests), else 0.",
            registry=self.registry,
        )
        caps = Gauge(
            "splitdet_edge_outbox_cap",
            "The outbox caps: requests (--outbox-max-items) and bytes (--outbox-max-mb).",
            ["unit"],
            registry=self.registry,
        )
        caps.labels("requests").set(store.cap.max_items)
        caps.labels("bytes").set(store.cap.max_bytes)

    def watch_loop(self, liveness: Liveness) -> None:
        """splitdet_edge_loop_age_seconds, read from `liveness` at scrape time."""
        age = Gauge(
            "splitdet_edge_loop_age_seconds",
            "Seconds since the daemon's loop last went round, finished an image or waited for "
            "outbox room (monotonic); /healthz answers 503 past --stall-after. A growing value "
            "on a live process: the loop hangs (a read on a share gone away).",
            registry=self.registry,
        )
        age.set_function(liveness.age_s)

    def answered(self, round_trip_s: float, delivery_s: float) -> None:
        """The cloud's answer committed: a defect image, its send and delivery times."""
        self.images.labels("defect").inc()
        self.stage_seconds.labels("send").observe(round_trip_s)
        self.delivery_seconds.observe(delivery_s)

    def send_failed(self, code: str) -> None:
        """A failed Detect call, counted by its status code."""
        self.send_failures.labels(code).inc()

    def dead_letter(self, code: str) -> None:
        """A request refused for good: counted by its code, as an error image and error."""
        self.dead_letters.labels(code).inc()
        self.images.labels("error").inc()
        self.errors.labels("dead_letter").inc()
