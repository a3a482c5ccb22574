"""Review 3 of `splitdet synth` and `splitdet data check/split/merge`:

1. SIGTERM or SIGKILL of synth left its render workers running on as orphans, each writing the
   image it was rendering into --out seconds after the command had returned (into a fresh
   --overwrite dataset made meanwhile). Now SIGTERM ends synth as Ctrl-C does (exit 143, one
   line, the pool terminated), a SIGKILLed synth's workers end with it, and workers never
   write: the parent does. A Ctrl-C while the workers still started printed their
   KeyboardInterrupt tracebacks (the demo's test of it failed 1 run in 2): now one line.
2. A --val-fraction that left train no image, or no defective image, was accepted (exit 0);
   now refused before anything is written, naming --val-fraction. --defective 0 (a
   defect-free set, for false-alarm tests) is still made, with a warning.
3. An interrupted or disk-full synth's remnant (dataset.json "complete": false) passed
   `data split` and then `data check`; now both name it, and a rerun without --overwrite
   says it is unfinished.
4. `data check` of a defect-free-only set advised "train with --classes ''".
5. `data check PARENT` / `data split PARENT` said "not a VOC dataset" without naming the
   sub-folder that is one.
6. Progress bars were drawn (carriage returns) into log files: now on a terminal only.

Real commands: subprocesses for the signals, `main` in this process otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from splitdet.shared.cli import main
from splitdet.training import synth

from support import FILE_SIZE_LIMITED, wait_for

pytestmark = pytest.mark.timeout(120)

#: A small dataset's options (7 images, 256x256), written on one worker.
SMALL_COUNTS = ["--size", "256x256", "--defective", "3", "--free", "2", "--test-defective",
                "1", "--test-free", "1"]  # fmt: skip
SMALL = [*SMALL_COUNTS, "--workers", "1", "--no-progress"]
#: A dataset that takes a while (120 images of 816x680) on two workers: signalled mid-way.
SLOW = ["--size", "816x680", "--defective", "120", "--free", "0", "--test-defective", "0",
        "--test-free", "0", "--workers", "2", "--no-progress"]  # fmt: skip
INTERRUPTED = (
    "an interrupted `splitdet synth` (dataset.json complete: false): rerun it with --overwrite"
)


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    """A finished synthetic dataset (`SMALL`)."""
    out = tmp_path_factory.mktemp("small") / "data"
    assert main(["synth", "--out", str(out), *SMALL]) == 0
    return out


# ---------------------------------------------------------------- 1. no worker outlives synth


def _workers_of(parent: int) -> list[int]:
    """Pids of the live (not zombie) multiprocessing workers whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == parent and stat[0] != "Z" and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _files(out: Path) -> dict[str, int]:
    """Every file under `out` (relative path -> size)."""
    return {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*") if p.is_file()}


def _popen_synth(out: Path, err_path: Path) -> subprocess.Popen:
    """`splitdet synth` of `SLOW` into `out`, its stderr in `err_path`, in a session of its own."""
    with err_path.open("wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "splitdet.shared.cli", "synth", "--out", str(out), *SLOW],
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _start_slow_synth(out: Path, err_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """`splitdet synth` of `SLOW` into `out`, once both its workers run and an image is written:
    the process and its workers' pids."""
    process = _popen_synth(out, err_path)

    def rendering() -> list[int] | None:
        assert process.poll() is None, err_path.read_text(errors="replace")
        workers = _workers_of(process.pid)
        images = out / "JPEGImages"
        written = images.is_dir() and any(p.suffix == ".jpg" for p in images.iterdir())
        return workers if len(workers) == 2 and written else None

    try:
        return process, wait_for(rendering, 60, "synth's two workers and its first image")
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise


def _cleanup(process: subprocess.Popen, workers: list[int]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    for pid in workers:  # (the original's orphans: not left to run on)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_synth_with_one_line_and_ends_its_workers(tmp_path):
    out, err_path = tmp_path / "data", tmp_path / "stderr.txt"
    process, workers = _start_slow_synth(out, err_path)
    try:
        os.kill(process.pid, signal.SIGTERM)  # (the parent alone, as `kill PID` sends it)
        code = process.wait(30)
        err = err_path.read_text(errors="replace")
        assert code == 143, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "splitdet synth: stopped on SIGTERM" in err and "--overwrite" in err, err
        assert not [pid for pid in workers if _alive(pid)]  # ended with the pool, at once
        meta = json.loads((out / "dataset.json").read_text())
        assert meta["complete"] is False
    finally:
        _cleanup(process, workers)


def test_a_second_synth_on_the_same_out_is_refused_while_the_first_runs(tmp_path, capsys):
    """(An interruption review: a second run with --overwrite emptied the first's folders while
    it wrote; the first then wrote its splits and "complete": true over the mix, both exit 0,
    and data check found 94 problems.)"""
    out, err_path = tmp_path / "data", tmp_path / "stderr.txt"
    process, workers = _start_slow_synth(out, err_path)
    try:
        before = {name for name in _files(out) if "/." not in f"/{name}"}  # (temporaries go)
        argv = ["synth", "--out", str(out), "--overwrite", "--size", "256x256", "--defective", "2",
                "--free", "1", "--test-defective", "0", "--test-free", "0"]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "splitdet synth" in err and str(out) in err and "Traceback" not in err, err
        assert before <= set(_files(out))  # nothing of the first run's removed
    finally:
        _cleanup(process, workers)


def test_ctrl_c_while_the_workers_start_is_one_line(tmp_path):
    """A Ctrl-C while the workers still imported their modules (before their start ignored
    SIGINT) printed a KeyboardInterrupt traceback from each (`splitdet demo`'s data stage
    met it)."""
    out, err_path = tmp_path / "data", tmp_path / "stderr.txt"
    process = _popen_synth(out, err_path)
    workers: list[int] = []
    try:
        workers = wait_for(lambda: _workers_of(process.pid), 60, "synth's first worker")
        os.killpg(process.pid, signal.SIGINT)  # (at once: the workers are importing)
        assert process.wait(30) == 130
    finally:
        _cleanup(process, workers)
    err = err_path.read_text(errors="replace")
    left = f"{out} holds an unfinished dataset: rerun the same command with --overwrite"
    assert err.strip() == f"splitdet synth: interrupted; {left}", err  # (as SIGTERM's line)


def test_a_sigkilled_synths_workers_end_and_write_nothing_more(tmp_path):
    out, err_path = tmp_path / "data", tmp_path / "stderr.txt"
    process, workers = _start_slow_synth(out, err_path)
    try:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        left = _files(out)
        wait_for(lambda: not [pid for pid in workers if _alive(pid)], 20, "the workers to end")
        assert _files(out) == left  # no image written after synth was gone
    finally:
        _cleanup(process, workers)


def test_parallel_and_serial_runs_still_write_the_same_bytes(tmp_path):
    """The workers now hand back encoded images, which this process writes."""
    options = [*SMALL_COUNTS, "--no-progress"]
    assert main(["synth", "--out", str(tmp_path / "a"), *options, "--workers", "1"]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), *options, "--workers", "2"]) == 0
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert (
                path.read_bytes()
                == (tmp_path / "b" / path.relative_to(tmp_path / "a")).read_bytes()
            )


# ------------------------------------------------------------- 2. a train split left empty


@pytest.mark.parametrize(
    ("counts", "lacks"),
    [
        (["--defective", "1", "--free", "1", "--val-fraction", "0.9"], "none to train on"),
        (["--defective", "2", "--free", "10", "--val-fraction", "0.8"], "none to learn scratches"),
    ],
)
def test_a_val_fraction_leaving_train_empty_is_refused_before_writing(
    tmp_path, capsys, counts, lacks
):
    out = tmp_path / "data"
    argv = ["synth", "--out", str(out), "--size", "256x256", "--test-defective", "0",
            "--test-free", "0", "--workers", "1", "--no-progress", *counts]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert lacks in err and "lower --val-fraction" in err, err
    assert not out.exists()


def test_generate_dataset_refuses_a_train_split_without_a_defective_image(tmp_path):
    with pytest.raises(ValueError, match=r"val_fraction 0\.8 leaves the train split no defective"):
        synth.generate_dataset(tmp_path / "d", size=(256, 256), n_defective=2, n_free=10,
                               val_fraction=0.8, n_test_defective=0, n_test_free=0,
                               workers=1, progress=False)  # fmt: skip
    assert not (tmp_path / "d").exists()


def test_defective_0_makes_a_defect_free_set_with_a_warning(tmp_path, capsys):
    out = tmp_path / "free"
    argv = ["synth", "--out", str(out), "--size", "256x256", "--defective", "0", "--free",
            "2", "--test-defective", "0", "--test-free", "1", "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "  train: 0 defective (0 scratches) + 2 defect-free" in captured.out
    [warning] = captured.err.strip().splitlines()
    assert warning.startswith("splitdet synth: warning: --defective 0: train holds no defective")
    assert "cannot train" in warning and "give --defective N" in warning

    # 4. its check says what is wrong, not "train with --classes ''"
    assert main(["data", "check", str(out), "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert "--classes ''" not in report and "classes ''" not in report, report
    assert "train.txt: no defective image" in report, report


# ----------------------------------------------------- 3. an interrupted synth's remnant


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitdet.shared.cli", *argv],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_an_interrupted_synths_remnant_is_named_by_check_split_and_synth(tmp_path):
    out, err_path = tmp_path / "data", tmp_path / "stderr.txt"
    process, workers = _start_slow_synth(out, err_path)
    try:
        os.killpg(process.pid, signal.SIGINT)  # (Ctrl-C, as a terminal sends it to the group)
        assert process.wait(30) == 130, err_path.read_text(errors="replace")
    finally:
        _cleanup(process, workers)
    err = err_path.read_text(errors="replace")
    left = f"{out} holds an unfinished dataset: rerun the same command with --overwrite"
    assert err.strip() == f"splitdet synth: interrupted; {left}", err  # (no worker's traceback)
    assert not [pid for pid in workers if _alive(pid)]
    assert json.loads((out / "dataset.json").read_text())["complete"] is False

    check = _cli("data", "check", str(out), "--no-progress")
    assert check.returncode == 1, check.stdout
    assert f"problem: {out / 'dataset.json'}: {INTERRUPTED}" in check.stdout, check.stdout
    assert "data split" not in check.stdout, check.stdout  # (it would make the remnant pass)

    split = _cli("data", "split", str(out), "--overwrite")
    assert split.returncode == 2 and INTERRUPTED in split.stderr, split.stderr
    assert not (out / "ImageSets" / "Main" / "train.txt").exists()

    again = _cli("synth", "--out", str(out), *SMALL)
    assert again.returncode == 2, again.stderr
    assert f"{out} holds an unfinished synthetic dataset" in again.stderr, again.stderr
    assert "rerun with --overwrite" in again.stderr and "already holds" not in again.stderr

    redone = _cli("synth", "--out", str(out), *SMALL, "--overwrite")
    assert redone.returncode == 0, redone.stderr
    assert json.loads((out / "dataset.json").read_text())["complete"] is True
    assert _cli("data", "check", str(out), "--no-progress").returncode == 0


def test_a_full_disk_fails_synth_and_its_remnant_says_so(tmp_path):
    """Under a file size limit (a write past it fails, as on a full disk): JPEGs of 256x256
    are 20-40 kB. The images were saved by Pillow, which here left a truncated 12,000-byte
    JPEG and reported nothing: "wrote", exit 0, dataset.json "complete": true."""
    out = tmp_path / "data"
    full = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED, "12000", "synth", "--out",
                           str(out), *SMALL], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert full.returncode == 2 and "cannot write" in full.stderr, full.stderr
    assert json.loads((out / "dataset.json").read_text())["complete"] is False
    assert all(p.stat().st_size != 12000 for p in (out / "JPEGImages").iterdir())
    check = _cli("data", "check", str(out), "--no-progress")
    assert check.returncode == 1 and INTERRUPTED in check.stdout, check.stdout


# ------------------------------------------------------- 5. the parent folder of datasets


def test_check_and_split_of_a_parent_folder_name_the_dataset_below(tmp_path, capsys, small_dataset):
    parent = tmp_path / "data"
    parent.mkdir()
    shutil.copytree(small_dataset, parent / "gaskets")
    (parent / "notes").mkdir()
    assert main(["data", "check", str(parent), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"its sub-folder {parent / 'gaskets'} is one: splitdet data check " in out, out

    assert main(["data", "split", str(parent)]) == 2
    err = capsys.readouterr().err
    assert f"its sub-folder {parent / 'gaskets'} is one: splitdet data split " in err, err

    shutil.copytree(small_dataset, parent / "line2")
    assert main(["data", "check", str(parent), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"its sub-folders {parent / 'gaskets'}, {parent / 'line2'} are VOC datasets" in out


# ------------------------------------------------------------- 6. no bars into a log file


def test_no_bar_is_drawn_when_stderr_is_not_a_terminal(tmp_path, capsys, small_dataset):
    """capsys's stderr is no terminal, as a log file is not; no --no-progress given."""
    options = [*SMALL_COUNTS, "--workers", "1"]
    assert main(["synth", "--out", str(tmp_path / "s"), *options, "--seed", "5"]) == 0
    assert "\r" not in capsys.readouterr().err
    assert main(["data", "check", str(small_dataset)]) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err, captured.err
    assert captured.out.splitlines()[-1].startswith("ok, "), captured.out
    merged = tmp_path / "merged"
    argv = [
        "data",
        "merge",
        str(small_dataset),
        str(tmp_path / "s"),
        "--out",
        str(merged),
        "--prefix",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err, captured.err
    assert captured.out.splitlines()[-1].startswith("next: splitdet data check")


def test_a_stopped_synth_given_overwrite_asks_for_the_same_command_only(tmp_path):
    """(An interruption review: `splitdet demo`, whose synth has --overwrite, stopped on SIGTERM
    said "rerun the same command with --overwrite", an option demo has not.)"""
    from splitdet.training.cli_synth import _left_text

    out = tmp_path / "data"
    out.mkdir()
    (out / "dataset.json").write_text(json.dumps({"generator": synth._MARKER, "complete": False}))
    assert _left_text(out, overwrite=True).endswith(
        "holds an unfinished dataset: rerun the same command"
    )
    assert _left_text(out, overwrite=False).endswith("rerun the same command with --overwrite")
