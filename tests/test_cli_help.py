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


def _commands(line: str) -> list[list[str]]:
    """The `splitdet` commands of a shell line, as words: split at `&&`, `;` and `|`, each cut
    at its first redirection (`> day.csv`)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, cut = [], [], False
    for word in [*lexer, ";"]:
        if word in {"&&", "||", ";", "|", "&"}:
            if words and words[0] == "splitdet":
                commands.append(words)
            words, cut = [], False
        elif word in {">", ">>", "<"}:
            cut = True
        elif not cut:
            words.append(word)
    return commands


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
            for words in _commands(example):
                if "..." in words or "<(" in " ".join(words):  # (a placeholder, a substitution)
                    continue
                try:
                    parser.parse_args(words[1:])
                except SystemExit:
                    shown = " ".join(words)
                    raise AssertionError(
                        f"`{path} --help` example does not parse: {shown}"
                    ) from None
                checked += 1
    assert checked >= 30
