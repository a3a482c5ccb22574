"""`--log-format text` keeps a record with an exception on one line (the README: "one line per
record"): the exception and the frame that raised it become fields; the full traceback
follows only at DEBUG. The JSON line still carries the whole traceback as `exc`.

Real logging handlers and a real full disk (/dev/full answers every write with ENOSPC)."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitdet.shared.logs import JsonLogFormatter, TextLogFormatter

TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ERROR splitdet\.test\.logs: ")
FULL_DISK = Path("/dev/full")
NO_SPACE = "OSError: [Errno 28] No space left on device"
pytestmark = pytest.mark.skipif(not FULL_DISK.exists(), reason="no /dev/full here")


class StoreFull(Exception):
    """Stands for an error a caller raises from the OSError (``raise ... from``)."""


def _write_to_full_disk() -> None:
    with open(FULL_DISK, "wb", buffering=0) as fh:
        fh.write(b"a result row")  # OSError: [Errno 28] No space left on device


def _raising_line() -> int:
    """The line of _write_to_full_disk that raises (the innermost frame of the traceback)."""
    try:
        _write_to_full_disk()
    except OSError as exc:
        tb = exc.__traceback__
        while tb.tb_next is not None:
            tb = tb.tb_next
        return tb.tb_lineno
    raise AssertionError("/dev/full took the write")


@pytest.fixture
def logs() -> Iterator[tuple[logging.Logger, io.StringIO, io.StringIO]]:
    """(logger, text stream, JSON stream): a logger writing each record through both
    formatters, as `splitdet` does with --log-format text and json."""
    log = logging.getLogger("splitdet.test.logs")
    text, lines = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(lines)]
    handlers[0].setFormatter(TextLogFormatter())
    handlers[1].setFormatter(JsonLogFormatter())
    for handler in handlers:
        log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log, text, lines
    for handler in handlers:
        log.removeHandler(handler)
    log.propagate = True
    log.setLevel(logging.NOTSET)


def _sender_error(log: logging.Logger, chained: bool = False, **fields: object) -> None:
    """What the sender logs when a pass fails (edge/sender.py), here on a full disk."""
    try:
        try:
            _write_to_full_disk()
        except OSError as exc:
            if not chained:
                raise
            raise StoreFull("cannot record the answer") from exc
    except Exception:
        log.exception(
            "the sender failed unexpectedly; retrying in %.1f s", 2.0,
            extra={"fields": {"event": "sender_error", "retry_in_s": 2.0, **fields}},
        )  # fmt: skip


def test_a_text_record_with_an_exception_is_one_line(logs):
    """Before: the line, then a ~20-line traceback. Now one line, the exception and where it
    was raised as fields."""
    log, text, _ = logs
    _sender_error(log)
    [line] = text.getvalue().splitlines()
    assert TEXT_LINE.match(line), line
    at = f"tests/{Path(__file__).name}:{_raising_line()}"
    assert line.endswith(
        "the sender failed unexpectedly; retrying in 2.0 s event=sender_error retry_in_s=2.0 "
        f'error="{NO_SPACE}" at={at}'
    ), line
    assert "Traceback" not in text.getvalue()


def test_the_cause_and_a_field_of_the_same_name(logs):
    """``raise ... from`` names the innermost cause too; a field called `error` keeps its
    name and the exception's fields move aside together."""
    log, text, _ = logs
    _sender_error(log, chained=True, error="kept")
    [line] = text.getvalue().splitlines()
    found = re.search(
        rf'error=kept exc_error="{__name__}\.StoreFull: cannot record the answer" '
        rf'exc_at=tests/{Path(__file__).name}:(\d+) exc_cause="{re.escape(NO_SPACE)}"$',
        line,
    )
    assert found, line
    raised = Path(__file__).read_text().splitlines()[int(found.group(1)) - 1]
    assert "raise StoreFull(" in raised  # where the outer exception was raised


def test_at_debug_the_full_traceback_follows_the_line(logs):
    log, text, _ = logs
    log.setLevel(logging.DEBUG)
    _sender_error(log)
    first, *rest = text.getvalue().splitlines()
    assert TEXT_LINE.match(first) and f'error="{NO_SPACE}"' in first, first
    assert rest[0] == "Traceback (most recent call last):" and rest[-1] == NO_SPACE, rest


def test_the_json_line_keeps_the_whole_traceback(logs):
    """JsonLogFormatter is unchanged: one JSON object, the traceback in `exc`, whether or not
    the text formatter saw the record first (the two do not share a cached traceback)."""
    log, text, lines = logs
    _sender_error(log)
    [line] = lines.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "sender_error" and entry["retry_in_s"] == 2.0
    assert entry["exc"].startswith("Traceback (most recent call last):\n")
    assert entry["exc"].endswith(f"\n{NO_SPACE}") and "_write_to_full_disk" in entry["exc"]
    assert "error" not in entry and "at" not in entry  # no text fields added to JSON

    log.handlers.reverse()  # the JSON formatter first, then the text one
    text.truncate(0), text.seek(0), lines.truncate(0), lines.seek(0)
    _sender_error(log)
    assert json.loads(lines.getvalue())["exc"] == entry["exc"]
    assert len(text.getvalue().splitlines()) == 1


def test_exc_info_outside_an_exception_adds_nothing(logs):
    log, text, _ = logs
    log.error("no exception here", exc_info=True)
    [line] = text.getvalue().splitlines()
    assert line.endswith(": no exception here"), line


def test_under_json_logs_a_python_warning_is_a_json_line():
    """An image fuzz review: Pillow's UserWarnings ("Tag data larger than file") came on the
    edge daemon's stderr as two raw lines among its JSON ones, breaking a pipeline that
    parses every line. A fresh interpreter (captureWarnings is process-wide)."""
    code = (
        "import logging, warnings\n"
        "from splitdet.shared.logs import use_json_logs\n"
        "use_json_logs()\n"
        "logging.getLogger('splitdet').warning('before')\n"
        "warnings.warn('Tag data larger than file. Skipping tag 257', UserWarning)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines
    records = [json.loads(line) for line in lines]
    assert "Tag data larger than file" in records[1]["msg"]
    assert records[1]["level"] == "WARNING"
