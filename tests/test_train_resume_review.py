"""Review of `splitdet train --resume` and its neighbours: a new --lr on resume was ignored but
recorded, and a new --batch-size applied without a word; Ctrl-C gave no resume command; a
resume with another --preset or --classes failed on the data instead of on the model; --init
with --resume was ignored; --init from another preset's checkpoint said only INFO; torchrun's
rank 1 repeated rank 0's lines; wall_minutes restarted at each resume; multi-class data
without --classes did not say which classes to give."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from splitdet.shared.checkpoint import read_checkpoint
from splitdet.shared.cli import main
from splitdet.training import train as train_module
from splitdet.training.presets import TINY
from splitdet.training.train import train

from support import (
    cli_train_rank,
    free_port,
    make_tiny_voc,
    run_until,
    train_argv,
    write_voc_image,
)

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(180)]

ONE_EPOCH = replace(TINY, epochs=1, eval_every=0)


@pytest.fixture(scope="module")
def cli_run(tiny_voc, tmp_path_factory) -> Path:
    """`splitdet train` (tiny, one epoch of 2 steps at batch 2, no validation) on `tiny_voc`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("cli_run") / "run"
        assert main(train_argv(tiny_voc, run)) == 0
    finally:
        torch.set_num_threads(threads)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


@pytest.fixture(scope="module")
def two_class_voc(tmp_path_factory) -> Path:
    """`make_tiny_voc` with one more image holding a 'dent' and another a 'pit' (train = val)."""
    import numpy as np

    from splitdet.training import voc

    root = make_tiny_voc(tmp_path_factory.mktemp("two_class"), n_defective=3, n_free=1)
    ids = [p.stem for p in sorted((root / "Annotations").glob("*.xml"))]
    image = np.full((128, 160, 3), 40, np.uint8)
    image[40:43, 20:70] = 230
    for name in ("dent", "pit"):
        ids.append(
            write_voc_image(
                root, f"{name}_0", image, [voc.VocObject(name, (20.0, 40.0, 70.0, 43.0))]
            )
        )
    for split in ("train", "val", "test"):
        voc.write_split(root, split, ids)
    return root


def _error_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.startswith("splitdet train: error:")]
    return line


# ------------------------------------------------------------------- 1: --lr, --batch-size


def test_resume_applies_a_new_lr_with_a_warning_and_names_changed_settings(
    cli_run, tiny_voc, tmp_path, caplog
):
    """--lr on --resume was restored away by the schedule's state, yet train_config.json said
    the new one; --batch-size was applied silently (and, with fewer steps per epoch than the
    cosine's saved total assumed, the schedule ran out early). Now both apply, a WARNING names
    the lr change, an INFO line every other changed setting, and the record is what runs."""
    run = _copy(cli_run, tmp_path)
    argv = train_argv(tiny_voc, run, "--resume", "--epochs", "2", "--lr", "0.05",
                      "--batch-size", "1")  # fmt: skip
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--lr 0.05 replaces the run's 0.01" in m for m in warnings), warnings
    infos = [
        r.getMessage() for r in caplog.records if "settings other than the run's" in r.getMessage()
    ]
    assert len(infos) == 1 and "batch_size 2 -> 1" in infos[0] and "epochs 1 -> 2" in infos[0]
    recipe = json.loads((run / "train_config.json").read_text())
    assert (recipe["lr"], recipe["batch_size"]) == (0.05, 1)
    schedule = read_checkpoint(run / "last.pt")["lr_scheduler"]
    assert schedule["base_lrs"] == [0.05, 0.05]  # what the run trained with
    # epoch 0: 2 steps at batch 2, epoch 1: 4 at batch 1: the cosine ends with the last one
    assert schedule["step_count"] == schedule["total_iters"] == 6
    # resumed again at batch 1: its 4 steps per epoch are not what the run's 2 epochs took (6,
    # not 8): the cosine still ends with the last step, as it does at batch 2 (2 steps)
    for batch, steps in (("1", 10), ("2", 12)):
        epochs = str(int(read_checkpoint(run / "last.pt")["epoch"]) + 2)
        argv = train_argv(tiny_voc, run, "--resume", "--epochs", epochs, "--lr", "0.05",
                          "--batch-size", batch)  # fmt: skip
        assert main(argv) == 0
        schedule = read_checkpoint(run / "last.pt")["lr_scheduler"]
        assert schedule["step_count"] == schedule["total_iters"] == steps, (batch, schedule)


