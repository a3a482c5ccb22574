"""The state of a training run (`_Run`): what one call of `train` was given, what it trains
with, and how far it has come, from a resumed run's last.pt (`run_start`) then epoch by epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splitdet.shared.model import MultiTaskRCNN
from splitdet.training.epoch_records import BestEpoch
from splitdet.training.presets import TrainConfig
from splitdet.training.schedule import WarmupCosine
from splitdet.training.train_epoch import TrainClock


@dataclass
class _Run:
    """One call of `train`: what it was given, what it trains with, and how far it has come
    (from a resumed run's last.pt, then epoch by epoch)."""

    config: TrainConfig
    data_dir: Path
    out_dir: Path
    device: torch.device
    rank: int
    world: int
    progress: bool
    model: MultiTaskRCNN
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.StepLR | WarmupCosine | None
    per_iteration: bool  # whether lr_scheduler steps every iteration (else every epoch)
    clock: TrainClock
    autocast: torch.dtype | None
    best: BestEpoch  # the epoch best.pt holds
    history: list[dict[str, Any]] = field(default_factory=list)  # a metrics row per epoch
    start_epoch: int = 0
    gate_threshold: float = 0.5
    gate_calibrated: bool = False  # whether gate_threshold came from a validation pass
    # where this call's validation calibrated it (`checkpoint.calibration_source`), else None
    gate_source: dict[str, str] | None = None
    epoch_seconds: float = 0.0  # training seconds of the last epoch (the budget's half-epoch rule)
    epochs_run: int = 0  # epochs this call trained
    # wall-clock seconds of the run's earlier calls (a resumed last.pt's), and the
    # `time.perf_counter()` its wall clock counts from in this call (that many seconds back)
    wall_seconds: float = 0.0
    wall_start: float = 0.0
    # history rows metrics.json holds; learning_curve.png: how many of them it shows, and
    # when it was drawn (perf_counter)
    recorded_rows: int = 0
    plotted_rows: int = 0
    plotted_at: float | None = None

    @property
    def last_path(self) -> Path:
        """The run's last.pt (every epoch; what --resume reads)."""
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        """The run's best.pt (the epoch `best` names)."""
        return self.out_dir / "best.pt"
