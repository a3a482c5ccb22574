"""Every WARNING and ERROR event the edge, the cloud and the other commands log is named in a
README: a monitoring engineer builds log alerts from the documents, and a reviewer found six
such events named nowhere (and one WARNING without an event at all). The code is read as text:
each `"event": "NAME"` field and each `log_event(logging.LEVEL, "NAME")`, its level from the
logging call nearest to it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge", "cloud", "shared", "training", "bench")
READMES = ("README.md", "edge/README.md", "cloud/README.md", "training/README.md",
           "bench/README.md")  # fmt: skip
#: A logging call and its level: log.warning(...), log_event(logging.ERROR, ...).
CALL = re.compile(
    r"\blog\.(debug|info|warning|error|exception)\(|logging\.(DEBUG|INFO|WARNING|ERROR)\b"
)
EVENT = re.compile(r'"event": "([^"]+)"|log_event\(\s*logging\.\w+,\s*"([^"]+)"')
#: Lines looked at before and after an event's name for its logging call.
BEFORE, AFTER = 12, 3


def logged_events() -> dict[str, set[str]]:
    """{event name: the levels it is logged at} over every module of the packages."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            lines = path.read_text().splitlines()
            for number, line in enumerate(lines):
                for match in EVENT.finditer(line):
                    name = match.group(1) or match.group(2)
                    found.setdefault(name, set()).add(_level(lines, number))
    return found


def _level(lines: list[str], number: int) -> str:
    """The level of the logging call nearest line `number` (the same line first, then a line
    before, then after), "UNKNOWN" when none is near."""
    order = [number]
    for step in range(1, BEFORE + 1):
        order.append(number - step)
        if step <= AFTER:
            order.append(number + step)
    for index in order:
        if 0 <= index < len(lines) and (call := CALL.search(lines[index])):
            level = (call.group(1) or call.group(2)).upper()
            return "ERROR" if level == "EXCEPTION" else level
    return "UNKNOWN"


def test_every_warning_and_error_event_is_named_in_a_readme():
    documents = "\n".join((ROOT / name).read_text() for name in READMES)
    events = logged_events()
    assert len(events) > 50  # (the scan found them: not vacuous)
    loud = {name for name, levels in events.items() if levels & {"WARNING", "ERROR"}}
    assert {"dead_letter", "calls_cut", "stop_incomplete", "file_read_shortage"} <= loud
    missing = sorted(name for name in loud if f"`{name}`" not in documents)
    assert not missing, f"no README names these WARNING/ERROR events: {missing}"
