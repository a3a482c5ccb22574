"""Identical Detect calls answered once (no torch).

An edge that gave up on a call (its deadline passed, its connection dropped) sends the same
request again, while the cloud may still be computing the first: without this, both take a
slot and run the heads, and the retry waits in the queue behind work done twice. A call whose
request is one already running (same model, same request id, the same `request_digest`: what
determines the answer, as the answers store compares it; a log-only field such as the image's
`source` may differ) now waits for that answer instead, without a slot; if the first fails, it
goes on as any call would. The first call keeps computing for those waiting even when its own
caller has gone away (the usual reason for the retry). A call of the same model and request id
but another request is a conflict: it leads calls of its own request (an edge's retry of it
waits for it too), and its caller knows (`conflict`), so that its answer is not stored over the
first's (`DetectionCore.detect`), as for a call whose id has another request's answer stored.

    running = InFlight()
    lead, follow, conflict = running.lead_or_follow(key, digest)
    if follow is not None:
        answer = InFlight.wait(follow, is_cancelled)   # the first call's result, or None
    ...
    running.finish(key, lead, answer)                  # in a finally, None when it failed
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from splitdet.cloud.core import Cancelled


@dataclass
class Running:
    """One call being computed: its request's digest, and its answer once there."""

    digest: str  # the request's `request_digest`
    conflict: bool = False  # another request of its key was running when it started
    done: threading.Event = field(default_factory=threading.Event)
    answer: Any = None  # what `finish` was given: None when the call failed
    followers: int = 0  # calls waiting for this one's answer (while it runs, only grows)


class InFlight:
    """The calls being computed now, by key (answers scope, model fingerprint, request id) and
    request digest. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, dict[str, Running]] = {}

    def lead_or_follow(
        self, key: Hashable, digest: str
    ) -> tuple[Running | None, Running | None, bool]:
        """(the entry this call now leads, or None; the identical running call's entry it
        should wait for, or None; whether a call of the same key but another request, or of
        another request leading the one it follows, is running: a conflict). `digest`: the
        call's `request_digest`."""
        with self._lock:
            by_digest = self._running.setdefault(key, {})
            running = by_digest.get(digest)
            if running is not None:
                running.followers += 1
                return None, running, running.conflict
            conflict = bool(by_digest)
            running = by_digest[digest] = Running(digest, conflict=conflict)
        return running, None, conflict

    def finish(self, key: Hashable, running: Running | None, answer: Any) -> None:
        """End a call this one leads (`running` None: it led none): hand `answer` (None when
        it failed) to the calls waiting for it."""
        if running is None:
            return
        running.answer = answer
        with self._lock:
            by_digest = self._running.get(key, {})
            if by_digest.get(running.digest) is running:
                del by_digest[running.digest]
                if not by_digest:
                    del self._running[key]
        running.done.set()

    @staticmethod
    def wait(running: Running, is_cancelled: Callable[[], bool], poll_s: float = 0.05) -> Any:
        """The answer of the call `running` describes, once it ends (None when it failed).

        Raises:
            Cancelled: `is_cancelled` said the waiting caller went away.
        """
        while not running.done.wait(poll_s):
            if is_cancelled():
                raise Cancelled("caller went away while an identical call was being answered")
        return running.answer
