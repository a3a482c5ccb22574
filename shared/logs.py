"""Log lines as JSON objects, for the edge daemon and the cloud server (stdlib only).

    use_json_logs()                                   # every root handler writes JSON lines
    log.info("refused", extra={"fields": {"event": "refused", "code": "UNAUTHENTICATED"}})
    # {"ts": "2026-12-04T15:40:01.123Z", "level": "INFO", "logger": "...", "msg": "refused",
    #  "event": "refused", "code": "UNAUTHENTICATED"}

A record's `fields` extra becomes keys of its line; in text logs it is not shown, so every
message stays readable on its own.
"""

from __future__ import annotations

import json
import logging
import time


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def use_json_logs() -> None:
    """Switch every root handler (or a new stderr one) to JSON lines."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonLogFormatter())
