"""`splitdet bench` after a methodology audit: the figures label a perfect gate's curves as an
upper bound (and only theirs), two defect rates that make one stream are refused, and each
mean time and reduction carries a 95% bootstrap confidence interval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from splitdet.bench import report as report_module
from splitdet.bench.report import markdown, summarise, write_report
from splitdet.bench.streams import make_stream
from splitdet.bench.systems import Outcome
from splitdet.shared.cli import main
from splitdet.training.voc import read_split

BOUND = " (upper bound: perfect gate)"
GATED = ("paper", "splitdet-int8")
UNGATED = ("jpeg95-to-cloud", "monolithic-split-engines")


def _summary(mean_s: float, reduction: float | None, realised: float, bound: bool) -> dict:
    """The keys of a system's summary the figures read."""
    return {
        "mean_s": mean_s,
        "reduction": reduction,
        "defect_rate_realised": realised,
        "upper_bound": "perfect gate" if bound else None,
    }


def _oracle_report() -> dict:
    """A hand-made `--oracle-gate` report of two rates: two gated systems, two without a gate."""
    rates = {}
    for key, realised in (("0.05", 0.05), ("0.5", 0.5)):
        systems = {"monolithic": _summary(2.0, None, realised, False)}
        for index, name in enumerate(GATED + UNGATED):
            systems[name] = _summary(1.0 + index / 10, 0.5 - index / 20, realised, name in GATED)
        rates[key] = systems
    return {"settings": {"oracle_gate": True}, "rates": rates, "rate_distortion": None}


# -- fault 1: the figures did not say which curves were a perfect gate's ----------------------