def test_the_cosine_ends_with_the_last_epoch_whatever_the_steps_per_epoch_were(
    tiny_voc, tmp_path, one_torch_thread
):
    """The cosine's total was re-spread only when the saved one was not the run's epochs
    times this resume's steps per epoch; after an earlier re-spread it can be by chance, and
    the cosine then ended early. 4 images, 3 epochs: one at batch 1 (4 steps), one at batch 4
    (1 step; the total re-spread to 6 = 3 epochs x 2), the last at batch 2 (2 steps): 7."""
    run = tmp_path / "run"
    for batch, resume in ((1, False), (4, True), (2, True)):
        config = replace(TINY, epochs=3, batch_size=batch, eval_every=0)
        train(config, tiny_voc, run, resume=resume, progress=False, stop_after=1)
    schedule = read_checkpoint(run / "last.pt")["lr_scheduler"]
    assert schedule["step_count"] == schedule["total_iters"] == 7, schedule


def test_a_run_whose_record_says_another_lr_than_it_trained_at_is_warned_of(
    cli_run, tiny_voc, tmp_path, caplog
):
    """A last.pt an earlier splitdet resumed with --lr 0.05 records 0.05 but trained at 0.01
    (the --lr was ignored): resuming it applied 0.05 without a word. Now the lr its schedule
    ran at is the run's, and the change is warned of, as for a --lr given now."""
    run = _copy(cli_run, tmp_path)
    checkpoint = torch.load(run / "last.pt", weights_only=False)
    checkpoint["train_config"]["lr"] = 0.05  # the record; the schedule's base_lrs stay 0.01
    torch.save(checkpoint, run / "last.pt")
    recipe = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps({**recipe, "lr": 0.05}))
    with caplog.at_level(logging.WARNING):
        assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2")) == 0
    assert any("--lr 0.05 replaces the run's 0.01" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------- 2: Ctrl-C


def test_ctrl_c_ends_with_the_resume_command_and_status_130(tiny_voc, tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "splitdet.shared.cli",
            *train_argv(tiny_voc, run, "--epochs", "1000")]  # fmt: skip

    def ctrl_c(process):
        time.sleep(0.3)  # (into epoch 1)
        process.send_signal(signal.SIGINT)

    code, out, err = run_until(argv, (run / "last.pt").is_file, "finished epoch", ctrl_c)
    assert code == 130, err
    assert "Traceback" not in err and out == "", err
    assert err.rstrip().splitlines()[-1] == (
        f"splitdet train: interrupted; {run / 'last.pt'} holds the last finished epoch: "
        f"continue with `splitdet train --data {tiny_voc} --out {run} --resume`"
    )


# ------------------------------------------------------- 3: --preset, --classes on resume


def test_resume_with_another_preset_or_classes_is_refused_on_the_model(
    two_class_voc, tmp_path, capsys
):
    """The new preset's class list replaced the run's before the data was read: the refusal
    named a class of the data ("unknown class 'dent'"). Now the run's classes stay, and the
    model of another configuration is refused as such, before the data is read."""
    run = tmp_path / "run"
    assert main(train_argv(two_class_voc, run, "--classes", "scratch,dent,pit")) == 0
    capsys.readouterr()
    assert main(train_argv(two_class_voc, run, "--resume", "--preset", "cpu")) == 2
    line = _error_line(capsys.readouterr().err)
    assert "holds a model of another configuration" in line, line
    assert "preset 'tiny' there, 'cpu' here" in line and "--classes scratch" not in line, line
    assert "unknown class" not in line

    assert main(train_argv(two_class_voc, run, "--resume", "--classes", "scratch")) == 2
    line = _error_line(capsys.readouterr().err)
    assert "--classes scratch,dent,pit there, scratch here" in line, line
    assert "unknown class" not in line


# ------------------------------------------------------------------ 4: --init with --resume


def test_init_with_resume_is_refused_once_last_pt_exists_and_used_before(
    cli_run, tiny_voc, tmp_path, capsys, caplog
):
    run = _copy(cli_run, tmp_path)
    init = str(cli_run / "last.pt")
    assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2", "--init", init)) == 2
    line = _error_line(capsys.readouterr().err)
    assert f"--init {init} with --resume" in line and "would be ignored" in line, line
    assert read_checkpoint(run / "last.pt")["epoch"] == 0  # untouched

    fresh = tmp_path / "fresh"  # no last.pt: the resume starts afresh, from --init
    with caplog.at_level(logging.INFO, logger="splitdet.training.train"):
        assert main(train_argv(tiny_voc, fresh, "--resume", "--init", init)) == 0
    assert f"init {init}: " in caplog.text and "tensors loaded" in caplog.text


# ---------------------------------------------------- 5: --init of another preset's model


def test_init_from_another_presets_checkpoint_warns_naming_the_fresh_tensors(
    tiny_voc, tmp_path, caplog
):
    from splitdet.shared.checkpoint import save_checkpoint
    from splitdet.shared.model import MultiTaskRCNN

    other = replace(TINY, name="other", model=replace(TINY.model, box_head_dim=64))
    path = tmp_path / "other.pt"
    save_checkpoint(path, MultiTaskRCNN(other.model), train_config=other.to_dict())
    with caplog.at_level(logging.INFO, logger="splitdet.training.train"):
        train(ONE_EPOCH, tiny_voc, tmp_path / "run", init=str(path), progress=False, max_iters=1)
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.levelno == logging.WARNING and "kept fresh" in r.getMessage()]  # fmt: skip
    assert "preset 'other' there, 'tiny' here" in warning, warning
    assert "roi_heads.box_head" in warning and "more" in warning, warning


