"""`splitdet train --nproc-per-node N`: one run in N processes on this machine (DDP).

    splitdet train --data data/gaskets --out runs/p --preset paper --nproc-per-node 2

The processes are started by torchrun's own launcher (`torch.distributed.run`), called in this
process, so that the one `splitdet` command trains on several GPUs (nccl; on a CPU, gloo), and a
run stopped by SIGTERM or Ctrl-C ends with the ranks' own line (what last.pt holds, how to
resume) and the exit status of the signal, not with the launcher's traceback. Every rank runs
`python -m splitdet.training.cli_train` with the same options.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence

from splitdet.shared.parent_death import PARENT_PID_ENV

#: The module each rank runs (its `main` parses the same options as `splitdet train`).
RANK_MODULE = "splitdet.training.cli_train"
#: The environment variable that gives the ranks the launcher's log level.
LOG_LEVEL_ENV = "SPLITDET_LOG_LEVEL"


def train_processes(train_argv: Sequence[str], nproc: int) -> int:
    """Run `splitdet train` with the options `train_argv` (as typed, `--nproc-per-node`
    included: a rank started by torchrun does not start more) in `nproc` local processes.

    Each process gets cores // nproc torch threads unless OMP_NUM_THREADS says otherwise, and
    ends with this one (PARENT_PID_ENV: `cli_train.main` asks for SIGTERM when it dies, so that
    a SIGKILLed launcher leaves no rank training on).
    Returns the exit status: 0 when every rank trained; the first failed rank's own status
    (2: a problem it named on stderr); 128 + N when signal N stopped the launcher or a rank.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

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
        except SignalException as exc:  # the ranks got it too and said what they kept
            return 128 + int(exc.sigval)
        except ChildFailedError as exc:
            rank, failure = exc.get_first_failure()
            if failure.exitcode >= 0:  # the rank printed its own error
                return failure.exitcode
            signum = -failure.exitcode
            print(
                f"splitdet train: rank {rank} (pid {failure.pid}) was killed by signal "
                f"{signum}; the others were stopped",
                file=sys.stderr,
            )
            return 128 + signum
    return 0


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
