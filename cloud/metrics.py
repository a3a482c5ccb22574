"""The cloud server's Prometheus metrics (`ServerMetrics`, one registry per server): calls by
method and status code, stage times, served models, reloads, busy threads, and per-edge series
bounded to MAX_EDGE_LABELS names that are forgotten after --forget-edges-after."""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from splitdet.cloud.call_status import FAILURE_CODES, METHODS
from splitdet.cloud.core import DetectResult
from splitdet.cloud.log_limit import LineLimiter, repeats_fields, repeats_note
from splitdet.shared.edge_name import EDGE_NAME_KEY, is_edge_name

log = logging.getLogger(__name__)

#: Latency histogram buckets, seconds.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Bounds of the slot-wait histogram, seconds: the stage times', on to --queue-wait's range.
SLOT_WAIT_BUCKETS = (*STAGE_BUCKETS, 60, 120, 300, 600, 1800, 3600)
#: The label of the calls whose edge name has none of its own.
OTHER_EDGE = "other"
#: Distinct edge names the per-edge metrics label; later ones are counted as "other".
MAX_EDGE_LABELS = 256
#: Edge names remembered with the exports they used, for the warning of a reload that drops an
#: export still in use (`ServerMetrics.edges_using`): a name with no label of its own (a camera
#: that has only checked its export so far, or one past MAX_EDGE_LABELS) is named there too;
#: the least recently heard beyond this many are forgotten.
MAX_EDGE_NAMES_USING = 4 * MAX_EDGE_LABELS
#: Seconds an edge name keeps its per-edge series and its place among MAX_EDGE_LABELS after its
#: last call (--forget-edges-after): retired or renamed cameras leave, new ones get a label.
FORGET_EDGES_S = 7 * 24 * 3600.0
#: Seconds between two looks for edges to forget (also done at once when the labels are full).
FORGET_SWEEP_S = 60.0
#: The per-edge metrics' label for calls refused for their credentials whose claimed name has
#: no label (see TokenInterceptor).
UNAUTHENTICATED_EDGE = "unauthenticated"
#: Seconds between two WARNINGs that a new edge name found every label held (`edge_of`).
LABELS_FULL_EVERY_S = 600.0


#: The outcomes of a reload, as `splitdet_cloud_reloads_total` counts them.
RELOAD_OUTCOMES = ("ok", "problems", "refused")


#: The labels of calls that name no edge, or not a valid name (`claimed_edge`).
UNNAMED_EDGE, INVALID_EDGE = "unnamed", "invalid"


