"""`splitdet train` refuses what would lose a run or fail late, by name and without a traceback:
an --out that already holds a run, checkpoints it cannot resume from, an image whose body is
corrupt, a validation split the gate cannot be calibrated on, classes that are no names."""

from __future__ import annotations

import re
import shutil
from dataclasses import replace

import pytest
import torch

from splitdet.shared.checkpoint import CheckpointError, read_checkpoint
from splitdet.shared.cli import main
from splitdet.training import voc
from splitdet.training.presets import TINY
from splitdet.training.train import train

from conftest import ONE_EPOCH
from support import train_argv

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_a_fresh_start_never_overwrites_a_run(tiny_voc, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.copy(run / "last.pt", run / "best.pt")  # as a run with validation has
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(train_argv(tiny_voc, run)) == 2
    _error(capsys, str(run), "already holds a training run", "last.pt", "--resume")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # --resume with only best.pt left (a run stopped between writing best.pt and last.pt in
    # its first epoch) resumes from a copy of it, never starting afresh over it
    (run / "last.pt").unlink()
    assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2")) == 0
    assert read_checkpoint(run / "last.pt")["epoch"] == 1


def test_checkpoints_it_cannot_resume_from_are_named(tiny_voc, finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    checkpoint = read_checkpoint(run / "last.pt")
    torch.save({**checkpoint, "format": 2}, run / "last.pt")  # from a newer splitdet
    with pytest.raises(CheckpointError, match=r"last\.pt: checkpoint format 2"):
        read_checkpoint(run / "last.pt")
    assert main(train_argv(tiny_voc, run, "--resume")) == 2
    _error(capsys, "last.pt", "format 2")
    torch.save({k: v for k, v in checkpoint.items() if k != "optimizer"}, run / "last.pt")
    assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2")) == 2
    _error(capsys, "last.pt: cannot resume from it", "optimizer")
    weights = {k: v[..., :1] if v.ndim else v for k, v in checkpoint["model"].items()}
    torch.save({**checkpoint, "model": weights}, run / "last.pt")  # shapes of another model
    assert main(train_argv(tiny_voc, run, "--resume", "--epochs", "2")) == 2
    _error(capsys, "last.pt: cannot resume from it")


def test_resuming_a_run_its_budget_ended_trains_nothing_more(tiny_voc, tmp_path):
    """A run ended by its time budget (the next epoch would end past it) stays ended when
    resumed with the same budget: before, the clock's last-epoch length was not restored and
    one more epoch ran, replacing last.pt."""
    config = replace(TINY, epochs=5, minutes=1e-6, eval_every=0)
    train(config, tiny_voc, tmp_path, progress=False, max_iters=1)
    first = (tmp_path / "last.pt").read_bytes()
    row = train(config, tiny_voc, tmp_path, progress=False, resume=True, max_iters=1)
    assert row["epoch"] == 0 and (tmp_path / "last.pt").read_bytes() == first


def test_a_corrupt_image_body_is_named(tiny_voc, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_voc, data)
    victim = sorted((data / "JPEGImages").iterdir())[0]
    body = victim.read_bytes()
    victim.write_bytes(body[: len(body) // 2])  # the header (read with the split) still parses
    assert voc.read_split(data, "train")  # the split reads: the damage shows only on decoding
    with pytest.raises(voc.VocError, match=re.escape(f"{victim.name}: cannot decode image")):
        voc.load_rgb(victim)
    assert main(train_argv(data, tmp_path / "run")) == 2
    _error(capsys, victim.name, "cannot decode image")


def test_a_validation_split_without_defects_is_refused_before_training(tiny_voc, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_voc, data)
    free = [s.image_id for s in voc.read_split(data, "val") if not s.is_defective]
    voc.write_split(data, "val", free)
    run = tmp_path / "run"
    assert main([*train_argv(data, run)[:-3], "--eval-every", "1", "--no-progress"]) == 2
    _error(capsys, "val.txt", "cannot be calibrated")
    assert not run.exists()  # refused before it wrote anything: no --out left, empty or not


@pytest.mark.parametrize("classes", [" ", ",", ""])
def test_classes_that_are_no_names_are_refused(tiny_voc, tmp_path, capsys, classes):
    """`--classes ,` said "class_names must name at least one foreground class", naming no
    option (and `--classes ''` trained the preset's classes without a word)."""
    assert main(train_argv(tiny_voc, tmp_path / "run", "--classes", classes)) == 2
    err = _error(capsys, f"--classes {classes!r}: names no class", "--classes scratch")
    assert "class_names" not in err and len(err.strip().splitlines()) == 1


def test_a_train_split_without_a_defective_image_is_refused(tmp_path, capsys):
    """`train --eval-every 0` trained on a train split of empty annotations to exit 0 (the
    refusal came only from the val split, which --eval-every 0 does not read), though `data
    check` reports it as a problem: refused by name, exit 2, before training."""
    from support import make_tiny_voc

    data = make_tiny_voc(tmp_path / "free", n_defective=0, n_free=3)
    run = tmp_path / "run"
    assert main(train_argv(data, run)) == 2  # --eval-every 0
    err = _error(capsys, f"{data / 'ImageSets' / 'Main' / 'train.txt'}: no defective image",
                 "`splitdet data check")  # fmt: skip
    assert len(err.strip().splitlines()) == 1
    assert not run.exists()


def test_an_out_folder_that_cannot_be_made_is_named(tiny_voc, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should go\n")
    assert main(train_argv(tiny_voc, blocker / "run")) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker / 'run'}: cannot make the folder" in err and "Traceback" not in err


def test_unreadable_checkpoints_are_named_in_one_line(finished_run, tmp_path):
    """torch.load's own message runs to a dozen lines and advises weights_only=False (which
    would run the file's code); the error says in one line what is wrong with the file."""
    good = (finished_run / "last.pt").read_bytes()
    cases = {
        "empty.pt": (b"", "the file is empty"),
        "text.pt": (b"model: 1\n" * 20, "not a file written by torch.save"),
        "half.pt": (good[: len(good) // 2], "damaged or truncated"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": {}, "config": {}, "odd": re.compile("x")}, tmp_path / "objects.pt")
    cases["objects.pt"] = (None, "holds Python objects")
    for name, (_, reason) in cases.items():
        with pytest.raises(CheckpointError) as caught:
            read_checkpoint(tmp_path / name)
        message = str(caught.value)
        assert message.startswith(f"{tmp_path / name}: not a readable checkpoint"), message
        assert reason in message and "\n" not in message and "weights_only" not in message


def test_a_diverging_run_ends_in_one_line(tiny_voc, tmp_path, capsys):
    """A loss gone to nan raised FloatingPointError through the command: a traceback."""
    run = tmp_path / "run"
    assert main(train_argv(tiny_voc, run, "--lr", "1e30")) == 2
    _error(capsys, "training diverged", "loss is nan", "lower the lr")
    assert not (run / "last.pt").exists()


def test_resuming_with_other_classes_names_them(tiny_voc, finished_run, tmp_path, capsys):
    """The refusal blamed the preset ('tiny' there, 'tiny' here): it names the difference."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    assert main(train_argv(tiny_voc, run, "--resume", "--classes", "scratch,dent")) == 2
    # as the option is typed, and no preset clause: both runs are 'tiny'
    _error(capsys, "another configuration", "(--classes scratch there, scratch,dent here);")


def test_resuming_on_other_data_is_reported(tiny_voc, finished_run, tmp_path, caplog):
    """Another path of other data: a warning. A copy of the same data (the same train digest)
    is said at INFO: it warned as if the data were other."""
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(finished_run, run)
    shutil.copytree(tiny_voc, data)
    moved = f"trained on {tiny_voc.resolve()}, now resumed on {data.resolve()}"
    with caplog.at_level("INFO", logger="splitdet.training"):
        train(replace(ONE_EPOCH, epochs=2), tiny_voc, run, resume=True, progress=False, max_iters=1)
        assert "trained on" not in caplog.text  # the run's own data
        train(replace(ONE_EPOCH, epochs=3), data, run, resume=True, progress=False, max_iters=1)
    (said,) = [r for r in caplog.records if moved in r.getMessage()]
    assert said.levelname == "INFO" and "the same train data" in said.getMessage()
    caplog.clear()
    image = voc.read_split(data, "train")[0].image_path
    image.write_bytes(image.read_bytes() + b"\0")  # (other bytes: other data)
    with caplog.at_level("INFO", logger="splitdet.training"):
        train(replace(ONE_EPOCH, epochs=4), tiny_voc, run, resume=True, progress=False, max_iters=1)
        train(replace(ONE_EPOCH, epochs=5), data, run, resume=True, progress=False, max_iters=1)
    (said,) = [r for r in caplog.records if moved in r.getMessage()]
    assert said.levelname == "WARNING" and "best.pt keeps the best validation" in said.getMessage()


def test_an_init_file_that_is_no_checkpoint_is_named(tiny_voc, tmp_path, capsys):
    """torch.load's message for a text file was its first byte's value: '(101)'."""
    (tmp_path / "notes.pt").write_text("epochs: 30\n")
    assert main(train_argv(tiny_voc, tmp_path / "run", "--init", str(tmp_path / "notes.pt"))) == 2
    _error(capsys, "--init", "notes.pt: not a readable checkpoint", "not a file written by torch")


def test_a_class_with_no_box_to_train_on_is_warned_of_once(tiny_voc, tmp_path, caplog):
    """`train --classes scratch,"Pit mark",rust` trained without a word on a train split
    holding no 'Pit mark' (only val does) and a dataset holding no 'rust'."""
    import shlex

    data, run = tmp_path / "my data", tmp_path / "run"  # a space: quoted in commands it gives
    shutil.copytree(tiny_voc, data)
    pitted = data / "Annotations" / "img_000.xml"
    pitted.write_text(pitted.read_text().replace("<name>scratch<", "<name>Pit mark<"))
    voc.write_split(data, "train", ["img_001", "img_002", "img_003"])
    classes = ("scratch", "Pit mark", "rust")
    config = replace(ONE_EPOCH, model=replace(ONE_EPOCH.model, class_names=classes))
    with caplog.at_level("WARNING", logger="splitdet.training.train"):
        train(config, data, run, progress=False, max_iters=1)
    warned = [r.getMessage() for r in caplog.records if "learn to detect" in r.getMessage()]
    assert warned == [
        f"{data / 'ImageSets' / 'Main' / 'train.txt'}: class 'rust' is in no annotation of the "
        "dataset at all: the model will never learn to detect it; remove it from --classes, or "
        "label some; and no box of class 'Pit mark' to train on (the dataset holds 1 'Pit "
        "mark' elsewhere: in val, test, in no split, or marked difficult, which training "
        "skips): the model will not learn to detect it; list images holding it in train.txt "
        f"(`splitdet data split '{data}' --overwrite` gives each split its share of every "
        "class), or leave it out of --classes and relabel or remove its objects in "
        f"{data / 'Annotations'}: img_000.xml (train and eval refuse an object of a class "
        "--classes does not name)"
    ]
    # and the commands and options it gives paste as they are
    from splitdet.training.run_checks import model_difference

    assert model_difference(ONE_EPOCH.model, config.model) == (
        "--classes scratch there, 'scratch,Pit mark,rust' here"
    )
    assert f"`splitdet eval --data '{data}' --checkpoint {shlex.quote(str(run / 'last.pt'))} " in (
        caplog.text
    )


def test_a_validation_split_too_small_for_the_gate_is_said_at_start(tiny_voc, tmp_path, caplog):
    """Each validation pass stores the threshold it calibrates; on a handful of defective
    images that threshold misses new ones far more often than --target-recall allows."""
    config = replace(ONE_EPOCH, eval_every=1)
    with caplog.at_level("INFO", logger="splitdet.training.train"):
        train(config, tiny_voc, tmp_path / "run", progress=False, max_iters=1)
    said = [r for r in caplog.records if "stores its gate threshold" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO"
    assert "defective image(s): on new images expect about" in said[0].getMessage()
    assert f"--checkpoint {tmp_path / 'run' / 'best.pt'}" in said[0].getMessage()
