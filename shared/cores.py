"""The CPU cores this process may run on: the default thread count of every engine splitdet
starts (torch in the cloud and the benchmark, ONNX Runtime on the edge)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container pinned to 2 cores of a
    64-core host has 2, where `os.cpu_count()` says 64 and a thread per core oversubscribes
    the 2 it has), else the machine's count, else 1."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # (not Linux)
        return os.cpu_count() or 1