def test_the_figures_label_only_the_gated_curves_an_upper_bound(tmp_path, monkeypatch):
    """time_vs_defect_rate.png said nothing of the perfect gate; reduction_vs_defect_rate.png
    put it in its title, over the curves without a gate too. Now each gated system's legend
    entry carries "(upper bound: perfect gate)", as its row in report.md, and no title does."""
    seen: dict[str, tuple[str, list[str]]] = {}
    save = report_module._save

    def recording_save(fig, path: Path) -> str:  # the real writer, after reading the figure
        ax = fig.axes[0]
        seen[path.name] = (ax.get_title(), [t.get_text() for t in ax.get_legend().get_texts()])
        return save(fig, path)

    monkeypatch.setattr(report_module, "_save", recording_save)
    written = report_module.figures(_oracle_report(), tmp_path)
    assert written == ["time_vs_defect_rate.png", "reduction_vs_defect_rate.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)
    expected = [f"{n}{BOUND}" for n in GATED] + list(UNGATED)
    time_title, time_labels = seen["time_vs_defect_rate.png"]
    assert time_labels == ["monolithic", *expected]
    reduction_title, reduction_labels = seen["reduction_vs_defect_rate.png"]
    assert reduction_labels == [*expected, report_module.PAPER_REPORTED_LABEL]
    for title in (time_title, reduction_title):
        assert "upper bound" not in title and "perfect gate" not in title


def test_the_legend_labels_are_report_md_s_row_labels():
    """One function names a system in both places: the legend says what the row says."""
    from splitdet.bench.report import system_label

    assert system_label("paper", {"upper_bound": "perfect gate"}) == f"paper{BOUND}"
    assert system_label("jpeg95-to-cloud", {"upper_bound": None}) == "jpeg95-to-cloud"
    figure = report_module.time_figure(_oracle_report())
    try:
        labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    rows = _oracle_report()["rates"]["0.5"]
    assert labels == [system_label(name, s) for name, s in rows.items()]


# -- fault 2: two requested rates made the same stream without a word -------------------------


def test_two_rates_of_one_stream_are_refused_before_anything_runs(tmp_path, capsys):
    """--images 11 at the default 5%, 12%, 50%: 5% and 12% both gave 1 defective image of 11,
    two headings of one stream and a vertical step in the reduction figure."""
    out = tmp_path / "out"
    argv = ["bench", "--model", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "none")]
    argv += ["--data", str(tmp_path), "--out", str(out), "--images", "11"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--defect-rates 0.05 and 0.12 with --images 11: both are 1 of 11 images defective" in err
    assert "use --images 13 " in err
    assert not out.exists()


@pytest.mark.parametrize(
    "rates, images, separating",
    [((0.05, 0.12, 0.5), 11, 13), ((0.05, 0.12, 0.5), 12, 13), ((0.5, 0.6), 2, 5)],
)
def test_the_images_that_separate_the_rates_are_the_fewest(rates, images, separating):
    from splitdet.bench.streams import defective_count, images_separating, rates_problem

    assert images_separating(rates, images) == separating
    assert rates_problem("--defect-rates", rates, "--images", separating) is None
    for n in range(images, separating):  # each fewer image count still makes one stream twice
        assert len({defective_count(r, n) for r in rates}) < len(rates)
        assert "the same stream twice" in rates_problem("--defect-rates", rates, "--images", n)


def test_counts_round_half_to_even_as_documented(tiny_dataset):
    """Python's round(): 50% of 5 images (2.5) is 2 defective, 50% of 7 (3.5) is 4; 5% of 30 is
    1.5000000000000002 as a float, so 2."""
    from splitdet.bench.streams import defective_count

    assert [defective_count(0.5, 5), defective_count(0.5, 7), defective_count(0.05, 30)] == [
        2,
        4,
        2,
    ]
    stream = make_stream(read_split(tiny_dataset, "test"), 0.5, 5, seed=0)
    assert sum(s.is_defective for s in stream) == 2


# -- fault 3: no spread was reported ----------------------------------------------------------


def test_identical_times_give_a_zero_width_interval():
    from splitdet.bench.report import add_confidence_intervals

    varied = [0.5, 1.0, 3.0, 0.2, 2.2]
    summaries = {"monolithic": {}, "same": {}, "flat": {}}
    times = {"monolithic": varied, "same": varied, "flat": [0.7] * 5}
    add_confidence_intervals(summaries, times, [False, True, False, False, True])
    assert summaries["same"]["reduction_ci95"] == [0.0, 0.0]  # paired: same images each time
    assert summaries["flat"]["mean_s_ci95"] == [pytest.approx(0.7), pytest.approx(0.7)]
    assert summaries["monolithic"]["reduction_ci95"] is None
    low, high = summaries["monolithic"]["mean_s_ci95"]
    assert min(varied) < low < np.mean(varied) < high < max(varied)


def test_a_constant_ratio_gives_an_interval_at_that_ratio():
    """Every image 40% of monolithic's time: the reduction is 60% whichever images are drawn;
    an unpaired bootstrap (different images for each system) would spread it widely."""
    from splitdet.bench.report import add_confidence_intervals

    mono = np.random.default_rng(1).uniform(0.1, 5.0, 40)
    summaries = {"monolithic": {}, "gated": {}}
    add_confidence_intervals(summaries, {"monolithic": mono, "gated": 0.4 * mono}, [False] * 40)
    assert summaries["gated"]["reduction_ci95"] == [pytest.approx(0.6), pytest.approx(0.6)]


def test_the_interval_covers_the_point_estimate_and_is_reproducible():
    from splitdet.bench.report import add_confidence_intervals

    rng = np.random.default_rng(2)
    mono = rng.uniform(1.5, 3.0, 30)
    gated = np.where(rng.random(30) < 0.1, 2.6, 0.8) + rng.normal(0, 0.1, 30)
    times = {"monolithic": mono, "gated": gated}
    defective = list(rng.random(30) < 0.2)
    summaries = {"monolithic": {}, "gated": {}}
    add_confidence_intervals(summaries, times, defective)
    again = {"monolithic": {}, "gated": {}}
    add_confidence_intervals(again, times, defective)
    assert again == summaries  # a fixed seed: the same report from the same outcomes
    for name, t in times.items():
        low, high = summaries[name]["mean_s_ci95"]
        assert low < t.mean() < high
    low, high = summaries["gated"]["reduction_ci95"]
    assert low < 1 - gated.mean() / mono.mean() < high


def test_the_report_gives_the_intervals_beside_the_means_and_reductions(tiny_dataset, tmp_path):
    """report.json keeps its keys and gains `mean_s_ci95` and `reduction_ci95`; report.md gives
    them in the mean and reduction cells."""
    from splitdet.bench.report import add_confidence_intervals

    stream = make_stream(read_split(tiny_dataset, "test"), 0.5, 6, seed=0)
    names = sorted({o.name for s in stream for o in s.objects})
    mono_s = [2.0, 2.5, 1.5, 2.2, 1.8, 2.1]
    gated_s = [1.5 if s.is_defective else 0.5 for s in stream]

    def outcomes(seconds: list[float], gated: bool) -> list[Outcome]:
        return [Outcome(t, t, 0.0, 0, True, 0.9 if gated else None) for t in seconds]

    mono = summarise(outcomes(mono_s, False), stream, names, None)
    rate = {"monolithic": mono, "paper": summarise(outcomes(gated_s, True), stream, names, mono)}
    add_confidence_intervals(
        rate, {"monolithic": mono_s, "paper": gated_s}, [s.is_defective for s in stream]
    )
    report = {
        "command": "splitdet bench",
        "machine": {"cpu_count": 2, "platform": "test", "versions": {}},
        "model": {"depth_label": "R", "input": "i", "gate_threshold": 0.5, "fingerprint": "f"},
        "rates": {"0.5": rate},
    }
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())["rates"]["0.5"]
    paper = saved["paper"]
    assert paper["reduction"] == pytest.approx(1 - np.mean(gated_s) / np.mean(mono_s))
    low, high = paper["reduction_ci95"]
    assert low < paper["reduction"] < high
    text = markdown(json.loads((tmp_path / "report.json").read_text()))
    row = next(x for x in text.splitlines() if x.startswith("| paper |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    m_low, m_high = paper["mean_s_ci95"]
    assert cells[1] == f"{paper['mean_s']:.3f} (95% CI {m_low:.3f} to {m_high:.3f})"
    assert cells[5] == f"{paper['reduction']:+.1%} (95% CI {low:+.1%} to {high:+.1%})"
    mono_row = next(x for x in text.splitlines() if x.startswith("| monolithic |"))
    assert [c.strip() for c in mono_row.strip("|").split("|")][5] == "–"
    assert "paired, stratified bootstrap over the stream's images (2000 resamples" in text


# (a real run's intervals: test_bench_report_review.py's
# test_a_run_writes_the_intervals_of_every_rate, on that module's --oracle-gate run)
