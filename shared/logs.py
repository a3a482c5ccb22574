"""Log lines for the edge daemon and the cloud server, as JSON objects or as text (stdlib only).

    use_json_logs()                                   # every root handler writes JSON lines
    log.info("refused", extra={"fields": {"event": "refused", "code": "UNAUTHENTICATED"}})
    # {"ts": "2026-12-04T15:40:01.123Z", "level": "INFO", "logger": "...", "msg": "refused",
    #  "event": "refused", "code": "UNAUTHENTICATED"}

A record's `fields` extra becomes keys of its JSON line. Text lines (TextLogFormatter, what
`splitdet` logs unless told JSON) append them to the message as key=value, the event name
first, each value the message already shows left out:

    2026-12-04 15:40:01,123 ERROR splitdet.edge.sender: dead letter event=dead_letter
    image_id=7 path=/data/camera/a.png code=INVALID_ARGUMENT reason="dead letter: ..."
    (one line)
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any


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


#: The text line before the fields (the format `splitdet` logged in before fields were shown).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: A value written without quotes: no space, quote, backslash, '=' or control character.
_BARE = re.compile(r"[^\s\"\\=\x00-\x1f\x7f]+")
#: Line breaks JSON leaves as they are (beside the control characters it escapes), escaped.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class TextLogFormatter(logging.Formatter):
    """TEXT_FORMAT, then the record's `fields` extra as key=value on the same line: `event`
    first, then the rest in their order. A value the message already shows as a word of its
    own (a path, a code, the event name of a message that is one) is left out, so a message
    that says it all reads as before. Strings go bare when they can, else quoted with JSON
    escapes (a newline in a reason stays on the line); other values as compact JSON."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None) or {}
        if not isinstance(fields, dict):
            return line
        message = record.message
        ordered = sorted(fields.items(), key=lambda item: item[0] != "event")  # stable
        shown = []
        for key, value in ordered:
            text = _text(value)
            if text and _shows(message, text):
                continue
            shown.append(f"{key}={_quoted(text, isinstance(value, str))}")
        return " ".join([line, *shown])


def _text(value: Any) -> str:
    """A field's value as text: a string as it is, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except ValueError:  # a circular structure
        return repr(value)


def _quoted(text: str, string: bool) -> str:
    """`text` bare when it holds nothing that ends or splits a key=value, else as a JSON
    string. A `string` value's text is bare only without quotes, backslashes or '=' too (else
    it could pass for another field); JSON text (not `string`) only needs to hold no space."""
    bare = _BARE.fullmatch(text) if string else not any(c.isspace() for c in text)
    return text if bare else json.dumps(text, ensure_ascii=False).translate(_LINE_BREAKS)


def _shows(message: str, text: str) -> bool:
    """Whether `message` holds `text` as a word of its own: not inside a longer word or
    number (so "1" is not found in "10", nor "3" in "3.5")."""
    pattern = rf"(?<![\w.]){re.escape(text)}(?![\w]|\.\w)"
    return re.search(pattern, message) is not None
