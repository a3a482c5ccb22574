"""`training.synth.generate_dataset` called from a Python script (review 4).

1. A script that sets its own SIGTERM handler at module level (a typical "finish the frame,
   then stop" handler) hung in `generate_dataset(workers=2)`: the spawned workers re-import
   ``__main__`` and so installed that handler too; the pool was ended with `Pool.terminate`
   even on success, which relies on SIGTERM ending the workers, and the parent waited for a
   worker that shrugged it off. The same handler kept the workers of a SIGKILLed parent
   alive (the kernel's die-with-parent SIGTERM). Now the workers reset SIGTERM to the
   default and a finished pool is closed and joined.
2. `generate_dataset` drew its tqdm bar into any stderr (a log file, a pipe); now, by
   default, only into a terminal, as `splitdet synth` does.

Real subprocesses running real scripts; no mocks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_synth_review3 import _alive, _workers_of

from splitdet.training.synth import generate_dataset

from support import wait_for

pytestmark = pytest.mark.timeout(120)

#: A script with an application's SIGTERM handler at module level (so its spawned workers
#: install it too: they re-import ``__main__``), which notes each SIGTERM it takes in the
#: file argv[1], then runs `generate_dataset` with two workers as argv[3] asks.
APP_SCRIPT = """
import os, signal, sys
from pathlib import Path

NOTES = Path(sys.argv[1])

def graceful(signum, frame):  # "finish the current frame, then stop"
    with NOTES.open("a") as notes:
        notes.write(f"SIGTERM taken by the app's handler in pid {os.getpid()}\\n")

signal.signal(signal.SIGTERM, graceful)

if __name__ == "__main__":
    from splitdet.training.synth import generate_dataset

    out, mode = Path(sys.argv[2]), sys.argv[3]
    if mode == "small":  # several small runs: each ended its pool with a hang-prone terminate
        for run in range(6):
            generate_dataset(out, size=(256, 256), n_defective=3, n_free=2, n_test_defective=1,
                             n_test_free=0, workers=2, progress=False, overwrite=True)
            print("returned", run, flush=True)
    else:  # a long one, to be SIGKILLed mid-way
        generate_dataset(out, size=(816, 680), n_defective=120, n_free=0, n_test_defective=0,
                         n_test_free=0, workers=2, progress=False)
"""


def _start_app(tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path, Path]:
    """`APP_SCRIPT` in `mode`, in a session of its own: the process, its notes file, its out."""
    script = tmp_path / "app.py"
    script.write_text(APP_SCRIPT)
    notes, out = tmp_path / "sigterm_notes.txt", tmp_path / "data"
    process = subprocess.Popen(
        [sys.executable, str(script), str(notes), str(out), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    return process, notes, out


def _kill(process: subprocess.Popen, workers: list[int]) -> None:
    """End the app and any worker of it still running (the original's hung or orphaned ones)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for pid in workers:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_generate_dataset_returns_under_an_apps_own_sigterm_handler(tmp_path):
    process, notes, out = _start_app(tmp_path, "small")
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        workers = _workers_of(process.pid)
        _kill(process, workers)
        taken = notes.read_text() if notes.exists() else ""
        pytest.fail(f"generate_dataset(workers=2) hung (workers {workers} left); {taken}")
    assert process.returncode == 0, stderr
    assert stdout.count("returned") == 6, (stdout, stderr)
    assert not notes.exists(), notes.read_text()  # no worker was sent SIGTERM on success
    assert (out / "dataset.json").is_file()


def test_workers_end_with_their_sigkilled_parent_under_an_apps_sigterm_handler(tmp_path):
    """The kernel's die-with-parent SIGTERM ends each worker at once, never the app's handler
    (which let it render on to the end of its chunk: with a slower chunk, or a handler that
    never returns, for good)."""
    process, notes, out = _start_app(tmp_path, "slow")
    workers: list[int] = []

    def rendering() -> list[int] | None:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        found = _workers_of(process.pid)
        images = out / "JPEGImages"
        written = images.is_dir() and any(p.suffix == ".jpg" for p in images.iterdir())
        return found if len(found) == 2 and written else None

    try:
        workers = wait_for(rendering, 60, "the app's two render workers and its first image")
        os.kill(process.pid, signal.SIGKILL)  # (the parent alone: the OOM killer's way)
        process.wait()
        wait_for(lambda: not [pid for pid in workers if _alive(pid)], 60, "the workers to end")
    finally:
        _kill(process, workers)
    assert not notes.exists(), notes.read_text()


def test_generate_dataset_draws_no_bar_into_a_file_by_default(tmp_path):
    """stderr a file (not a terminal): no bar by default; ``progress=True`` still draws one."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from splitdet.training.synth import generate_dataset\n"
        "generate_dataset(Path(sys.argv[1]), size=(256, 256), n_defective=2, n_free=1,\n"
        "                 n_test_defective=0, n_test_free=0, workers=1,\n"
        "                 **({} if sys.argv[2] == 'default' else {'progress': True}))\n"
    )
    for mode, expect_bar in (("default", False), ("on", True)):
        err = tmp_path / f"stderr_{mode}.txt"
        with err.open("w") as stream:
            subprocess.run(
                [sys.executable, "-c", code, str(tmp_path / mode), mode],
                stderr=stream,
                check=True,
                timeout=60,
            )
        assert ("synth:" in err.read_text()) is expect_bar, (mode, err.read_text())


def test_generate_dataset_in_process_draws_no_bar_into_pytests_captured_stderr(tmp_path, capsys):
    generate_dataset(tmp_path / "data", size=(256, 256), n_defective=2, n_free=1,
                     n_test_defective=0, n_test_free=0, workers=1)  # fmt: skip
    assert "synth:" not in capsys.readouterr().err
