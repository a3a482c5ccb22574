"""`splitdet train` when something else goes wrong around it: a second run into the same --out,
a full disk or a file size limit while it writes a checkpoint, temporary files a killed run
left, a resume whose --preset or --epochs would quietly replace the run's recipe."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from splitdet.shared import checkpoint as checkpoint_module
from splitdet.shared.checkpoint import read_checkpoint
from splitdet.shared.cli import main
from splitdet.training.presets import TINY
from splitdet.training.train import train

from support import (
    FILE_SIZE_LIMITED,
    ctrl_c_mid_write_open,
    full_disk_open,
    run_until,
    train_argv,
)

#: The lock file `splitdet train` holds in its --out (`training.train.TRAIN_LOCK`).
TRAIN_LOCK = ".splitdet-train.lock"

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Holds `splitdet train`'s lock on argv[1] until its stdin closes, as a running train would.
HOLD_LOCK = f"""
import sys
from splitdet.shared.folder_lock import folder_lock
with folder_lock(sys.argv[1], {TRAIN_LOCK!r}, "splitdet train", "--out"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _one_line_error(err: str, *needles: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("splitdet train: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_second_train_into_the_same_out_is_refused(tiny_voc, tmp_path, capsys):
    """Two runs into one --out both went on, and mixed best.pt of one with last.pt and the
    metrics of the other: the second is refused at once, naming --out and the first's pid."""
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(train_argv(tiny_voc, run)) == 2
        _one_line_error(
            capsys.readouterr().err,
            f"--out {run}: another splitdet train (pid {holder.pid}) is writing there",
            "give another --out",
        )
        assert sorted(p.name for p in run.iterdir()) == [TRAIN_LOCK]  # nothing written
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert main(train_argv(tiny_voc, run)) == 0  # the lock ends with its holder
    assert read_checkpoint(run / "last.pt")["epoch"] == 0


def test_a_checkpoint_past_the_file_size_limit_ends_in_one_line(tiny_voc, finished_run, tmp_path):
    """A real limit on the file size (`ulimit -f`, as a full file system stops a write): torch
    raised RuntimeError "unexpected pos ..." through the command, a traceback. Now one line
    naming the file, and the earlier last.pt whole, with no temporary file left."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "last.pt").read_bytes()
    limit = len(before) // 2  # the checkpoint cannot fit; the records (a few kB) do
    done = subprocess.run(
        [sys.executable, "-c", FILE_SIZE_LIMITED, str(limit),
         *train_argv(tiny_voc, run, "--resume", "--epochs", "2")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    line = _one_line_error(done.stderr, f"epoch 1: {run / 'last.pt'}: cannot write it (file too "
                           "large", "the earlier last.pt is kept as it was")  # fmt: skip
    assert "unexpected pos" not in line and "basic_ios" not in line
    assert (run / "last.pt").read_bytes() == before
    assert read_checkpoint(run / "last.pt")["epoch"] == 0
    assert _temporaries(run) == []


def test_a_full_disk_while_saving_a_checkpoint_says_so(tiny_voc, finished_run, tmp_path,
                                                       monkeypatch, capsys):  # fmt: skip
    """torch.save on a full disk raises RuntimeError("... unexpected pos ..."), its errno lost:
    the error says "no space left on device", names the file, and keeps the last one whole."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(checkpoint_module, "open", full_disk_open, raising=False)
    assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2")) == 2
    _one_line_error(
        capsys.readouterr().err,
        f"epoch 1: {run / 'last.pt'}: cannot write it (no space left on device); the earlier "
        "last.pt is kept as it was",
    )
    assert (run / "last.pt").read_bytes() == before
    assert _temporaries(run) == []


def test_ctrl_c_while_saving_a_checkpoint_is_an_interruption(tiny_voc, finished_run, tmp_path,
                                                             monkeypatch, capsys):  # fmt: skip
    """Ctrl-C that lands in one of torch.save's writes came out of torch as RuntimeError
    ("unexpected pos ..."): the run said "cannot write it" and ended with status 2. It is an
    interruption: status 130, the resume command, and the earlier last.pt whole."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(checkpoint_module, "open", ctrl_c_mid_write_open, raising=False)
    assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2")) == 130
    err = capsys.readouterr().err
    assert "cannot write" not in err and "unexpected pos" not in err, err
    assert (
        err.rstrip()
        .splitlines()[-1]
        .startswith(f"splitdet train: interrupted; {run / 'last.pt'} holds the last finished epoch")
    ), err
    assert (run / "last.pt").read_bytes() == before
    assert _temporaries(run) == []


def test_a_start_removes_the_temporary_files_a_killed_run_left(tiny_voc, finished_run, tmp_path,
                                                               caplog):  # fmt: skip
    """A run killed while it wrote last.pt left .last.pt.XXXXXXXX.tmp (as large as a
    checkpoint), and every later start kept it. Only that pattern, of the run's own files, goes;
    one written in the last minutes may be another process's write in progress (eval storing
    a threshold into best.pt) and stays."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    old = time.time() - 3600
    stale = [".last.pt.k2x9_q0a.tmp", ".metrics.json.abcdefgh.tmp", ".best.pt.00000000.tmp"]
    others = [".best.pt.recently.tmp", ".last.pt.tmp", "last.pt.abcdefgh.tmp", "notes.tmp",
              ".mydata.abcdefgh.tmp", ".last.pt.abcdefghi.tmp"]  # fmt: skip
    for name in stale + others:
        (run / name).write_bytes(b"x" * 1000)
        if name != ".best.pt.recently.tmp":
            os.utime(run / name, (old, old))
    caplog.set_level(logging.INFO, logger="splitdet.training.train")
    assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2")) == 0
    assert _temporaries(run) == sorted(others)
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed ")]
    assert sorted(removed) == sorted(
        f"removed {run / name} (1000 bytes), a temporary file left by a run that was stopped "
        "while it wrote"
        for name in stale
    )
    assert any(".best.pt.recently.tmp" in r.getMessage() and "kept" in r.getMessage()
               for r in caplog.records)  # fmt: skip


def test_resume_with_the_runs_own_preset_keeps_its_recipe(tiny_voc, tmp_path, capsys):
    """A 3-epoch run stopped after epoch 0, resumed with `--preset tiny --resume`: the preset's
    2 epochs replaced the run's 3 (train_config.json rewritten, one epoch trained instead of
    two). Naming the preset the run was made with keeps the run's recipe."""
    run = tmp_path / "run"
    train(replace(TINY, epochs=3, eval_every=0), tiny_voc, run, progress=False, stop_after=1)
    assert read_checkpoint(run / "last.pt")["epoch"] == 0
    argv = ["train", "--data", str(tiny_voc), "--out", str(run), "--no-progress", "--resume"]
    assert main([*argv, "--preset", "tiny"]) == 0
    assert "trained to epoch 2 " in capsys.readouterr().out
    assert read_checkpoint(run / "last.pt")["epoch"] == 2
    assert json.loads((run / "train_config.json").read_text())["epochs"] == 3


def test_resume_with_epochs_already_trained_is_refused(tiny_voc, tmp_path, capsys):
    """A resume whose --epochs the run has already trained trained nothing, printed "trained to
    epoch N" below the epoch it resumed at, and rewrote the recipe with the smaller --epochs:
    refused, naming both numbers, the run left as it was."""
    run = tmp_path / "run"
    train(replace(TINY, epochs=3, eval_every=0), tiny_voc, run, progress=False, stop_after=2,
          max_iters=1)  # fmt: skip
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != TRAIN_LOCK}
    argv = ["train", "--data", str(tiny_voc), "--out", str(run), "--no-progress", "--resume"]
    for epochs in ("2", "1"):
        assert main([*argv, "--epochs", epochs]) == 2
        captured = capsys.readouterr()
        _one_line_error(captured.err, "holds 2 trained epochs (epochs 0-1)",
                        f"--epochs is {epochs}: nothing is left to train",
                        "give --epochs above 2")  # fmt: skip
        assert "trained to epoch" not in captured.out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != TRAIN_LOCK} == before


