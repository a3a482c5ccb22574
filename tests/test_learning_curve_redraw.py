"""learning_curve.png is redrawn at most every PLOT_EVERY_S seconds, yet shows every epoch a run
kept when it ends: by --epochs, or stopped (Ctrl-C) after some epochs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from splitdet.training import train as train_module
from splitdet.training.epoch_records import plot_learning_curve
from splitdet.training.presets import TINY
from splitdet.training.train import train


def _curve_of_history(run, tmp_path) -> bytes:
    """learning_curve.png drawn afresh from the run's metrics.json."""
    history = json.loads((run / "metrics.json").read_text())
    plot_learning_curve(history, tmp_path / "expected.png")
    return (tmp_path / "expected.png").read_bytes()


def _ctrl_c_at_call(monkeypatch, name: str, call: int) -> None:
    """KeyboardInterrupt at the `call`-th call of training.train's `name` (1-based)."""
    real = getattr(train_module, name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, name, interrupted)


def test_the_curve_shows_every_epoch_when_the_run_ends(tiny_voc, tmp_path, one_torch_thread):
    run = tmp_path / "run"
    train(replace(TINY, epochs=3, eval_every=0), tiny_voc, run, progress=False, max_iters=1)
    assert len(json.loads((run / "metrics.json").read_text())) == 3
    assert (run / "learning_curve.png").read_bytes() == _curve_of_history(run, tmp_path)


def test_the_curve_shows_the_epochs_kept_by_a_stopped_run(
    tiny_voc, tmp_path, monkeypatch, one_torch_thread
):
    _ctrl_c_at_call(monkeypatch, "_train_epoch", 3)  # in the third epoch
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(replace(TINY, epochs=5, eval_every=0), tiny_voc, run, progress=False, max_iters=1)
    assert len(json.loads((run / "metrics.json").read_text())) == 2
    assert (run / "learning_curve.png").read_bytes() == _curve_of_history(run, tmp_path)


def test_a_run_stopped_before_its_records_are_written_draws_no_epoch_they_lack(
    tiny_voc, tmp_path, monkeypatch, one_torch_thread
):
    """Stopped in the second epoch's records (before metrics.json held it): the curve is that
    of metrics.json, not of the epoch trained but not recorded."""
    _ctrl_c_at_call(monkeypatch, "write_metrics", 2)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(replace(TINY, epochs=3, eval_every=0), tiny_voc, run, progress=False, max_iters=1)
    assert len(json.loads((run / "metrics.json").read_text())) == 1
    assert (run / "learning_curve.png").read_bytes() == _curve_of_history(run, tmp_path)


def test_a_plot_that_cannot_be_written_costs_no_epoch(tiny_voc, tmp_path, one_torch_thread):
    """A training-kill review: the plot drawn before last.pt, its failure (here a folder where
    the PNG goes; a full disk alike) ended the run with the epoch just trained recorded in the
    metrics but not in last.pt: trained again on --resume. Now last.pt holds every epoch, and
    only the run's end says the plot could not be drawn."""
    import torch

    run = tmp_path / "run"
    (run / "learning_curve.png").mkdir(parents=True)
    with pytest.raises(OSError):
        train(replace(TINY, epochs=2, eval_every=0), tiny_voc, run, progress=False, max_iters=1)
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1  # both epochs (0, 1)
    assert len(json.loads((run / "metrics.json").read_text())) == 2


def test_a_plot_cut_short_leaves_the_one_before(tmp_path, monkeypatch):
    """The same review: the PNG was written in place, so a kill while it was drawn left a
    0-byte file that stayed broken until a later epoch."""
    from matplotlib.figure import Figure

    history = [{"epoch": 0, "loss": 1.0, "loss_detection": 0.8, "loss_defect": 0.2}]
    path = tmp_path / "learning_curve.png"
    plot_learning_curve(history, path)
    before = path.read_bytes()

    def killed_midway(self, target, *args, **kwargs):
        with open(target, "wb") as out:
            out.write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        plot_learning_curve([*history, {**history[0], "epoch": 1}], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["learning_curve.png"]
