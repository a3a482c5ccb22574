"""The optimiser and the learning-rate schedule of a training run: `build_optimizer` (SGD or
AdamW, no weight decay on norm weights and biases), `WarmupCosine` (per-iteration warm-up and
cosine, annealed by iterations or by the time budget, whichever runs out first) and
`build_scheduler` (the schedule a `TrainConfig` names).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from splitdet.training.presets import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; no weight decay on norm weights and biases (torchvision's reference)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append(param)
        del name
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


class WarmupCosine:
    """Per-iteration learning rate: linear warm-up from lr/10, then a cosine to 0.

    Progress is the larger of iterations done / `total_iters` and training seconds /
    `budget_seconds`, so a time-budgeted run anneals fully by its deadline whatever the speed
    of the machine. Has `state_dict`/`load_state_dict` like torch's schedulers.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_iters: int,
        warmup_iters: int = 0,
        budget_seconds: float | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.total_iters = max(1, total_iters)
        self.warmup_iters = warmup_iters
        self.budget_seconds = budget_seconds
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.step_count = 0
        self.seconds = 0.0
        self._apply()

    def progress(self) -> float:
        """How far the schedule has run, in [0, 1]: the larger of the iterations' fraction and
        the time budget's."""
        p = self.step_count / self.total_iters
        if self.budget_seconds:
            p = max(p, self.seconds / self.budget_seconds)
        return min(p, 1.0)

    def factor(self) -> float:
        """The learning-rate multiplier now: cosine over `progress`, ramped up from 0.1 during
        the warmup iterations."""
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress()))
        if self.step_count < self.warmup_iters:
            cosine *= 0.1 + 0.9 * self.step_count / self.warmup_iters
        return cosine

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * self.factor()

    def step(self, seconds: float | None = None) -> None:
        """One iteration done; `seconds`: the run's training seconds so far (for the budget)."""
        self.step_count += 1
        if seconds is not None:
            self.seconds = seconds
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, for a checkpoint."""
        return {
            "total_iters": self.total_iters,
            "warmup_iters": self.warmup_iters,
            "budget_seconds": self.budget_seconds,
            "base_lrs": list(self.base_lrs),
            "step_count": self.step_count,
            "seconds": self.seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up the schedule where `state` (a `state_dict`) left it."""
        self.__dict__.update({k: state[k] for k in self.state_dict()})
        self._apply()


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, iters_per_epoch: int
) -> tuple[torch.optim.lr_scheduler.StepLR | WarmupCosine | None, bool]:
    """(scheduler, per_iteration): StepLR per epoch, WarmupCosine per iteration, or none."""
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma), False
    if config.scheduler == "cosine":
        total = config.epochs * iters_per_epoch
        return WarmupCosine(optimizer, total, config.warmup_iters, config.budget_seconds), True
    return None, False
