"""At most one log line of a kind per interval, the next one saying how many were left out.

The cloud logs a line per refused call and per answer its store could not keep; a client that
cancels every call, a caller sending junk, or a full disk would write one per call. The
Prometheus counters count each; the log keeps the first line of each kind at once, then at
most one per `every_s`, carrying the number of lines left out since the last (`repeats`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

#: Seconds between two log lines of one kind (refusals: event, edge label, status code).
LINE_EVERY_S = 60.0
#: Kinds remembered; beyond, those whose interval has passed with nothing left out are dropped
#: (edge labels come and go over months: --forget-edges-after).
MAX_KINDS = 8192
#: Names a line left out is remembered by, per kind, to be listed in the next line written.
MAX_NAMES = 20
#: Names that get log lines of their own at once (`OwnLines`); more share one.
MAX_OWN_NAMES = 64


class LineLimiter:
    """Which lines to write: the first of each kind, then at most one per `every_s` seconds.

    Thread-safe. `clock` is monotonic seconds (tests step it).
    """

    def __init__(
        self, every_s: float = LINE_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`every_s`: seconds between two lines of one kind; `clock`: monotonic s now."""
        self.every_s = every_s
        self.clock = clock
        self._lock = threading.Lock()
        # kind -> [monotonic s before which its lines are left out, lines left out since,
        #          the names they were about (the first MAX_NAMES)]
        self._kinds: dict[Hashable, list] = {}

    def admit(self, kind: Hashable) -> int | None:
        """None: leave this line of `kind` out (it is counted); else write it, and this is how
        many lines of `kind` were left out since the last one written (0 for none)."""
        admitted = self.admit_from(kind, None)
        return None if admitted is None else admitted[0]

    def admit_from(self, kind: Hashable, who: str | None) -> tuple[int, list[str]] | None:
        """`admit` for a line about `who` (e.g. the edge a refused call claims to be): also
        the distinct others (the first MAX_NAMES) whose lines of `kind` were left out since
        the last one written, so that a line shared by many callers still names them."""
        now = self.clock()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now < entry[0]:
                entry[1] += 1
                if who is not None and len(entry[2]) < MAX_NAMES and who not in entry[2]:
                    entry[2].append(who)
                return None
            left_out, names = (0, []) if entry is None else (int(entry[1]), entry[2])
            if entry is None and len(self._kinds) >= MAX_KINDS:
                self._prune(now)
            self._kinds[kind] = [now + self.every_s, 0, []]
            return left_out, names

    def _prune(self, now: float) -> None:
        """Forget the kinds whose interval has passed with no line left out (under the lock);
        the oldest others too if that is not enough."""
        stale = [kind for kind, entry in self._kinds.items() if now >= entry[0] and not entry[1]]
        for kind in stale:
            del self._kinds[kind]
        excess = len(self._kinds) - MAX_KINDS + 1
        if excess > 0:
            for kind in sorted(self._kinds, key=lambda kind: self._kinds[kind][0])[:excess]:
                del self._kinds[kind]


class OwnLines:
    """Which names get lines of their own: each of the first MAX_OWN_NAMES heard within an
    interval (a name keeps its place while it is heard again within `every_s`); the others
    share `shared`. So a caller's first line is written at once, not a minute late in another
    caller's `repeats_from`, and callers choosing their names (unauthenticated ones) cannot
    write more than MAX_OWN_NAMES + 1 lines per interval. Thread-safe."""

    def __init__(
        self,
        shared: str,
        every_s: float = LINE_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`shared`: the name of the line the others share; `every_s`: seconds a name keeps
        its place after it was last heard; `clock`: monotonic s now."""
        self.shared, self.every_s, self.clock = shared, every_s, clock
        self._lock = threading.Lock()
        self._until: OrderedDict[str, float] = OrderedDict()  # name -> monotonic s, oldest first

    def name_of(self, name: str) -> str:
        """`name` when it has, or gets, a line of its own; else `shared`."""
        now = self.clock()
        with self._lock:
            while self._until and next(iter(self._until.values())) <= now:
                self._until.popitem(last=False)
            if name not in self._until and len(self._until) >= MAX_OWN_NAMES:
                return self.shared
            self._until[name] = now + self.every_s
            self._until.move_to_end(name)
            return name


def repeats_note(left_out: int, every_s: float, names: list[str] | None = None) -> str:
    """The text a written line ends with when `left_out` lines of its kind were not written
    (`names`: the distinct ones they were about, as `LineLimiter.admit_from` gives them)."""
    if not left_out:
        return ""
    about = ""
    if names:
        more = ", …" if left_out > len(names) and len(names) >= MAX_NAMES else ""
        about = f" (edges {', '.join(names)}{more})"
    return (
        f" [{left_out} more like it{about} since the last such line: at most one per {every_s:g} s]"
    )
