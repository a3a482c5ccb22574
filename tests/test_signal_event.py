"""Signal handlers that set an Event take no lock (shared/signal_event.py).

A CI run on a loaded machine: an edge daemon sent SIGTERM and SIGINT every 0.5 ms ended with 1
and a RecursionError. A signal had landed while the main thread held the Event's (plain) lock
for a few steps of `Event.wait()`; its handler's `Event.set()` then waited for that lock, held
by its own thread, for good, and each further signal ran the handler again inside it. The
cloud's and the JPEG server's handlers were the same `lambda: stop.set()`."""

from __future__ import annotations

import os
import signal
import threading

from splitdet.shared.signal_event import event_setter, safe_setter


def test_a_handler_returns_while_the_events_lock_is_held():
    """As when the signal lands inside the main thread's Event.wait(): the handler returns at
    once, and the Event is set once the lock is free. (A handler calling set() itself waits
    for the lock: here for the 5 s the test holds it; in the main thread, for good.)"""
    stop = threading.Event()
    handler = event_setter(stop)
    with stop._cond:  # (what Event.wait holds for a few steps)
        caller = threading.Thread(target=handler, args=(signal.SIGTERM, None))
        caller.start()
        caller.join(5)
        returned = not caller.is_alive()
    assert returned
    assert stop.wait(5)


def test_a_storm_of_real_signals_sets_the_event():
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, event_setter(stop))
    try:
        for _ in range(2000):
            os.kill(os.getpid(), signal.SIGTERM)
            stop.wait(0)  # (the main thread inside Event.wait as the signals come)
        assert stop.wait(5)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_event_cleared_after_it_was_handled_is_set_by_the_next_signal():
    """SIGHUP's reload event is cleared once the reload is done: the next SIGHUP sets it."""
    reload = threading.Event()
    set_reload = safe_setter(reload)
    set_reload()
    assert reload.wait(5)
    reload.clear()
    set_reload()
    assert reload.wait(5)
