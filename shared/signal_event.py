"""Signal handlers that set a `threading.Event` without taking its lock (no torch).

A handler runs in the main thread between two bytecodes. `Event.set()` takes the Event's
lock, a plain (not re-entrant) one that the main thread itself holds for a few steps of every
`Event.wait()` and `clear()`: a signal landing there made the handler wait for a lock its own
thread held, for good. Each further signal then ran the handler again inside the blocked one,
until RecursionError ended the process (a CI run on a loaded machine: an edge daemon sent
SIGTERM and SIGINT every 0.5 ms ended with 1). So a handler here only writes a number to a
pipe (`post`); one helper thread reads it and sets the Event, waiting for the lock like any
other thread.

    stop = threading.Event()
    signal.signal(signal.SIGTERM, event_setter(stop))
    ...
    set_hurry = safe_setter(hurry)     # for a handler of one's own
    def on_signal(signum, frame):
        set_hurry()
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import weakref
from collections.abc import Callable
from types import FrameType

__all__ = ["event_setter", "safe_setter"]

_RECORD = struct.Struct("<I")  # one Event's number per signal, written whole (< PIPE_BUF)


class _Poster:
    """The pipe, the numbers of the Events it sets, and the thread that sets them."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # (full: the Events it names are being set)
        self._events: weakref.WeakValueDictionary[int, threading.Event] = (
            weakref.WeakValueDictionary()
        )
        self._numbers: weakref.WeakKeyDictionary[threading.Event, int] = weakref.WeakKeyDictionary()
        self._next = 0
        self._lock = threading.Lock()  # (taken outside handlers only: `number`)
        threading.Thread(target=self._run, name="splitdet-signal-events", daemon=True).start()

    def number(self, event: threading.Event) -> int:
        """`event`'s number on the pipe (given once, when a handler is made for it)."""
        with self._lock:
            if event not in self._numbers:
                self._numbers[event], self._events[self._next] = self._next, event
                self._next += 1
            return self._numbers[event]

    def post(self, number: int) -> None:
        """Ask for the Event of `number` to be set: one write, no lock (handler-safe)."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.write(self._write, _RECORD.pack(number))

    def _run(self) -> None:
        pending = b""
        while True:
            pending += os.read(self._read, 4096)
            whole = len(pending) - len(pending) % _RECORD.size
            for (number,) in _RECORD.iter_unpack(pending[:whole]):
                event = self._events.get(number)
                if event is not None:
                    event.set()
            pending = pending[whole:]


_posters: dict[int, _Poster] = {}  # by process id: a forked child makes its own (and thread)
_posters_lock = threading.Lock()


def _the_poster() -> _Poster:
    """This process's one `_Poster`, made at the first setter (never inside a handler)."""
    with _posters_lock:
        pid = os.getpid()
        if pid not in _posters:
            _posters[pid] = _Poster()
        return _posters[pid]


def safe_setter(event: threading.Event) -> Callable[[], None]:
    """A callable that has `event` set (by the helper thread, at once), safe to call in a
    signal handler; make it outside one (in the main thread, as `signal.signal` is called)."""
    poster = _the_poster()
    number = poster.number(event)
    return lambda: poster.post(number)


def event_setter(event: threading.Event) -> Callable[[int, FrameType | None], None]:
    """A signal handler that has `event` set (`safe_setter`)."""
    set_event = safe_setter(event)

    def handler(_signum: int, _frame: FrameType | None) -> None:
        set_event()

    return handler
