"""Per-epoch records of a training run: `BestEpoch` (which validated epoch best.pt holds: the
best `best_metric`, ties broken by mAP@[.5:.95]) and `describe_best`, `write_metrics`
(metrics.json, metrics.csv: one row per epoch) and `plot_learning_curve` (learning_curve.png);
`METRIC_NAMES` names the validation metrics as logs and messages do.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitdet.shared.agg_pyplot import agg_pyplot
from splitdet.shared.atomic_file import atomic_write, replacing
from splitdet.shared.strict_json import strict_dumps

#: Validation metrics (`evaluate`'s keys) as logs and messages name them.
METRIC_NAMES = {
    "map50": "mAP@.5", "map": "mAP@[.5:.95]", "ar100": "AR@100", "gate_auc": "gate AUC",
    "gate_accuracy": "gate accuracy",
}  # fmt: skip
#: Values of the metric best.pt is chosen on this close count as equal (the same mean summed
#: in another order): the tie-break decides between them.
TIE_TOLERANCE = 1e-9


@dataclass
class BestEpoch:
    """The validated epoch best.pt holds: the highest `metric` (`TrainConfig.best_metric`);
    among epochs equal on it, the highest `tie_metric`. A small validation split saturates
    mAP@.5 at 1.0 while the boxes go on tightening (mAP@[.5:.95] 0.19 -> 0.66): on mAP@.5
    alone best.pt kept the first, loosest epoch to reach 1.0. A later epoch replaces the
    best only when strictly better on the two in turn, so a full tie keeps the earlier."""

    metric: str
    epoch: int | None = None
    value: float = -math.inf
    tie_value: float = -math.inf

    @property
    def tie_metric(self) -> str:
        """The metric that breaks ties: mAP@[.5:.95], or mAP@.5 when `metric` is that."""
        return "map50" if self.metric == "map" else "map"

    def offer(self, row: dict[str, Any]) -> bool:
        """Take the epoch of metrics `row` as the best if it is better; True when it is (a row
        without the metric, not validated, is not)."""
        value = row.get(f"val_{self.metric}")
        if value is None or math.isnan(value):
            return False
        tie = row.get(f"val_{self.tie_metric}")
        tie = -math.inf if tie is None or math.isnan(tie) else float(tie)
        better = value > self.value + TIE_TOLERANCE or (
            abs(value - self.value) <= TIE_TOLERANCE and tie > self.tie_value
        )
        if better:
            self.epoch, self.value, self.tie_value = int(row["epoch"]), float(value), tie
        return better

    def to_checkpoint(self) -> dict[str, Any]:
        """The entries a checkpoint keeps of it ("best_value" as before; the epoch and the
        tie-break's value since ties are broken)."""
        return {
            "best_value": self.value, "best_epoch": self.epoch, "best_tie_value": self.tie_value,
        }  # fmt: skip

    @classmethod
    def of_checkpoint(
        cls, checkpoint: dict[str, Any], history: list[dict[str, Any]], metric: str
    ) -> BestEpoch:
        """The best a resumed run's last.pt records. One written before ties were broken
        records only "best_value": its best.pt holds the first epoch of `history` that
        reached it (a strictly greater value replaced it, an equal one did not)."""
        best = cls(metric, value=float(checkpoint.get("best_value", -math.inf)))
        if "best_epoch" in checkpoint:
            best.epoch = checkpoint["best_epoch"]
            best.tie_value = float(checkpoint.get("best_tie_value", -math.inf))
            return best
        for row in history:
            if row.get(f"val_{metric}") == best.value:
                best.epoch = int(row["epoch"])
                tie = row.get(f"val_{best.tie_metric}")
                best.tie_value = -math.inf if tie is None else float(tie)
                break
        return best

    def summary(self) -> dict[str, Any] | None:
        """What best.pt holds, for the run's result (None: no validated epoch)."""
        if self.epoch is None:
            return None
        tie = None if math.isinf(self.tie_value) else self.tie_value
        return {
            "epoch": self.epoch, "metric": self.metric, "value": self.value,
            "tie_metric": self.tie_metric, "tie_value": tie,
        }  # fmt: skip


def describe_best(best: dict[str, Any]) -> str:
    """What a `BestEpoch.summary` says, as a clause: "best.pt holds epoch 9 (val mAP@.5 1.000,
    mAP@[.5:.95] 0.658: ...)"."""
    name = METRIC_NAMES.get(best["metric"], best["metric"])
    tie_name = METRIC_NAMES.get(best["tie_metric"], best["tie_metric"])
    tie = "n/a" if best["tie_value"] is None else f"{best['tie_value']:.3f}"
    return (
        f"best.pt holds epoch {best['epoch']} (val {name} {best['value']:.3f}, {tie_name} {tie}: "
        f"the highest {name}, ties broken by {tie_name})"
    )


#: Keys of a metrics row that metrics.json holds and metrics.csv leaves out (its columns stay
#: those other tools read): "budget_cut" (the time budget ended the epoch before its data did:
#: fewer iterations than a full one), "run" (the run folder's name), "preset" (the recipe's
#: name) and "data" (the dataset folder's name), which the learning curve shows.
JSON_ONLY = ("budget_cut", "run", "preset", "data")


def write_metrics(out_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.json (a list of rows) and metrics.csv (the union of columns, `JSON_ONLY` left
    out)."""
    text = strict_dumps(history, indent=2)  # (a NaN loss: null, as jq and pandas read JSON)
    atomic_write(out_dir / "metrics.json", (text + "\n").encode())
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns and k not in JSON_ONLY]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write(out_dir / "metrics.csv", table.getvalue().encode())


def _loss(row: dict[str, Any], key: str) -> float:
    """A loss of a metrics row; NaN (no point) when the epoch ran no iteration."""
    value = row.get(key)
    return math.nan if value is None else float(value)


def epoch_span(first: int, last: int) -> str:
    """Epochs ``first`` to ``last`` (numbers from 0, as metrics.csv and the log give them) as
    a line says them: "epoch 0" for one, "epochs 0-4" for several (not "epochs 0-0")."""
    return f"epoch {first}" if first == last else f"epochs {first}-{last}"


def curve_title(
    history: list[dict[str, Any]], run_name: str | None, preset: str | None, data: str | None = None
) -> str:
    """learning_curve.png's title: the run folder, preset and dataset folder (when known), the
    epochs (counted, and their numbers from 0, as metrics.csv and the log give them) and
    training minutes."""
    n = len(history)
    numbers = epoch_span(history[0]["epoch"], history[-1]["epoch"])
    minutes = history[-1].get("train_minutes") or 0.0
    who = ", ".join(
        part
        for part in (
            run_name and f"run {run_name}",
            preset and f"preset {preset}",
            data and f"data {data}",
        )
        if part
    )
    return (
        (f"{who}: " if who else "")
        + f"multi-task model, {n} epoch{'s' if n != 1 else ''} ({numbers}), "
        f"{minutes:.1f} training minutes"
    )


def plot_learning_curve(
    history: list[dict[str, Any]],
    path: Path,
    *,
    run_name: str | None = None,
    preset: str | None = None,
    data: str | None = None,
) -> None:
    """Loss and mAP against epoch, like the paper's Fig. 3.

    The paper compares plain Faster R-CNN with the multi-task model; one run trains only the
    multi-task model, so the plot shows its detection loss (what a plain Faster R-CNN would
    minimise) beside its total multi-task loss, and its mAP / mAP@.5 / gate AUC. A dashed line
    marks each epoch a --resume started with (rows with "resumed": settings may change there).

    Every epoch is a marker (a run of one epoch is a point, not nothing), on whole-number epoch
    ticks numbered from 0 as metrics.csv's `epoch`, the two panels over the same epochs; the
    legends sit under the panels, off the data. An epoch the time budget ended early
    (`budget_cut`: fewer iterations than a full one) is circled in red on the loss panel. The
    title names `run_name`, `preset` and `data` (default: the last row's "run", "preset" and
    "data", which metrics.json records, so that a curve drawn again from it is the same).
    """
    plt = agg_pyplot()
    from matplotlib.ticker import MaxNLocator

    run_name = run_name or (history[-1].get("run") if history else None)
    preset = preset or (history[-1].get("preset") if history else None)
    data = data or (history[-1].get("data") if history else None)
    epochs = [row["epoch"] for row in history]
    marker = {"marker": "o", "markersize": 4 if len(history) <= 60 else 2}
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4.6), sharex=True)
    ax_loss.plot(epochs, [_loss(r, "loss") for r in history], label="multi-task loss (total)",
                 **marker)  # fmt: skip
    ax_loss.plot(epochs, [_loss(r, "loss_detection") for r in history], label="detection losses",
                 **marker)  # fmt: skip
    ax_loss.plot(epochs, [_loss(r, "loss_defect") for r in history], label="defect loss",
                 **marker)  # fmt: skip
    cut = [row for row in history if row.get("budget_cut")]
    if cut:
        ax_loss.plot(
            [row["epoch"] for row in cut],
            [_loss(row, "loss") for row in cut],
            linestyle="none",
            marker="o",
            markersize=12,
            markerfacecolor="none",
            markeredgecolor="tab:red",
            markeredgewidth=1.5,
            label="epoch cut short by the time budget (fewer iterations)",
        )
    axis_label = "epoch (numbered from 0, as in metrics.csv and the log)"
    ax_loss.set_xlabel(axis_label)
    ax_loss.set_ylabel("training loss")
    evaluated = [row for row in history if row.get("val_map50") is not None]
    for key, label in (
        ("val_map", "mAP@[.5:.95]"),
        ("val_map50", "mAP@.5"),
        ("val_gate_auc", "gate AUC"),
    ):
        points = [(row["epoch"], row[key]) for row in evaluated if row.get(key) is not None]
        if points:
            ax_map.plot(*zip(*points, strict=True), marker="o", label=label)
    ax_map.set_xlabel(axis_label)
    ax_map.set_ylabel("validation")
    ax_map.set_ylim(-0.03, 1.03)  # (a point at 0 or 1 whole, not cut by the frame)
    if not evaluated:
        ax_map.text(0.5, 0.5, "no validation passes", ha="center", transform=ax_map.transAxes)
    for n, epoch in enumerate(row["epoch"] for row in history if row.get("resumed")):
        for ax in (ax_loss, ax_map):
            ax.axvline(epoch - 0.5, color="grey", linestyle="--", linewidth=1,
                       label="resumed" if n == 0 and ax is ax_loss else None)  # fmt: skip
    for ax in (ax_loss, ax_map):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if ax.get_legend_handles_labels()[0]:  # under the panel, off the curves
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8,
                      frameon=False)  # fmt: skip
    if epochs:
        ax_loss.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)  # shared: both panels
        fig.suptitle(curve_title(history, run_name, preset, data))
    fig.tight_layout()
    try:
        with replacing(path, parents=False) as temporary:  # (killed meanwhile: the old one)
            fig.savefig(temporary, dpi=100, format="png")
    finally:
        plt.close(fig)
