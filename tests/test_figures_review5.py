"""Review of the product's figures and reports (5): one colour and marker per system in every
benchmark figure; the figures carry the model, report.md's flags, the confidence intervals and
an unmistakable legend, and say "not plotted" rather than draw empty axes; the learning curve
draws a one-epoch run, on whole epochs, both panels alike, legends off the data, its run and
preset in the title and a budget-cut epoch marked; loadtest gives a percentile only from
enough requests, and report.md a mean only to the digits its interval supports.

Every figure here is drawn from small hand-made data (no benchmark or training run), written
as a real PNG and read back."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from splitdet.bench import report as report_module

SYSTEMS = ("monolithic", "monolithic-split-engines", "paper", "splitdet-int8", "jpeg95-to-cloud")
RATES = (("0.05", 0.05), ("0.12", 0.12), ("0.5", 0.5))
FINGERPRINT = "0123456789abcdef" + "f" * 48


def _summary(name: str, index: int, realised: float, n_images: int) -> dict:
    """Every key report.md and the figures read of one system's summary, made up."""
    mean = 2.0 - 0.3 * index + realised
    reduction = None if name == "monolithic" else 1 - mean / (2.0 + realised)
    gated = name in ("paper", "splitdet-int8")
    summary = {
        "n_images": n_images, "n_defective": round(realised * n_images),
        "n_unique_images": n_images, "mean_s": mean, "p50_s": mean, "p95_s": mean * 1.2,
        "images_per_s": 1 / mean, "edge_s": mean / 2, "cloud_s": mean / 4,
        "bytes_per_image": 1000.0 * index, "bytes_per_sent_image": 2000.0 * index,
        "transfer_100mbit_s_computed": 0.0, "flagged_fraction": realised, "has_gate": gated,
        "map": 0.5, "map50": 0.7, "map_kept": None if name == "monolithic" else 0.95,
        "gate_recall": 0.9 if gated else None, "defect_rate_realised": realised,
        "upper_bound": None, "reduction": reduction,
        "mean_s_ci95": [mean - 0.05, mean + 0.06],
        "reduction_ci95": None if reduction is None else [reduction - 0.03, reduction + 0.02],
        "reduction_vs_same_engines": None,
    }  # fmt: skip
    for link in report_module.LINKS:
        summary[f"mean_with_{link}_s"] = mean
        summary[f"reduction_with_{link}"] = reduction
    return summary


def _report(
    *, complete: bool = True, load: float = 0.0, n_images: int = 200, map_monolithic=0.4
) -> dict:
    """A hand-made report.json of three rates, every system, and a bytes-vs-mAP pass."""
    rates = {
        key: {name: _summary(name, i, realised, n_images) for i, name in enumerate(SYSTEMS)}
        for key, realised in RATES
    }
    kept = None if map_monolithic < 0.01 else 0.9
    points = [
        {"name": "splitdet-int8", "bytes": 5e4, "map": 0.3, "map_kept": kept},
        {"name": "jpeg75", "bytes": 8e4, "map": 0.3, "map_kept": kept},
        {"name": "jpeg95", "bytes": 2e5, "map": 0.35, "map_kept": kept},
    ]
    return {
        "command": "splitdet bench --out x",
        "machine": {"cpu_count": 2, "platform": "test", "versions": {}},
        "model": {
            "depth_label": "ResNet18",
            "input": "612x512",
            "gate_threshold": 0.5,
            "fingerprint": FINGERPRINT,
        },
        "settings": {"defect_rates": [0.05, 0.12, 0.5], "rd_images": 3},
        "load_1min": {"start": load, "end": load},
        "rates": rates,
        "rate_distortion": {"n_images": 3, "map_monolithic": map_monolithic, "points": points},
        "complete": complete,
    }


