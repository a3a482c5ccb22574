"""A single-value path option given twice is refused (argparse would keep the last one without a
word: `train --data data/gaskets --data review` trained on review alone), in every subcommand,
while repeatable options and non-path options repeat as before."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from splitdet.shared.cli import build_parser


def _refused(capsys, argv: list[str]) -> str:
    """The parse of `argv` exits with status 2 and argparse's usage line, or under JSON logs
    (`edge run`'s default) one JSON `fatal` line (parsed only: were it accepted, no command
    runs)."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.startswith("usage: splitdet ") or json.loads(err)["event"] == "fatal", err
    return err


def test_train_given_two_datasets_is_refused_and_told_to_merge(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (relative paths: none of them exists)
    run = tmp_path / "run"
    argv = ["train", "--data", "data/gaskets", "--data", "review", "--out", str(run)]
    err = _refused(capsys, argv)
    assert (
        "splitdet train: error: argument --data: given twice ('data/gaskets', 'review'); train "
        "reads one dataset: to train on several, merge them with `splitdet data merge"
    ) in err
    assert not run.exists()

    # the console script itself: exit status 2, the usage line, no traceback
    done = subprocess.run(
        [sys.executable, "-m", "splitdet.shared.cli", *argv],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2 and "usage: splitdet train" in done.stderr
    assert "argument --data: given twice" in done.stderr and "Traceback" not in done.stderr

    # while an option meant to repeat still does, and a non-path one still overrides
    args = build_parser().parse_args(
        ["--log-level", "DEBUG", "--log-level", "INFO", "cloud", "--model", "a", "--model", "b"]
    )
    assert [str(m) for m in args.model] == ["a", "b"] and args.log_level == "INFO"
    args = build_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--preset", "cpu", "--preset", "tiny"]
    )
    assert (args.data, args.out, args.preset) == ("d", "o", "tiny")
    assert not any(name.startswith("_") for name in vars(args))


@pytest.mark.parametrize(
    "argv, option",
    [
        (["train", "--data", "d", "--out", "a", "--out", "b"], "--out"),
        (["eval", "--data", "d", "--checkpoint", "a.pt", "--checkpoint", "b.pt"], "--checkpoint"),
        (["eval", "--data", "d", "--checkpoint", "c.pt", "--calibrate-data", "a",
          "--calibrate-data", "b"], "--calibrate-data"),
        (["export", "--checkpoint", "c.pt", "--out", "a", "--out", "b"], "--out"),
        (["edge", "status", "--db", "a.sqlite", "--db", "b.sqlite"], "--db"),
        (["edge", "run", "--model", "m", "--watch", "a", "--watch", "b", "--db", "e.sqlite",
          "--cloud", "h:1"], "--watch"),
        (["edge", "collect", "--db", "e.sqlite", "--out", "a", "--out=b"], "--out"),
        (["predict", "x.png", "--model", "a", "--model", "b"], "--model"),
        (["bench", "--model", "m", "--checkpoint", "c.pt", "--data", "a", "--data", "b",
          "--out", "r"], "--data"),
        (["synth", "--out", "a", "--out", "b"], "--out"),
        (["train", "--data", "d", "--out", "o", "--init", "a.pt", "--init", "coco"], "--init"),
    ],
)  # fmt: skip
def test_a_path_option_given_twice_is_refused_in_every_command(capsys, argv, option):
    err = _refused(capsys, argv)
    assert f"error: argument {option}: given twice (" in err, err
    assert ("splitdet data merge" in err) == (option == "--data")


def test_the_torchrun_entry_refuses_a_repeated_data_too(capsys):
    """`torchrun ... -m splitdet.training.cli_train` parses with its own parser: the README's
    two-GPU path kept the last --data there."""
    from splitdet.training.cli_train import main as torchrun_main

    with pytest.raises(SystemExit) as exited:
        torchrun_main(["--data", "data/gaskets", "--data", "review", "--out", "run"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --data: given twice ('data/gaskets', 'review')" in err, err


def test_the_ranks_take_the_log_level_given_after_train(tmp_path, capsys):
    """(A review: `splitdet train ... --nproc-per-node 2 --log-level WARNING` handed the option
    to each rank, whose own parser did not know it: every rank exited 2.) The rank's parser
    takes it; here the run goes on to the data, which is missing."""
    from splitdet.training.cli_train import main as torchrun_main

    status = torchrun_main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "run"),
                            "--preset", "tiny", "--log-level", "WARNING"])  # fmt: skip
    err = capsys.readouterr().err
    assert status != 0 and "unrecognized arguments" not in err, err
    assert "none" in err, err
