"""Signal handlers that set a `threading.Event`, safe against a storm of signals (no torch).

A handler runs in the main thread between two bytecodes, so a signal that arrives while the
handler is inside `Event.set()` (waiting for the Event's lock) runs the handler again within
it, and `set()` is entered again (its lock is re-entrant). A supervisor repeating its SIGTERM
fast on a loaded machine nested the handler until RecursionError ended the process with a
traceback. These handlers set the event only when it is not set, nor being set already.

    stop = threading.Event()
    signal.signal(signal.SIGTERM, event_setter(stop))
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import FrameType

__all__ = ["event_setter"]


def event_setter(event: threading.Event) -> Callable[[int, FrameType | None], None]:
    """A signal handler that sets `event` unless it is set or being set (a reload's event,
    cleared once handled, can be set again by the next signal)."""
    setting = False

    def handler(_signum: int, _frame: FrameType | None) -> None:
        nonlocal setting
        if setting or event.is_set():
            return
        setting = True
        try:
            event.set()
        finally:
            setting = False

    return handler
