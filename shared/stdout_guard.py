"""The process's standard output while a command runs (no torch): what its encoding cannot
hold written escaped, not failed (`tolerate_unencodable_output`); a write that fails
(`>/dev/full`) or a stdout closed before the start (`>&-`) remembered and said in one line by
`splitdet.shared.cli.main`, exit status 2 (`guarded_stdout`), a reader that stops early
(`| head`) quietly (`silence_stdout`); commands whose output is stdout refuse a closed one before
their work (`stdout_closed`)."""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import os
import sys
from collections.abc import Callable, Iterator


def silence_stdout() -> None:
    """After a reader closed our stdout (`| head`): point it at /dev/null, so that Python's
    flush at exit does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def quiet_stdout() -> None:
    """`silence_stdout` after a stdout that failed otherwise (`>/dev/full`), when it is a file
    descriptor's (not a closed one, nor a stream a caller put in its place)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        silence_stdout()


def tolerate_unencodable_output() -> None:
    """Have the standard streams write what their encoding cannot hold escaped, not fail.

    Under PYTHONIOENCODING=ascii or latin-1 (or a locale's encoding under PYTHONUTF8=0),
    stdout's error handler is "strict": a path it cannot encode (`合成`, or a name that is not
    UTF-8) failed a command's closing lines with UnicodeEncodeError once its work was done,
    exit status 1 ("problems found" to `data check`). Such a stream now writes backslash
    escapes (`\\u5408`, as `edge results`' table does); a UTF-8 one the bytes of a name that is
    not UTF-8 as they are (surrogateescape, UTF-8 mode's own). An error handler
    PYTHONIOENCODING names (`ascii:strict`) is kept: it was asked for. stderr writes escapes
    already (Python's backslashreplace). Only the process's own streams are changed."""
    given = "" if sys.flags.ignore_environment else os.environ.get("PYTHONIOENCODING", "")
    if given.partition(":")[2]:  # (ENCODING:ERRORS: the errors part given)
        return
    for stream in (sys.__stdout__, sys.__stderr__):
        if not isinstance(stream, io.TextIOWrapper) or stream.errors != "strict":
            continue
        try:
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")
        except (LookupError, ValueError, OSError):  # (closed, or its flush failed: as it was)
            continue


#: What a stdout closed before the process started (`>&-`) is called in messages.
CLOSED_STDOUT = "standard output is closed"


class StdoutFailed(Exception):
    """A write to stdout failed (`>/dev/full`, `>&-`); its message says why, in one line:
    `main` ends the command with it, exit status 2."""


class _ClosedStdout(io.TextIOBase):
    """sys.stdout when the process started without one (`>&-`, which Python gives as None:
    `print` then wrote nowhere and `sys.stdout.write` raised AttributeError): every write
    fails with EBADF, `CLOSED_STDOUT`."""

    encoding = "utf-8"
    errors = "strict"

    def write(self, text: str) -> int:
        """Fail: there is no stdout."""
        raise OSError(errno.EBADF, CLOSED_STDOUT)

    def writable(self) -> bool:
        """A text stream meant for writing (each write fails)."""
        return True


class GuardedStdout:
    """sys.stdout while `main` runs: the stream it was (`_ClosedStdout` for none), each
    write and flush passed on, the first OSError they raise kept as `failure` (a broken pipe
    excepted: `| head` ends a command quietly, as before), so that `main` ends the command
    with one line naming it, exit status 2, whatever the command did with the error. Its
    `buffer` (bytes: `edge results --csv`) is watched alike; anything else is the stream's."""

    def __init__(self, stream: object) -> None:
        self._stream = stream
        self.failure: OSError | None = None
        #: whether the process started with stdout closed (`stdout_closed`)
        self.stdout_closed = isinstance(stream, _ClosedStdout)

    def write(self, text: str) -> int:
        """Write `text` to the stream."""
        return self.watched(self._stream.write, text)

    def writelines(self, lines: Iterator[str]) -> None:
        """Write `lines` to the stream."""
        return self.watched(self._stream.writelines, lines)

    def flush(self) -> None:
        """Flush the stream."""
        return self.watched(self._stream.flush)

    @property
    def buffer(self) -> _WatchedBuffer:
        """The stream's bytes (AttributeError when it has none), watched."""
        return _WatchedBuffer(self, self._stream.buffer)

    def watched(self, call: Callable, *args: object) -> object:
        """`call(*args)`; an OSError it raises (but a broken pipe) kept as `failure`."""
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            if self.failure is None:
                self.failure = exc
            raise

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") or name == "_stream":
            raise AttributeError(name)
        return getattr(self._stream, name)


class _WatchedBuffer:
    """A `GuardedStdout`'s `buffer`: writes and flushes watched by it."""

    def __init__(self, guard: GuardedStdout, buffer: object) -> None:
        self._guard, self._buffer = guard, buffer

    def write(self, data: bytes) -> int:
        """Write `data` to the buffer."""
        return self._guard.watched(self._buffer.write, data)

    def flush(self) -> None:
        """Flush the buffer."""
        return self._guard.watched(self._buffer.flush)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") or name in ("_guard", "_buffer"):
            raise AttributeError(name)
        return getattr(self._buffer, name)


@contextlib.contextmanager
def guarded_stdout() -> Iterator[GuardedStdout]:
    """sys.stdout as a `GuardedStdout` while in it (the one in place already, for a command
    another runs in-process: `splitdet demo`), put back after. A process started with stdout
    closed gets a `_ClosedStdout`, and /dev/null on file descriptor 1, so that no file opened
    later takes that number (a library's or a child process's print would write into it)."""
    current = sys.stdout
    if isinstance(current, GuardedStdout):
        yield current
        return
    guard = GuardedStdout(current if current is not None else _closed_stdout())
    sys.stdout = guard
    try:
        yield guard
    finally:
        if sys.stdout is guard:
            sys.stdout = current


def _closed_stdout() -> _ClosedStdout:
    """The stdout of a process started without one; file descriptor 1, when free, given
    /dev/null (see `guarded_stdout`)."""
    try:
        os.fstat(1)
    except OSError:
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            if devnull != 1:
                os.dup2(devnull, 1)
                os.close(devnull)
    return _ClosedStdout()


def stdout_closed() -> bool:
    """Whether this process has no stdout (started with it closed: `>&-`)."""
    stream = sys.stdout
    if stream is None or isinstance(stream, _ClosedStdout):
        return True
    return getattr(stream, "stdout_closed", False) is True


def stdout_problem(stdout: GuardedStdout) -> str:
    """One line saying why `stdout` (whose `failure` is set) could not be written."""
    if stdout.stdout_closed:
        return (
            f"{CLOSED_STDOUT}: what the command prints there was not written (run it with "
            "stdout open, e.g. > FILE, or > /dev/null to discard it)"
        )
    exc = stdout.failure
    return f"cannot write to standard output: {getattr(exc, 'strerror', None) or exc}"


def flush_problem(stdout: GuardedStdout) -> str | None:
    """`stdout` flushed: `stdout_problem` when a write to it failed, else None (a reader that
    closed it, `| head`, is no problem: stdout silenced)."""
    try:
        stdout.flush()
    except BrokenPipeError:
        quiet_stdout()
    except OSError:
        pass
    if stdout.failure is None:
        return None
    quiet_stdout()
    return stdout_problem(stdout)
