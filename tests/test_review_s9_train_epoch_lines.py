"""Every epoch of `splitdet train` has its line in the log, validated or not.

An epoch between --eval-every's validation passes (or any epoch of a run that validates
nothing: --eval-every 0) left no line at all: with --no-progress a log showed nothing between
the start and the first validation (`cpu-r50` validates every 10 epochs, 20+ minutes)."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

from splitdet.training.presets import TINY
from splitdet.training.train import train


def _epoch_lines(caplog) -> dict[int, str]:
    lines = {}
    for record in caplog.records:
        match = re.match(r"epoch (\d+): loss", record.getMessage())
        if match:
            lines[int(match.group(1))] = record.getMessage()
    return lines


def test_every_epoch_between_validations_has_its_line(tiny_voc, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitdet")
    config = replace(TINY, epochs=3, eval_every=2)
    train(config, tiny_voc, tmp_path / "run", progress=False, max_iters=1)
    lines = _epoch_lines(caplog)
    assert sorted(lines) == [0, 1, 2]
    assert "val mAP" in lines[1] and "val mAP" in lines[2]  # epoch 2: the run's last
    assert "not validated" in lines[0] and "follows epoch 1" in lines[0], lines[0]
    # a validation pass, silent for minutes on a large split when no bar is drawn, is announced
    announced = [r.getMessage() for r in caplog.records if "validating on" in r.getMessage()]
    assert announced == ["epoch 1: validating on 4 image(s)", "epoch 2: validating on 4 image(s)"]


def test_a_run_without_validation_logs_each_epoch(tiny_voc, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="splitdet")
    config = replace(TINY, epochs=2, eval_every=0)
    train(config, tiny_voc, tmp_path / "run", progress=False, max_iters=1)
    lines = _epoch_lines(caplog)
    assert sorted(lines) == [0, 1]
    assert all("validates nothing" in line for line in lines.values()), lines
