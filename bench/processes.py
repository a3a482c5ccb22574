"""Child processes the benchmark and the demo start: wait until ready, always stop them.

with ServiceProcess([...cmd...], ready_file=path, name="cloud") as cloud:
    port = cloud.ready["port"]
# stopped here: SIGTERM, then SIGKILL after a grace period; Ctrl-C included

with started(cloud, jpeg):  # several at once: their start-ups (and shut-downs) overlap
    ...

On Linux a service also ends when the process that started it dies without stopping it
(SIGKILL, the OOM killer): it runs through `die_with_parent_command`, which asks the kernel
for a SIGTERM when its parent goes (prctl PR_SET_PDEATHSIG) before it execs the command.

with scratch_folder() as scratch:  # the benchmark's temporary folder, /tmp/splitdet-bench-*
    ...
remove_stale_scratch()  # those of runs killed before they could remove theirs
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from splitdet.shared.parent_death import die_with_parent


class ServiceError(RuntimeError):
    """A child process did not become ready; the message carries the end of its log."""


def splitdet_command(*args: str) -> list[str]:
    """Command line running `splitdet ARGS` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "splitdet.shared.cli", *args]


#: Exit status of a service whose parent was gone before it could ask for that signal.
ORPHANED_STATUS = 75


def die_with_parent_command(command: Sequence[str]) -> list[str]:
    """`command`, run so that it gets SIGTERM when this thread ends (on Linux; elsewhere, and
    from a thread other than the main one, `command` as it is).

    The kernel sends the signal when the *thread* that forked the child ends: from the main
    thread that is when this process dies (SIGKILL and the OOM killer included); a worker
    thread could end first and stop the service mid-run, so there it is not asked for. The
    setting must be made in the child before it execs the command (`exec_dying_with_parent`,
    run as `python -m splitdet.bench.processes PARENT_PID COMMAND...`): a `preexec_fn` would
    run Python in a child forked from our threads, which can deadlock.
    """
    if not sys.platform.startswith("linux"):
        return list(command)
    if threading.current_thread() is not threading.main_thread():
        return list(command)
    return [sys.executable, "-m", "splitdet.bench.processes", str(os.getpid()), *command]


def exec_dying_with_parent(parent: int, command: Sequence[str]) -> NoReturn:
    """Ask the kernel for SIGTERM when our parent thread ends, then exec `command`.

    A parent that died before the request (then our parent is no longer `parent`, whoever
    adopted us) would never send it: exit with `ORPHANED_STATUS` instead of serving forever.
    """
    if not die_with_parent(parent, command[0]):
        print(f"splitdet: the process that started {command[0]} (pid {parent}) is gone; "
              "not starting it", file=sys.stderr)  # fmt: skip
        sys.exit(ORPHANED_STATUS)
    for name in ("SIGPIPE", "SIGXFSZ"):  # as subprocess leaves them for an exec
        if hasattr(signal, name):  # (Python itself ignores SIGPIPE: it would stay ignored)
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    sys.stderr.flush()
    try:
        os.execvp(command[0], list(command))
    except OSError as exc:
        print(f"splitdet: cannot run {command[0]}: {exc}", file=sys.stderr)
        sys.exit(127)


#: A run's temporary folder is named this + random characters, in the system's temporary folder.
SCRATCH_PREFIX = "splitdet-bench-"
#: The file in a run's temporary folder its run holds an flock on while it lives. The kernel
#: drops the lock when the process dies, SIGKILL included, and a recycled pid cannot take it
#: over: a folder whose lock another process can take is a dead run's (`remove_stale_scratch`).
SCRATCH_OWNER = "owner.lock"


@contextlib.contextmanager
def _owner_lock(folder: Path) -> Iterator[None]:
    """Hold `SCRATCH_OWNER` in `folder` for the `with` block. It is locked under a temporary
    name and renamed in: a `SCRATCH_OWNER` is never seen unlocked while its run lives. A file
    system without flock: no lock file (the folder is then never taken for stale)."""
    staged = folder / f".{SCRATCH_OWNER}.tmp"
    with staged.open("wb") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            staged.rename(folder / SCRATCH_OWNER)
        except OSError:
            staged.unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def scratch_folder(root: Path | None = None) -> Iterator[Path]:
    """A temporary folder for the run (the servers' ready file and answers store), removed at
    its end; it holds `SCRATCH_OWNER` so that a later run can remove it if this one is killed
    before it can (`remove_stale_scratch`). `root`: where (default: the system's)."""
    with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=root) as name:
        folder = Path(name)
        with _owner_lock(folder):
            yield folder


