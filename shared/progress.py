"""When a command draws progress bars (standard library only: the edge imports it).

A bar redraws its line with carriage returns several times a second: on a terminal that is one
line; in a log file (`make demo > demo.log`, a systemd journal, a CI log) it is a new line each
time. Every command draws its bars only on a terminal, as `train` always did, and never with
`--no-progress`.
"""

from __future__ import annotations

import sys

__all__ = ["progress_off"]


def progress_off(no_progress: bool = False) -> bool:
    """True when no bar is to be drawn: `no_progress` (`--no-progress`) given, or stderr (where
    bars go) not a terminal."""
    stream = sys.stderr
    return no_progress or stream is None or not stream.isatty()
