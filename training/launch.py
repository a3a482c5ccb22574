"""`splitdet train --nproc-per-node N`: one run in N processes on this machine (DDP).

    splitdet train --data data/gaskets --out runs/p --preset paper --nproc-per-node 2

The processes are started by torchrun's own launcher (`torch.distributed.run`), called in this
process, so that the one `splitdet` command trains on several GPUs (nccl; on a CPU, gloo), and a
run stopped by SIGTERM or Ctrl-C ends with one line (what last.pt holds, how to resume) and the
exit status of the signal, not with the launcher's traceback. This process says that line, not
the ranks: it alone knows whether the SIGTERM every rank gets came from the user or from its
stopping the others after one rank ended (`train_processes`). Every rank runs
`python -m splitdet.training.cli_train` with the same options.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from splitdet.shared.parent_death import PARENT_PID_ENV

#: The module each rank runs (its `main` parses the same options as `splitdet train`).
RANK_MODULE = "splitdet.training.cli_train"
#: The environment variable that gives the ranks the launcher's log level.
LOG_LEVEL_ENV = "SPLITDET_LOG_LEVEL"


#: `train_processes`' way of saying how a run stopped: `(how, since)` -> the line (what the
#: run kept, the `--resume` command) or None; `how` as "stopped on SIGTERM"; `since` (unix s):
#: give None unless the run folder holds a checkpoint written at or after it (0: any), so that
#: the line never points at a last.pt that is not this run's to resume; None: always a line.
StopLine = Callable[[str, "float | None"], "str | None"]


def train_processes(
    train_argv: Sequence[str], nproc: int, stop_line: StopLine | None = None
) -> int:
    """Run `splitdet train` with the options `train_argv` (as typed, `--nproc-per-node`
    included: a rank started by torchrun does not start more) in `nproc` local processes.

    Each process gets cores // nproc torch threads unless OMP_NUM_THREADS says otherwise, and
    ends with this one (PARENT_PID_ENV: `cli_train.main` asks for SIGTERM when it dies, so that
    a SIGKILLed launcher leaves no rank training on).

    The ranks print no line of how the run stopped (PARENT_PID_ENV tells them): every rank
    gets the launcher's SIGTERM whether the user stopped the run or a rank's end made the
    launcher stop the others, and only this process knows which. It prints `stop_line`'s:
    "stopped on SIGTERM" (or "interrupted", Ctrl-C) when a signal stopped it; when a rank was
    killed by a signal, "another process of this run ended" and the line naming it; when a
    rank ended with an error it said itself, a line pointing at it, only when this launch
    wrote a checkpoint (a run refused at its start, its --out held by another run, has a
    last.pt that is not its to resume: the error stays the last line).

    Returns the exit status: 0 when every rank trained; the first failed rank's own status
    (2: a problem it named on stderr); 128 + N when signal N stopped the launcher or a rank.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    started = time.time()  # (a checkpoint older than this is not this launch's)
    threads = str(max(1, (os.cpu_count() or 1) // nproc))
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    with (
        # the launcher's folder for its ranks' error files (it would leave a torchelastic_*
        # folder in the temporary directory after every run)
        tempfile.TemporaryDirectory(prefix="splitdet-train-ranks-") as log_dir,
        _environment(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", threads)),
        _environment(**{LOG_LEVEL_ENV: level, PARENT_PID_ENV: str(os.getpid())}),
        _quiet_launcher(),
        _signal_handlers_kept(),
    ):
        launch_args = torchrun.parse_args(
            ["--standalone", f"--nproc-per-node={nproc}", f"--log-dir={log_dir}",
             "-m", RANK_MODULE, *train_argv]
        )  # fmt: skip
        try:
            torchrun.run(launch_args)
        except SignalException as exc:  # the ranks got it too, and stopped
            _say(stop_line, _signal_stop(int(exc.sigval)), since=None)
            return 128 + int(exc.sigval)
        except ChildFailedError as exc:
            rank, failure = first_cause(exc.failures)
            return _failed(stop_line, rank, failure.pid, failure.exitcode, started)
    return 0


def first_cause(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """(rank, failure) of the failure that ended the run, of torchrun's `ProcessFailure`s by
    global rank in the order torchrun recorded them: a rank that stopped only because
    another's process ended (PEER_LOST_STATUS) last, then the earliest, then the first
    recorded. torchrun records the ranks it stops (SIGTERM) after the failure that made it
    stop them, with timestamps in whole seconds when no error file was written; its own
    `get_first_failure` goes by the timestamp alone, so rank 1 killed and rank 0 ending on the
    closed connection in the same second could give "rank 0 ended with the error above", with
    no error above and the rank killed never named."""
    from splitdet.training.cli_train import PEER_LOST_STATUS

    # (min keeps the first of equal keys: ties go to the first recorded)
    return min(
        failures.items(),
        key=lambda item: (item[1].exitcode == PEER_LOST_STATUS, item[1].timestamp),
    )


def _signal_stop(signum: int) -> str:
    """How a run stopped by signal `signum` says it: "stopped on SIGTERM", "interrupted"."""
    import signal

    if signum == signal.SIGINT:
        return "interrupted"
    try:
        return f"stopped on {signal.Signals(signum).name}"
    except ValueError:
        return f"stopped on signal {signum}"


def _failed(stop_line: StopLine | None, rank: int, pid: int, exitcode: int, started: float) -> int:
    """Say how the run ended when rank `rank` (pid `pid`) failed first with `exitcode` (as
    `subprocess`'s: -N for signal N), the others stopped by the launcher (`started`: unix s
    this launch began); its exit status."""
    import signal

    if exitcode in (128 + signal.SIGINT, 128 + signal.SIGTERM):  # a signal sent to the rank
        _say(stop_line, _signal_stop(exitcode - 128), since=None)
        return exitcode
    if exitcode >= 0:  # the rank printed its own error
        _say(stop_line, f"stopped: rank {rank} ended with the error above", since=started)
        return exitcode
    signum = -exitcode
    _say(stop_line, "stopped: another process of this run ended", since=0.0)
    print(
        f"splitdet train: rank {rank} (pid {pid}) was killed by signal {signum}; the others "
        "were stopped",
        file=sys.stderr,
    )
    return 128 + signum


def _say(stop_line: StopLine | None, how: str, *, since: float | None) -> None:
    """Print `stop_line`'s line for `how`, if it gives one."""
    line = stop_line(how, since) if stop_line is not None else None
    if line:
        print(line, file=sys.stderr)


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """`os.environ` with `values` set while inside (the ranks inherit it), as before after."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _signal_handlers_kept() -> Iterator[None]:
    """The handlers of the signals the launcher takes over (TORCHELASTIC_SIGNALS_TO_HANDLE's
    default), as they were before, after: it leaves its own set (`splitdet demo` and the tests
    run commands in-process)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # (it sets none there)
        yield
        return
    taken = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    before = {signum: signal.getsignal(signum) for signum in taken}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """The launcher's own log (its rendezvous, "Received 15 death signal", a failed rank's
    exit code) silent while inside: the ranks say what happened, `train_processes` how it ended.
    Each of its modules' loggers has its own level (torch sets them from LOGLEVEL)."""
    loggers = [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.distributed")
    ]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)
