"""SIGTERM unwinds a command as Ctrl-C does (standard library only: the edge imports it).

SIGTERM is what systemd, `docker stop`, a job scheduler and a CI cancel stop a process with.
Its default action ends the process at once: no `finally` block runs, so a command stopped so
left a hidden temporary file of up to ~95 MB beside the checkpoint it was writing (`eval`),
wrote no `--json` of the images it had judged (`predict`), and said nothing. `splitdet` makes
it raise `Terminated`, a KeyboardInterrupt, where Ctrl-C raises KeyboardInterrupt: every
command then unwinds as on Ctrl-C (temporary files removed, partial results written as
documented), and `main` ends it with one line, `splitdet COMMAND: stopped on SIGTERM`, exit
status 143. The commands that stop gracefully on SIGTERM (`cloud`, `edge run`) install their
own handler once ready. A second SIGTERM while it unwinds is ignored.

Python swallows an exception raised where nothing can catch it, a weakref callback or a
`__del__` the garbage collector runs: a signal handled there ("Exception ignored in ...", a
traceback on stderr) was lost, and with it the stop. A `splitdet train` sent SIGTERM while
matplotlib's transforms were collected went on training, and ignored every later SIGTERM as
"already unwinding" until the SIGKILL. Inside `sigterm_as_interrupt` such a swallowed
Terminated or KeyboardInterrupt is sent again (the same signal, from a short-lived thread a
moment later, once the finaliser has returned), with no traceback; a context left before
then raises the stop itself as it ends, the signal not sent. So is any other exception a
handler raises, when it carries its signal (`SIGNUM_ATTRIBUTES`): `edge run`'s
StoppedBeforeStart, met so during its start-up, was lost and the start-up went on; torchrun's
SignalException, which the `train --nproc-per-node` launcher stops its ranks on, alike.

An extension module whose initialisation a stop signal interrupts (pybind11's: onnxruntime's)
raises ImportError("initialization failed") with the Terminated as its cause: `stop_behind`
finds it, and `main` ends the command as stopped, not with that error (`edge run` sent
SIGTERM while it imported ONNX Runtime: "error: ImportError: initialization failed", exit 1).
Some extensions left so cannot exit: matplotlib's ft2font aborted the interpreter at exit
(exit status 134, not 143). `stops_held` holds the stop signals while such a module loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType

__all__ = [
    "SIGTERM_EXIT",
    "Terminated",
    "raise_if_stopped",
    "sigterm_as_interrupt",
    "stop_behind",
    "stops_held",
]

#: Exit status of a process ended by SIGTERM (128 + 15), as a shell reports its default action.
SIGTERM_EXIT = 128 + signal.SIGTERM

#: Delay (s) before a signal whose exception a finaliser swallowed is sent again: long enough
#: for the garbage collection that ran the finaliser to have returned.
RESEND_DELAY_S = 0.05

#: The attributes by which an exception a signal handler raises names its signal (a
#: `signal.Signals`, not a bare int another library's exception may hold), so
#: that one a finaliser swallowed is sent again like a KeyboardInterrupt: `signum` (`edge
#: run`'s StoppedBeforeStart), `sigval` (torch elastic's SignalException, raised by the
#: handler torchrun sets in the `train --nproc-per-node` launcher).
SIGNUM_ATTRIBUTES = ("signum", "sigval")

#: The signals a command stops on, which `stops_held` holds: SIGTERM and Ctrl-C's SIGINT.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (`sigterm_as_interrupt`)."""


#: The `received` lists of the `sigterm_as_interrupt` contexts open in the main thread,
#: innermost last (`raise_if_stopped` reads the innermost).
_OPEN: list[list[int]] = []


