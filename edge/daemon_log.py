"""The edge daemon's log (no torch): the "splitdet.edge" logger and `log_event`, a line that
carries its event name and fields, as JSON keys or as text key=value (splitdet.shared.logs:
`event=NAME` is written in text lines too, though the message is the event name)."""

from __future__ import annotations

import logging

log = logging.getLogger("splitdet.edge")


def log_event(level: int, msg: str, **fields: object) -> None:
    """Log `msg` at `level` on the daemon's logger, with `fields` and ``event=msg``."""
    log.log(level, msg, extra={"fields": {"event": msg, **fields}})
