"""Log lines for the edge daemon and the cloud server, as JSON objects or as text (stdlib only).

    use_json_logs()                                   # every root handler writes JSON lines
    log.info("refused", extra={"fields": {"event": "refused", "code": "UNAUTHENTICATED"}})
    # {"ts": "2026-12-04T15:40:01.123Z", "level": "INFO", "logger": "...", "msg": "refused",
    #  "event": "refused", "code": "UNAUTHENTICATED"}

A record's `fields` extra becomes keys of its JSON line. Text lines (TextLogFormatter, what
`splitdet` logs unless told JSON) append them to the message as key=value: `event` always and
first, numbers and other non-string values always, a string the message already shows as a
word of its own (a path, a code) left out. Both formats stamp the time in UTC, the same way:

    2026-12-04T15:40:01.123Z ERROR splitdet.edge.sender: dead letter event=dead_letter
    image_id=7 path=/data/camera/a.png code=INVALID_ARGUMENT reason="dead letter: ..."
    (one line)

A record with an exception (`log.exception`) stays one line too: the exception and where it
was raised are two more fields, its cause (``raise ... from``, or the exception being handled)
a third when there is one; the full traceback follows only when the record's logger logs
DEBUG (``--log-level DEBUG``). A JSON line carries the full traceback as ``exc``:

    2026-12-04T15:40:01.123Z ERROR splitdet.edge.sender: the sender failed unexpectedly;
    retrying in 2.0 s event=sender_error retry_in_s=2.0
    error="sqlite3.OperationalError: database or disk is full" at=edge/store.py:512
    (one line)
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from splitdet.shared.strict_json import strict_dumps


def utc_stamp(record: logging.LogRecord) -> str:
    """When `record` was made, in UTC to the millisecond: ``2026-12-04T15:40:01.123Z`` (ISO
    8601; the `ts` of a JSON line and the start of a text one)."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's `fields` extra."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        entry = {
            "ts": utc_stamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return strict_dumps(entry, default=str)  # (NaN, infinity: null)


def use_json_logs() -> None:
    """Switch every root handler (or a new stderr one) to JSON lines. gRPC's own lines (a
    failed TLS handshake's, a bind failure's) still come on stderr in its own format: on a
    server they are the only sign of a client failing its handshake. GRPC_VERBOSITY=NONE,
    set before the process starts, drops them. Python warnings (a library's UserWarning,
    numpy's RuntimeWarning) become records of the "py.warnings" logger, JSON lines too,
    instead of two raw lines on stderr."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        handler.setFormatter(JsonLogFormatter())
    logging.captureWarnings(True)


def json_line(level: int, msg: str, **fields: object) -> str:
    """One JSON log line as the "splitdet" logger's handlers would write it, for a line that
    must reach stderr whatever handlers the root logger has (a command's last error)."""
    record = logging.LogRecord("splitdet", level, __file__, 0, msg, None, None)
    record.fields = fields
    return JsonLogFormatter().format(record)


#: The text line before the fields (the format `splitdet` logged in before fields were shown;
#: its `asctime` is now `utc_stamp`'s, no longer local time without an offset).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: A value written without quotes: no space, quote, backslash, '=' or control character (C0,
#: DEL, C1: U+009B is a terminal's CSI; "\s" covers U+0085, U+2028 and U+2029).
_BARE = re.compile(r"[^\s\"\\=\x00-\x1f\x7f-\x9f]+")
#: What JSON leaves as it is (it escapes only C0), escaped: DEL, the C1 controls (U+0085 a
#: line break, U+009B a terminal's CSI) and the line breaks U+2028, U+2029.
_LINE_BREAKS = str.maketrans(
    {code: f"\\u{code:04x}" for code in [*range(0x7F, 0xA0), 0x2028, 0x2029]}
)
#: Every character that ends or splits a line (C0 and C1 controls, DEL, U+2028, U+2029), as
#: JSON escapes it (\\n, \\t, \\u001b ...): a message embedding a file name holding one stays
#: on its line. Other text, backslashes included, is left as it is (a message is for reading).
_MESSAGE_CONTROLS = str.maketrans(
    {
        code: json.dumps(chr(code))[1:-1] if code < 0x20 else f"\\u{code:04x}"
        for code in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]
    }
)


#: Events whose message spans lines on purpose, left unescaped: SIGUSR1's thread stacks
#: (shared/stacks.py) and `splitdet eval`'s table of gate operating points, the records the
#: READMEs let take more than a line.
MULTILINE_EVENTS = frozenset({"stacks", "gate_operating_points"})


def _event_of(record: logging.LogRecord) -> object:
    """The record's `event` field, or None."""
    fields = getattr(record, "fields", None)
    return fields.get("event") if isinstance(fields, dict) else None


class TextLogFormatter(logging.Formatter):
    """TEXT_FORMAT, its time in UTC (`utc_stamp`), then the record's `fields` extra as
    key=value on the same line, each key once: `event` first and always (also where the
    message is the event name: a parser keyed on it finds it whatever the wording), then the
    rest in their order. Numbers and other non-string values are always written (a parser
    reads them whatever the message says of them); a string the message already shows as a
    word of its own (a path, a code) is left out, so that none is read twice. Strings go bare
    when they can, else quoted with JSON escapes (a newline in a reason stays on the line);
    other values as compact JSON. The message's own control characters (a newline in a file
    name it embeds) are escaped too (`_MESSAGE_CONTROLS`): one line per record, but SIGUSR1's
    stacks and eval's table (`MULTILINE_EVENTS`)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """The record's line, its exception (if any) folded into it as `error`, `at` and
        `cause` fields (`exception_fields`; all as ``exc_error``... when the record's
        fields use one of those names); at DEBUG (the record's logger logs DEBUG) the
        full traceback, and a `stack_info` stack, follow on lines of their own. Unlike
        logging.Formatter it leaves ``record.exc_text`` alone: another handler's formatter
        still writes the full traceback."""
        record.message = record.getMessage()
        if _event_of(record) not in MULTILINE_EVENTS:  # one line
            record.message = record.message.translate(_MESSAGE_CONTROLS)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if not record.exc_info and not record.stack_info:
            return line
        extra = exception_fields(record.exc_info) if record.exc_info else {}
        fields = getattr(record, "fields", None)
        taken = fields if isinstance(fields, dict) else {}
        prefix = "exc_" if taken.keys() & extra.keys() else ""  # all aside: they go together
        shown = [
            f"{prefix}{key}={_quoted(value, True)}"
            for key, value in extra.items()
            if key == "at" or not _shows(record.message, value)
        ]
        line = " ".join([line, *shown])
        if logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            if record.exc_info and record.exc_info[1] is not None:
                line += "\n" + self.formatException(record.exc_info).rstrip("\n")
            if record.stack_info:
                line += "\n" + self.formatStack(record.stack_info)
        return line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """`utc_stamp`: UTC, as a JSON line's `ts` (`datefmt` is not used)."""
        return utc_stamp(record)

    def formatMessage(self, record: logging.LogRecord) -> str:
        """The formatted message, then the `fields` extra: `event` and non-strings always, a
        string only where the message does not already show it."""
        line = super().formatMessage(record)
        fields = getattr(record, "fields", None) or {}
        if not isinstance(fields, dict):
            return line
        ordered = sorted(fields.items(), key=lambda item: item[0] != "event")  # stable
        shown = [
            f"{key}={_quoted(_text(value), isinstance(value, str))}"
            for key, value in ordered
            if _written(key, value, record.message)
        ]
        return " ".join([line, *shown])


_ExcInfo = tuple[type[BaseException] | None, BaseException | None, TracebackType | None]


def exception_fields(exc_info: _ExcInfo | tuple[None, None, None]) -> dict[str, str]:
    """A logged exception as text fields: ``error`` (``Type: message``, the type named with
    its module unless a builtin), ``at`` (``folder/file.py:line`` of the innermost frame of
    its traceback, where it was raised) and, when it has one, ``cause`` (the innermost
    exception of its chain: ``raise ... from``, or the one being handled when it was
    raised). Empty for ``exc_info=True`` outside an exception."""
    exc = exc_info[1]
    if exc is None:
        return {}
    fields = {"error": _describe(exc)}
    tb = exc.__traceback__ or exc_info[2]
    if tb is not None:
        while tb.tb_next is not None:
            tb = tb.tb_next
        where = Path(tb.tb_frame.f_code.co_filename)
        fields["at"] = f"{'/'.join(where.parts[-2:])}:{tb.tb_lineno}"
    seen = {id(exc)}
    cause = exc
    while True:  # to the innermost, a cycle (an exception its own context) ending it
        nxt = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        cause = nxt
    if cause is not exc:
        fields["cause"] = _describe(cause)
    return fields


def _describe(exc: BaseException) -> str:
    """``Type: message`` of an exception (``Type`` alone without a message), the type named
    with its module unless a builtin, as `traceback` names it."""
    kind = type(exc)
    name = kind.__qualname__
    if kind.__module__ not in ("builtins", "__main__"):
        name = f"{kind.__module__}.{name}"
    try:
        text = str(exc)
    except Exception:  # a broken __str__
        text = "<exception str() failed>"
    return f"{name}: {text}" if text else name


def _text(value: Any) -> str:
    """A field's value as text: a string as it is, anything else as compact JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except ValueError:  # a circular structure
        return repr(value)


def _written(key: str, value: Any, message: str) -> bool:
    """Whether a text line writes the field `key`=`value` after `message`: `event` and any
    value not a string always; a string unless the message shows it as a word of its own."""
    if key == "event" or not isinstance(value, str):
        return True
    return not (value and _shows(message, value))


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
