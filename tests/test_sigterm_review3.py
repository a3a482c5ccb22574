"""SIGTERM stops every command as Ctrl-C does (an interruption review: `predict` stopped by
SIGTERM wrote no --json of the images it had judged, `eval` left a hidden temporary file of up
to ~95 MB beside the checkpoint it was writing, each with no line; `bench` called it an
interruption, exit 130). Now: the command unwinds, one line `splitdet COMMAND: stopped on
SIGTERM`, exit status 143. Ctrl-C or SIGTERM while the commands' modules import printed a
KeyboardInterrupt traceback; now one line too.

`predict` sent a real SIGTERM is in tests/test_predict_review.py; the start-up window, a
fraction of a second, is hit in-process by raising at the moment the parser is built (the fault
injected)."""

from __future__ import annotations

import os
import signal

import pytest

from splitdet.shared import cli
from splitdet.shared.sigterm import SIGTERM_EXIT, Terminated, sigterm_as_interrupt
from splitdet.shared.stdout_guard import guarded_stdout

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize(
    ("raised", "status", "line"),
    [(KeyboardInterrupt, 130, "splitdet: interrupted"),
     (Terminated, SIGTERM_EXIT, "splitdet: stopped on SIGTERM")],
)  # fmt: skip
def test_a_stop_while_the_commands_import_is_one_line(monkeypatch, capsys, raised, status, line):
    def importing() -> None:
        raise raised

    monkeypatch.setattr(cli, "build_parser", importing)
    assert cli.main(["synth", "--help"]) == status
    assert capsys.readouterr().err.strip() == line


def test_a_stop_in_a_command_says_which_it_was(capsys):
    """The command's own run unwinding from SIGTERM: its name, 143."""

    def terminated(_args: object) -> int:
        raise Terminated

    parser = cli.build_parser()
    args = parser.parse_args(["synth", "--out", "x"])
    args.handler = terminated
    with guarded_stdout() as stdout:
        assert cli._run_command(args, ["synth", "--out", "x"], stdout) == SIGTERM_EXIT
    assert capsys.readouterr().err.strip() == "splitdet synth: stopped on SIGTERM"


def test_sigterm_raises_terminated_inside_and_the_handler_is_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_as_interrupt() as received:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10**6):  # (the handler runs between two bytecodes)
            pass
    assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before


def test_under_json_logs_the_stop_line_is_json(capsys):
    """(A review: `edge run` stopped while it loaded wrote this one line as text among its
    JSON lines.)"""
    import json

    assert cli._stopped("splitdet edge", Terminated(), logs_json=True) == SIGTERM_EXIT
    record = json.loads(capsys.readouterr().err)
    assert record["event"] == "stopped" and record["signal"] == "SIGTERM", record
    assert record["msg"] == "splitdet edge: stopped on SIGTERM", record
