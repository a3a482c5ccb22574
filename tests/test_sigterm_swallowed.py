"""A stop signal handled inside a finaliser is not lost. Python swallows an exception raised
in a weakref callback or a `__del__` ("Exception ignored in ...", a traceback): a `splitdet
train` sent SIGTERM while the garbage collector ran matplotlib's weakref callbacks went on
training and ignored every later SIGTERM as "already unwinding" (1 run in ~200 in a loop; a
fresh-clone CI run timed out on it). Now the signal is sent again once the finaliser is
over: the command stops, quietly. Each case runs in its own process (a signal to it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import FINALISER

#: A program that sends itself `SIGNAL` from inside a weakref callback (the handler runs
#: there), then waits 3 s; it prints how it ended.
PROGRAM = (
    FINALISER
    + """
from splitdet.shared.sigterm import Terminated, sigterm_as_interrupt

try:
    with sigterm_as_interrupt() as received:
        swallowed_then_wait()
        print("went on")
except Terminated:
    print("terminated", received)
except KeyboardInterrupt:
    print("interrupted", received)
"""
)


def run_program(program: str) -> subprocess.CompletedProcess:
    """`python -c program` in a process of its own (text output)."""
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "said"),
    [("SIGTERM", "terminated [15]"), ("SIGINT", "interrupted []")],
)
def test_a_signal_a_finaliser_swallowed_still_stops_the_command(name, said):
    done = run_program(PROGRAM.format(signal=name))
    assert done.stdout.strip() == said, (done.stdout, done.stderr)
    assert done.stderr == "", done.stderr  # (no "Exception ignored" traceback)
    assert done.returncode == 0


def test_other_unraisable_exceptions_are_shown_as_before():
    """Only a swallowed stop is taken: any other exception a finaliser raises is reported by
    the hook that was there (Python's: "Exception ignored in ..."), and the hook is put back."""
    program = (
        "import sys\n"
        "from splitdet.shared.sigterm import sigterm_as_interrupt\n"
        "class Broken:\n"
        "    def __del__(self):\n"
        "        raise ValueError('a finaliser fault')\n"
        "before = sys.unraisablehook\n"
        "with sigterm_as_interrupt():\n"
        "    Broken()\n"
        "print(sys.unraisablehook is before)\n"
    )
    done = run_program(program)
    assert done.stdout.strip() == "True", done.stderr
    assert "Exception ignored" in done.stderr and "ValueError: a finaliser fault" in done.stderr


def test_a_loop_s_safe_point_raises_a_sigterm_caught_on_the_way():
    """A SIGTERM whose Terminated something caught (an `except Exception` around an import
    that made it an ImportError; C code that dropped it) is raised again by the next
    `raise_if_stopped`; nothing is raised before a SIGTERM, nor outside a context."""
    program = (
        "import os, signal\n"
        "from splitdet.shared.sigterm import Terminated, raise_if_stopped, "
        "sigterm_as_interrupt\n"
        "raise_if_stopped()\n"
        "try:\n"
        "    with sigterm_as_interrupt():\n"
        "        with sigterm_as_interrupt():\n"
        "            raise_if_stopped()\n"
        "            try:\n"
        "                try:\n"
        "                    os.kill(os.getpid(), signal.SIGTERM)\n"
        "                    for _ in range(10**6):\n"
        "                        pass\n"
        "                except BaseException as exc:\n"
        "                    raise ImportError('initialization failed') from exc\n"
        "            except Exception:\n"
        "                print('caught')\n"
        "            raise_if_stopped()\n"
        "            print('went on')\n"
        "except Terminated:\n"
        "    print('terminated')\n"
        "raise_if_stopped()\n"
    )
    done = run_program(program)
    assert done.stdout.split() == ["caught", "terminated"], (done.stdout, done.stderr)
    assert done.returncode == 0, done.stderr


#: A program whose `sigterm_as_interrupt` block ends right after a finaliser swallowed
#: {signal}'s exception, before it is sent again (RESEND_DELAY_S later); it then stays 0.5 s.
ENDS_FIRST = (
    FINALISER
    + """
from splitdet.shared.sigterm import Terminated, sigterm_as_interrupt

def swallowed():
    thing = Collected()
    ref = weakref.ref(thing, finaliser)
    del thing  # the callback runs now

try:
    with sigterm_as_interrupt() as received:
        swallowed()
    print("went on")
except Terminated:
    print("terminated", received)
except KeyboardInterrupt:
    print("interrupted", received)
time.sleep(0.5)  # (a signal sent again after the context would end the process here)
print("alive", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""
)


@pytest.mark.parametrize(
    ("name", "said"),
    [("SIGTERM", ["terminated [15]", "alive True"]), ("SIGINT", ["interrupted []", "alive True"])],
)
def test_a_swallowed_stop_the_block_outran_stops_the_command_as_it_ends(name, said):
    """A stop a finaliser swallowed is sent again 50 ms later; a block that ended within those
    50 ms left the context first, and the signal met the handler that was before it: the
    process died of SIGTERM with no stop line. Now the context cancels the signal it had not
    sent yet and raises the stop itself as it ends."""
    done = run_program(ENDS_FIRST.format(signal=name))
    assert done.stdout.strip().splitlines() == said, (done.stdout, done.stderr)
    assert done.stderr == "", done.stderr
    assert done.returncode == 0


def test_a_sigterm_met_as_the_context_ends_stops_the_command_once_it_has_ended():
    """A SIGTERM met in the context's own `finally` raised Terminated there, cutting it short:
    the handler and the unraisable hook of the finished command stayed in place. Now it is
    raised once the context has ended, with both put back. (The signal is sent from inside
    the `finally`, as it takes the context off the open ones.)"""
    program = (
        "import os, signal, sys\n"
        "from splitdet.shared import sigterm\n"
        "close = sigterm._close\n"
        "def close_on_a_sigterm(received):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    for _ in range(10**5):  # (the handler runs between two bytecodes: here)\n"
        "        pass\n"
        "    return close(received)\n"
        "sigterm._close = close_on_a_sigterm\n"
        "hook = sys.unraisablehook\n"
        "try:\n"
        "    with sigterm.sigterm_as_interrupt() as received:\n"
        "        pass\n"
        "    print('went on')\n"
        "except sigterm.Terminated:\n"
        "    print('terminated', received)\n"
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, sys.unraisablehook is hook)\n"
    )
    done = run_program(program)
    assert done.stdout.strip().splitlines() == ["terminated [15]", "True True"], done.stderr
    assert done.returncode == 0, done.stderr
