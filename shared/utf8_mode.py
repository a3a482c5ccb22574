"""splitdet runs in Python's UTF-8 mode whatever the locale (standard library only: the edge
imports it).

Under a locale whose encoding is not UTF-8 (LANG=de_DE.ISO-8859-1, an old industrial PC's),
Python decodes file names with that encoding: the bytes of `café.jpg` as a UTF-8 camera wrote
them read as `cafÃ©.jpg`. The edge stores names as text, so a daemon restarted under another
locale than the one it first ran under took every kept image with such a name for a new one
and processed it again, and `edge status` failed on stored names the locale cannot encode. In
UTF-8 mode (PEP 540) file names, the standard streams and files opened without an encoding are
UTF-8 (bytes that are not as surrogate escapes) whatever the locale; the C and POSIX locales
get it already (PEP 538). The `splitdet` command therefore replaces itself, first thing, with
the same command in UTF-8 mode when it does not run in it (`reexec_in_utf8_mode`), unless
PYTHONUTF8=0 is set: the way to keep reading names by the locale, for an edge whose store was
written so by an earlier splitdet.
"""

from __future__ import annotations

import codecs
import os
import sys

__all__ = ["reexec_in_utf8_mode", "utf8_file_names"]

#: Set in the environment of the process made by the re-execution: it is never done twice.
_REEXECUTED = "SPLITDET_UTF8_REEXEC"


def utf8_file_names() -> bool:
    """Whether this process decodes file names as UTF-8 (UTF-8 mode, or a UTF-8 locale)."""
    return sys.flags.utf8_mode or codecs.lookup(sys.getfilesystemencoding()).name == "utf-8"


def reexec_in_utf8_mode() -> None:
    """Replace this process (the same pid, open files and signals' dispositions) with the same
    command line in UTF-8 mode, when its file names are not decoded as UTF-8; return when they
    are, or when it cannot be done (then it goes on as it is). PYTHONUTF8=1 is in the new
    environment, so Python processes it starts (training ranks, pool workers) run so too."""
    if utf8_file_names() or os.environ.get(_REEXECUTED):
        return
    if os.environ.get("PYTHONUTF8") == "0":  # Python's own switch, set off on purpose: kept
        return  # (an edge whose store holds names decoded by its locale: edge/README.md)
    argv = list(getattr(sys, "orig_argv", None) or [])
    if not argv or not sys.executable:
        return
    env = {**os.environ, "PYTHONUTF8": "1", _REEXECUTED: "1"}
    script = argv[1] if len(argv) > 1 else ""
    try:
        if _runs_with_this_python(script):  # the console script: its name stays the process's
            os.execve(script, [script, *argv[2:]], env)  # (`pgrep -x splitdet` finds it)
        os.execve(sys.executable, [sys.executable, "-X", "utf8", *argv[1:]], env)
    except OSError:  # (no executable to run again: go on under the locale's encoding)
        return


def _runs_with_this_python(script: str) -> bool:
    """Whether `script` is an executable file whose "#!" line names this interpreter (the
    `splitdet` console script pip writes): run itself again, the process keeps its name."""
    if not script or script.startswith("-") or not os.access(script, os.X_OK):
        return False
    try:
        with open(script, "rb") as handle:
            first = handle.readline(4096)
    except OSError:
        return False
    if not first.startswith(b"#!"):
        return False
    named = first[2:].strip().split(b" ")[0]
    try:
        return os.path.samefile(os.fsdecode(named), sys.executable)
    except OSError:
        return False
