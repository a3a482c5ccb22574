"""The one `splitdet` command.

Each subcommand lives beside the code it drives, in a module whose top level imports nothing
heavy (no torch, no onnxruntime) and exposes `register(subparsers)`. That module adds its parser
and sets `handler` to a function `(args) -> int` that imports what it needs when it runs. So
`splitdet --help` works on an edge-only install, and an edge command never pulls in torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import ipaddress
import logging
import math
import os
import re
import stat
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.logs import TextLogFormatter, json_line
from splitdet.shared.regular_file import read_regular
from splitdet.shared.sigterm import SIGTERM_EXIT, Terminated, sigterm_as_interrupt, stop_behind
from splitdet.shared.stacks import stacks_on_sigusr1
from splitdet.shared.stdout_guard import (
    CLOSED_STDOUT,
    GuardedStdout,
    StdoutFailed,
    flush_problem,
    guarded_stdout,
    quiet_stdout,
    silence_stdout,
    stdout_closed,
    stdout_problem,
    tolerate_unencodable_output,
)
from splitdet.shared.torchvision_import import defer_dynamo_import
from splitdet.shared.utf8_mode import reexec_in_utf8_mode

#: Modules that register subcommands, in the order `--help` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "splitdet.training.cli_synth",
    "splitdet.training.cli_data",
    "splitdet.training.cli_train",
    "splitdet.training.cli_eval",
    "splitdet.training.cli_export",
    "splitdet.edge.cli_predict",
    "splitdet.cloud.cli_cloud",
    "splitdet.edge.cli_edge",
    "splitdet.bench.cli_bench",
    "splitdet.bench.cli_load",
    "splitdet.bench.cli_demo",
)


#: Modules only the full install has (training, export, the cloud server, the benchmark).
FULL_INSTALL_MODULES = ("torch", "torchvision", "onnx", "onnxscript", "pycocotools", "matplotlib")
#: How to get the full install, for messages: from splitdet's source folder, as the docs say,
#: or from a built wheel.
FULL_INSTALL = (
    'install splitdet[full] (pip install ".[full]" in splitdet\'s source folder, or '
    'pip install "WHEEL[full]" for a built splitdet-*.whl)'
)
#: How to get ONNX Runtime, which the base install leaves to an extra (CPU or GPU flavour).
EDGE_INSTALL = (
    'install splitdet[edge] for the CPU (pip install ".[edge]" in splitdet\'s source folder, or '
    'pip install "WHEEL[edge]" for a built splitdet-*.whl) or splitdet[gpu] for onnxruntime-gpu'
)


#: Commands that import torch when they run (`predict` only without --cloud: `_needs_torch`).
TORCH_COMMANDS = frozenset({"train", "eval", "export", "predict", "cloud", "bench", "demo"})
#: The message of the FileNotFoundError `tempfile.gettempdir` raises when no folder it tries
#: can be written (torch's imports ask it for their cache folder).
NO_TEMP_FOLDER_TEXT = "No usable temporary directory found"


def no_temp_folder_message() -> str:
    """What to say when no temporary folder can be written (a read-only root file system in a
    container, no writable TMPDIR): torch's imports fail without one."""
    given = os.environ.get("TMPDIR")
    tmpdir = f"TMPDIR={given}" if given else "TMPDIR"
    return (
        f"no writable temporary folder ({tmpdir}, /tmp, /var/tmp): torch needs one; give the "
        "process a writable TMPDIR (in a container: an emptyDir or tmpfs volume)"
    )


def temp_folder_problem() -> str | None:
    """`no_temp_folder_message` when `tempfile.gettempdir` finds no folder it can write, else
    None. Cheap: it creates and removes one file in the first folder that takes it, once per
    process (the folder found is kept, and is the one torch then uses)."""
    try:
        tempfile.gettempdir()
    except FileNotFoundError as exc:
        if NO_TEMP_FOLDER_TEXT not in str(exc):
            raise
        return no_temp_folder_message()
    return None


def _needs_torch(args: argparse.Namespace) -> bool:
    """Whether the parsed command imports torch as it runs: a `TORCH_COMMANDS` one, torch
    installed (without it the command says it needs the full install), and for `predict`
    only its in-process detection (with --cloud it runs on ONNX Runtime alone)."""
    if args.command not in TORCH_COMMANDS:
        return False
    if args.command == "predict" and getattr(args, "cloud", None):
        return False
    return has_full_install()


def has_full_install() -> bool:
    """Whether torch can be imported here (the full install): looked up, not imported (0.1 ms,
    where an import takes seconds)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # (a blocked or broken torch: as good as none)
        return False


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type` for whole numbers in [low, high] (no upper bound when `high` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}-{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf) -> Callable[[str], float]:
    """An argparse `type` for finite numbers in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            span = f"{low:g}-{high:g}" if math.isfinite(high) else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text!r}")
        return value

    return parse


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


#: What to say when the working directory was removed under the process (getcwd() fails).
DELETED_CWD_MESSAGE = (
    "the working directory was deleted; start splitdet from an existing folder "
    "(systemd: WorkingDirectory=)"
)