@pytest.fixture
def drawn(tmp_path, monkeypatch):
    """`draw(report)`: the benchmark's figures written as PNGs into a folder of their own
    (`report.figures`), each Figure kept open for inspection: file name -> (Figure, PNG
    pixels read back)."""
    kept: dict[str, Figure] = {}
    save = report_module._save

    def keeping(fig, path: Path) -> str:
        kept[path.name] = fig
        return save(fig, path)  # (the real writer, which closes the figure)

    monkeypatch.setattr(report_module, "_save", keeping)
    calls = []

    def draw(report: dict) -> dict[str, tuple[Figure, np.ndarray]]:
        folder = tmp_path / f"figures{len(calls)}"
        calls.append(folder)
        folder.mkdir()
        kept.clear()
        written = report_module.figures(report, folder)
        return {name: (kept[name], matplotlib.image.imread(folder / name)) for name in written}

    yield draw
    plt.close("all")


def _styles(fig: Figure) -> dict[str, tuple[tuple, str]]:
    """Legend label -> (RGBA colour, marker) of the artist it names, in the figure's axes."""
    handles, labels = fig.axes[0].get_legend_handles_labels()
    found = {}
    for handle, label in zip(handles, labels, strict=True):
        line = handle.lines[0] if isinstance(handle, ErrorbarContainer) else handle
        found[label] = (matplotlib.colors.to_rgba(line.get_color()), line.get_marker())
    return found


# -- fault 1: a system's colour depended on the figure ---------------------------------------


def test_each_system_has_one_colour_and_marker_in_every_figure(drawn):
    """paper was green in time_vs_defect_rate.png, orange in reduction_vs_defect_rate.png (that
    figure leaves monolithic out, shifting matplotlib's colour cycle); splitdet-int8 took a
    third colour again in bytes_vs_map_kept.png."""
    figures = drawn(_report())
    time = _styles(figures["time_vs_defect_rate.png"][0])
    reduction = _styles(figures["reduction_vs_defect_rate.png"][0])
    rd = _styles(figures["bytes_vs_map_kept.png"][0])
    assert set(time) == set(SYSTEMS)
    for name in SYSTEMS[1:]:
        assert reduction[name] == time[name], name
    assert rd["splitdet-int8"] == time["splitdet-int8"]
    assert rd["JPEG of the image (qualities)"][0] == time["jpeg95-to-cloud"][0]
    assert len({style[0] for style in time.values()}) == len(SYSTEMS)  # told apart
    # the same in a figure of fewer systems (another run): tied to the name, not the order
    fewer = _report()
    for systems in fewer["rates"].values():
        del systems["monolithic-split-engines"], systems["paper"]
    again = _styles(drawn(fewer)["time_vs_defect_rate.png"][0])
    assert all(again[name] == time[name] for name in again)


# -- fault 2: no identity, no caveats, two "paper" entries, empty placeholder axes ----------


def _footer(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.texts)


def _red_pixels(pixels: np.ndarray) -> int:
    """Pixels of matplotlib's tab:red (214, 39, 40), as text antialiasing leaves them."""
    rgb = pixels[..., :3] * 255
    return int(np.sum((rgb[..., 0] > 150) & (rgb[..., 1] < 110) & (rgb[..., 2] < 110)))


