"""Mutant audit (session 10): training/schedule.py's documented schedule, pinned directly.

`WarmupCosine` and `build_optimizer` had no test of their own: a training run only showed
that some schedule ran. Each test names the one-line mutants it kills.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from splitdet.training.presets import TrainConfig
from splitdet.training.schedule import WarmupCosine, build_optimizer, build_scheduler


def _optimizer(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=lr)


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def test_warmup_ramps_linearly_from_a_tenth_then_the_cosine_anneals_to_zero():
    """Kills: the warm-up starting from 0 (`cosine *= 0.9 * step/warmup` or dropping the
    0.1), the warm-up test made `<=` (the ramp would last one step longer, or divide by zero
    without warm-up), and the progress left unclamped at 1 (`min(p, 1.0)` dropped: past the
    last iteration the cosine climbs again)."""
    optimizer = _optimizer(lr=2.0)
    schedule = WarmupCosine(optimizer, total_iters=10, warmup_iters=4)
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(14):
        schedule.step()
        seen.append(optimizer.param_groups[0]["lr"])
    for step in range(4):  # linear ramp from lr/10 times the cosine so far
        expected = 2.0 * _cosine(step / 10) * (0.1 + 0.9 * step / 4)
        assert seen[step] == pytest.approx(expected), step
    for step in range(4, 11):  # no ramp once warm-up is over
        assert seen[step] == pytest.approx(2.0 * _cosine(step / 10)), step
    assert seen[10:] == [pytest.approx(0.0, abs=1e-12)] * 5  # annealed, and stays there

    no_warmup = _optimizer(lr=2.0)
    WarmupCosine(no_warmup, total_iters=10)  # (step 0 without warm-up: the full rate)
    assert no_warmup.param_groups[0]["lr"] == pytest.approx(2.0)


def test_the_time_budget_anneals_whichever_runs_out_first():
    """Kills: progress taking the smaller of the two fractions (`max` made `min`), the
    seconds not recorded by `step`, and the budget fraction inverted."""
    optimizer = _optimizer()
    schedule = WarmupCosine(optimizer, total_iters=1000, budget_seconds=100.0)
    schedule.step(seconds=50.0)  # 1 of 1000 iterations, half the budget
    assert schedule.progress() == pytest.approx(0.5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(_cosine(0.5))
    schedule.step(seconds=250.0)  # the budget is spent: fully annealed
    assert schedule.progress() == 1.0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    iterations_first = WarmupCosine(_optimizer(), total_iters=4, budget_seconds=1e6)
    for _ in range(3):
        iterations_first.step(seconds=1.0)
    assert iterations_first.progress() == pytest.approx(0.75)


def test_a_resumed_schedule_continues_where_the_saved_one_left():
    """Kills: `state_dict` leaving out a field a resume needs (the seconds of a budgeted
    run, the step count, the warm-up), and `load_state_dict` not re-applying the rate."""
    optimizer = _optimizer(lr=0.5)
    first = WarmupCosine(optimizer, total_iters=100, warmup_iters=10, budget_seconds=60.0)
    for second in range(1, 6):
        first.step(seconds=second * 4.0)
    state = first.state_dict()

    resumed_optimizer = _optimizer(lr=0.5)
    resumed = WarmupCosine(resumed_optimizer, total_iters=1)
    resumed.load_state_dict(state)
    assert resumed.progress() == pytest.approx(first.progress())
    assert resumed.progress() == pytest.approx(20.0 / 60.0)  # the budget's share, not 5/100
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    first.step(seconds=24.0)
    resumed.step(seconds=24.0)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])


def test_no_weight_decay_on_norm_weights_and_biases_and_frozen_ones_left_out():
    """Kills: the 1-D test made strict (`param.ndim < 1`: biases and norm weights decayed),
    the groups' decays swapped, and frozen parameters handed to the optimiser."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    config = TrainConfig(weight_decay=0.01, lr=0.1)
    optimizer = build_optimizer(model, config)
    decays = {
        id(param): group["weight_decay"]
        for group in optimizer.param_groups
        for param in group["params"]
    }
    assert decays[id(model[0].weight)] == 0.01
    for param in (model[0].bias, model[1].weight, model[1].bias, model[2].bias):
        assert decays[id(param)] == 0.0
    assert id(model[2].weight) not in decays
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == config.momentum
    assert isinstance(build_optimizer(model, TrainConfig(optimizer="adamw")), torch.optim.AdamW)


def test_the_cosine_schedule_spans_every_iteration_of_every_epoch():
    """Kills: `build_scheduler` sizing the cosine by epochs alone (`total = config.epochs`),
    and the warm-up or budget of the config not passed on."""
    config = TrainConfig(scheduler="cosine", epochs=3, warmup_iters=5, minutes=1.5)
    schedule, per_iteration = build_scheduler(_optimizer(), config, iters_per_epoch=7)
    assert per_iteration is True and isinstance(schedule, WarmupCosine)
    assert (schedule.total_iters, schedule.warmup_iters, schedule.budget_seconds) == (21, 5, 90.0)
