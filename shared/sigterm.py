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
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["SIGTERM_EXIT", "Terminated", "sigterm_as_interrupt"]

#: Exit status of a process ended by SIGTERM (128 + 15), as a shell reports its default action.
SIGTERM_EXIT = 128 + signal.SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (`sigterm_as_interrupt`)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises `Terminated` in the main thread; the list yielded gets the
    signal once received (a command that meets another error while unwinding can tell). A
    second SIGTERM while it unwinds is ignored. The handler before is put back after (commands
    run in-process by `splitdet demo` nest), unless another was set inside and left there.
    Outside the main thread, where no handler can be set, nothing changes."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def on_sigterm(signum: int, _frame: FrameType | None) -> None:
        if received:  # already unwinding: let it finish
            return
        received.append(signum)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield received
    finally:  # put back unless the command set its own meanwhile and left it (the cloud
        # ignores a late signal while its stopped process exits: its choice stands); None: a
        # handler not set from Python, which cannot be put back: the default
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
