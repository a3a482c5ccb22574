"""Each command's help: an "actions:" list names every action the command has (`edge --help`
left out `abandon`)."""

from __future__ import annotations

import argparse

from splitdet.shared.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_actions_list_names_every_action():
    checked = 0
    for command, parser in _subcommands(build_parser()).items():
        actions = _subcommands(parser)
        if not actions or "actions:" not in (parser.epilog or ""):
            continue
        listed = parser.epilog.split("actions:", 1)[1]
        for action in actions:
            assert f"splitdet {command} {action} " in listed, (command, action)
        checked += 1
    assert checked >= 1  # `splitdet edge` has such a list
