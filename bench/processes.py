"""Child processes the benchmark and the demo start: wait until ready, always stop them.

with ServiceProcess([...cmd...], ready_file=path, name="cloud") as cloud:
    port = cloud.ready["port"]
# stopped here: SIGTERM, then SIGKILL after a grace period; Ctrl-C included

with started(cloud, jpeg):  # several at once: their start-ups (and shut-downs) overlap
    ...
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType


class ServiceError(RuntimeError):
    """A child process did not become ready; the message carries the end of its log."""


def splitdet_command(*args: str) -> list[str]:
    """Command line running `splitdet ARGS` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "splitdet.shared.cli", *args]


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


#: Signals that would end us at once and leave the services serving (a job scheduler's
#: SIGTERM; SIGHUP when the terminal or the SSH session goes away).
UNWINDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _sigterm_unwinds() -> tuple[signal.Signals, ...]:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt in this process, where nothing else
    handles them; the signals so handled (to restore when done).

    The services run in their own sessions (so a terminal's Ctrl-C reaches only us, and we stop
    them); a plain SIGTERM (`kill`, a job scheduler) or a closed terminal's SIGHUP would end us
    at once and leave them serving. Unwinding instead runs every `with ServiceProcess` exit.
    """
    if threading.current_thread() is not threading.main_thread():
        return ()
    installed = []
    for signum in UNWINDING_SIGNALS:
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _interrupt)
            installed.append(signum)
    return tuple(installed)


class ServiceProcess:
    """A child process with its output in a log file, ready when it writes `ready_file`
    (JSON) or, without one, when it prints a line starting with `ready_prefix`."""

    def __init__(
        self,
        command: Sequence[str],
        log_path: Path,
        name: str,
        ready_file: Path | None = None,
        ready_prefix: str | None = None,
        timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.command = list(command)
        self.log_path = Path(log_path)
        self.name = name
        self.ready_file = Path(ready_file) if ready_file else None
        self.ready_prefix = ready_prefix
        self.timeout_s = timeout_s
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self._terminated = False  # SIGTERM sent (`terminate`)
        self.ready: dict = {}
        self._own_signals: tuple[signal.Signals, ...] = ()

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
            self.process = subprocess.Popen(
                self.command,
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
        for signum in self._own_signals:
            signal.signal(signum, signal.SIG_DFL)
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