def test_the_figures_name_the_model_and_raise_report_md_s_flags(drawn):
    """Intermediate figures of a running benchmark (and those of a busy, small run) looked
    final: now each figure names the model's fingerprint and, in red under it, the flags
    report.md raises."""
    plain = drawn(_report())
    flagged = drawn(_report(complete=False, load=3.0, n_images=20))
    for name, (fig, pixels) in flagged.items():
        footer = _footer(fig)
        assert f"fingerprint {FINGERPRINT[:16]}" in footer, name
        assert "INCOMPLETE" in footer and "BUSY MACHINE" in footer and "NOISY" in footer, name
        # drawn in red, under the axes: the PNG's rows below the plot hold red text
        plain_fig, plain_pixels = plain[name]
        assert "INCOMPLETE" not in _footer(plain_fig) and "BUSY" not in _footer(plain_fig)
        bottom = pixels[-pixels.shape[0] // 8 :]
        assert _red_pixels(bottom) > 200, name
        assert _red_pixels(plain_pixels[-plain_pixels.shape[0] // 8 :]) == 0, name


def test_the_measured_paper_and_the_reported_paper_are_told_apart(drawn):
    """Two legend entries both started "paper": this run's measurement of the paper's design
    and "paper (reported)", the paper's own figures."""
    fig, _ = drawn(_report())["reduction_vs_defect_rate.png"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert [label for label in labels if label.startswith("paper")] == ["paper"]
    assert report_module.PAPER_REPORTED_LABEL in labels
    assert "reported" in report_module.PAPER_REPORTED_LABEL
    assert "paper's design" in _footer(fig) and "measured" in _footer(fig)


def test_the_confidence_intervals_are_drawn_as_error_bars(drawn):
    figures = drawn(_report())
    for name, key, scale in (
        ("time_vs_defect_rate.png", "mean_s_ci95", 1),
        ("reduction_vs_defect_rate.png", "reduction_ci95", 100),
    ):
        fig, _ = figures[name]
        handles, labels = fig.axes[0].get_legend_handles_labels()
        bars = dict(zip(labels, handles, strict=True))["splitdet-int8"]
        assert isinstance(bars, ErrorbarContainer), name
        (segments,) = bars.lines[2]  # the vertical bars, one per rate
        spans = sorted(sorted(s[:, 1]) for s in segments.get_segments())
        report = _report()["rates"]
        expected = sorted([scale * b for b in report[k]["splitdet-int8"][key]] for k, _ in RATES)
        assert np.allclose(spans, expected), (name, spans, expected)
        assert "95% CI" in _footer(fig)


def test_a_map_under_its_floor_is_said_not_plotted_not_drawn_as_empty_axes(drawn):
    """bytes_vs_map_kept.png drew placeholder axes (y 0-1 "mAP kept (%)", x 1-10 kB) with a
    line of text over them."""
    fig, pixels = drawn(_report(map_monolithic=0.001))["bytes_vs_map_kept.png"]
    (ax,) = fig.axes
    assert not ax.axison  # no axes, ticks or labels to misread
    texts = [t.get_text() for t in ax.texts]
    assert report_module.MAP_NOT_PLOTTED in texts and "mAP below floor" in texts[0]
    assert any("0.001" in t and "0.01" in t for t in texts)
    assert pixels.shape[0] > 400  # a real PNG, read back


# -- fault 3: the learning curve ---------------------------------------------------------------


@pytest.fixture
def curve(tmp_path, monkeypatch):
    """`draw(history)`: learning_curve.png of `history` as `plot_learning_curve` writes it,
    -> (its Figure, the PNG read back)."""
    from splitdet.training.epoch_records import plot_learning_curve

    seen: list[Figure] = []
    real = Figure.savefig

    def recording(self, *args, **kwargs):
        seen.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)

    def draw(history: list[dict], **kwargs) -> tuple[Figure, np.ndarray]:
        path = tmp_path / f"curve{len(seen)}" / "learning_curve.png"
        path.parent.mkdir()
        plot_learning_curve(history, path, **kwargs)
        fig = seen[-1]
        FigureCanvasAgg(fig).draw()  # (closed by plot_learning_curve: drawn again, to measure)
        return fig, matplotlib.image.imread(path)

    return draw


def _row(epoch: int, loss: float, **extra) -> dict:
    return {
        "epoch": epoch, "iters": 10, "train_minutes": 0.5 * (epoch + 1), "resumed": False,
        "loss": loss, "loss_detection": 0.7 * loss, "loss_defect": 0.3 * loss,
        "run": "cpu-a", "preset": "cpu", "data": "gaskets-7", "budget_cut": False, **extra,
    }  # fmt: skip


def test_a_one_epoch_run_draws_its_point_on_whole_epoch_ticks(curve):
    """One epoch: no loss was drawn (a line of one point and no marker), the x ticks ran
    -0.04..0.04 and the title said "1 epochs"."""
    fig, _ = curve([_row(0, 2.0, val_map=0.1, val_map50=0.3, val_gate_auc=0.7)])
    ax_loss, ax_map = fig.axes
    losses = [line for line in ax_loss.get_lines() if len(line.get_xdata()) == 1]
    assert len(losses) >= 3 and all(line.get_marker() not in ("None", "", None) for line in losses)
    for ax in (ax_loss, ax_map):
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [0.0], ticks
        assert "from 0" in ax.get_xlabel()
    title = fig._suptitle.get_text()
    assert "1 epoch " in title and "1 epochs" not in title and "epoch 0" in title


def test_both_panels_show_the_same_whole_epochs_and_the_legends_cover_no_data(curve):
    """The validation panel's x range was that of its validated epochs only, the ticks
    fractional (2.5 epochs), and the loss legend sat over the curve's start."""
    zigzag = [_row(e, [3.0, 1.5, 0.2][e % 3]) for e in range(30)]
    for row in zigzag[::4]:
        row.update(val_map=0.2, val_map50=0.5, val_gate_auc=0.8)
    fig, _ = curve(zigzag)
    ax_loss, ax_map = fig.axes
    assert ax_loss.get_xlim() == ax_map.get_xlim()
    assert ax_loss.get_xlim()[0] <= 0 and ax_loss.get_xlim()[1] >= 29
    for ax in (ax_loss, ax_map):
        assert all(float(t).is_integer() for t in ax.get_xticks())
    renderer = fig.canvas.get_renderer()
    for ax in (ax_loss, ax_map):
        box = ax.get_legend().get_window_extent(renderer)
        for line in ax.get_lines():
            points = ax.transData.transform(np.column_stack(line.get_data()).astype(float))
            inside = [p for p in points if box.contains(*p)]
            assert not inside, (line.get_label(), inside[:3])


def test_the_title_names_the_run_and_preset_and_numbers_epochs_as_the_axis(curve):
    """... and the dataset folder: curves of runs on several datasets looked alike."""
    fig, _ = curve([_row(e, 1.0) for e in range(3)])
    title = fig._suptitle.get_text()
    assert "run cpu-a" in title and "preset cpu" in title and "data gaskets-7" in title
    assert "3 epochs" in title and "epochs 0-2" in title
    fig, _ = curve([_row(e, 1.0) for e in range(2)], run_name="other", preset="tiny")
    assert "run other" in fig._suptitle.get_text() and "preset tiny" in fig._suptitle.get_text()


def test_an_epoch_cut_short_by_the_budget_is_marked(curve):
    """A budget-cut last epoch (fewer iterations) was drawn like a full one."""
    history = [_row(e, 2.0 - 0.3 * e) for e in range(4)]
    history[-1].update(budget_cut=True, iters=3)
    fig, pixels = curve(history)
    ax_loss = fig.axes[0]
    marks = [line for line in ax_loss.get_lines() if "budget" in line.get_label()]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [3]
    assert any("budget" in t.get_text() for t in ax_loss.get_legend().get_texts())
    assert _red_pixels(pixels) > 30  # the red ring, in the PNG
    history[-1].update(budget_cut=False, iters=10)
    fig, pixels = curve(history)
    assert not [line for line in fig.axes[0].get_lines() if "budget" in line.get_label()]
    assert _red_pixels(pixels) == 0


def test_the_budget_cut_is_recorded_in_metrics_json_and_metrics_csv_keeps_its_columns(tmp_path):
    from splitdet.training.epoch_records import write_metrics

    before = {
        k: v for k, v in _row(0, 1.0).items() if k not in ("budget_cut", "run", "preset", "data")
    }
    write_metrics(tmp_path, [_row(0, 1.0, budget_cut=True)])
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == list(before)
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["budget_cut"] is True
    rows = list(csv.DictReader(io.StringIO((tmp_path / "metrics.csv").read_text())))
    assert rows[0]["loss"] == "1.0"


def test_train_one_epoch_says_when_the_budget_ended_it():
    """metrics.csv showed fewer iterations and nothing else: the records now say why."""
    import torch

    from splitdet.training.train_epoch import TrainClock, train_one_epoch

    class Losses(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(()))

        def forward(self, images, targets):
            return {"loss_classifier": self.weight**2, "loss_defect": self.weight.abs()}

    loader = [([torch.zeros(1)], [{"boxes": torch.zeros(0, 4)}])] * 3
    model = Losses()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def run(clock: TrainClock, max_iters: int | None = None) -> dict:
        return train_one_epoch(model, optimizer, loader, clock=clock, max_iters=max_iters,
                               progress=False)  # fmt: skip

    cut = run(TrainClock(budget_seconds=1e-12))
    assert cut["iters"] == 1 and cut["budget_cut"] is True
    full = run(TrainClock(budget_seconds=1e6))
    assert full["iters"] == 3 and full["budget_cut"] is False
    capped = run(TrainClock(), max_iters=2)  # a cap is no budget
    assert capped["iters"] == 2 and capped["budget_cut"] is False


# -- fault 4: precision beyond the measurement --------------------------------------------------


def _level(seconds: list[float], unanswered: list[float] = ()):
    from splitdet.bench.load import LevelResult

    return LevelResult(clients=1, seconds=10.0, latencies_s=list(seconds),
                       per_edge=[len(seconds)], unanswered_s=list(unanswered))  # fmt: skip


def test_a_percentile_needs_enough_requests(capsys):
    """9 requests gave p90 = p99 = the maximum, to 0.1 ms, unsaid."""
    from splitdet.bench.cli_load import _print_row

    nine = [0.1 + 0.01 * k for k in range(8)] + [0.31234]
    row = _level(nine).to_json()
    assert set(row["latency_ms"]) == {"p50", "p90", "p99"}  # the keys stay: null
    assert row["latency_ms"]["p90"] is None and row["latency_ms"]["p99"] is None
    assert row["latency_ms"]["p50"] == pytest.approx(140.0)
    assert row["latency_samples"] == 9 and row["latency_max_ms"] == pytest.approx(312.3)
    assert row["answered_latency_ms"]["p99"] is None
    assert row["answered_latency_max_ms"] == pytest.approx(312.3)
    out = io.StringIO()
    _print_row(row, out)
    table = out.getvalue()
    assert "312.3" not in table and "max of 9: 312 ms" in table
    assert "too few for p90, p99" in table
    cells = table.splitlines()[0].split()
    assert cells[4:7] == ["140", "-", "-"]  # p50 ms to 3 significant digits, p90/p99 -

    hundred = _level([0.1 + 0.001 * k for k in range(99)], unanswered=[2.5]).to_json()
    assert hundred["latency_ms"]["p99"] == pytest.approx(198.0)
    assert hundred["latency_at_least"] == ["max"] and hundred["latency_max_ms"] == 2500.0
    out = io.StringIO()
    _print_row(hundred, out)
    assert "too few" not in out.getvalue() and out.getvalue().split()[6] == "198"


# -- fault 4: report.md's means to the millisecond ------------------------------------------


def test_report_md_gives_a_mean_to_the_digits_its_interval_supports():
    """2.457 (95% CI 2.401 to 2.512): the interval is ±0.06 s, the millisecond is noise."""
    report = _report()
    rate = report["rates"]["0.05"]
    rate["paper"].update(mean_s=2.4567, mean_s_ci95=[2.401, 2.512])
    rate["splitdet-int8"].update(mean_s=0.45678, mean_s_ci95=[0.4561, 0.4573])
    rate["jpeg95-to-cloud"].update(mean_s=3.1234, mean_s_ci95=[2.81, 3.43])
    text = report_module.markdown({**report, "figures": []})

    def mean_cell(label: str) -> str:
        line = next(x for x in text.splitlines() if x.startswith(f"| {label} |"))
        return line.strip("|").split("|")[1].strip()

    assert mean_cell("paper") == "2.46 (95% CI 2.40 to 2.51)"
    assert mean_cell("splitdet-int8") == "0.457 (95% CI 0.456 to 0.457)"  # the ms at most
    assert mean_cell("jpeg95-to-cloud") == "3.1 (95% CI 2.8 to 3.4)"