def raise_if_stopped() -> None:
    """Raise `Terminated` if the innermost `sigterm_as_interrupt` has received SIGTERM: a
    loop's safe point. A command that still runs its loop after a SIGTERM lost the Terminated
    on the way: caught by an `except Exception` as the ImportError("initialization failed") an
    extension module's interrupted initialisation makes of it (matplotlib's, imported for a
    learning curve: the run logged "not redrawn" and trained on, ignoring every later SIGTERM
    as "already unwinding"), or dropped by C code. Nothing outside a context (or in another
    thread: its contexts take no signal)."""
    if _OPEN and _OPEN[-1] and threading.current_thread() is threading.main_thread():
        raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises `Terminated` in the main thread; the list yielded gets the
    signal once received (a command that meets another error while unwinding can tell). A
    second SIGTERM while it unwinds is ignored. The handler before is put back after (commands
    run in-process by `splitdet demo` nest), unless another was set inside and left there.
    Outside the main thread, where no handler can be set, nothing changes. A SIGTERM met as
    the handler is set raises from the `with` line itself, and one met as the context is left
    (or a swallowed stop not yet sent again) raises as the block has ended, the context's
    cleanup done: catch KeyboardInterrupt around the `with`."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    resent = [False]  # a Terminated was swallowed: the SIGTERM sent again raises anew
    closing = [False, False]  # the context is being left; a SIGTERM was met meanwhile

    def on_sigterm(signum: int, _frame: FrameType | None) -> None:
        if received and not resent[0]:  # already unwinding: let it finish
            return
        resent[0] = False
        received[:] = [signum]
        if closing[0]:  # (raised once the context is left: its `finally` not cut short)
            closing[1] = True
            return
        raise Terminated

    hook_before = sys.unraisablehook

    def on_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
        signum = _swallowed_signal(unraisable)
        if signum is None:
            hook_before(unraisable)
            return
        resent[0] = resent[0] or issubclass(unraisable.exc_type, Terminated)
        if not resends.schedule(signum):  # ("can't start new thread": shown as Python would)
            hook_before(unraisable)

    previous = signal.getsignal(signal.SIGTERM)
    resends = _Resends()
    sys.unraisablehook = on_unraisable
    _OPEN.append(received)
    ended = False  # the block ended without an exception
    try:  # (a SIGTERM as soon as the handler is set raises before `signal.signal` returns:
        # Terminated out of the `with` line, the handler put back by the `finally`)
        signal.signal(signal.SIGTERM, on_sigterm)
        yield received
        ended = True
    finally:
        closing[0] = True
        unsent = resends.close()
        _close(received)
        # put back unless the command set its own meanwhile and left it (the cloud
        # ignores a late signal while its stopped process exits: its choice stands); None: a
        # handler not set from Python, which cannot be put back: the default
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if sys.unraisablehook is on_unraisable:
            sys.unraisablehook = hook_before
    if ended and closing[1]:
        raise Terminated
    if ended and unsent:  # a swallowed stop the block ended before it was sent again
        _stop_now(unsent[0], received)


