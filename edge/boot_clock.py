"""Time since boot, which no setting of the wall clock moves (torch-free, Linux).

    boot = boot_clock()           # BootClock("e99fb216-...", 2088.76) or None off Linux
    boot.boot_id, boot.seconds    # this boot's id, seconds since it (suspend included)

The results store stamps each final result with it beside its wall-clock time, so that a prune
can tell a result that is old from one whose wall-clock stamp is old because the clock was
behind when it was written: an edge without a real-time-clock battery boots with a stale time
until NTP steps it forward, and a `--keep-results` prune then would delete minutes-old results
as months old. Within one boot, `seconds` differences are true elapsed time.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

#: Linux's random id of the running boot: differs after every reboot.
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class BootClock:
    """This boot's id and the seconds since it began (CLOCK_BOOTTIME)."""

    boot_id: str
    seconds: float


def boot_clock() -> BootClock | None:
    """Now on the boot clock, or None where the system has none (not Linux)."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    boot = boot_id()
    if clock is None or boot is None:
        return None
    return BootClock(boot, time.clock_gettime(clock))


@functools.cache
def boot_id() -> str | None:
    """This boot's id (a new one at every boot), or None when it cannot be read; read once: a
    process never outlives its boot (every final result asks for it, on the daemon's path
    from image to result, and a ready file records it: `shared.cli.process_identity`)."""
    try:
        return BOOT_ID_FILE.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None
