"""The benchmark's child services end with it, also when it is ended by SIGTERM."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PARENT = textwrap.dedent(
    """
    import sys, time
    from splitdet.bench.processes import ServiceProcess

    sleeper = [sys.executable, "-c", "import time; print('READY', flush=True); time.sleep(600)"]
    with ServiceProcess(sleeper, log_path=sys.argv[1], name="sleeper", ready_prefix="READY") as s:
        print(s.process.pid, flush=True)
        time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    """Whether `pid` runs: a zombie (dead, not yet reaped: under an init that never reaps, a
    container without --init) does not."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return False
    return fields[0] not in ("Z", "X")


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_parent_stopped_or_killed_takes_its_services_with_it(tmp_path, stop):
    """SIGTERM unwinds the parent's `with`; SIGKILL (the OOM killer) runs no exit at all: its
    services ran on forever, until each asked the kernel for SIGTERM at its parent's death."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "sleeper.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    child = None
    try:
        line = parent.stdout.readline()
        assert line.strip().isdigit(), parent.stderr.read()
        child = int(line)
        assert _alive(child)
        parent.send_signal(stop)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 15
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the service outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def _sleeper(tmp_path, name: str, ignore_sigterm: bool = False):
    """A ServiceProcess that prints READY and sleeps (deaf to SIGTERM if asked)."""
    from splitdet.bench.processes import ServiceProcess

    deaf = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " * ignore_sigterm
    code = f"{deaf}import time; print('READY', flush=True); time.sleep(600)"
    return ServiceProcess([sys.executable, "-c", code], log_path=tmp_path / f"{name}.log",
                          name=name, ready_prefix="READY")  # fmt: skip


def test_started_stops_every_service_when_one_stop_raises(tmp_path, monkeypatch):
    """`started(cloud, jpeg)`: a second Ctrl-C while the last-started one stops (its stop
    raises) must not leave the first running."""
    from splitdet.bench.processes import started

    first, second = _sleeper(tmp_path, "first", ignore_sigterm=True), _sleeper(tmp_path, "second")
    first.stop = functools.partial(first.stop, grace_s=0.5)  # deaf to SIGTERM: killed after it
    real_stop = second.stop

    def interrupted_stop(grace_s: float = 10.0):
        real_stop(grace_s)
        raise KeyboardInterrupt

    monkeypatch.setattr(second, "stop", interrupted_stop)
    try:
        with pytest.raises(KeyboardInterrupt), started(first, second):
            pids = [first.process.pid, second.process.pid]
        assert first.process.poll() is not None and second.process.poll() is not None
        assert not any(_alive(pid) for pid in pids)
    finally:
        for service in (first, second):
            if service.process is not None and service.process.poll() is None:
                service.process.kill()


def test_started_keeps_sigterm_unwinding_until_every_service_is_stopped(tmp_path):
    """The first service's launch makes SIGTERM unwind; a failed start of it must not give
    SIGTERM back its default (ending the bench at once) while the second is still stopped."""
    from splitdet.bench.processes import ServiceError, started

    failing = _sleeper(tmp_path, "failing")
    failing.command = [sys.executable, "-c", "raise SystemExit(3)"]
    second = _sleeper(tmp_path, "second")
    seen = []
    real_stop = second.stop

    def stop(grace_s: float = 10.0):
        seen.append(signal.getsignal(signal.SIGTERM))
        return real_stop(grace_s)

    second.stop = stop
    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in `splitdet bench`
    try:
        with (
            pytest.raises(ServiceError, match="failing exited with status 3"),
            started(failing, second),
        ):
            pass
        assert seen and seen[0] not in (signal.SIG_DFL, None), seen
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back once all stopped
        assert second.process.poll() is not None
    finally:
        signal.signal(signal.SIGTERM, before)