def test_a_run_stopped_between_its_checkpoints_keeps_best_pt_the_best(
    tiny_voc, tmp_path, monkeypatch, caplog
):
    """last.pt (with the new best_value) was written before best.pt: a run stopped between
    them kept a best.pt older than the best last.pt recorded, which no later epoch at that
    level replaced. Now best.pt and the records come first; stopped before last.pt, the run
    resumes from best.pt's copy in its first epoch (and trains a later epoch again)."""
    from splitdet.training import train as train_module

    real_save = train_module.save_checkpoint

    def stopped_at_last_pt(path, *args, **kwargs):
        if Path(path).name == "last.pt":
            raise KeyboardInterrupt  # as Ctrl-C or a kill between the two writes
        return real_save(path, *args, **kwargs)

    config = replace(TINY, epochs=2, eval_every=1)
    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "save_checkpoint", stopped_at_last_pt)
    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_voc, run, progress=False, max_iters=1)
    monkeypatch.undo()
    assert not (run / "last.pt").exists()
    assert read_checkpoint(run / "best.pt")["epoch"] == 0
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == [0]

    with caplog.at_level(logging.WARNING, logger="splitdet.training.train"):
        train(config, tiny_voc, run, progress=False, max_iters=1, resume=True)
    assert "resuming from a copy of it" in caplog.text
    last = read_checkpoint(run / "last.pt")
    assert last["epoch"] == 1
    assert read_checkpoint(run / "best.pt")["best_value"] == last["best_value"]
    assert [row["epoch"] for row in json.loads((run / "metrics.json").read_text())] == [0, 1]