# -------------------------------------------------------------------- 6: torchrun rank 1


def test_torchrun_rank_1_repeats_none_of_rank_0s_lines(tiny_voc, tmp_path):
    import torch.multiprocessing as mp

    argv = train_argv(tiny_voc, tmp_path / "run")[1:]  # (cli_train.main takes no "train")
    mp.spawn(cli_train_rank, args=(2, free_port(), [argv], str(tmp_path)), nprocs=2, join=True)
    rank0 = (tmp_path / "rank0.txt").read_text()
    rank1 = (tmp_path / "rank1.txt").read_text()
    assert "training precision" in rank0 and "trained to epoch 0" in rank0, rank0
    assert "fp32); 1 torch thread(s) (set by OMP_NUM_THREADS" in rank0, rank0
    assert "training precision" not in rank1 and "trained to epoch" not in rank1, rank1
    assert " INFO " not in rank1, rank1


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_says_how_to_continue_a_stopped_run(tiny_voc, tmp_path, monkeypatch,
                                                        capsys, rank):  # fmt: skip
    """torchrun signals every rank: each printed the "continue with ... --resume" line."""
    from splitdet.training import cli_train

    def interrupted(config, args):
        raise KeyboardInterrupt

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(cli_train, "_train", interrupted)  # the Ctrl-C, mid-run
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # (rank 1 raises it: put back after)
    assert cli_train.main(train_argv(tiny_voc, tmp_path / "run")[1:]) == 130
    said = "splitdet train: interrupted" in capsys.readouterr().err
    assert said is (rank == "0")


# ---------------------------------------------------------- 7: wall_minutes across resumes


def test_wall_minutes_go_on_across_a_resume(tiny_voc, tmp_path, monkeypatch):
    """train_minutes went on across a resume, wall_minutes restarted at 0: now last.pt keeps
    the wall time so far, as it keeps the training time."""
    real = train_module._save_epoch_records

    def slow(*args, **kwargs):  # 2 s of wall time in the first call, none of training time
        time.sleep(2.0)
        return real(*args, **kwargs)

    run = tmp_path / "run"
    monkeypatch.setattr(train_module, "_save_epoch_records", slow)
    train(ONE_EPOCH, tiny_voc, run, progress=False, max_iters=1)
    monkeypatch.undo()
    assert read_checkpoint(run / "last.pt")["wall_seconds"] >= 2.0
    train(replace(ONE_EPOCH, epochs=2), tiny_voc, run, resume=True, progress=False, max_iters=1)
    rows = json.loads((run / "metrics.json").read_text())
    assert rows[1]["wall_minutes"] * 60 >= 2.0, rows
    assert rows[1]["wall_minutes"] >= rows[0]["wall_minutes"]
    assert rows[1]["train_minutes"] >= rows[0]["train_minutes"]
    # the epoch the resume started with is marked, in the records and on the learning curve
    assert [row["resumed"] for row in rows] == [False, True]
    from splitdet.training.epoch_records import plot_learning_curve

    unmarked = [{**row, "resumed": False} for row in rows]
    plot_learning_curve(unmarked, tmp_path / "unmarked.png")
    assert (tmp_path / "unmarked.png").read_bytes() != (run / "learning_curve.png").read_bytes()


# ------------------------------------------------------- 8: multi-class data, no --classes


def test_unknown_class_names_every_class_to_give(two_class_voc, tmp_path, capsys):
    assert main(train_argv(two_class_voc, tmp_path / "run")) == 2
    line = _error_line(capsys.readouterr().err)
    assert "unknown class" in line and "train with --classes dent,pit,scratch" in line, line