def cwd_problem() -> str | None:
    """`DELETED_CWD_MESSAGE` when this process's working directory no longer exists (a
    relative path would fail later with a traceback, and torch's libraries fail to load: Intel
    oneMKL's "Cannot load libtorch_cpu.so"), else None."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return DELETED_CWD_MESSAGE
    return None


def _soft_limit(kind: int) -> int | None:
    """The soft resource limit `kind` (a `resource.RLIMIT_*`), None when unlimited."""
    import resource

    soft, _ = resource.getrlimit(kind)
    return None if soft == resource.RLIM_INFINITY else soft


def memory_limit_hint() -> str:
    """What to raise when memory ran out: the address-space limit when one is set (RLIMIT_AS:
    `prlimit --as`, systemd LimitAS=), else the memory of the machine or container."""
    import resource

    limit = _soft_limit(resource.RLIMIT_AS)
    if limit is not None:
        return f"address-space limit {limit >> 20} MB: raise LimitAS= / prlimit --as"
    return "no address-space limit is set: free memory, or raise the container's memory limit"


def thread_limit_message(exc: BaseException) -> str:
    """One line for a thread that could not be started (`exc`: CPython's RuntimeError "can't
    start new thread"): the process/thread limit (RLIMIT_NPROC, counting every process and
    thread of the user) is too low, or, under an address-space limit, the thread's stack found
    no room; what to raise."""
    import resource

    nproc = _soft_limit(resource.RLIMIT_NPROC)
    shown = f" (RLIMIT_NPROC {nproc})" if nproc is not None else ""
    message = (
        f"cannot start a thread ({exc}): the process/thread limit is too low{shown}; raise it "
        "(`ulimit -u`, systemd LimitNPROC= / TasksMax=)"
    )
    if _soft_limit(resource.RLIMIT_AS) is not None:  # (a thread's stack is address space too)
        message += f", or memory for its stack ({memory_limit_hint()})"
    return message


def privileged_port_hint(port: int) -> str:
    """The hint for a port that may not be bound (EACCES): below 1024 it needs root or
    CAP_NET_BIND_SERVICE; "" for other ports."""
    if 0 < port < 1024:
        return (
            f" (port {port} is below 1024: it needs root or CAP_NET_BIND_SERVICE, e.g. systemd "
            "AmbientCapabilities=CAP_NET_BIND_SERVICE; or use a port from 1024 up)"
        )
    return ""


def class_names(text: str) -> tuple[str, ...]:
    """The class names of a ``--classes A,B`` option: stripped, empty ones dropped.
    ValueError naming the first one listed twice (the second would take the label of the
    first, which then never trains)."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice")
    return names


#: Example addresses in messages: one a server listens on (every interface), one a client
#: connects to (0.0.0.0 is no address to connect to).
LISTEN_EXAMPLE = "0.0.0.0:50051"
CONNECT_EXAMPLE = "cloud.example:50051"


def address_problem(text: str, port_required: bool = True, port_zero: bool = True) -> str | None:
    """What gRPC would misread without a word in `text` ("host:port" or "[IPv6]:port"), or
    None: a port past 65535 (99999 becomes 34463), a negative or missing port (443), an
    unbracketed IPv6 address, an empty host. Port 0 ("any free port") only with `port_zero`;
    no port at all only without `port_required` (gRPC then takes 443).

    `port_zero` also says what the address is for, and so which example a problem gives: one
    to listen on (0.0.0.0:50051), else one to connect to (cloud.example:50051: a client
    cannot reach 0.0.0.0)."""
    value = text.strip()
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        problem = _ipv6_problem(host) if closed else "an unclosed '[' (expected [IPv6]:port)"
        if not problem and rest and not rest.startswith(":"):
            problem = "expected [IPv6]:port, e.g. [::1]:50051"
        port = rest[1:] if rest else None
    elif value.count(":") > 1:
        return "more than one ':' (an IPv6 address goes in brackets, e.g. [::1]:50051)"
    elif value.isascii() and value.isdigit():  # a port alone (`--listen 50051`)
        return _port_alone(value, port_zero)
    else:
        host, colon, port = value.partition(":")
        problem = host_problem(host, listen=port_zero) if value else "no address"
        port = port if colon else None
    if problem:
        return problem
    if not port:  # None: no ':' at all; "": nothing after it
        if port_required or port == "":
            example = LISTEN_EXAMPLE if port_zero else CONNECT_EXAMPLE
            return f"no port (expected host:port, e.g. {example})"
        return None
    low = 0 if port_zero else 1
    if not (port.isascii() and port.isdigit() and low <= int(port) <= 65535):
        return f"the port must be a number {low}-65535, got {port!r}"
    return None


def _port_alone(port: str, listen: bool) -> str:
    """The problem of an address that is a number alone, taken for its port: no host, with
    examples of that port (`listen`: on every interface or this machine only)."""
    if listen:
        return f"no host (expected host:port, e.g. 0.0.0.0:{port} or 127.0.0.1:{port})"
    return f"no host (expected host:port, e.g. cloud.example:{port} or 127.0.0.1:{port})"


def split_host_port(text: str, option: str, port_zero: bool = True) -> tuple[str, int]:
    """`text` ("host:port" or "[IPv6]:port") as (host, port), brackets dropped; CommandError
    naming `option` and the value on any `address_problem`."""
    problem = address_problem(text, port_required=True, port_zero=port_zero)
    if problem:
        raise CommandError(f"{option} {text!r}: {problem}")
    host, _, port = text.strip().rpartition(":")
    return host.strip("[]"), int(port)


def host_problem(host: str, listen: bool = True) -> str | None:
    """What is wrong with a host name or IP address (IPv6 without brackets), or None;
    `listen`: the host is one to listen on (else one to connect to), for the example given."""
    if not host:
        if not listen:
            return f"no host (expected host:port, e.g. {CONNECT_EXAMPLE})"
        return "no host (0.0.0.0 for every interface, 127.0.0.1 for this machine only)"
    if ":" in host:
        return _ipv6_problem(host)
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return f"{host!r} is not an IPv4 address"
    elif not re.fullmatch(r"[A-Za-z0-9_.-]+", host):
        return f"{host!r} is not a host name or IP address"
    return None


