"""The values the edge store takes and gives (no torch): the outbox's caps, an arrival, an
outbox item, the cloud's answer, what a prune did, the outbox's and dead letters' size, and
`OutboxFull` when the outbox has no room."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from splitdet.edge.store_schema import FULL_POLICIES

#: Where a processed file will be kept: a path, None (deleted), or a function of the row id.
StoredPath = str | None | Callable[[int], str | None]


class OutboxFull(Exception):
    """The outbox is at its cap and the policy is "wait": try again later."""


@dataclass(frozen=True)
class OutboxCap:
    """Bounds of the outbox and what happens at them.

    Attributes:
        max_items: requests waiting at most.
        max_bytes: total payload bytes waiting at most.
        policy: "wait" (the daemon stops taking images from the hot folder until the outbox has
            room; the images wait there, counted as outbox_full_waits) or "reject" (the flagged
            image gets verdict "error", error_kind "outbox_full", its features are dropped;
            counted as outbox_full_rejected).
        dead_letter_max_bytes: refused requests kept for requeueing, total payload bytes at
            most (0 keeps none); a request larger than it alone, then the oldest, are dropped
            beyond it (counted as dead_letter_payloads_dropped).
    """

    max_items: int = 10_000
    max_bytes: int = 2 << 30
    policy: str = "wait"
    dead_letter_max_bytes: int = 256 << 20

    def admits(self, depth: int, size: int, payload_bytes: int) -> bool:
        """Whether an outbox of `depth` requests and `size` payload bytes has room for one more
        of `payload_bytes`. An empty one takes any single request: one larger than max_bytes
        alone would otherwise stop intake for good, with nothing to send that could make room."""
        return depth + 1 <= self.max_items and (
            depth == 0 or size + payload_bytes <= self.max_bytes
        )

    def __post_init__(self) -> None:
        if self.max_items < 1 or self.max_bytes < 1:
            raise ValueError("outbox caps must be at least 1")
        if self.dead_letter_max_bytes < 0:
            raise ValueError("the dead letters' byte cap must be at least 0 (0 keeps none)")
        if self.policy not in FULL_POLICIES:
            raise ValueError(f"outbox policy must be one of {FULL_POLICIES}, got {self.policy!r}")


@dataclass(frozen=True)
class Arrival:
    """One file as the hot folder delivered it.

    Attributes:
        path: where it arrived.
        file_key: "name|size|mtime_ns|inode": the identity of this arrival of the file.
        content_hash: SHA-256 hex of its bytes.
        size_bytes: its size.
        arrived: unix s when it was found complete.
    """

    path: str
    file_key: str
    content_hash: str
    size_bytes: int
    arrived: float


@dataclass(frozen=True)
class KnownFile:
    """A file the store already has a row for (found again after a crash or in keep mode)."""

    id: int
    path: str
    stored_path: str | None
    verdict: str
    error_kind: str | None
    reason: str | None
    content_hash: str | None = None  # SHA-256 hex of the bytes read (of b"" if none were)


@dataclass(frozen=True)
class OutboxItem:
    """One request waiting for delivery."""

    image_id: int
    request_id: str
    payload: bytes
    created: float
    attempts: int
    stored_path: str | None
    path: str
    fingerprint: str  # the model export that made the request
    content_hash: str | None = None  # SHA-256 hex of the image's bytes, as read
    p_defect: float | None = None  # the gate's p(defect) that flagged it


@dataclass(frozen=True)
class Answer:
    """The cloud's detections for one request.

    Attributes:
        boxes: [[x1, y1, x2, y2], ...] in original-image px, by decreasing score.
        timings: cloud-side and round-trip seconds, merged into the row's timings.
    """

    boxes: Sequence[Sequence[float]]
    scores: Sequence[float]
    labels: Sequence[int]
    class_names: Sequence[str]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Pruned:
    """What `ResultStore.prune` did: rows deleted, the largest row id its pass over the results
    (after the dead letters' own) looked at, and the rows
    kept although their wall-clock stamp is old enough, because they were written more
    recently by the time since their boot (the clock was stepped forward since: `boot_clock`,
    `StoreMaintenance.prune`), or because their file still
    lies where it arrived (`kept_in_place`); and the dead letters: those old enough kept
    because they were not asked for (`kept_dead_letters`), and how many of the rows deleted
    were dead letters (`dead_letters_deleted`, within `deleted`); and the ok or defect results
    old enough kept because a dead letter of their image is still there: requeue reads them to
    tell that the image was processed again (`kept_for_dead_letters`)."""

    deleted: int
    through_id: int
    kept_for_clock: int = 0
    kept_in_place: int = 0
    kept_dead_letters: int = 0
    dead_letters_deleted: int = 0
    kept_for_dead_letters: int = 0


@dataclass(frozen=True)
class OutboxStats:
    """What the outbox (or the dead letters) holds: rows, payload bytes, the oldest row's
    creation time (unix s; None when empty)."""

    depth: int
    bytes: int
    oldest_created: float | None