def test_sigterm_stops_a_run_as_ctrl_c_does_and_it_resumes(tiny_voc, tmp_path):
    """Schedulers, containers and systemd stop a job with SIGTERM: the run died at once (exit
    143) with no line. Now it unwinds as on Ctrl-C: one line saying it stopped on SIGTERM and
    the command that resumes it, exit 143, last.pt the last finished epoch, --resume goes on."""
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "splitdet.shared.cli",
        *train_argv(tiny_voc, run, "--epochs", "1000"),
    ]

    def stop(process: subprocess.Popen) -> None:
        time.sleep(0.3)  # (into epoch 1)
        process.send_signal(signal.SIGTERM)

    # epoch 0 done (last.pt): the run is in epoch 1 or on
    code, out, err = run_until(argv, (run / "last.pt").is_file, "finished epoch", stop)
    assert code == 143, err
    assert "Traceback" not in err and out == "", err
    (line,) = [line for line in err.splitlines() if "SIGTERM" in line]
    assert line == (
        f"splitdet train: stopped on SIGTERM; {run / 'last.pt'} holds the last finished epoch: "
        f"continue with `splitdet train --data {tiny_voc} --out {run} --resume`"
    )
    assert err.rstrip().endswith(line)
    assert _temporaries(run) == []
    epoch = read_checkpoint(run / "last.pt")["epoch"]
    assert epoch >= 0
    resumed = train_argv(tiny_voc, run, "--resume", "--epochs", str(epoch + 2))
    assert main(resumed) == 0
    assert read_checkpoint(run / "last.pt")["epoch"] == epoch + 1


def test_train_puts_back_the_sigterm_handler_it_found(tiny_voc, tmp_path):
    """`splitdet demo` runs train in-process: the SIGTERM handler train sets for its run is
    the caller's again afterwards, also when the run fails."""
    calls = []

    def callers(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, callers)
    try:
        assert main(train_argv(tiny_voc, tmp_path / "run")) == 0
        assert signal.getsignal(signal.SIGTERM) is callers
        assert main(train_argv(tiny_voc, tmp_path / "run")) == 2  # holds a run already
        assert signal.getsignal(signal.SIGTERM) is callers
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_one_trained_epoch_is_said_as_one():
    """A resume of a run of one epoch said "epochs 0-0 trained"."""
    from splitdet.training.epoch_records import epoch_span

    assert epoch_span(0, 0) == "epoch 0"
    assert epoch_span(0, 3) == "epochs 0-3"
