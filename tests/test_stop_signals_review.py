"""Stop signals met where Python swallows the exception their handler raises (a weakref
callback or `__del__` the garbage collector runs: "Exception ignored in ..."). The fix of
1e5999a sends a swallowed Terminated or KeyboardInterrupt again; these are the other handlers
that raise, found by sending commands SIGTERM and SIGINT at random moments. Each case runs in
its own process (a signal to it); the moment is injected, not left to timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support import FINALISER

#: `splitdet edge run --once` whose start-up meets the swallowed signal while it checks
#: --watch, before the daemon is built (`cli_edge_run.run`'s own handler raises there).
EDGE_RUN = (
    FINALISER
    + """
import sys
import splitdet.edge.daemon_config as daemon_config
from splitdet.shared.cli import main

checked = daemon_config.folder_problem

def folder_problem(*args, **kwargs):
    swallowed_then_wait()
    return checked(*args, **kwargs)

daemon_config.folder_problem = folder_problem
sys.exit(main(sys.argv[1:]))
"""
)


def test_edge_run_stopped_at_start_up_inside_a_finaliser_still_stops(tmp_path: Path):
    """`edge run`'s start-up handler raises StoppedBeforeStart (not a KeyboardInterrupt): one
    a finaliser swallowed was lost, with a traceback, and the start-up went on as if never
    stopped (here: to the missing export's error, exit 2). Now it is sent again: the start-up
    ends with the `stopped` line, nothing taken, exit 1 (--once), no traceback."""
    watch = tmp_path / "hot"
    watch.mkdir()
    argv = ["edge", "run", "--model", str(tmp_path / "no-model"), "--watch", str(watch),
            "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9", "--once",
            "--drain-timeout", "0", "--log-format", "text"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", EDGE_RUN.format(signal="SIGTERM"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Exception ignored" not in done.stderr, done.stderr
    assert "stopped by SIGTERM before the daemon started" in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr


#: `splitdet edge run` whose import of ONNX Runtime meets SIGNAL inside its extension module's
#: initialisation, which turns the exception raised there into ImportError("initialization
#: failed") with it as the cause, as pybind11's modules do (onnxruntime's, here stood in for).
EXTENSION_INIT = """
import importlib.abc, importlib.util, os, signal, sys

class Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        try:
            os.kill(os.getpid(), signal.{signal})
            for _ in range(10**6):  # (the handler runs between two bytecodes: here)
                pass
        except BaseException as exc:
            raise ImportError("initialization failed") from exc

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "{module}":
            sys.meta_path.remove(self)  # (once: a later import is the real module's)
            return importlib.util.spec_from_loader(name, Loader())
        return None

sys.meta_path.insert(0, Finder())
from splitdet.shared.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("name", "status", "line"),
    [
        ("SIGTERM", 143, "splitdet edge: stopped on SIGTERM"),
        ("SIGINT", 130, "splitdet edge: interrupted"),
    ],
)
def test_a_stop_inside_an_extension_modules_start_stops_the_command(tmp_path, name, status, line):
    """A stop signal met while an extension module initialises came out as that module's
    ImportError: `edge run` stopped while it imported ONNX Runtime said "error: ImportError:
    initialization failed" (exit 1; a traceback under text logs). Now it is the stop it was:
    its one line and exit status."""
    argv = ["edge", "run", "--model", str(tmp_path / "model"), "--watch", str(tmp_path),
            "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9",
            "--log-format", "text"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", EXTENSION_INIT.format(signal=name, module="onnxruntime"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr.strip().splitlines()[-1:] == [line], done.stderr
    assert "Traceback" not in done.stderr and "ImportError" not in done.stderr, done.stderr
    assert done.returncode == status


#: `splitdet eval` (a torch command) sent SIGNAL as numpy's linear algebra starts to import:
#: the first import of numpy, which torch's C extension made as it initialised.
NUMPY_IMPORT = """
import importlib.abc, os, signal, sys

class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "numpy.linalg":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{signal})
            for _ in range(10**6):  # (the handler runs between two bytecodes: here)
                pass
        return None

sys.meta_path.insert(0, Finder())
from splitdet.shared.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_while_numpy_imports_stops_a_torch_command(tmp_path):
    """torch imports numpy from its C extension's initialisation and drops what that raises:
    a SIGTERM met there was lost (and every later one ignored as "already unwinding"), numpy
    left half-imported; an `eval` went on and ended in RecursionError (exit 1). numpy is now
    imported first, from Python: the command stops with its line, exit 143."""
    done = _eval_sent_sigterm(NUMPY_IMPORT, tmp_path)
    assert done.stderr.strip().splitlines()[-1:] == ["splitdet eval: stopped on SIGTERM"], (
        done.stderr
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 143


def _eval_sent_sigterm(program: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`splitdet eval` (of files that do not exist) run by `program`, which sends it SIGTERM."""
    argv = ["eval", "--data", str(tmp_path / "data"), "--checkpoint", str(tmp_path / "a.pt")]
    return subprocess.run(
        [sys.executable, "-c", program.format(signal="SIGTERM"), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )


#: `splitdet eval` sent SIGTERM late in its import of torch (torch.fx's passes, imported
#: after torch registered its exit hook that logs FakeTensor cache statistics at INFO).
TORCH_IMPORT = NUMPY_IMPORT.replace('"numpy.linalg"', '"torch.fx.passes.graph_manipulation"')


def test_a_sigterm_while_torch_imports_leaves_the_stop_line_last(tmp_path):
    """A stop that cut torch's import short left torch's loggers at the root's INFO (torch
    sets them to WARNING as its import ends), and torch's exit hook logged three "FakeTensor
    cache stats" lines after `stopped on SIGTERM`: no longer the last line, as documented."""
    done = _eval_sent_sigterm(TORCH_IMPORT, tmp_path)
    assert done.stderr.strip().splitlines() == ["splitdet eval: stopped on SIGTERM"], done.stderr
    assert done.returncode == 143


#: The `train --nproc-per-node` launcher's case: torchrun's own SIGTERM handler (it raises
#: SignalException, an Exception carrying `sigval`) met inside a finaliser.
LAUNCHER = (
    FINALISER
    + """
from torch.distributed.elastic.multiprocessing.api import (
    SignalException, _terminate_process_handler)
from splitdet.shared.sigterm import sigterm_as_interrupt

with sigterm_as_interrupt():
    signal.signal(signal.SIGTERM, _terminate_process_handler)  # (as torchrun's agent does)
    try:
        swallowed_then_wait()
        print("went on")
    except SignalException as exc:
        print("stopped", exc.sigval.name)
"""
)


def test_the_launchers_sigterm_inside_a_finaliser_still_stops_the_run():
    """torchrun's handler raises SignalException, which is no KeyboardInterrupt: one a
    finaliser swallowed was lost (the launcher went on waiting for its ranks, which trained
    on). It carries its signal (`sigval`): it is sent again, and the launcher stops."""
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER.format(signal="SIGTERM")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "stopped SIGTERM", (done.stdout, done.stderr)
    assert "Exception ignored" not in done.stderr, done.stderr


def test_a_sigterm_while_matplotlib_loads_stops_training(tmp_path):
    """A run draws its learning curve after its first epoch, importing matplotlib then: a
    SIGTERM met in an extension's initialisation there came out as ImportError, which the
    plot's `except Exception` logged ("learning_curve.png not redrawn: initialization
    failed"); the run trained on and ignored every later SIGTERM. Now matplotlib is imported
    with the stop held (`sigterm.stops_held`): the run stops once the import is done, not
    inside it. (This stand-in for matplotlib is empty: the redraw as the run ends then fails
    on it, "not redrawn: ... no attribute 'use'", where matplotlib's own would draw.)"""
    from support import make_tiny_voc, train_argv

    data = make_tiny_voc(tmp_path / "voc", n_defective=2, n_free=1)
    run = tmp_path / "run"
    argv = train_argv(data, run, "--epochs", "3")
    done = subprocess.run(
        [sys.executable, "-c", EXTENSION_INIT.format(signal="SIGTERM", module="matplotlib"),
         *argv],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert "initialization failed" not in done.stderr, done.stderr  # (the import was whole)
    assert (
        done.stderr.strip().splitlines()[-1].startswith("splitdet train: stopped on SIGTERM; ")
    ), done.stderr
    assert done.returncode == 143, done.stderr
    assert (run / "last.pt").is_file()  # (epoch 0's, kept)


#: `splitdet ARGV` whose SIGTERM handler, once set, gets a SIGTERM before `signal.signal`
#: returns (a container's stop met as `main` begins).
AS_THE_HANDLER_IS_SET = """
import os, signal, sys

real = signal.signal

def signal_then_sigterm(signum, handler):
    previous = real(signum, handler)
    if signum == signal.SIGTERM and callable(handler):
        signal.signal = real
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**5):  # (the handler runs between two bytecodes: here)
            pass
    return previous

signal.signal = signal_then_sigterm
from splitdet.shared.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_sigterm_as_main_sets_its_handler_is_one_line(tmp_path):
    """The handler raised Terminated before `signal.signal` had returned, outside the `try`
    that stops a command: a traceback, exit 1 (a CI run of the PID-1 container test sent its
    SIGTERM the moment the handler showed in /proc). Now: the stop line, exit 143."""
    done = subprocess.run(
        [sys.executable, "-c", AS_THE_HANDLER_IS_SET, "data", "check", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr.strip() == "splitdet: stopped on SIGTERM", done.stderr
    assert done.returncode == 143


def test_a_training_rank_imports_numpy_before_torch(tmp_path):
    """A rank of `train --nproc-per-node` (or torchrun) starts at `cli_train.main`, not at
    `splitdet`'s: torch imported numpy there, from its C extension, which drops a SIGTERM met
    in that import (see the test above). The rank readies torch's import as `main` does."""
    program = (
        "import sys\n"
        "order = []\n"
        "def on_audit(event, args):\n"
        "    if event == 'import' and args[0] in ('numpy', 'torch'):\n"
        "        order.append(args[0])\n"
        "sys.addaudithook(on_audit)\n"
        "from splitdet.training.cli_train import main\n"
        f"status = main(['--data', {str(tmp_path / 'none')!r}, '--out', "
        f"{str(tmp_path / 'run')!r}])\n"
        "print(status, *order)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.stdout.split() == ["2", "numpy", "torch"], (done.stdout, done.stderr)
    assert "split file not found" in done.stderr  # (torch imported before the data is read)
