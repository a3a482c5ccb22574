"""At most one log line of a kind per interval, the next one saying how many were left out.

The cloud logs a line per refused call and per answer its store could not keep; a client that
cancels every call, a caller sending junk, or a full disk would write one per call. The
Prometheus counters count each; the log keeps the first line of each kind at once, then at
most one per `every_s`, carrying the number of lines left out since the last (`repeats`).
A line left out after the last one written is written when the server stops
(`LineLimiter.flush`), so that a log read after the fact counts every line of a kind.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

#: Seconds between two log lines of one kind (refusals: event, edge label, status code).
LINE_EVERY_S = 60.0
#: Kinds remembered; beyond, those whose interval has passed with nothing left out are dropped
#: (edge labels come and go over months: --forget-edges-after).
MAX_KINDS = 8192
#: Names a line left out is remembered by, per kind, to be listed in the next line written.
MAX_NAMES = 20
#: Names that get log lines of their own at once (`OwnLines`); more share one.
MAX_OWN_NAMES = 64

#: A line of a kind, written as `line(repeats, names, at_stop)`: `repeats` the lines of its kind
#: left out since the last one written, `names` those they were about (`LineLimiter.admit_from`),
#: `at_stop` True when it is itself a line left out, written as the server stops
#: (`LineLimiter.flush`).
Line = Callable[[int, list[str], bool], None]


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
        #          the names they were about (the first MAX_NAMES; each -> lines about it),
        #          the last line left out (`write_from`; None: not given), whom it is about]
        self._kinds: dict[Hashable, list[Any]] = {}

    def admit(self, kind: Hashable) -> int | None:
        """None: leave this line of `kind` out (it is counted); else write it, and this is how
        many lines of `kind` were left out since the last one written (0 for none)."""
        admitted = self.admit_from(kind, None)
        return None if admitted is None else admitted[0]

    def admit_from(
        self, kind: Hashable, who: str | None, line: Line | None = None
    ) -> tuple[int, list[str]] | None:
        """`admit` for a line about `who` (e.g. the edge a refused call claims to be): also
        the distinct others (the first MAX_NAMES) whose lines of `kind` were left out since
        the last one written, so that a line shared by many callers still names them.
        `line`: this line, kept when it is left out, for `flush` to write it (a line left out
        without one is counted, never written)."""
        now = self.clock()
        with self._lock:
            entry = self._kinds.get(kind)
            if entry is not None and now < entry[0]:
                entry[1] += 1
                names = entry[2]
                if who is not None and (who in names or len(names) < MAX_NAMES):
                    names[who] = names.get(who, 0) + 1
                entry[3], entry[4] = line, who
                return None
            left_out, names = (0, []) if entry is None else (int(entry[1]), list(entry[2]))
            if entry is None and len(self._kinds) >= MAX_KINDS:
                self._prune(now)
            self._kinds[kind] = [now + self.every_s, 0, {}, None, None]
            return left_out, names

    def write_from(self, kind: Hashable, who: str | None, line: Line) -> bool:
        """Write `line` of `kind` about `who` (`line(repeats, names, False)`) when
        `admit_from` admits it; else keep it as the kind's last line left out, which `flush`
        writes if no other comes. True when written now."""
        admitted = self.admit_from(kind, who, line)
        if admitted is None:
            return False
        line(*admitted, False)
        return True

    def flush(self) -> int:
        """Write, for each kind with lines left out since its last written line, the last one
        left out (`line(repeats, names, True)`): `repeats` the others left out since the last
        line written, `names` those the others were about; nothing for a kind with none left
        out. Meant for the server's stop, so that the log says every line of a kind: the
        counts are taken and reset under the lock, as a written line resets them, so that a
        line left out meanwhile (a call still finishing) is either in what this writes or
        counted afresh, never both. The lines are written outside the lock, in the order the
        kinds were first written. Returns how many lines it wrote."""
        now = self.clock()
        pending: list[tuple[Line, int, list[str]]] = []
        with self._lock:
            for entry in self._kinds.values():
                if not entry[1] or entry[3] is None:
                    continue
                line, who, names = entry[3], entry[4], entry[2]
                if who is not None and names.get(who) == 1:  # (only that line was about it)
                    del names[who]
                pending.append((line, int(entry[1]) - 1, list(names)))
                entry[:] = [max(entry[0], now), 0, {}, None, None]
        for line, repeats, names in pending:
            line(repeats, names, True)
        return len(pending)

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


def repeats_fields(
    left_out: int, names: list[str] | None = None, at_stop: bool = False
) -> dict[str, Any]:
    """The fields a written line carries for `repeats_note`'s text: `repeats` (the lines of its
    kind left out since the last written, when any), `repeats_from` (the names they were
    about, with `repeats`, when names are kept for the kind) and `at_stop` (true, when the line
    is itself one left out, written as the server stops: `LineLimiter.flush`)."""
    fields: dict[str, Any] = {}
    if left_out:
        fields["repeats"] = left_out
        if names is not None:
            fields["repeats_from"] = names
    if at_stop:
        fields["at_stop"] = True
    return fields


def repeats_note(
    left_out: int, every_s: float, names: list[str] | None = None, at_stop: bool = False
) -> str:
    """The text a written line ends with when `left_out` lines of its kind were not written
    (`names`: the distinct ones they were about, as `LineLimiter.admit_from` gives them);
    `at_stop`: the line is itself one left out, written as the server stops
    (`LineLimiter.flush`)."""
    about = ""
    if names:
        more = ", …" if left_out > len(names) and len(names) >= MAX_NAMES else ""
        about = f" (edges {', '.join(names)}{more})"
    if at_stop:
        also = (
            f", as were {left_out} more like it{about} since the last such line" if left_out else ""
        )
        return (
            f" [held back (at most one such line per {every_s:g} s) until the server's stop{also}]"
        )
    if not left_out:
        return ""
    return (
        f" [{left_out} more like it{about} since the last such line: at most one per {every_s:g} s]"
    )
