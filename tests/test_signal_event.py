"""Signal handlers that set an Event survive a storm of signals (shared/signal_event.py).

A CI run on a loaded machine: an edge daemon sent SIGTERM and SIGINT every 0.5 ms ended with 1
and a RecursionError, each signal landing inside the previous handler's `Event.set()` (waiting
for its re-entrant lock) and running the handler again within it. The cloud's and the JPEG
server's handlers were the same lambda."""

from __future__ import annotations

import signal
import threading

from splitdet.shared.signal_event import event_setter


class Storm(threading.Event):
    """An Event whose set() is interrupted by the same signal, again and again, before it
    takes its lock (as a storm on a loaded machine does)."""

    def __init__(self, signals: int) -> None:
        super().__init__()
        self.signals = signals
        self.entered = 0
        self.handler = None

    def set(self) -> None:
        self.entered += 1
        if self.signals:
            self.signals -= 1
            self.handler(signal.SIGTERM, None)  # the next signal, inside this set()
        super().set()


def test_a_storm_of_signals_inside_set_does_not_nest_the_handler():
    event = Storm(signals=10_000)  # (nested, 10,000 calls exceed Python's recursion limit)
    event.handler = event_setter(event)
    event.handler(signal.SIGTERM, None)
    assert event.is_set() and event.entered == 1


def test_an_event_cleared_after_it_was_handled_is_set_by_the_next_signal():
    """SIGHUP's reload event is cleared once the reload is done: the next SIGHUP sets it."""
    reload = threading.Event()
    handler = event_setter(reload)
    handler(signal.SIGHUP, None)
    handler(signal.SIGHUP, None)
    assert reload.is_set()
    reload.clear()
    handler(signal.SIGHUP, None)
    assert reload.is_set()
