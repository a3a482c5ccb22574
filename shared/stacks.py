"""`kill -USR1 PID` logs every thread's Python stack and the process goes on: what a daemon,
server or training run that seems stuck is doing, without stopping it (stdlib only).

    stacks_on_sigusr1()   # first thing in `splitdet`'s main(), before any thread starts

SIGUSR1 is blocked in the main thread, so every thread started after it (gRPC's, ONNX
Runtime's and torch's included) blocks it too, and one thread takes it with `signal.sigwait`.
That thread walks the other threads' frames with the GIL held and logs them as one record
(event "stacks"; one JSON line with --log-format json). faulthandler's dump was tried first: it
reads the frames inside the signal handler, without the GIL, and crashed a busy cloud server
(SIGSEGV in 4 of 8 runs of 300 signals under load).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
import traceback

log = logging.getLogger("splitdet")

_started = threading.Event()
#: Seconds between two dumps at least: the signals of a burst in between are dropped.
MIN_INTERVAL_S = 1.0
#: What a dump at SIGUSR1 says of itself (`log_stacks`'s default reason).
SIGUSR1_REASON = "(SIGUSR1); the process goes on"


def stacks_on_sigusr1() -> None:
    """From now on, SIGUSR1 logs every thread's stack (`log_stacks`) instead of ending the
    process. Once per process, from the main thread (elsewhere it does nothing: a thread's
    signal mask is its own, and only the main thread's passes to the threads it starts)."""
    if _started.is_set() or threading.current_thread() is not threading.main_thread():
        return
    _started.set()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    threading.Thread(target=_take_signals, name="splitdet-stacks", daemon=True).start()


def _take_signals() -> None:
    """Log the stacks at each SIGUSR1, for the life of the process; at most one dump per
    MIN_INTERVAL_S (a burst of signals, e.g. a script in a loop, must not flood the log)."""
    last = -math.inf
    while True:
        signal.sigwait({signal.SIGUSR1})
        if time.monotonic() - last < MIN_INTERVAL_S:
            continue
        last = time.monotonic()
        try:
            log_stacks()
        except Exception:  # (a dump never ends the process)
            log.exception("could not log the threads' stacks")


def log_stacks(reason: str = SIGUSR1_REASON) -> None:
    """One WARNING record holding every other thread's name and stack, most recent call
    last (fields: event "stacks", threads: how many, reason). `reason` says why, after "stacks
    of N threads": SIGUSR1's by default; a caller about to end the process says so, since
    SIGUSR1's "the process goes on" would then be false."""
    me = threading.get_ident()
    names = {thread.ident: thread.name for thread in threading.enumerate()}
    stacks = [
        f"thread {names.get(ident, ident)!s}:\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
        if ident != me
    ]
    log.warning(
        "stacks of %d threads %s:\n%s", len(stacks), reason, "\n".join(stacks),
        extra={"fields": {"event": "stacks", "threads": len(stacks), "reason": reason}},
    )  # fmt: skip
