"""`splitdet train --nproc-per-node N`: DDP through the one command (torchrun's launcher, run
in-process). A run stopped by SIGTERM ends with the ranks' one line and exit 143, not the
launcher's traceback, and resumes on as many processes; a problem of the data is said once per
rank, without the launcher's own log; the ranks end with a SIGKILLed launcher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from splitdet.shared.checkpoint import read_checkpoint
from splitdet.shared.cli import main

from support import processes_naming, run_until, train_argv


def test_two_processes_train_stop_on_sigterm_in_one_line_and_resume(tiny_voc, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "splitdet.shared.cli",
            *train_argv(tiny_voc, run, "--epochs", "1000", "--nproc-per-node", "2")]  # fmt: skip
    env_threads = os.environ.get("OMP_NUM_THREADS")

    def stop(process: subprocess.Popen) -> None:
        process.send_signal(signal.SIGTERM)

    litter_before = set(Path(tempfile.gettempdir()).glob("torchelastic_*"))
    code, out, err = run_until(argv, (run / "last.pt").is_file, "finished epoch", stop)
    assert code == 143, err
    assert "Traceback" not in err and out == "", err
    assert "torch/distributed" not in err, err  # the launcher's own lines stay out
    (line,) = [line for line in err.splitlines() if "SIGTERM" in line]
    assert line == (
        f"splitdet train: stopped on SIGTERM; {run / 'last.pt'} holds the last finished epoch: "
        f"continue with `splitdet train --data {tiny_voc} --out {run} --resume "
        "--nproc-per-node 2`"
    )
    assert processes_naming(run) == []  # no rank outlives the launcher
    litter = set(Path(tempfile.gettempdir()).glob("torchelastic_*")) - litter_before
    assert litter == set(), litter  # (the launcher's own log folder, left after every run)
    epoch = read_checkpoint(run / "last.pt")["epoch"]
    # resumed in-process: trains on, and leaves this process's signal handlers as they were
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)]
    resumed = train_argv(tiny_voc, run, "--resume", "--epochs", str(epoch + 2),
                         "--nproc-per-node", "2")  # fmt: skip
    assert main(resumed) == 0
    assert read_checkpoint(run / "last.pt")["epoch"] == epoch + 1
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)] == handlers
    assert os.environ.get("OMP_NUM_THREADS") == env_threads


def test_a_problem_of_the_data_is_said_by_the_ranks_alone(tmp_path):
    nodata = tmp_path / "nodata"
    argv = [sys.executable, "-m", "splitdet.shared.cli",
            *train_argv(nodata, tmp_path / "run", "--nproc-per-node", "2")]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    problem = f"{tmp_path / 'nodata' / 'ImageSets' / 'Main' / 'train.txt'}: split file not found"
    assert len(lines) == 2 and all(problem in line for line in lines), done.stderr
    assert sorted(line[: line.index(problem)] for line in lines) == [
        "splitdet train: error (rank 1): ", "splitdet train: error: "
    ], done.stderr  # fmt: skip


def test_the_count_of_processes_is_checked(tiny_voc, tmp_path, capsys, monkeypatch):
    assert main(train_argv(tiny_voc, tmp_path / "run", "--nproc-per-node", "0")) == 2
    assert "--nproc-per-node 0: give 1 or more" in capsys.readouterr().err
    # a process torchrun started: the count is torchrun's
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(train_argv(tiny_voc, tmp_path / "run", "--nproc-per-node", "4")) == 2
    err = capsys.readouterr().err
    assert "--nproc-per-node 4: this run is one of the 2 processes torchrun started" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("before", [["--log-level", "WARNING"], []])
def test_the_command_argv_is_what_follows_the_command(before, monkeypatch):
    """The ranks get `train`'s own arguments as typed, whatever options precede the command."""
    seen = []
    monkeypatch.setattr(
        "splitdet.training.cli_train.run", lambda args: seen.append(args.command_argv) or 0
    )
    argv = [*before, "train", "--data", "train", "--out", "r", "--nproc-per-node", "2"]
    assert main(argv) == 0
    assert seen == [["--data", "train", "--out", "r", "--nproc-per-node", "2"]]


# (a rank killed stops the others with a line naming it: test_train_review3.py's
# test_a_rank_killed_stops_the_others_naming_it_not_as_a_users_sigterm, one run for both)


