"""A stop signal met while matplotlib's C extensions initialise waits until they have loaded.

A SIGTERM (or Ctrl-C) met as matplotlib's ft2font built its enums left that extension half
initialised: the stopped `splitdet train` printed its stop line, then the interpreter aborted
at exit ("Fatal Python error: PyThreadState_Get", exit status 134 where 143 was due: a
fresh-clone CI run of `test_demo`'s SIGTERM test failed so). `shared.agg_pyplot` imports
pyplot with the stop signals held (`sigterm.stops_held`). The signal is sent at that moment,
not at a time: a profile hook sends it from the first Python call ft2font's initialisation
makes. Each case runs in its own process (a signal to it, matplotlib not yet imported)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

#: A program that plots a learning curve in a `sigterm_as_interrupt` context, sending itself
#: {signal} from inside matplotlib.ft2font's initialisation; it says where the signal was
#: sent and how the plot ended, and exits 143 (130 for SIGINT) if stopped.
PROGRAM = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path

    from splitdet.shared.sigterm import sigterm_as_interrupt
    from splitdet.training.epoch_records import plot_learning_curve

    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a test run in the background)
    state = {{"importing": False, "sent": None}}

    def on_audit(event, args):
        if event == "import" and args[0] == "matplotlib.ft2font":
            state["importing"] = True

    def on_call(frame, event, _arg):
        code = frame.f_code.co_filename
        if state["importing"] and state["sent"] is None and event == "call" and (
            code.endswith("enum.py")
        ):  # (ft2font's initialisation builds its enums through Python's enum module)
            state["sent"] = Path(code).name
            os.kill(os.getpid(), signal.{signal})

    sys.addaudithook(on_audit)
    sys.setprofile(on_call)
    history = [{{"epoch": 0, "loss": 1.0, "val_map50": 0.1, "val_map": 0.05}}]
    try:
        with sigterm_as_interrupt():
            plot_learning_curve(history, Path({out!r}))
        print("plotted", file=sys.stderr)
        status = 0
    except KeyboardInterrupt as stop:
        print("stopped by", type(stop).__name__, file=sys.stderr)
        status = 128 + signal.{signal}
    sys.setprofile(None)
    print("signal sent from", state["sent"], file=sys.stderr)
    sys.exit(status)
    """
)


@pytest.mark.parametrize(
    ("name", "stop"), [("SIGTERM", "Terminated"), ("SIGINT", "KeyboardInterrupt")]
)
def test_a_stop_in_matplotlib_s_extension_initialisation_stops_the_plot_and_exits_cleanly(
    tmp_path, name, stop
):
    out = tmp_path / "learning_curve.png"
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM.format(signal=name, out=str(out))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    # the moment was met (if ft2font stops building its enums so, this test says it)
    assert lines[-1] == "signal sent from enum.py", done.stderr
    assert "Fatal Python error" not in done.stderr, done.stderr
    assert lines[:-1] == [f"stopped by {stop}"], done.stderr  # (not "initialization failed")
    assert done.returncode == 128 + getattr(signal, name), done.stderr
    assert not out.exists()  # stopped after the import, before any drawing


#: A program that sends itself {signal} inside `stops_held`, then says what the block saw.
HELD = textwrap.dedent(
    """
    import os, signal, sys
    from splitdet.shared.sigterm import Terminated, sigterm_as_interrupt, stops_held

    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sigterm_as_interrupt() as received:
            before = {{s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}}
            with stops_held():
                os.kill(os.getpid(), signal.{signal})
                for _ in range(10000):  # (eval-loop checks, where a handler would raise)
                    pass
                print("block finished", received)
                {raise_in_block}
            print("went on")
    except KeyboardInterrupt as stop:
        print("stopped by", type(stop).__name__, "context", type(stop.__context__).__name__)
    after = {{s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}}
    print("handlers put back", after[signal.SIGINT] is before[signal.SIGINT])
    """
)


@pytest.mark.parametrize(
    ("name", "raise_in_block", "said"),
    [
        ("SIGTERM", "", ["block finished []", "stopped by Terminated context NoneType"]),
        ("SIGINT", "", ["block finished []", "stopped by KeyboardInterrupt context NoneType"]),
        # the block's own error: the stop is raised over it, with it as its context
        ("SIGTERM", "raise ValueError('x')", ["block finished []",
                                              "stopped by Terminated context ValueError"]),
    ],
)  # fmt: skip
def test_stops_held_raises_the_held_stop_as_the_block_ends(name, raise_in_block, said):
    done = subprocess.run(
        [sys.executable, "-c", HELD.format(signal=name, raise_in_block=raise_in_block)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip().splitlines() == [*said, "handlers put back True"], done.stderr
    assert done.returncode == 0, done.stderr


def test_stops_held_leaves_a_default_action_alone():
    """Outside a command's context SIGTERM's action is the default (the process ends): held
    there, it would be a SIGTERM lost, so it is not held."""
    program = (
        "import os, signal, time\n"
        "from splitdet.shared.sigterm import stops_held\n"
        "with stops_held():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "print('went on')\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == -signal.SIGTERM, (done.stdout, done.stderr)
    assert done.stdout == ""
