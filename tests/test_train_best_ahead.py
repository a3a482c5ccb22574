"""A run stopped between its best.pt and last.pt writes (kill -9): best.pt holds an epoch
last.pt does not, and the resumed run keeps it as its best (training/run_start.py,
`_best_pt_ahead`)."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from splitdet.training.train import train

from conftest import ONE_EPOCH


def test_a_best_pt_ahead_of_last_pt_stays_the_runs_best(tiny_voc, tmp_path, caplog):
    """best.pt is written before last.pt, so a kill between them leaves best.pt with epoch 1
    and last.pt with epoch 0. The resume trains epoch 1 again; before, last.pt's older record
    was the yardstick: a worse retraining kept best.pt yet the run's result named epoch 0, and
    a better one overwrote it. best.pt's own record is now the yardstick (here unbeatable)."""
    run = tmp_path / "run"
    config = replace(ONE_EPOCH, eval_every=1)
    train(config, tiny_voc, run, progress=False, max_iters=1)
    # what the kill leaves: best.pt of epoch 1 (a value no retraining reaches), last.pt of 0
    best = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    best.update(epoch=1, best_epoch=1, best_value=2.0, best_tie_value=2.0)
    torch.save(best, run / "best.pt")
    with caplog.at_level(logging.INFO, logger="splitdet.training.train"):
        result = train(
            replace(config, epochs=2), tiny_voc, run, progress=False, resume=True, max_iters=1
        )
    assert result["best"]["epoch"] == 1 and result["best"]["value"] == 2.0, result["best"]
    kept = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    assert kept["best_value"] == 2.0, "the retrained epoch replaced a better best.pt"
    last = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert (last["epoch"], last["best_epoch"], last["best_value"]) == (1, 1, 2.0)
    assert "best.pt holds epoch 1" in caplog.text and "trained again" in caplog.text


def test_a_best_pt_behind_last_pt_changes_nothing(tiny_voc, tmp_path, caplog):
    """The ordinary resume: best.pt of an epoch last.pt knows is not re-read as ahead."""
    run = tmp_path / "run"
    config = replace(ONE_EPOCH, eval_every=1)
    train(config, tiny_voc, run, progress=False, max_iters=1)
    with caplog.at_level(logging.INFO, logger="splitdet.training.train"):
        train(replace(config, epochs=2), tiny_voc, run, progress=False, resume=True, max_iters=1)
    assert "which last.pt does not" not in caplog.text
