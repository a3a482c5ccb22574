"""How much of the benchmark's cores other work took while a rate was measured.

The 1-minute load average at the start says whether the machine was busy when the run began;
it cannot tell, later on, the run's own processes (this one, its cloud and JPEG servers) from
anyone else's. Other work that starts mid-run slows the systems unequally (torch in this
process against the servers' threads: up to 4x apart on 2 cores), and a reduction measured
then is not comparable. Linux's counters tell them apart: the busy time of the cores this
process may run on (/proc/stat), less the CPU time of this process and its descendants
(/proc/PID/stat), is other work's.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

#: Clock ticks per second of /proc's CPU times.
_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuSample:
    """The counters at one moment.

    Attributes:
        wall_s: time.monotonic(), seconds.
        busy_ticks: busy time (all but idle and I/O wait) of the cores this process may run
            on, clock ticks.
        ours_ticks: CPU time (user + system) of this process and of every descendant, ticks.
        cores: how many cores `busy_ticks` covers.
    """

    wall_s: float
    busy_ticks: int
    ours_ticks: int
    cores: int


def sample_cpu() -> CpuSample | None:
    """The counters now; None where /proc is not Linux's (or cannot be read)."""
    try:
        cores = os.sched_getaffinity(0)
        busy = _busy_ticks(Path("/proc/stat").read_text(), cores)
        ours = _tree_ticks(os.getpid())
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    return CpuSample(time.monotonic(), busy, ours, len(cores))


def foreign_cores(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """The cores, on average, that processes other than this one and its descendants kept busy
    between the two samples (0.0 on an idle machine, up to ``cores``); None without both
    samples or with no time between them."""
    if before is None or after is None or after.wall_s <= before.wall_s:
        return None
    other = (after.busy_ticks - before.busy_ticks) - (after.ours_ticks - before.ours_ticks)
    held = other / _TICKS_PER_S / (after.wall_s - before.wall_s)
    return min(max(held, 0.0), float(after.cores))


def _busy_ticks(stat: str, cores: set[int]) -> int:
    """Busy ticks (user, nice, system, irq, softirq, steal) of the `cpuN` lines of /proc/stat's
    text `stat` whose N is in `cores`."""
    busy = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cores:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        busy += user + nice + system + irq + softirq + steal
    return busy


def _tree_ticks(root: int) -> int:
    """User + system CPU ticks of process `root` and all its descendants alive now."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:  # (ended meanwhile)
            continue
        rest = text[text.rindex(")") + 2 :].split()  # (after the command, which may hold spaces)
        pid = int(entry.name)
        parents[pid] = int(rest[1])
        ticks[pid] = int(rest[11]) + int(rest[12])
    total = 0
    for pid, own in ticks.items():
        at = pid
        while at > 1 and at != root:
            at = parents.get(at, 0)
        if at == root:
            total += own
    return total
