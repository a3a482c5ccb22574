"""The `splitdet` command line (review 3): options given twice, abbreviations, a negative
--threshold, --log-level after the command, a missing command or action, a port given as
--listen, --version, progress bars into a log file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.shared.cli import address_problem, build_parser, main

from support import run_without_torch


def _refused(capsys, argv: list[str]) -> str:
    """The parse of `argv` exits with status 2: its last stderr line (no traceback)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


EDGE_RUN = ["edge", "run", "--model", "m", "--watch", "w", "--db", "e.sqlite", "--log-format",
            "text"]  # fmt: skip


# 2. --cloud, --threshold and --timeout given twice -------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["edge", "check", "--model", "m", "--cloud", "10.0.0.5:50051", "--cloud", "10.0.0.6:50051"],
        [*EDGE_RUN, "--cloud", "10.0.0.5:50051", "--cloud=10.0.0.6:50051"],
        ["predict", "x.png", "--model", "m", "--cloud", "10.0.0.5:50051", "--cloud",
         "10.0.0.6:50051"],
    ],
)  # fmt: skip
def test_cloud_given_twice_is_refused_naming_comma_separated_replicas(capsys, argv):
    """`--cloud A --cloud B` checked (or sent to) B alone, A dropped without a word."""
    line = _refused(capsys, argv)
    assert "argument --cloud: given twice ('10.0.0.5:50051', '10.0.0.6:50051')" in line, line
    assert "comma-separate replicas (--cloud 10.0.0.5:50051,10.0.0.6:50051)" in line, line


@pytest.mark.parametrize("option, values", [("--threshold", ("0.5", "0.7")),
                                            ("--timeout", ("5", "30"))])  # fmt: skip
def test_threshold_and_timeout_given_twice_are_refused(capsys, option, values):
    for argv in (["predict", "x.png", "--model", "m", "--cloud", "h:1"], [*EDGE_RUN, "--cloud",
                 "h:1"], ["eval", "--data", "d", "--model", "m"]):  # fmt: skip
        line = _refused(capsys, [*argv, option, values[0], option, values[1]])
        assert f"argument {option}: given twice" in line and "give it once" in line, line
    args = build_parser().parse_args([*EDGE_RUN, "--cloud", "h:1", option, values[1]])
    assert getattr(args, option[2:]) == float(values[1])  # (once: as before)


# 3. abbreviations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, said",
    [
        (["edge", "results", "--db", "e.db", "--after", "3"], "unrecognized arguments: --after 3"),
        ([*EDGE_RUN, "--cloud", "h:1", "--thresh", "2"], "unrecognized arguments: --thresh 2"),
        (["cloud", "--model", "m", "--log-f", "json"], "unrecognized arguments: --log-f json"),
        # (a required option's absence is said first: --chec is not --checkpoint)
        (["export", "--chec", "m.pt", "--out", "x"], "required: --checkpoint"),
        (["export", "--checkpoint", "m.pt", "--o", "x"], "required: --out"),
    ],
)  # fmt: skip
def test_an_abbreviated_option_is_refused_not_read_as_another(capsys, argv, said):
    """`edge results --after 3` was read as `--after-id 3` (rows 4 and 5 only, exit 0), `export
    --chec m --o x` as --checkpoint and --out, `edge run --thresh 2` as --threshold."""
    line = _refused(capsys, argv)
    assert said in line, line


def test_edge_results_after_is_refused_by_the_command(tmp_path, capsys):
    """The reviewer's case through `main`, on a real results database."""
    from splitdet.edge.store import ResultStore

    db = tmp_path / "e.sqlite"
    ResultStore(db).close()
    with pytest.raises(SystemExit) as exited:
        main(["edge", "results", "--db", str(db), "--after", "3"])
    assert exited.value.code == 2
    err = capsys.readouterr().err  # (said by the action's parser, naming the option meant)
    assert (
        "splitdet edge results: error: unrecognized arguments: --after 3 (--after: did you "
        "mean --after-id? No option is taken abbreviated)" in err
    ), err
    assert main(["edge", "results", "--db", str(db), "--after-id", "0"]) == 0


# 4. a negative --threshold -------------------------------------------------------------------