def _ipv6_problem(host: str) -> str | None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return f"{host!r} is not an IPv6 address"
    return None


#: Single-value options that name a file or folder: given twice, argparse would keep the last
#: one without a word (`train --data a --data b` trained on b alone), so a second one is refused
#: (`OncePathAction`). Options of ``type=Path`` are such options too, whatever their name.
#: Repeatable ones (``action="append"``, e.g. `cloud --model`) and options that are no path
#: (``--log-level``: a shell alias's value overridden on the command line) are not affected.
PATH_OPTIONS = frozenset({
    "--data", "--out", "--checkpoint", "--calibrate-data", "--db", "--watch", "--model", "--init",
    "--models-dir", "--json", "--save", "--quantize-edge", "--archive", "--quarantine",
    "--save-annotated", "--image", "--workdir", "--answers-db", "--ready-file", "--token-file",
    "--root-certs", "--client-cert", "--client-key", "--tls-cert", "--tls-key", "--client-ca",
})  # fmt: skip

#: Single-value options that name no path but lose a first value given twice all the same
#: (`OncePathAction` refuses a second one): `--cloud A --cloud B` checked B alone (several
#: replicas go in one value, comma-separated), and a second --threshold or --timeout hid the
#: first (a shell alias's or a script's value overridden by mistake).
ONCE_OPTIONS = frozenset({"--cloud", "--threshold", "--timeout"})

#: Where `OncePathAction` notes, during one parse, the options already given (removed from the
#: namespace before `parse_known_args` returns it).
_GIVEN = "_splitdet_paths_given"


