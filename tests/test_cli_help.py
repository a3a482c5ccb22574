"""Each command's help: an "actions:" list names every action the command has (`edge --help`
left out `abandon`)."""

from __future__ import annotations

import argparse
import shlex

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


def _parsers(parser: argparse.ArgumentParser, path: str = "splitdet"):
    """(command path, parser) for `parser` and every subcommand under it."""
    yield path, parser
    for name, sub in _subcommands(parser).items():
        yield from _parsers(sub, f"{path} {name}")


def _examples(epilog: str) -> list[str]:
    """The command lines of an epilog: lines starting with `splitdet ` outside its "actions:"
    list (which ends at a blank line), continued by trailing backslashes, a trailing
    `# comment` dropped."""
    lines, current, in_actions = [], "", False
    for raw in epilog.splitlines():
        line = raw.strip()
        if line == "actions:":
            in_actions = True
        elif not line:
            in_actions = False
        if in_actions or (not current and not line.startswith("splitdet ")):
            continue
        current += " " + line.split("  #", 1)[0].rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    return lines


def _words(command: str) -> list[str]:
    """A shell command line's words up to its first redirection or pipe (`> day.csv`)."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = []
    for word in lexer:
        if word in {">", ">>", "<", "|", "||", "&&", ";", "&"}:
            break
        words.append(word)
    return words


def test_every_example_in_every_help_parses():
    """A new user pastes the help's examples: `edge status --help` showed `[--json]`, which
    argparse refuses. Every command with actions or options has an example, and each parses."""
    parser = build_parser()
    checked = 0
    for path, sub in _parsers(parser):
        if path == "splitdet":
            continue
        examples = _examples(sub.epilog or "")
        assert examples, f"`{path} --help` shows no example"
        for example in examples:
            if "..." in example or "<(" in example:  # (a placeholder, a shell substitution)
                continue
            try:
                parser.parse_args(_words(example)[1:])
            except SystemExit:
                raise AssertionError(f"`{path} --help` example does not parse: {example}") from None
            checked += 1
    assert checked >= 30