def test_the_rank_killed_is_named_though_its_peer_failed_in_the_same_second(tmp_path, capsys):
    """torchrun's failures carry whole-second timestamps (no error file), and its
    `get_first_failure` took the lowest rank of a tie: rank 1 killed and rank 0 ending on the
    closed connection (status 1) in the same poll gave "rank 0 ended with the error above",
    with no error above and the rank killed never named. The rank killed is the cause."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from splitdet.training.cli_train import PEER_LOST_STATUS
    from splitdet.training.launch import _failed, first_cause

    def failure(rank: int, exitcode: int, timestamp: int) -> ProcessFailure:
        found = ProcessFailure(rank, 1000 + rank, exitcode, str(tmp_path / "no-error-file"))
        found.timestamp = timestamp
        return found

    tie = {0: failure(0, PEER_LOST_STATUS, 50), 1: failure(1, -signal.SIGKILL, 50)}
    assert ChildFailedError("train", tie).get_first_failure()[0] == 0  # (torchrun's choice)
    rank, cause = first_cause(tie)
    assert (rank, cause.pid) == (1, 1001)
    assert _failed(None, rank, cause.pid, cause.exitcode, 0.0) == 128 + signal.SIGKILL
    assert capsys.readouterr().err == (
        "splitdet train: rank 1 (pid 1001) was killed by signal 9; the others were stopped\n"
    )
    # a rank's own error (status 2) before its peer's lost connection, a second later or not
    for later in (0, 1):
        failures = {0: failure(0, PEER_LOST_STATUS, 50 + later), 1: failure(1, 2, 50)}
        assert first_cause(failures)[0] == 1
    # otherwise the earliest, then the first recorded: torchrun records the ranks it stops
    # after the failure that made it stop them (a CI run: rank 1's own error, then rank 0
    # stopped by SIGTERM in the same second, must name rank 1's error)
    assert first_cause({0: failure(0, 2, 51), 1: failure(1, -9, 50)})[0] == 1
    assert first_cause({1: failure(1, 2, 50), 0: failure(0, -signal.SIGTERM, 50)})[0] == 1
    assert first_cause({0: failure(0, 2, 50), 1: failure(1, 3, 50)})[0] == 0
    assert first_cause({0: failure(0, 1, 50), 1: failure(1, 1, 49)})[0] == 1


def test_the_ranks_end_with_a_launcher_killed_by_sigkill(tiny_voc, tmp_path, monkeypatch):
    """The OOM killer or a container's stop of its main process: the ranks, in sessions of
    their own, trained on as orphans and held --out against the --resume the user was told."""
    import time

    # (the launcher killed cannot remove its ranks' splitdet-train-ranks-* folder: here, not /tmp)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "splitdet.shared.cli",
            *train_argv(tiny_voc, run, "--epochs", "1000", "--nproc-per-node", "2")]  # fmt: skip
    ranks = []

    def kill_launcher(process: subprocess.Popen) -> None:
        ranks.extend(pid for pid in processes_naming(run) if pid != process.pid)
        process.kill()

    code, _, _ = run_until(argv, (run / "last.pt").is_file, "finished epoch", kill_launcher)
    assert code == -signal.SIGKILL and len(ranks) == 2, ranks
    deadline = time.monotonic() + 30
    while processes_naming(run) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_naming(run) == []


def test_a_run_stopped_between_best_and_last_is_told_to_resume(tmp_path):
    """best.pt is written before last.pt: a run stopped between them in its first epoch said
    "no checkpoint was written; start it again", and starting again is refused (best.pt)."""
    from argparse import Namespace

    from splitdet.training.cli_train import _stopped_on_sigterm

    (tmp_path / "best.pt").write_bytes(b"")
    line = _stopped_on_sigterm(Namespace(data="D", out=str(tmp_path)))
    assert line == (
        f"splitdet train: stopped on SIGTERM before last.pt was written; {tmp_path / 'best.pt'} "
        f"holds a finished epoch: continue with `splitdet train --data D --out {tmp_path} "
        "--resume`"
    )


def test_a_rank_writes_its_problem_in_one_piece(tmp_path, monkeypatch):
    """print() wrote a rank's problem and its newline apart: on an unbuffered stderr
    (PYTHONUNBUFFERED) the other rank's line landed between the two (a CI run of the test
    above: both lines on one)."""
    import io

    from splitdet.training.cli_train import main as rank_main

    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stderr", Recorder())
    monkeypatch.delenv("RANK", raising=False)
    assert rank_main(train_argv(tmp_path / "nodata", tmp_path / "run")[1:]) == 2
    said = [text for text in writes if "splitdet train: error: " in text]
    assert len(said) == 1 and said[0].endswith("split file not found (no split 'train' under "
                                               f"{tmp_path / 'nodata'}) (`splitdet data check "
                                               f"{tmp_path / 'nodata'}` lists every problem at "
                                               "once)\n"), writes  # fmt: skip
