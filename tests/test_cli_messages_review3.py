"""What the CLI says is true (review 3, messages):

1. `--since '2h ago'` is taken, as the help of results, requeue and collect writes it.
2. A malformed retention (`1M`) is answered with examples the option takes (not 30s).
3. A --db that is a folder is called a folder, not "no such results database".
4. `edge check --model FILE` names the file once.
5. `predict --model RUN`, a training run's folder, says to export its checkpoint first.
6. `bench --help` shows its defaults; `demo --help` says what the benchmark's threads are.
7. The demo's and the benchmark's progress bars are not drawn into a log file.
8. `edge results --help` says any --fingerprint prefix works; requeue and abandon why 8.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from splitdet.edge.cli_edge_options import parse_since, retention_type

from support import run_main


def _one_text(text: str) -> str:
    """`text` with argparse's line wrapping undone."""
    return " ".join(text.split())


# ---------------------------------------------------------------------- 1. --since '2h ago'


def test_since_takes_an_age_with_or_without_ago(capsys, store_db):
    """Before: "2h ago" was refused with "expected 30s/15m/2h/7d ago"."""
    now = 1_700_000_000.0
    assert parse_since("2h ago", now) == parse_since("2h", now) == now - 7200
    assert parse_since(" 15m  AGO ", now) == now - 900
    for action in ("results", "requeue", "collect"):
        argv = ["edge", action, "--db", store_db, "--since", "2h ago"]
        if action == "collect":
            argv += ["--out", store_db.parent / "review"]
        code, _, err = run_main(capsys, *argv)
        assert code == 0 and "--since" not in err, (action, err)
        code, out, _ = run_main(capsys, "edge", action, "--help")
        assert "'2h ago'" in _one_text(out), action


def test_since_refuses_ago_after_anything_but_an_age(capsys, store_db):
    """Unix seconds take no " ago": "3600 ago" is not an hour ago, and is refused."""
    code, _, err = run_main(capsys, "edge", "results", "--db", store_db, "--since", "3600 ago")
    assert code == 2
    assert "--since '3600 ago': expected 30s, 15m, 2h or 7d" in err and "'2h ago'" in err, err


# ------------------------------------------------------------ 2. a malformed retention's examples


@pytest.mark.parametrize("action", ["prune", "run"])
def test_a_malformed_retention_is_answered_with_ages_it_takes(capsys, tmp_path, action):
    """Before: `--older-than 1M` got "expected 30s, 15m, 2h or 7d", and 30s is refused."""
    option = "--older-than" if action == "prune" else "--keep-results"
    argv = ["edge", action, "--db", tmp_path / "edge.sqlite", option, "1M"]
    if action == "run":
        argv += ["--model", tmp_path, "--watch", tmp_path]
    code, _, err = run_main(capsys, *argv)
    assert code == 2 and "'1M'" in err, err
    assert "30s" not in err, err
    examples = ("15m", "12h", "30d")
    assert all(example in err for example in examples), err
    assert all(retention_type(example) >= 60 for example in examples)  # each one taken


# ------------------------------------------------------------------------- 3. --db a folder


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["results"],
        ["prune", "--older-than", "30d"],
        ["prune", "--older-than", "30d", "--dry-run"],
        ["requeue"],
        ["abandon", "--fingerprint", "3c5823c70655"],
        ["collect", "--out", "review"],
    ],
    ids=lambda argv: "-".join(a for a in argv if not a[0].isdigit()),
)
def test_a_db_that_is_a_folder_is_called_a_folder(capsys, tmp_path, argv):
    """Before: "--db data: no such results database" for the folder `data`."""
    folder = tmp_path / "data"
    folder.mkdir()
    code, _, err = run_main(capsys, "edge", argv[0], "--db", folder, *argv[1:])
    assert code == 2
    assert f"--db {folder}: is a folder; --db names the database file" in err, err
    assert "no such results database" not in err and len(err.strip().splitlines()) == 1


def test_a_missing_db_is_still_said_to_be_missing(capsys, tmp_path):
    missing = tmp_path / "none.sqlite"
    for argv in (["status"], ["prune", "--older-than", "30d"]):
        code, _, err = run_main(capsys, "edge", argv[0], "--db", missing, *argv[1:])
        assert code == 2 and f"--db {missing}: no such results database" in err, err


# ------------------------------------------------------------ 4. edge check names a file once


def test_edge_check_names_a_checkpoint_file_once(capsys, tmp_path):
    """Before: "FAIL model run/best.pt: run/best.pt: a file, not the folder ..."."""
    checkpoint = tmp_path / "run" / "best.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"not an export")
    code, out, _ = run_main(capsys, "edge", "check", "--model", checkpoint)
    assert code == 1
    line = out.splitlines()[0]
    assert line.startswith("FAIL") and line.count(str(checkpoint)) == 2, line  # the hint's too
    assert f"{checkpoint}: {checkpoint}" not in line
    assert f"{checkpoint}: a file, not the folder `splitdet export` makes" in line, line


# ------------------------------------------------------- 5. predict --model a training run