def test_a_negative_threshold_is_refused_and_above_one_still_taken(tiny_model_dir, tmp_path,
                                                                   capsys):  # fmt: skip
    """`predict --threshold -1` flagged every image, `edge run --threshold -0.5` stored -0.5 in
    its results; above 1 flags nothing on purpose (documented) and stays."""
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((64, 80, 3), np.uint8)).save(image)
    watch = tmp_path / "watch"
    watch.mkdir()
    runs = {
        "predict": ["predict", str(image), "--model", str(tiny_model_dir), "--no-progress"],
        "edge": ["edge", "run", "--model", str(tiny_model_dir), "--watch", str(watch), "--db",
                 str(tmp_path / "e.sqlite"), "--cloud", "127.0.0.1:9", "--once",
                 "--log-format", "text", "--threads", "1"],
        "eval": ["eval", "--data", str(tmp_path), "--model", str(tiny_model_dir)],
    }  # fmt: skip
    for command, argv in runs.items():
        for value in ("-1", "-0.5", "-inf"):
            assert main([*argv, f"--threshold={value}"]) == 2
            last = capsys.readouterr().err.strip().splitlines()[-1]
            assert last == (
                f"splitdet {command}: error: --threshold {float(value):g}: must be a p(defect) "
                "from 0 to 1 (0 flags every image, above 1 none)"
            ), last
    out = tmp_path / "out.json"
    assert main([*runs["predict"], "--threshold", "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["verdict"] == "ok"


# 5. --log-level after the command ------------------------------------------------------------


def test_log_level_is_taken_after_the_command_too():
    """edge/README says `--log-level DEBUG` for `edge run`'s DEBUG lines: given after the
    command it was "unrecognized arguments"."""
    parse = build_parser().parse_args
    assert parse([*EDGE_RUN, "--cloud", "h:1", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert parse(["synth", "--out", "x", "--log-level", "ERROR"]).log_level == "ERROR"
    assert parse(["edge", "--log-level", "WARNING", "status", "--db", "e"]).log_level == "WARNING"
    # before the command as ever; after it, the later one wins; neither: INFO
    assert parse(["--log-level", "DEBUG", "edge", "status", "--db", "e"]).log_level == "DEBUG"
    later = ["--log-level", "DEBUG", "edge", "status", "--db", "e", "--log-level", "ERROR"]
    assert parse(later).log_level == "ERROR"
    assert parse(["edge", "status", "--db", "e"]).log_level == "INFO"


def test_log_level_after_the_command_has_the_same_choices(capsys):
    line = _refused(capsys, ["edge", "status", "--db", "e", "--log-level", "LOUD"])
    assert line.startswith("splitdet edge status: error: argument --log-level: invalid choice")


# 6. no command, no action --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, prog, missing, some",
    [([], "splitdet", "COMMAND", "synth, data"), (["edge"], "splitdet edge", "ACTION", "run"),
     (["data"], "splitdet data", "ACTION", "check, split, merge")],
)  # fmt: skip
def test_no_command_or_action_is_an_error_naming_what_is_missing(argv, prog, missing, some):
    """`splitdet` printed its help to stdout (exit 0), `splitdet edge` its full help to stderr
    with no error line (exit 2), `splitdet data` an error line: now each the last."""
    done = subprocess.run([sys.executable, "-m", "splitdet.shared.cli", *argv],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stdout == "", done
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith(f"usage: {prog} "), done.stderr
    assert lines[-1].startswith(
        f"{prog}: error: the following arguments are required: {missing} (one of: {some}"
    ), lines[-1]
    assert "positional arguments" not in done.stderr  # (the usage, not the whole help)


def test_help_still_exits_zero(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0 and "COMMAND" in capsys.readouterr().out


# 7. a port alone as an address ---------------------------------------------------------------


def test_a_port_alone_as_listen_address_says_no_host(capsys):
    assert main(["cloud", "--model", "m", "--listen", "52502"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "splitdet cloud: error: --listen '52502': no host (expected host:port, e.g. "
        "0.0.0.0:52502 or 127.0.0.1:52502)"
    ), last
    # to connect to: an example a client can reach; a dotted number is still no IPv4 address
    assert address_problem("50051", port_zero=False).startswith("no host (expected host:port")
    assert address_problem("1.2.3:50051") == "'1.2.3' is not an IPv4 address"


# 8. --version --------------------------------------------------------------------------------


def test_version_names_the_spec_and_the_runtimes_without_importing_torch():
    """`--version` printed `splitdet 0.1.0` alone; an edge and a cloud must share the split
    spec and manifest format. Torch's version is read from its metadata: never imported."""
    from splitdet.shared import __version__
    from splitdet.shared.manifest import MANIFEST_FORMAT
    from splitdet.shared.spec import SPEC_VERSION

    done = run_without_torch(
        """
        import sys
        from splitdet.shared.cli import main
        try:
            main(["--version"])
        except SystemExit as exc:
            print("exit", exc.code, "torch" in sys.modules)
        """
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "exit 0 False", done.stdout
    text = "\n".join(lines[:-1])
    from splitdet.training.provenance import splitdet_version

    assert lines[0] == f"splitdet {splitdet_version()}"
    if (Path(__file__).resolve().parent.parent / ".git").exists():  # (the commit it runs)
        assert lines[0].startswith(f"splitdet {__version__} (git "), lines[0]
    assert f"split spec {SPEC_VERSION}, manifest format {MANIFEST_FORMAT}" in text
    assert f"python {sys.version.split()[0]}, onnxruntime " in text and ", torch " in text


# 9. progress bars into a log file ------------------------------------------------------------


def test_predict_and_eval_draw_no_bar_when_stderr_is_no_terminal(tiny_model_dir, tiny_voc,
                                                                 tmp_path, capsys):  # fmt: skip
    """Without --no-progress, predict's and eval's tqdm bars went into a log file as lines of
    carriage returns (`make demo > demo.log`): a captured stderr is no terminal."""
    from splitdet.shared.checkpoint import save_checkpoint

    from conftest import make_tiny_model

    images = Path(tiny_voc) / "JPEGImages"
    assert main(["predict", str(images), "--model", str(tiny_model_dir), "--threshold", "2"]) == 0
    checkpoint = tmp_path / "c.pt"
    save_checkpoint(checkpoint, make_tiny_model(), gate_threshold=0.5)
    evals = (["--model", str(tiny_model_dir)],
             ["--checkpoint", str(checkpoint), "--calibrate-split", "none"])  # fmt: skip
    for what in evals:
        out = tmp_path / f"eval-{what[0][2:]}.json"
        assert main(["eval", "--data", str(tiny_voc), *what, "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "img/s" not in err and "batch/s" not in err, err


def test_version_into_a_closed_pipe_exits_quietly():
    """`PYTHONUNBUFFERED=1 splitdet --version | head -1` printed a BrokenPipeError traceback and
    exited 1 when head had gone (containers set PYTHONUNBUFFERED): `--version` runs while the
    arguments are parsed, before main's own BrokenPipeError handler."""
    import os
    import subprocess

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader gone before the first byte: every write fails, EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-c", "import sys; from splitdet.shared.cli import main; "
             "sys.exit(main(['--version']))"],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, "")
