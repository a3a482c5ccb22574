"""A child process that ends with the process that started it (Linux; no torch).

`die_with_parent(parent)` asks the kernel for SIGTERM when the parent goes (prctl
PR_SET_PDEATHSIG), then checks the parent is still the one expected: one that died before the
request would never send it. The bench's servers (`splitdet.bench.processes`) and the ranks of
`splitdet train --nproc-per-node` (`splitdet.training.launch`) ask for it, so that a SIGKILLed
parent (the OOM killer, a container's stop of its main process) leaves no process running on.

The kernel sends the signal when the *thread* that forked the child ends, not its process: the
parent must start the child from a thread that lives as long as it (its main thread).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

#: prctl(2)'s option: the signal the kernel sends the caller when its parent thread ends.
_PR_SET_PDEATHSIG = 1
#: The environment variable through which a parent names itself to its children.
PARENT_PID_ENV = "SPLITDET_PARENT_PID"


def die_with_parent(parent: int, what: str) -> bool:
    """Ask for SIGTERM when the parent thread ends (Linux; elsewhere nothing is asked); False
    when `parent` is no longer this process's parent (gone before the request: the caller
    should exit rather than run on alone). `what` names this process in a warning when the
    request itself fails."""
    if not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        error = os.strerror(ctypes.get_errno())
        print(f"splitdet: prctl(PR_SET_PDEATHSIG) failed ({error}); {what} will not end with "
              "its parent", file=sys.stderr)  # fmt: skip
    return os.getppid() == parent
