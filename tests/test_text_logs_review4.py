"""A log-parser review of `--log-format text`: a key=value parser got a different key set
depending on a message's wording. `event=` was left out whenever the message showed the event
name (every edge-daemon event: the message of `log_event` is its name), numbers whenever the
message showed them (the cloud's `serving` line lost port and threads); the time was local
without an offset. Now `event` and non-string fields are always written, each key once, and
the time is UTC as in JSON lines (``2026-12-06T19:56:15.449Z``).

Real formatters and handlers; the edge daemon's `log_event`; a fresh interpreter under another
time zone."""

from __future__ import annotations

import calendar
import io
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from splitdet.edge.daemon_log import log as edge_log
from splitdet.edge.daemon_log import log_event
from splitdet.shared.logs import JsonLogFormatter, TextLogFormatter

#: "2026-12-06T19:56:15.449Z": UTC to the millisecond, as a JSON line's `ts`.
UTC_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def edge_text() -> Iterator[io.StringIO]:
    """The edge daemon's logger writing text lines into the stream yielded."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextLogFormatter())
    edge_log.addHandler(handler)
    edge_log.setLevel(logging.INFO)
    yield stream
    edge_log.removeHandler(handler)
    edge_log.setLevel(logging.NOTSET)


def _keys(line: str) -> list[str]:
    """The keys of a text line's key=value fields, in order."""
    return re.findall(r" ([a-z_]+)=", line)


def test_an_edge_daemon_event_shows_its_name_as_event(edge_text):
    """log_event's message is its event name: `started`, `classified`, `outbox_full`... had
    no `event=` in text lines."""
    log_event(logging.WARNING, "outbox_full", depth=100, max_items=100, path="/hot/a.png")
    log_event(logging.INFO, "stopped", processed=2, outbox_depth=1, dead_letters=0)
    full, stopped = edge_text.getvalue().splitlines()
    assert full.endswith(": outbox_full event=outbox_full depth=100 max_items=100 path=/hot/a.png")
    assert stopped.endswith(": stopped event=stopped processed=2 outbox_depth=1 dead_letters=0")


def _record(message: str, *args: object, **fields: object) -> logging.LogRecord:
    record = logging.LogRecord("splitdet.cloud.server", logging.INFO, __file__, 1, message, args,
                               None)  # fmt: skip
    record.fields = fields
    return record


def test_the_key_set_does_not_depend_on_the_wording():
    """The cloud's `serving` line: its message shows the port, the threads and the security,
    so a parser lost `event`, `port` and `threads`. `event` and every number are keys now
    whatever the message says; a string it shows whole (here the security) is not repeated,
    and no key comes twice."""
    fields = {"event": "serving", "port": 53390, "security": "plaintext", "threads": 2,
              "metrics_port": None}  # fmt: skip
    said = _record("serving on port %d (%s, %d torch threads)", 53390, "plaintext", 2, **fields)
    quiet = _record("serving", **fields)
    said_line = TextLogFormatter().format(said)
    assert said_line.endswith(
        "serving on port 53390 (plaintext, 2 torch threads) event=serving port=53390 "
        "threads=2 metrics_port=null"
    ), said_line
    quiet_keys = _keys(TextLogFormatter().format(quiet))
    assert quiet_keys == ["event", "port", "security", "threads", "metrics_port"]
    assert _keys(said_line) == [key for key in quiet_keys if key != "security"]


def test_the_text_time_is_utc_as_the_json_ts():
    """Under TZ=America/New_York the text time was local (5 hours off UTC) with no offset."""
    record = _record("stopped", event="stopped")
    record.created, record.msecs = 1796586975.449, 449.0  # 2026-12-06 19:56:15.449 UTC
    stamp = TextLogFormatter().format(record).split(" ")[0]
    assert stamp == "2026-12-06T19:56:15.449Z"
    assert stamp == JsonLogFormatter().format(record).split('"')[3]  # {"ts": "..."


def test_under_another_time_zone_the_text_time_is_still_utc():
    """A fresh interpreter with TZ=America/New_York (the zone is read at start-up), logging
    through splitdet's text formatter."""
    code = (
        "import logging, time\n"
        "from splitdet.shared.logs import TextLogFormatter\n"
        "handler = logging.StreamHandler()\n"
        "handler.setFormatter(TextLogFormatter())\n"
        "logging.basicConfig(level='INFO', handlers=[handler])\n"
        "print(time.strftime('%z'))\n"
        "fields = {'fields': {'event': 'started'}}\n"
        "logging.getLogger('splitdet.edge').info('started', extra=fields)\n"
    )
    env = {"TZ": "America/New_York", "PATH": "/usr/bin:/bin"}
    before = time.time()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env)  # fmt: skip
    after = time.time()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in ("-0500", "-0400"), done.stdout  # (the zone took)
    [line] = done.stderr.splitlines()
    stamp = line.split(" ")[0]
    assert UTC_STAMP.match(stamp), line
    assert line.endswith("INFO splitdet.edge: started event=started"), line
    logged = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))  # (as UTC)
    assert before - 2 <= logged <= after + 1, (stamp, before, after)