@contextlib.contextmanager
def stops_held() -> Iterator[None]:
    """Hold SIGTERM and Ctrl-C (SIGINT) while inside, for code that a stop must not cut short:
    the first one met is raised as the block is left (by the handler it was held from, as it
    would have been raised inside), after the block's own work, and before any exception the
    block raised. Only a handler set from Python is held: a signal whose action is the default
    (a SIGTERM outside a command's `sigterm_as_interrupt`) or ignored acts as before. Outside
    the main thread, where no handler can be set, nothing changes.

    An extension module whose initialisation a stop interrupts may leave the interpreter unable
    to exit: matplotlib's ft2font, interrupted as it built its enums, ended a stopped `splitdet
    train` (its learning curve's first import) in "Fatal Python error: PyThreadState_Get" and
    SIGABRT (exit status 134), after its stop line. Import such a module inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    handlers: dict[int, Callable[[int, FrameType | None], object]] = {}
    closed = [False]  # after it: a signal passes to its handler (the block is being left)

    def hold(signum: int, frame: FrameType | None) -> None:
        if closed[0]:  # (met as the handlers are put back, before this one's turn)
            handlers[signum](signum, frame)
        else:
            held.append(signum)

    try:
        for signum in STOP_SIGNALS:
            handler = signal.getsignal(signum)
            if callable(handler):
                handlers[signum] = handler
                signal.signal(signum, hold)
        yield
    finally:
        closed[0] = True
        for signum, handler in handlers.items():
            if signal.getsignal(signum) is hold:  # (unless the block set its own)
                signal.signal(signum, handler)
        if held:
            handlers[held[0]](held[0], None)


def _close(received: list[int]) -> None:
    """Take the context of `received` out of _OPEN (by identity: the lists of two contexts
    that received nothing are equal)."""
    for at in range(len(_OPEN) - 1, -1, -1):
        if _OPEN[at] is received:
            del _OPEN[at]
            return


def stop_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM (`Terminated`) an ImportError stands for, if any: the one in its
    chain of causes and contexts, as an extension module's initialisation it interrupted
    chains it; None for an import that failed of itself."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while isinstance(link, ImportError) and id(link) not in seen:
        seen.add(id(link))
        behind = link.__cause__ or link.__context__
        if isinstance(behind, KeyboardInterrupt):
            return behind
        link = behind
    return None


def _swallowed_signal(unraisable: sys.UnraisableHookArgs) -> int | None:
    """The stop signal whose handler raised the exception a finaliser swallowed: SIGTERM for
    Terminated, the signal an exception carries (`SIGNUM_ATTRIBUTES`), SIGINT for another
    KeyboardInterrupt; None for an exception no signal raised (shown as Python would)."""
    if issubclass(unraisable.exc_type, Terminated):
        return signal.SIGTERM
    for name in SIGNUM_ATTRIBUTES:
        signum = getattr(unraisable.exc_value, name, None)
        if isinstance(signum, signal.Signals):  # (not any int: a library's errno-like field)
            return int(signum)
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        return signal.SIGINT
    return None


class _Resends:
    """The stop signals one `sigterm_as_interrupt` context sends again, each from a thread
    RESEND_DELAY_S s after a finaliser swallowed its exception, until the context closes: one
    not yet sent then is not sent at all (sent after the context, it met the handler that was
    before it, the default: the process died by the signal with no stop line), and the
    context stops the command itself (`_stop_now`)."""

    def __init__(self) -> None:
        # (re-entrant: a finaliser the garbage collector runs inside `close` may schedule)
        self._lock = threading.RLock()
        self._pending: dict[threading.Timer, int] = {}
        self._closed = False

    def schedule(self, signum: int) -> bool:
        """Send `signum` to this process in RESEND_DELAY_S s; False if no thread could be
        started for it."""
        timer = threading.Timer(RESEND_DELAY_S, lambda: self._send(timer))
        timer.daemon = True
        with self._lock:
            if self._closed:
                return True
            self._pending[timer] = signum
        try:
            timer.start()
        except RuntimeError:  # ("can't start new thread")
            with self._lock:
                self._pending.pop(timer, None)
            return False
        return True

    def _send(self, timer: threading.Timer) -> None:
        with self._lock:
            signum = self._pending.pop(timer, None)
            if signum is not None:  # (not closed meanwhile: `close` empties it)
                os.kill(os.getpid(), signum)

    def close(self) -> list[int]:
        """Send nothing more; the signals not sent yet, in the order they were met."""
        with self._lock:
            self._closed = True
            unsent = list(self._pending.values())
            for timer in self._pending:
                timer.cancel()
            self._pending.clear()
        return unsent


def _stop_now(signum: int, received: list[int]) -> None:
    """Stop as the handler of `signum` would have, for a stop a finaliser swallowed and the
    context closed before sending again: Terminated for SIGTERM (`received` set), a
    KeyboardInterrupt for SIGINT, and another signal (its exception carried it: edge's
    start-up stop, torchrun's) sent now, to the handler in place after the context."""
    if signum == signal.SIGTERM:
        received[:] = [int(signum)]
        raise Terminated
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    os.kill(os.getpid(), signum)