class OncePathAction(argparse._StoreAction):
    """argparse's "store" action, which for a single-value path option (`PATH_OPTIONS`, or
    ``type=Path``) or one of `ONCE_OPTIONS` refuses a second value instead of silently keeping
    the last (argparse's error: the usage line and exit status 2). Any other option stores as
    usual."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str,
        nargs: int | str | None = None,
        type: Callable | None = None,  # (argparse's own name for it)
        **kwargs: object,
    ) -> None:
        super().__init__(option_strings, dest, nargs=nargs, type=type, **kwargs)
        named = any(option in PATH_OPTIONS | ONCE_OPTIONS for option in option_strings)
        self.once = nargs is None and (named or type is Path)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        """Store `values`; argparse.ArgumentError when this parse has given the option already."""
        if self.once:
            given = vars(namespace).setdefault(_GIVEN, {})
            if self.dest in given:
                raise argparse.ArgumentError(self, self._twice(parser, given[self.dest], values))
            given[self.dest] = values
        super().__call__(parser, namespace, values, option_string)

    def _twice(self, parser: argparse.ArgumentParser, first: object, second: object) -> str:
        message = f"given twice ({str(first)!r}, {str(second)!r})"
        if "--data" in self.option_strings:
            command = parser.prog.removeprefix("splitdet ")
            return (
                f"{message}; {command} reads one dataset: to "
                f"{'train on' if command == 'train' else 'use'} several, merge them with "
                "`splitdet data merge SRC SRC... --out DIR`"
            )
        if "--cloud" in self.option_strings:
            both = f"{str(first).strip()},{str(second).strip()}"
            example = f"--cloud {both}" if "/" not in both else "--cloud HOST:PORT,HOST:PORT"
            return f"{message}; it takes one value: comma-separate replicas ({example})"
        return f"{message}; give it once"


#: `--log-level`'s choices, before the command or after it.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class Parser(argparse.ArgumentParser):
    """The `splitdet` parser, and (through argparse's ``parser_class``) every subcommand's:
    plain single-value options store with `OncePathAction`, and an error in the arguments of a
    command that logs JSON (`_logs_json`) is one JSON line (event "fatal", exit status 2), as
    a command's other errors are under JSON logs (`main`), not argparse's usage and text.

    No option is taken by an abbreviation of its name (`allow_abbrev` False: `edge results
    --after 3` was read as `--after-id 3`, `edge run --after` being another option). A command
    (or a command's action) is required: none given is argparse's error naming what is
    missing and the choices. Every subcommand takes `--log-level` too (`add_log_level`)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.register("action", None, OncePathAction)
        self.register("action", "store", OncePathAction)
        self._argv: list[str] = []  # the arguments this parser parses now (`_logs_json`)
        self._parsed: argparse.Namespace | None = None  # its result, once parsed

    def add_subparsers(self, **kwargs: object) -> argparse._SubParsersAction:
        """argparse's, a choice required unless told otherwise (`required=False`)."""
        kwargs.setdefault("required", True)
        return super().add_subparsers(**kwargs)

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """argparse's, without the note of the options given (`OncePathAction`)."""
        self._argv, self._parsed = list(sys.argv[1:] if args is None else args), None
        namespace, extras = super().parse_known_args(args, namespace)
        vars(namespace).pop(_GIVEN, None)
        return namespace, extras

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """argparse's; arguments no parser took are refused knowing the command's log format."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self._parsed = parsed
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def error(self, message: str) -> NoReturn:
        """argparse's usage and "PROG: error: MESSAGE" (exit status 2); under JSON logs that
        line alone, as JSON (event "fatal"), for a log pipeline to read. A missing command or
        action is named with its choices."""
        message = self._with_choices(message)
        if not self._logs_json():
            super().error(message)
        command = getattr(self._parsed, "command", None)  # ("splitdet edge run": edge)
        if command is None and self.prog.startswith("splitdet "):
            command = self.prog.split(" ")[1]
        line = json_line(logging.ERROR, f"{self.prog}: error: {message}", event="fatal",
                         command=command)  # fmt: skip
        self.exit(2, line + "\n")

    def _with_choices(self, message: str) -> str:
        """`message`, argparse's "the following arguments are required: COMMAND", with the
        choices of the missing command or action added ("one of: synth, data, ...")."""
        if not message.startswith("the following arguments are required: "):
            return message
        for action in self._actions:
            missing = isinstance(action.metavar, str) and action.metavar in message
            if isinstance(action, argparse._SubParsersAction) and missing:
                names = ", ".join(action.choices)
                return f"{message} (one of: {names}; {self.prog} --help says what each does)"
        return message

    def _logs_json(self) -> bool:
        """Whether the command parsed logs JSON: its `--log-format` once parsed (arguments left
        over), else the last valid one in the arguments being parsed (before "--"), else this
        parser's `--log-format` default (`edge run`: json)."""
        if self._parsed is not None and getattr(self._parsed, "log_format", None) is not None:
            return bool(self._parsed.log_format == "json")
        option = next((a for a in self._actions if a.dest == "log_format"), None)
        choices = option.choices if option is not None and option.choices else ("json", "text")
        value = option.default if option is not None else None
        argv = self._argv[: self._argv.index("--")] if "--" in self._argv else self._argv
        for i, token in enumerate(argv):
            name, equals, inline = token.partition("=")
            if not self._names_log_format(name):
                continue
            given = inline if equals else argv[i + 1] if i + 1 < len(argv) else None
            if given in choices:
                value = given
        return value == "json"

    def _names_log_format(self, name: str) -> bool:
        """Whether the option `name` is `--log-format` (no abbreviation is taken:
        `allow_abbrev` is False)."""
        return name == "--log-format" and name in self._option_string_actions


def add_log_level(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """`--log-level` on `parser`: the top-level one (`top`: default INFO), or a subcommand's,
    which leaves the top-level value unless given (default SUPPRESS: argparse copies a
    subcommand's values over the top-level ones), so `splitdet edge run ... --log-level
    DEBUG` works as `splitdet --log-level DEBUG edge run ...` does, the later one winning."""
    parser.add_argument(
        "--log-level",
        default="INFO" if top else argparse.SUPPRESS,
        choices=LOG_LEVELS,
        help="logging verbosity (default: INFO)"
        if top
        else "logging verbosity, as before the command (default: INFO)",
    )


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser` (commands, and the actions of a command such as `edge`),
    each once (an alias names the same parser)."""
    found: dict[int, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if id(sub) not in found:
                    found[id(sub)] = sub
                    found.update((id(p), p) for p in _subcommand_parsers(sub))
    return list(found.values())


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every subcommand this install provides."""
    parser = Parser(
        prog="splitdet",
        description=(
            "Split edge/cloud surface-defect detection: a gate on the edge lets defect-free "
            "images skip detection; flagged images' FPN features go to a cloud detection server."
        ),
    )
    parser.add_argument(
        "--version",
        action=VersionAction,
        help="show splitdet's version, the split spec and manifest format an edge and a cloud "
        "must share, and the versions of Python, ONNX Runtime and torch, and exit",
    )
    add_log_level(parser, top=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the module exists but something it imports is missing
                raise
            continue  # this command is not part of this install
        module.register(subparsers)
    for sub in _subcommand_parsers(parser):
        if "--log-level" not in sub._option_string_actions:
            add_log_level(sub)
    return parser


def version_text() -> str:
    """What `splitdet --version` prints: splitdet's version (and, run from a git work tree,
    the commit it runs: an editable install's metadata keeps the one it was installed at); the
    split spec version and
    manifest format an export is made under, which an edge and a cloud must share; and the
    versions of Python, ONNX Runtime and torch as installed (read from their package metadata,
    neither imported: "not installed" on an edge-only or base install)."""
    import platform

    from splitdet.shared.manifest import MANIFEST_FORMAT
    from splitdet.shared.spec import SPEC_VERSION
    from splitdet.shared.version import splitdet_version

    runtime = _installed("onnxruntime", "onnxruntime-gpu")
    return (  # (the commit run too, from a git work tree: as checkpoints and manifests say)
        f"splitdet {splitdet_version()}\n"
        f"split spec {SPEC_VERSION}, manifest format {MANIFEST_FORMAT} (an edge and a cloud "
        "must share both)\n"
        f"python {platform.python_version()}, onnxruntime {runtime}, torch {_installed('torch')}"
    )


def _installed(*distributions: str) -> str:
    """The version of the first of `distributions` installed, from its metadata (nothing
    imported), else "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "not installed"


class VersionAction(argparse.Action):
    """`--version`: print `version_text` to stdout and exit 0 (computed only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        """Print the versions and exit (quietly when a reader closed stdout: `| head -1`; a
        stdout that cannot be written, `>/dev/full` or `>&-`, is said by `main`, exit 2)."""
        try:
            print(version_text(), flush=True)
        except BrokenPipeError:
            silence_stdout()
        except OSError:  # (`GuardedStdout` keeps it: `main` says it in one line)
            pass
        parser.exit()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `splitdet` console script; returns the process exit status.

    The console script (`argv` None) first makes itself run in Python's UTF-8 mode whatever
    the locale (`utf8_mode`: file names read alike under every locale). SIGTERM unwinds every
    command as Ctrl-C does (`sigterm.sigterm_as_interrupt`): one line, `splitdet COMMAND:
    stopped on SIGTERM`, exit status 143 (Ctrl-C: `interrupted`, 130), from the first moment
    on, the imports of the commands' modules included; `cloud` and `edge run` install their
    own graceful stop once ready.

    What stdout's encoding cannot hold is written escaped (`tolerate_unencodable_output`),
    and a stdout that cannot be written (`>/dev/full`, `>&-`) ends the command with one line,
    exit status 2 (`guarded_stdout`), as its other errors do."""
    if argv is None:
        reexec_in_utf8_mode()  # (returns at once when it runs in UTF-8 mode already)
    tolerate_unencodable_output()
    with guarded_stdout() as stdout:
        try:
            return _main(argv, stdout)
        except SystemExit:  # --help, --version, a usage error: what they printed, flushed now
            problem = flush_problem(stdout)
            if problem is None:
                raise
            print(f"splitdet: error: {problem}", file=sys.stderr)
            raise SystemExit(2) from None


def _main(argv: Sequence[str] | None, stdout: GuardedStdout) -> int:
    """`main`'s work, its stdout watched by `stdout`."""
    try:
        stacks_on_sigusr1()  # first: before any thread starts (see shared/stacks.py)
    except RuntimeError as exc:  # ("can't start new thread": no command could run)
        if "can't start new thread" not in str(exc):
            raise
        print(f"splitdet: error: {thread_limit_message(exc)}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():
            parser = build_parser()
            raw = list(sys.argv[1:] if argv is None else argv)
            args = _parse(parser, raw)  # (no command, or no action: argparse's error, exit 2)
            return _run_command(args, raw, stdout)
    except KeyboardInterrupt as exc:  # (Ctrl-C or SIGTERM while the modules import, or as
        return _stopped("splitdet", exc)  # its handler is set: `signal.signal` not returned)


def _parse(parser: argparse.ArgumentParser, raw: list[str]) -> argparse.Namespace:
    """`parser.parse_args(raw)`, but an option no parser took is refused by the command's (or
    its action's) own parser, naming the options it has that start so: no option is taken
    abbreviated, and `edge results --after 3` was read as `--after-id 3` before."""
    args, extras = parser.parse_known_args(raw)
    if extras:
        chosen = _chosen_parser(parser, args)
        chosen.error(_unrecognized(chosen, extras))
    return args


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Parser:
    """The deepest parser the arguments chose: the command's, or its action's (`edge run`)."""
    current = parser
    while True:
        sub = next((a for a in current._actions if isinstance(a, argparse._SubParsersAction)),
                   None)  # fmt: skip
        name = getattr(args, sub.dest, None) if sub is not None else None
        if sub is None or name not in sub.choices:
            return current
        current = sub.choices[name]


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments: ..." for `extras`, with the options of `parser`
    each unknown `--name` starts (or would complete): "did you mean --after-id?"."""
    hints = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        if not name.startswith("--"):
            continue
        near = sorted(o for o in parser._option_string_actions if o.startswith(name) and o != name)
        if near:
            hints.append(f"{name}: did you mean {' or '.join(near)}?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    if hints:
        message += f" ({'; '.join(hints)} No option is taken abbreviated)"
    return message


def _stopped(who: str, exc: KeyboardInterrupt, logs_json: bool = False) -> int:
    """Print how a command was stopped, `WHO: stopped on SIGTERM` (exit status 143) or `WHO:
    interrupted` (Ctrl-C, 130), as one JSON line (event "stopped") under JSON logs, and
    return its exit status."""
    terminated = isinstance(exc, Terminated)
    line = f"{who}: {'stopped on SIGTERM' if terminated else 'interrupted'}"
    if logs_json:
        line = json_line(logging.INFO, line, event="stopped",
                         signal="SIGTERM" if terminated else "SIGINT")  # fmt: skip
    print(line, file=sys.stderr)
    return SIGTERM_EXIT if terminated else 130


def _run_command(args: argparse.Namespace, raw: list[str], stdout: GuardedStdout) -> int:
    """`main`'s run of the parsed command `args` (`raw`: the arguments as given; `stdout`:
    sys.stdout, watched: a write that failed ends it with one line, exit status 2)."""
    # the command's own arguments as typed (`train --nproc-per-node` gives them to its ranks);
    # the options before the command take no value a command could be named
    args.command_argv = raw[raw.index(args.command) + 1 :]
    handler = logging.StreamHandler()  # (unused when the root logger has a handler already)
    handler.setFormatter(TextLogFormatter())  # a record's fields too, as key=value
    logging.basicConfig(level=args.log_level, handlers=[handler])
    logs_json = getattr(args, "log_format", None) == "json"  # (`edge run`'s default: json)
    if _needs_torch(args):  # (torch's imports need a temporary folder: say so, not a traceback)
        # (and a working directory: without it Intel oneMKL cannot load libtorch_cpu.so; the
        # torch-free commands run from a deleted one with absolute paths, as they always did)
        problem = cwd_problem() or temp_folder_problem()
        if problem is not None:
            return _fatal(args, problem, logs_json, 2)
    try:
        return _handled(args, stdout)
    except StdoutFailed as exc:  # (`>/dev/full`, `>&-`: one line, whatever the command did)
        quiet_stdout()
        return _fatal(args, str(exc), logs_json, 2)
    except CommandError as exc:
        return _fatal(args, str(exc), logs_json, 2)
    except FileNotFoundError as exc:
        if NO_TEMP_FOLDER_TEXT in str(exc):  # (a command not in TORCH_COMMANDS that imports it)
            return _fatal(args, no_temp_folder_message(), logs_json, 2)
        if not logs_json:
            raise
        return _unexpected(args, exc)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in FULL_INSTALL_MODULES:
            needs = f"this command needs {exc.name}, which the edge-only install leaves out"
            return _fatal(args, f"{needs}; {FULL_INSTALL}", logs_json, 2)
        if exc.name and exc.name.split(".")[0] == "onnxruntime":
            needs = "this command needs ONNX Runtime, which the base install leaves to an extra"
            return _fatal(args, f"{needs}; {EDGE_INSTALL}", logs_json, 2)
        if not logs_json:
            raise
        return _unexpected(args, exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (`Terminated`)
        return _stopped(f"splitdet {args.command}", exc, logs_json)
    except BrokenPipeError:  # e.g. `| head` closed our stdout: stop quietly
        silence_stdout()
        return 0
    except Exception as exc:  # a bug, or a failure no command foresaw
        if not logs_json:
            raise  # (text: Python's traceback, exit status 1, as ever)
        return _unexpected(args, exc)


def _handled(args: argparse.Namespace, stdout: GuardedStdout) -> int:
    """The exit status of the command's handler, its stdout flushed; StdoutFailed when a
    write to stdout failed (other than a broken pipe), whatever came of it: an exception it
    raised on the way, or one the command caught and went on from."""
    try:
        status = _handler_status(args)
        stdout.flush()  # (now, not at exit: Python would say it as "Exception ignored", 120)
    except Exception:
        if stdout.failure is None:
            raise
        raise StdoutFailed(stdout_problem(stdout)) from None
    if stdout.failure is not None:
        raise StdoutFailed(stdout_problem(stdout))
    return status


def _handler_status(args: argparse.Namespace) -> int:
    """The command's handler's exit status, torch's import readied first for a command that
    imports it (`before_torch_imports`). A stop signal that interrupted an extension
    module's initialisation, which said it as an ImportError ("initialization failed"), is
    raised as the KeyboardInterrupt it was (`sigterm.stop_behind`): the command was stopped,
    it did not fail."""
    try:
        if _needs_torch(args):
            before_torch_imports()
        return int(args.handler(args) or 0)
    except ImportError as exc:
        stop = stop_behind(exc)
        if stop is None:
            raise
        raise stop from None


def before_torch_imports() -> None:
    """Ready this process for the command's import of torch, so that a stop signal met while
    it imports stops the command with its one line:

    - numpy is imported now, from Python. Else torch's C extension imports it as it
      initialises, and drops whatever that import raises: a SIGTERM (or Ctrl-C) met there was
      lost, numpy left half-imported (a later `np.linalg` ended an `eval` in RecursionError),
      and every later SIGTERM ignored as "already unwinding" (`sigterm.sigterm_as_interrupt`).
    - torch's loggers are set to WARNING, as torch sets them as its import ends: an import a
      stop cut short left them at the root's INFO, and torch's exit hook then logged three
      "FakeTensor cache stats" lines after the `stopped on SIGTERM` line, the last one.
    - torchvision's coming import will leave torch's compiler unimported, 2.7 s of CPU less
      (`torchvision_import.defer_dynamo_import`)."""
    import numpy  # noqa: F401  (only its import matters)

    defer_dynamo_import()

    torch_logger = logging.getLogger("torch")
    if torch_logger.level == logging.NOTSET:  # (torch's own import sets it again: TORCH_LOGS)
        torch_logger.setLevel(logging.WARNING)


def _unexpected(args: argparse.Namespace, exc: Exception) -> int:
    """An exception no command foresaw escaping a command that logs JSON: one JSON line
    (event "fatal", the traceback in its "exc" field) instead of Python's raw traceback, for a
    log pipeline to read; returns exit status 1, as Python's would. Call it in the `except`."""
    return _fatal(args, f"{type(exc).__name__}: {exc}", True, 1, traceback.format_exc())


def _fatal(
    args: argparse.Namespace, problem: str, logs_json: bool, status: int, exc: str | None = None
) -> int:
    """Print a command's last line, `splitdet COMMAND: error: PROBLEM` (under JSON logs one
    JSON line, event "fatal", with `exc`, a traceback, when given), and return `status`."""
    message = f"splitdet {args.command}: error: {problem}"
    if logs_json:  # (the only sign of the exit, as JSON)
        fields: dict[str, object] = {"event": "fatal", "command": args.command}
        if exc is not None:
            fields["exc"] = exc
        message = json_line(logging.ERROR, message, **fields)
    print(message, file=sys.stderr)
    return status


def refuse_closed_stdout(what: str) -> None:
    """CommandError, before any work, when stdout is closed (`stdout_closed`) and the
    command's output goes there: `what` says which ("--json - writes the results there"),
    and may end with what to do instead ("; give --json FILE")."""
    if stdout_closed():
        raise CommandError(f"{CLOSED_STDOUT}, and {what}: nothing was done")


#: Environment variable read for the bearer token when --token-file is not given (edge and cloud).
TOKEN_ENV = "SPLITDET_CLOUD_TOKEN"


def token_lines(token_file: Path) -> list[str]:
    """The token lines of a token file: its non-empty lines that are not comments (#), each
    stripped of whitespace and of any UTF-8 byte-order mark (a line appended from a file saved
    with one keeps it). The first is the one an edge sends; a cloud accepts each.

    CommandError if the file cannot be read.
    """
    try:
        text = read_regular(token_file).decode("utf-8")  # (never waiting on a FIFO)
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read --token-file {token_file}: {exc}") from None
    lines = (line.replace("\ufeff", "").strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def token_problem(token: str) -> str | None:
    """Why `token` cannot be sent as gRPC metadata (not printable ASCII), or None."""
    bad = sorted({c for c in token if not " " <= c <= "~"})
    if not bad:
        return None
    return "a token must be printable ASCII; it holds " + ", ".join(f"U+{ord(c):04X}" for c in bad)


#: (token file, mode) pairs already warned of in this process (`warn_if_others_can_read`).
_WARNED_TOKEN_MODES: set[tuple[str, int]] = set()


def warn_if_others_can_read(token_file: Path) -> None:
    """Log a WARNING (event token_file_open) when `token_file`, a regular file, grants other
    users read or write access (mode & 0o006): a bearer token is a password, and `echo TOKEN
    > FILE` under the usual umask 022 gives 0644. Once per file and mode per process: the
    cloud reads its file again at each rotation, and says so again only when the mode changed.

    A warning, not a refusal: a file shared with a group (0640, a service group) is a
    deliberate choice and not warned of; a world-readable one still works, as it did, and a
    running fleet must not stop at an upgrade. Not checked off POSIX, or when the file cannot
    be examined (reading it says why)."""
    if os.name != "posix":
        return
    try:
        found = os.stat(token_file)
    except OSError:
        return
    mode = found.st_mode & 0o777
    if not stat.S_ISREG(found.st_mode) or not mode & 0o006 or _kept_out(token_file):
        return
    key = (os.path.abspath(token_file), mode)
    if key in _WARNED_TOKEN_MODES:
        return
    _WARNED_TOKEN_MODES.add(key)
    can = {0o004: "read", 0o002: "change", 0o006: "read and change"}[mode & 0o006]
    logging.getLogger(__name__).warning(
        "--token-file %s has mode %04o: other users of this machine can %s the bearer "
        "token in it; run `chmod 600 %s` (the token is still used)",
        token_file, mode, can, os.path.realpath(token_file),
        extra={"fields": {"event": "token_file_open", "path": str(token_file),
                          "mode": f"{mode:04o}"}},
    )  # fmt: skip


def _kept_out(path: Path) -> bool:
    """Whether a folder on the way to `path` (its real one) keeps other users out (no search
    permission for them, 0700): they cannot reach the file, whatever its own mode."""
    folder = Path(os.path.realpath(path)).parent
    for step in (folder, *folder.parents):
        try:
            if not os.stat(step).st_mode & 0o001:
                return True
        except OSError:
            return False
    return False


def read_token(token_file: Path | None) -> str | None:
    """The bearer token: `token_file`'s first token line (see token_lines), else the
    SPLITDET_CLOUD_TOKEN environment variable, else None.

    CommandError if the file cannot be read, holds no token, or the token holds anything but
    printable ASCII: gRPC refuses such metadata on every call, so the edge would otherwise
    find out only when its first flagged image fails. A WARNING when other users can read the
    file (`warn_if_others_can_read`).
    """
    if token_file is not None:
        lines = token_lines(token_file)
        warn_if_others_can_read(token_file)
        if not lines:
            raise CommandError(f"--token-file {token_file} is empty")
        token, source = lines[0], f"--token-file {token_file}"
    else:
        token, source = os.environ.get(TOKEN_ENV) or None, f"${TOKEN_ENV}"
        if token is None:
            return None
    problem = token_problem(token)
    if problem:
        raise CommandError(f"{source}: {problem}")
    return token


#: What each kind of PEM file must hold: a line ending with this marker.
PEM_MARKERS = {"certificate": "-----BEGIN CERTIFICATE-----", "private key": "PRIVATE KEY-----"}


def read_pem(option: str, path: Path, kind: str) -> bytes:
    """The bytes of a PEM `kind` ("certificate" or "private key") file given as `option`;
    CommandError naming both when it cannot be read or is not PEM (gRPC reads TLS files only
    when it binds or connects, and then says only that it could not)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"{option} {path}: cannot read ({exc.strerror or exc})") from None
    marker = PEM_MARKERS[kind]
    if marker.encode() not in data:
        raise CommandError(f"{option} {path}: not a PEM {kind} (no {marker!r} line)")
    return data


#: The ready file's keys naming the process instance beside its pid (`process_identity`).
START_TICKS_KEY, BOOT_ID_KEY = "pid_start_ticks", "boot_id"


def write_ready_file(path: Path, info: dict) -> None:
    """Write `info` as one JSON line to `path` whole (a temporary file renamed over it), for
    supervisors and tests; OSError naming --ready-file when it cannot be written. When `info`
    names this process's pid, what identifies this process instance is added beside it
    (`process_identity`: a later start tells a reused pid, e.g. pid 1 in a container, from
    this process)."""
    import json

    if info.get("pid") == os.getpid():
        info = {**info, **process_identity(os.getpid())}
    try:
        atomic_write(path, json.dumps(info) + "\n", parents=False)
    except OSError as exc:
        raise OSError(f"--ready-file {path}: cannot write ({exc.strerror or exc})") from None


def process_identity(pid: int) -> dict[str, object]:
    """What tells process `pid` from another that has, or had, the same pid: its start time
    in clock ticks after boot (field 22 of /proc/PID/stat) and this boot's id
    (/proc/sys/kernel/random/boot_id), under `START_TICKS_KEY` and `BOOT_ID_KEY`; either
    left out when it cannot be read (no /proc: off Linux)."""
    from splitdet.edge.boot_clock import boot_id  # (stdlib only)

    identity: dict[str, object] = {}
    ticks = _start_ticks(pid)
    if ticks is not None:
        identity[START_TICKS_KEY] = ticks
    boot = boot_id()
    if boot is not None:
        identity[BOOT_ID_KEY] = boot
    return identity


def _start_ticks(pid: int) -> int | None:
    """Process `pid`'s start time in clock ticks after boot, or None (no such process, no
    /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            text = stat_file.read().decode("ascii", "replace")
        # after the command name, in parentheses that may hold anything: field 3 on
        return int(text[text.rindex(")") + 1 :].split()[22 - 3])
    except (OSError, ValueError, IndexError):
        return None


def _same_instance(info: dict, pid: int) -> bool | None:
    """Whether the ready file content `info`, naming `pid`, was written by the process that
    has that pid now: False when the boot id or start time it records differs from the live
    process's (the pid reused: a process of an earlier boot, or one that ran as pid 1 in
    another container), True when what it records matches, None when it records neither (a
    file an earlier version wrote) or the process cannot be examined (the pid alone decides,
    as before)."""
    from splitdet.edge.boot_clock import boot_id

    recorded_ticks, recorded_boot = info.get(START_TICKS_KEY), info.get(BOOT_ID_KEY)
    compared = False
    if isinstance(recorded_boot, str):
        boot = boot_id()
        if boot is not None:
            if boot != recorded_boot:
                return False
            compared = True
    if isinstance(recorded_ticks, int) and not isinstance(recorded_ticks, bool):
        ticks = _start_ticks(pid)
        if ticks is not None:
            if ticks != recorded_ticks:
                return False
            compared = True
    return True if compared else None


def remove_ready_file(path: Path, pid: int | None = None, unless_running: bool = False) -> None:
    """Remove a --ready-file: one left by a process stopped or killed would tell a supervisor
    that a dead, or still loading, process is ready. With `pid`, only one naming that pid (a
    stop: what another process wrote since is its own), and, when it records the process
    instance (`process_identity`), this one; with `unless_running`, not one naming another live
    process (a start: a second process given the same file must not unready the first; this
    one writes the file once it is ready), unless what it records of the process instance
    differs from the live one's (its pid reused: e.g. pid 1, alive in every container, named
    by a daemon that ran as pid 1). CommandError naming the file when a start cannot remove
    it."""
    import json

    info: dict = {}
    try:
        loaded = json.loads(read_regular(path))  # (a FIFO there: unreadable, never waited on)
        named = loaded.get("pid")
        info = loaded
    except FileNotFoundError:
        return
    except (OSError, ValueError, AttributeError):
        named = None  # unreadable or not ours to judge: removed at a start, left at a stop
        if pid is not None:
            return
    if pid is not None and (named != pid or _same_instance(info, pid) is False):
        return
    if (
        unless_running
        and isinstance(named, int)
        and named != os.getpid()
        and _alive(named)
        and _same_instance(info, named) is not False
    ):
        logging.getLogger(__name__).info(
            "--ready-file %s names pid %d, still running: left until this one is ready",
            path, named,
        )  # fmt: skip
        return
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        if pid is not None:
            return
        raise CommandError(
            f"--ready-file {path}: cannot remove the one an earlier run left ({exc.strerror})"
        ) from None


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's counts)."""

    if pid <= 0:  # (0 and -N would ask about process groups)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (EPERM: it exists, another user's)
        return True
    return True


def add_pixel_bits_option(parser: argparse.ArgumentParser, default: int | None) -> None:
    """`--pixel-bits N`: the bits a 16-bit grayscale image's values use (`ModelConfig.
    pixel_bits`); `default` None: the preset's or resumed run's."""
    from splitdet.shared.config import MIN_PIXEL_BITS

    shown = "a resumed run's, else 16" if default is None else str(default)
    parser.add_argument(
        "--pixel-bits",
        type=int_in(MIN_PIXEL_BITS, 16),
        default=default,
        metavar="N",
        help=f"bits a 16-bit grayscale image's values use, {MIN_PIXEL_BITS}-16 (default: "
        f"{shown}: values over all of 0..65535): 12 for a Mono12 camera that saves its "
        "values unscaled (0..4095) in 16-bit PNG or TIFF files; such values are scaled by 2**N - "
        "1, and a pixel past it is refused. 8-bit images are unaffected, and so is a PGM of a "
        "maximum other than 255 and 65535 (read over its own maximum); a PGM of maximum 65535 "
        "is read as any 16-bit image, and a 16-bit colour PNG is refused unless N is 16",
    )


def add_box_refine_option(parser: argparse.ArgumentParser) -> None:
    """`--box-refine-steps N`: the checkpoint's box refinement replaced at inference."""
    parser.add_argument(
        "--box-refine-steps",
        type=int,
        default=None,
        metavar="N",
        help="extra passes of the box head over its own boxes at inference, 0-4 (default: the "
        "checkpoint's; the 'cpu' preset's is 2). Gives a checkpoint trained before box "
        "refinement existed the refinement, or takes it away; the checkpoint file is unchanged",
    )


if __name__ == "__main__":
    # `python -m splitdet.shared.cli`: run the imported module's main, whose CommandError is the
    # one commands raise (this __main__ copy's is another class: a traceback, exit status 1).
    from splitdet.shared.cli import main as imported_main

    sys.exit(imported_main())