def _is_stale(folder: Path) -> bool:
    """Whether `folder` is a dead run's temporary folder: ours (this user's, not a link), and
    its `SCRATCH_OWNER` exists and is locked by nobody."""
    try:
        if folder.is_symlink() or folder.stat().st_uid != os.getuid():
            return False
        with (folder / SCRATCH_OWNER).open("rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (released when closed)
    except OSError:  # missing, another user's, held by a live run, or no flock here
        return False
    return True


def remove_stale_scratch(root: Path | None = None) -> list[Path]:
    """Remove the temporary folders of runs that died without removing them (SIGKILL, the OOM
    killer) from `root` (default: the system's temporary folder); the folders removed. A folder
    of a live run, another user's or one without `SCRATCH_OWNER` (from before it) is kept."""
    root = Path(root or tempfile.gettempdir())
    stale = [f for f in sorted(root.glob(f"{SCRATCH_PREFIX}*")) if _is_stale(f)]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    return stale


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


#: Signals that would end us at once and leave the services serving (a job scheduler's
#: SIGTERM; SIGHUP when the terminal or the SSH session goes away).
UNWINDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _sigterm_unwinds() -> tuple[tuple[signal.Signals, object], ...]:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt in this process, where nothing else
    handles them (`splitdet`'s `main` makes SIGTERM unwind already); the signals so handled
    with their handlers before (to restore when done).

    The services run in their own sessions (so a terminal's Ctrl-C reaches only us, and we stop
    them); a plain SIGTERM (`kill`, a job scheduler) or a closed terminal's SIGHUP would end us
    at once and leave them serving. Unwinding instead runs every `with ServiceProcess` exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return ()
    installed = []
    for signum in UNWINDING_SIGNALS:
        before = signal.getsignal(signum)
        if before == signal.SIG_DFL:  # (under `main`, SIGTERM unwinds already: `Terminated`)
            signal.signal(signum, _interrupt)
            installed.append((signum, before))
    return tuple(installed)


class ServiceProcess:
    """A child process with its output in a log file, ready when it writes `ready_file`
    (JSON) or, without one, when it prints a line starting with `ready_prefix`. `log_header`:
    written at the top of the log, before the process's output. On Linux it ends when the
    thread that launched it does (`die_with_parent_command`)."""

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        name: str,
        ready_file: Path | None = None,
        ready_prefix: str | None = None,
        timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
        log_header: str = "",
    ) -> None:
        self.command = list(command)
        self.log_header = log_header
        self.log_path = Path(log_path)
        self.name = name
        self.ready_file = Path(ready_file) if ready_file else None
        self.ready_prefix = ready_prefix
        self.timeout_s = timeout_s
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self._terminated = False  # SIGTERM sent (`terminate`)
        self.ready: dict = {}
        self._own_signals: tuple[tuple[signal.Signals, object], ...] = ()

    def start(self) -> ServiceProcess:
        """Start and wait until ready; raises ServiceError (and stops it) otherwise."""
        return self.launch().await_ready()

    def launch(self) -> ServiceProcess:
        """Start the process without waiting for it to be ready (`await_ready` does)."""
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed when the process is stopped
        self._log = log
        try:
            log.write(self.log_header.encode())
            log.flush()
            self.process = subprocess.Popen(
                die_with_parent_command(self.command),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, and we stop it
            )
        except BaseException:
            log.close()
            raise
        self._own_signals = _sigterm_unwinds()
        self._terminated = False
        return self

    def await_ready(self) -> ServiceProcess:
        """Wait until the launched process is ready; raises ServiceError (and stops it)
        otherwise."""
        try:
            self._wait_ready()
        except BaseException:  # Ctrl-C while it starts: `with` never entered, so stop it here
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with status {self.process.returncode}:\n{self.tail()}"
                )
            if self._is_ready():
                return
            time.sleep(0.1)
        raise ServiceError(f"{self.name} not ready after {self.timeout_s:.0f} s:\n{self.tail()}")

    def _is_ready(self) -> bool:
        if self.ready_file is not None:
            try:
                self.ready = json.loads(self.ready_file.read_text())
                return True
            except (OSError, ValueError):
                return False
        for line in self.log_path.read_text(errors="replace").splitlines():
            if self.ready_prefix and line.startswith(self.ready_prefix):
                self.ready = {"line": line}
                return True
        return False

    def failed_mid_run(self, error: str) -> ServiceError:
        """The error for a call it failed after it was ready: its state and the end of its log."""
        status = self.process.poll() if self.process else None
        state = "is still running" if status is None else f"exited with status {status}"
        return ServiceError(
            f"the {self.name} failed a call mid-run ({error}); it {state}. "
            f"The end of {self.log_path}:\n{self.tail(10)}"
        )

    def tail(self, lines: int = 20) -> str:
        """The last lines of the process's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self) -> None:
        """SIGTERM to the process group, not waiting for it to end (`stop` waits, and sends no
        second SIGTERM)."""
        process = self.process
        if process is not None and process.poll() is None and not self._terminated:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            self._terminated = True

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to `grace_s`, then SIGKILL the whole process group; exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            try:
                self.terminate()
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            finally:  # grace over, or a second Ctrl-C while waiting: kill what is left
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
        self._log.close()
        for signum, before in self._own_signals:
            signal.signal(signum, before)
        self._own_signals = ()
        return process.returncode

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def started(*services: ServiceProcess) -> Iterator[tuple[ServiceProcess, ...]]:
    """`with started(a, b):` as `with a, b:`, but every process is launched before any is
    waited for, and all are sent SIGTERM before any is waited for at the end: their start-ups
    (each may import torch and load a model: seconds) and shut-downs overlap instead of
    adding up. Each launched one is stopped, in the reverse order, whatever ends the block (a
    start-up that fails, Ctrl-C, a stop that raises); the first one's stop, the last, gives
    back the SIGTERM and SIGHUP handling its launch installed, so a signal meanwhile still
    unwinds into the stops."""
    with contextlib.ExitStack() as stops:
        for service in services:
            service.launch()
            stops.callback(service.stop)
        stops.callback(_terminate_all, services)  # (runs first)
        for service in services:
            service._wait_ready()  # (not await_ready: its stop would restore the signals early)
        yield services


def _terminate_all(services: Sequence[ServiceProcess]) -> None:
    for service in reversed(services):
        service.terminate()


if __name__ == "__main__":  # python -m splitdet.bench.processes PARENT_PID COMMAND...
    exec_dying_with_parent(int(sys.argv[1]), sys.argv[2:])