def claimed_edge(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The edge name a call's metadata claims: the name, UNNAMED_EDGE, or INVALID_EDGE."""
    name = UNNAMED_EDGE
    for key, value in metadata or ():
        if key == EDGE_NAME_KEY:
            name = value if isinstance(value, str) and is_edge_name(value) else INVALID_EDGE
    return name


class ServerMetrics:
    """The server's Prometheus metrics, in their own registry (one per server).

    The series of requests and failures by method and code exist at 0 from the start (every
    method with every code it can end with): one that first appeared at its first call (at 1)
    would be one Prometheus' rate() and increase() see no increase in, so an alert such as
    `rate(splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED"}[5m]) > 0` would miss the
    first refusals after each start. The per-edge series cannot be known in advance."""

    def __init__(
        self,
        fingerprints: Sequence[str] = (),
        forget_edges_s: float = FORGET_EDGES_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`fingerprints`: the served models, default first (the `splitdet_cloud_model` info);
        `forget_edges_s`: seconds after its last call an edge's series go (`edge_of`);
        `clock`: unix s now (tests step it)."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "splitdet_cloud_requests",
            "RPCs finished, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.failures = Counter(
            "splitdet_cloud_failures",
            "RPCs that did not finish OK, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        for method in METHODS:
            self.requests.labels(method, grpc.StatusCode.OK.name)
            for code in FAILURE_CODES:
                self.requests.labels(method, code.name)
                self.failures.labels(method, code.name)
        self.stage_seconds = Histogram(
            "splitdet_cloud_stage_seconds",
            "Server-side wall-clock seconds per Detect stage (decode, rpn, roi, total).",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "splitdet_cloud_in_flight", "Detect calls running now.", registry=self.registry
        )
        self.queued = Gauge(
            "splitdet_cloud_queued",
            "Detect calls waiting for a slot now (--max-queued).",
            registry=self.registry,
        )
        self.cache_hits = Counter(
            "splitdet_cloud_cache_hits",
            "Detect calls answered from the idempotency store.",
            registry=self.registry,
        )
        self.heads_runs = Counter(
            "splitdet_cloud_heads_runs",
            "Detect calls that ran the RPN and ROI heads.",
            registry=self.registry,
        )
        self.answers_store_errors = Counter(
            "splitdet_cloud_answers_store_errors",
            "Answers the idempotency store (--answers-db) could not keep (its disk full, its "
            "file read-only): answered without it, a repeat is computed again.",
            registry=self.registry,
        )
        self.request_id_conflicts = Counter(
            "splitdet_cloud_request_id_conflicts",
            "Detect calls computed whose request id names other contents, answered or being "
            "answered: computed on their own, their answers not stored. The same image's "
            "features from another machine or library build, or an edge reusing ids.",
            registry=self.registry,
        )
        self.model = Gauge(
            "splitdet_cloud_model",
            'Served models: 1 per fingerprint; default="true" on the first --model.',
            ["fingerprint", "default"],
            registry=self.registry,
        )
        self.model_answers = Counter(
            "splitdet_cloud_model_answers",
            "Detect calls answered, by the model's fingerprint: when an old export's count "
            "stops rising during a rolling upgrade, its edges have all moved on.",
            ["fingerprint"],
            registry=self.registry,
        )
        self._model_labels: set[tuple[str, str]] = set()
        self.served(fingerprints)
        self.edge_answers = Counter(
            "splitdet_cloud_edge_answers",
            "Detect calls answered, by the calling edge's name and the model's fingerprint: "
            "which cameras still send for an old export.",
            ["edge", "fingerprint"],
            registry=self.registry,
        )
        self.edge_refusals = Counter(
            "splitdet_cloud_edge_refusals",
            "Calls refused or failed, by the calling edge's name and status code.",
            ["edge", "code"],
            registry=self.registry,
        )
        self.edge_last_seen = Gauge(
            "splitdet_cloud_edge_last_seen_timestamp_seconds",
            "Unix time of each edge's last call (Detect or GetManifest): a camera gone quiet.",
            ["edge"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "splitdet_cloud_reloads",
            'Reloads (SIGHUP) by outcome: "ok"; "problems" (served what it could, an export '
            'skipped: see the reload_problem log lines); "refused" (nothing left to serve, '
            "nothing changed).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(outcome)
        self.rpc_threads_busy = Gauge(
            "splitdet_cloud_rpc_threads_busy",
            "Calls holding a handler thread now, by thread pool (detect, manifest, server: "
            "health checks and token refusals), those still receiving their request included.",
            ["pool"],
            registry=self.registry,
        )
        self.rpc_threads_exhausted = Counter(
            "splitdet_cloud_rpc_threads_exhausted",
            "Calls refused at once with RESOURCE_EXHAUSTED because every thread of their pool "
            "was held (see CallGuard): an overload, or callers that never send their request.",
            ["pool"],
            registry=self.registry,
        )
        self.slot_wait_seconds = Histogram(
            "splitdet_cloud_slot_wait_seconds",
            "Seconds a Detect call waited for a compute slot (--max-concurrent), by outcome: "
            "slot (it got one) or refused (queue full, --queue-wait over, deadline, caller "
            "gone, stopping); not part of the stage times.",
            ["outcome"],
            buckets=SLOT_WAIT_BUCKETS,
            registry=self.registry,
        )
        for outcome in ("slot", "refused"):  # (both series there from the start)
            self.slot_wait_seconds.labels(outcome)
        self.edge_answer_seconds = Summary(
            "splitdet_cloud_edge_answer_seconds",
            "Seconds from a Detect call's start (a server thread took it) to its answer, by "
            "the calling edge's name (slot wait included): _sum / _count is an edge's mean "
            "answer time.",
            ["edge"],
            registry=self.registry,
        )
        self._edges: set[str] = set()
        self._edges_lock = threading.Lock()
        self.edge_labels = Gauge(
            "splitdet_cloud_edge_labels",
            f"Edge names holding a label of their own (at most {MAX_EDGE_LABELS}).",
            registry=self.registry,
        )
        self.edge_labels.set_function(lambda: len(self._edges))
        # names that claimed a label while all were held -> unix s of their last such call
        self._unlabelled: OrderedDict[str, float] = OrderedDict()
        self.edge_names_unlabelled = Gauge(
            "splitdet_cloud_edge_names_unlabelled",
            f"Edge names that asked for a label while all {MAX_EDGE_LABELS} were held, counted "
            'as edge="other" (heard within --forget-edges-after; at most '
            f"{MAX_EDGE_NAMES_USING}).",
            registry=self.registry,
        )
        self.edge_names_unlabelled.set_function(lambda: len(self._unlabelled))
        #: the WARNING that a name found every label held: at most one per LABELS_FULL_EVERY_S
        self.labels_full_lines = LineLimiter(LABELS_FULL_EVERY_S)
        self._edge_models: dict[str, dict[str, float]] = {}  # edge -> {fingerprint: unix s}
        # edge name (not label) -> {fingerprint: unix s}, least recently used first
        self._names_using: OrderedDict[str, dict[str, float]] = OrderedDict()
        self.forget_edges_s = forget_edges_s
        self._clock = clock
        self._edge_seen: dict[str, float] = {}  # edge -> unix s of its last call
        self._edge_codes: dict[str, set[str]] = {}  # edge -> status codes it was refused with
        self._next_sweep = clock() + FORGET_SWEEP_S

    def served(self, fingerprints: Sequence[str]) -> None:
        """`splitdet_cloud_model` lists exactly these models, the first the default; each one's
        answer count is exported (at 0 for a new one)."""
        wanted = {(fp, str(index == 0).lower()) for index, fp in enumerate(fingerprints)}
        for labels in wanted:  # set before any removal: a scrape never finds no model
            self.model.labels(*labels).set(1)
            self.model_answers.labels(labels[0])
        for labels in self._model_labels - wanted:
            self.model.remove(*labels)
        self._model_labels = wanted

    def used(self, edge: str, fingerprint: str, name: str | None = None) -> None:
        """The edge labelled `edge`, named `name` (its label when None), asked for, or was
        answered by, the model `fingerprint` now."""
        now = time.time()
        with self._edges_lock:
            self._edge_models.setdefault(edge, {})[fingerprint] = now
            name = name or edge
            self._names_using.setdefault(name, {})[fingerprint] = now
            self._names_using.move_to_end(name)
            while len(self._names_using) > MAX_EDGE_NAMES_USING:
                self._names_using.popitem(last=False)

    def edges_using(self, fingerprint: str) -> dict[str, float]:
        """The edges that asked for or were answered by `fingerprint` since this server
        started (at most MAX_EDGE_NAMES_USING names, the most recent): {edge name: unix time
        of the last such call}."""
        with self._edges_lock:
            return {
                name: models[fingerprint]
                for name, models in self._names_using.items()
                if fingerprint in models
            }

    def forget(self, fingerprints: Sequence[str]) -> None:
        """Drop the answer series (overall and per edge) of models no longer served: the
        metrics stay bounded however many exports come and go. Which edges used a model is
        kept (`edges_using`: one served again and dropped again names them too, their
        requests of it still waiting), but not a use older than `forget_edges_s` of a model
        not served (at each reload: that memory stays bounded too)."""
        with self._edges_lock:
            for edge, models in self._edge_models.items():
                for fingerprint in fingerprints:
                    if models.pop(fingerprint, None) is not None:
                        with contextlib.suppress(KeyError):  # (asked, never answered)
                            self.edge_answers.remove(edge, fingerprint)
            served = {fingerprint for fingerprint, _ in self._model_labels}
            now = time.time()  # (the clock of `used`)
            for models in self._names_using.values():
                for fingerprint, at in list(models.items()):
                    if fingerprint not in served and now - at >= self.forget_edges_s:
                        del models[fingerprint]
        for fingerprint in fingerprints:
            with contextlib.suppress(KeyError):
                self.model_answers.remove(fingerprint)

    def edge_of(
        self, metadata: Sequence[tuple[str, str | bytes]] | None, claim: bool = False
    ) -> str:
        """The calling edge's name as a metric label, from a call's metadata ((key, value)
        pairs): its `splitdet-edge` entry, "unnamed" without one, "invalid" for a name that is
        not one (shared/edge_name.py), and "other" for a name without a label of its own.

        Only `claim` gives a name a label, while fewer than MAX_EDGE_LABELS are held: a Detect
        whose request passed its checks (`DetectionServicer._checked_call`: image sizes and
        levels the model takes; answered, or refused for load) or too large for
        --max-message-mib, or any call when tokens are required (it passed their check); cheap
        or malformed unauthenticated calls under made-up names cannot use up the labels and
        push real cameras into "other". A claim that finds every label held is shown
        (`splitdet_cloud_edge_names_unlabelled`) and logged (`_warn_labels_full`)."""
        name = claimed = claimed_edge(metadata)
        folded = False
        with self._edges_lock:
            now = self._clock()
            full = claim and name not in self._edges and len(self._edges) >= MAX_EDGE_LABELS
            if full or now >= self._next_sweep:
                self._forget_idle_edges(now)
            if name not in self._edges:
                if claim and len(self._edges) >= MAX_EDGE_LABELS:
                    folded = self._fold(name, now)
                if not claim or len(self._edges) >= MAX_EDGE_LABELS:
                    name = OTHER_EDGE  # (no place of its own: the names labelled stay 256)
                else:
                    self._edges.add(name)
                    self._unlabelled.pop(name, None)
            self._edge_seen[name] = now
        if folded:
            self._warn_labels_full(claimed)  # (the name, not "other")
        return name

    def _fold(self, name: str, now: float) -> bool:
        """Remember `name`, which claimed a label while all were held (under `_edges_lock`);
        True when it was not remembered yet (a WARNING may name it)."""
        new = name not in self._unlabelled
        self._unlabelled[name] = now
        self._unlabelled.move_to_end(name)
        while len(self._unlabelled) > MAX_EDGE_NAMES_USING:
            self._unlabelled.popitem(last=False)
        return new

    def _warn_labels_full(self, name: str) -> None:
        """The WARNING that `name` got no label of its own (at most one per
        LABELS_FULL_EVERY_S, naming the names left out since)."""
        self.labels_full_lines.write_from(
            "labels_full", name, functools.partial(self._labels_full_line, name)
        )

    def _labels_full_line(
        self, name: str, repeats: int, names: list[str], at_stop: bool = False
    ) -> None:
        """`_warn_labels_full`'s line (`log_limit.Line`, with the name it is about first)."""
        fields = {"event": "edge_labels_full", "edge": name, "limit": MAX_EDGE_LABELS,
                  **repeats_fields(repeats, names, at_stop)}  # fmt: skip
        log.warning(
            'edge %s gets no label of its own: all %d edge labels are held, so its calls '
            'count as edge="other"; a label is freed when its edge has been silent for '
            "--forget-edges-after (%g h): lower it to free them sooner%s",
            name, MAX_EDGE_LABELS, self.forget_edges_s / 3600,
            repeats_note(repeats, self.labels_full_lines.every_s, names, at_stop),
            extra={"fields": fields},
        )  # fmt: skip

    def refused_unauthenticated(self, name: str) -> str:
        """Count a call refused for its bearer token that claims the edge name `name` (only a
        claim: its caller proved nothing) under `name`'s label if that name holds one (a camera
        the server knew, its token revoked or rotated away), else under UNAUTHENTICATED_EDGE;
        never a new label, never "seen" (`edge_of`). Returns the label counted under."""
        with self._edges_lock:
            known = name in self._edges and name not in (UNNAMED_EDGE, INVALID_EDGE)
            label = name if known else UNAUTHENTICATED_EDGE
            self.edge_refusals.labels(label, grpc.StatusCode.UNAUTHENTICATED.name).inc()
            self._edge_codes.setdefault(label, set()).add(grpc.StatusCode.UNAUTHENTICATED.name)
        return label

    def _forget_idle_edges(self, now: float) -> None:
        """Remove every per-edge series of the edges not heard from for `forget_edges_s`, and
        their places among MAX_EDGE_LABELS (under `_edges_lock`). Logged once per sweep."""
        self._next_sweep = now + FORGET_SWEEP_S
        idle = sorted(edge for edge, seen in self._edge_seen.items()
                      if now - seen >= self.forget_edges_s)  # fmt: skip
        for edge in idle:
            with contextlib.suppress(KeyError):  # (a series never made)
                self.edge_last_seen.remove(edge)
            for fingerprint in self._edge_models.pop(edge, {}):
                with contextlib.suppress(KeyError):
                    self.edge_answers.remove(edge, fingerprint)
            self._names_using.pop(edge, None)
            with contextlib.suppress(KeyError):
                self.edge_answer_seconds.remove(edge)
            for code in self._edge_codes.pop(edge, set()):
                with contextlib.suppress(KeyError):
                    self.edge_refusals.remove(edge, code)
            self._edges.discard(edge)
            del self._edge_seen[edge]
        for name in [name for name, seen in self._unlabelled.items()
                     if now - seen >= self.forget_edges_s]:  # fmt: skip
            del self._unlabelled[name]
        if idle:
            log.info(
                "forgot %d edge(s) silent for %g h or more: their per-edge series are gone",
                len(idle), self.forget_edges_s / 3600,
                extra={"fields": {"event": "edges_forgotten", "edges": idle[:20],
                                  "count": len(idle)}},
            )  # fmt: skip

    def refused(self, edge: str, code: grpc.StatusCode) -> None:
        """A call of `edge` refused or failed with `code`: counted per edge."""
        self.edge_refusals.labels(edge, code.name).inc()
        with self._edges_lock:
            self._edge_codes.setdefault(edge, set()).add(code.name)

    def finished(self, method: str, code: grpc.StatusCode) -> None:
        """Count a finished call of `method` by its status code (and as a failure unless OK)."""
        self.requests.labels(method, code.name).inc()
        if code is not grpc.StatusCode.OK:
            self.failures.labels(method, code.name).inc()

    def observe(
        self,
        result: DetectResult,
        edge: str,
        name: str | None = None,
        seconds: float | None = None,
    ) -> None:
        """An answer given to `edge` `seconds` after its call arrived: counted, and its heads'
        run if it had one. By model only while the model is served: an answer of an export a
        reload dropped meanwhile must not bring back the series `forget` removed."""
        if seconds is not None:
            self.edge_answer_seconds.labels(edge).observe(seconds)
        if any(result.fingerprint == fingerprint for fingerprint, _ in self._model_labels):
            self.model_answers.labels(result.fingerprint).inc()
            self.edge_answers.labels(edge, result.fingerprint).inc()
            self.used(edge, result.fingerprint, name)
        if result.cached:
            self.cache_hits.inc()
            return
        self.observe_heads(result)

    def observe_heads(self, result: DetectResult) -> None:
        """A run of the heads (its stage times), answered or not."""
        self.heads_runs.inc()
        timings = result.timings
        for stage, seconds in (
            ("decode", timings.decode_s),
            ("rpn", timings.rpn_s),
            ("roi", timings.roi_s),
            ("total", timings.total_s),
        ):
            self.stage_seconds.labels(stage).observe(seconds)
