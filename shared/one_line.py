"""Text shown on one line of a table or a message: its control characters escaped."""

from __future__ import annotations


def one_line(text: str, at_most: int | None = None) -> str:
    """`text` with each character that is not printable (a newline, a tab, ESC, a C1 control
    in a file name or in SQLite's words) written as its escape (`\\n`, `\\t`, `\\x1b`), so it
    can neither break nor forge a row; cut to `at_most` characters ending in "..." when given.
    """
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if at_most is None or len(shown) <= at_most:
        return shown
    return shown[: at_most - 3] + "..."