@pytest.mark.parametrize(
    ("held", "named"), [(("last.pt", "best.pt"), "best.pt"), (("last.pt",), "last.pt")]
)
def test_a_training_run_given_as_model_says_to_export_its_checkpoint(capsys, tmp_path, held, named):
    """Before: only "run/manifest.json: missing; is run a directory made by splitdet export?"."""
    run = tmp_path / "run"
    run.mkdir()
    for name in held:
        (run / name).write_bytes(b"a checkpoint")
    image = tmp_path / "a.png"
    image.write_bytes(b"")
    code, _, err = run_main(capsys, "predict", image, "--model", run)
    assert code == 2, err
    said = _one_text(err)
    assert f"it holds {named}, a training checkpoint" in said, err
    assert f"export it first: splitdet export --checkpoint {run / named} --out DIR" in said, err
    code, out, _ = run_main(capsys, "edge", "check", "--model", run)  # the same, the path once
    assert code == 1 and f"it holds {named}" in out and out.count(f"{run}: {run}") == 0, out


def test_a_folder_without_manifest_or_checkpoint_is_asked_about(capsys, tmp_path):
    code, _, err = run_main(capsys, "predict", tmp_path / "a.png", "--model", tmp_path)
    assert code == 2 and "a directory made by splitdet export?" in err, err
    assert "checkpoint" not in err, err


# ----------------------------------------------------------------------------- 6. help texts


def test_bench_help_shows_its_defaults(capsys):
    """Before: --split, --defect-rates, --images, --jpeg-quality, --rd-images and --seed
    showed no default (and --defect-rates no help at all)."""
    from splitdet.bench.run import BenchConfig

    code, out, _ = run_main(capsys, "bench", "--help")
    assert code == 0
    said, real = _one_text(out), BenchConfig(Path("m"), Path("c"), Path("d"), Path("o"))
    rates = ",".join(f"{r:g}" for r in real.defect_rates)
    assert f"--split SPLIT split the streams are drawn from (default: {real.split})" in said
    assert f"per rate (default: {rates})" in said, said
    for option, value in (
        ("--images N", real.n_images),
        ("--jpeg-quality Q", real.jpeg_quality),
        ("--rd-images N", real.rd_images),
        ("--seed SEED", real.seed),
    ):
        shown = said.split(f"{option} ", 1)[1].split(" --", 1)[0]
        assert shown.endswith(f"default: {value})"), (option, shown)


def test_demo_help_says_the_benchmark_runs_on_all_cores(capsys):
    """Before: "torch's own count, its physical cores, to train and benchmark", while the
    benchmark's default is every usable core (bench.run.usable_cores)."""
    code, out, _ = run_main(capsys, "demo", "--help")
    said = _one_text(out)
    assert code == 0 and "to train and benchmark" not in said
    assert "to train and evaluate; all the cores the demo may run on for the benchmark" in said


# ------------------------------------------------------------ 7. no progress bars in a log file


def test_the_demos_camera_bar_is_not_drawn_into_a_log_file(capsys, tmp_path):
    """Before: the "edge results" bar was drawn whenever --no-progress was not given, into a
    log file too (stderr here is pytest's capture: not a terminal)."""
    from splitdet.bench.demo import DemoConfig, _feed_camera

    capsys.readouterr()
    assert _feed_camera(DemoConfig(tmp_path, progress=True), [], tmp_path, tmp_path / "x") == []
    assert capsys.readouterr().err == ""


def test_the_benchmarks_bar_is_not_drawn_into_a_log_file(capsys):
    """Before: `splitdet bench` without --no-progress drew its bar into a log file. (The bar
    run_benchmark draws, made alone: a benchmark run needs two servers and minutes.)"""
    from splitdet.bench.run import progress_bar

    capsys.readouterr()
    with progress_bar(3, progress=True) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""


def test_the_demos_synth_stage_draws_no_bars_into_a_log_file(capsys, tmp_path):
    """Before: the demo passed --no-progress to `splitdet synth` only when given it, and synth
    draws its bars whatever stderr is."""
    from splitdet.bench.demo import DemoConfig, make_data

    config = DemoConfig(tmp_path, image_size=(320, 256), dataset=(1, 1, 1, 1), progress=True)
    capsys.readouterr()
    assert make_data(config) is False
    err = capsys.readouterr().err
    assert "\r" not in err and "it/s" not in err and "img/s" not in err, err


# --------------------------------------------------------------- 8. --fingerprint prefixes


def test_fingerprint_help_says_which_prefixes_each_action_takes(capsys):
    """Before: `edge results --help` did not say it takes any prefix, while requeue and abandon
    refuse fewer than 8 hex digits."""
    code, out, _ = run_main(capsys, "edge", "results", "--help")
    assert code == 0 and "starts with HEX: any prefix, even a digit" in _one_text(out)
    for action in ("requeue", "abandon"):
        code, out, _ = run_main(capsys, "edge", action, "--help")
        said = _one_text(out)
        assert code == 0 and "first 8 or more hex digits" in said and "fewer are refused" in said


def test_results_takes_a_one_digit_prefix_and_abandon_refuses_it(capsys, store_db):
    code, _, err = run_main(capsys, "edge", "results", "--db", store_db, "--fingerprint", "3")
    assert code == 0, err
    code, _, err = run_main(capsys, "edge", "abandon", "--db", store_db, "--fingerprint", "3")
    assert code == 2 and "first 8 or more" in err, err


def test_parse_since_keeps_its_other_forms():
    now = time.time()
    assert parse_since("30s", now) == now - 30
    assert parse_since("1700000000", now) == 1_700_000_000
    assert parse_since("2024-05-01T08:00Z", now) == 1_714_550_400
