"""The `vs same engines` reduction carries its confidence interval, as `reduction` does."""

from __future__ import annotations

import numpy as np

from splitdet.bench.report import (
    MONOLITHIC,
    add_confidence_intervals,
    add_engine_reductions,
    bootstrap_means,
    interval,
    markdown,
)
from splitdet.bench.systems import SAME_ENGINES


def _times() -> tuple[dict[str, list[float]], list[bool]]:
    rng = np.random.default_rng(1)
    defective = [k % 4 == 0 for k in range(20)]
    mono = 2.0 + rng.random(20)
    engines = 1.4 + 0.8 * rng.random(20)
    split = np.where(defective, 2.4, 0.6) + 0.5 * rng.random(20)
    return {MONOLITHIC: list(mono), SAME_ENGINES: list(engines), "splitdet-int8": list(split)}, (
        defective
    )


def test_reduction_vs_same_engines_has_its_interval_in_json_and_markdown() -> None:
    """bench/README's headline, splitdet against the same engines, is a ratio of two noisy
    means like `reduction`: report.json gives it `reduction_vs_same_engines_ci95` (the same
    paired, stratified resamples) and report.md prints it beside the figure."""
    times, defective = _times()
    summaries = {name: {"mean_s": float(np.mean(t))} for name, t in times.items()}
    add_engine_reductions(summaries)
    add_confidence_intervals(summaries, times, defective)

    means = bootstrap_means(times, defective=defective)
    split = summaries["splitdet-int8"]
    expected = interval(1.0 - means["splitdet-int8"] / means[SAME_ENGINES])
    assert split["reduction_vs_same_engines_ci95"] == expected
    low, high = expected
    assert low < split["reduction_vs_same_engines"] < high
    assert summaries[SAME_ENGINES]["reduction_vs_same_engines_ci95"] is None

    for name, s in summaries.items():  # (what summarise gives besides; not under test)
        s.update(n_images=20, n_defective=5, n_unique_images=20, defect_rate_realised=0.25,
                 p50_s=s["mean_s"], p95_s=s["mean_s"], images_per_s=1 / s["mean_s"],
                 reduction=None if name == MONOLITHIC else 0.1, edge_s=0.0, cloud_s=0.0,
                 bytes_per_image=0.0, bytes_per_sent_image=0.0, map=None, map50=None,
                 map_kept=None, gate_recall=None, flagged_fraction=1.0, has_gate=False,
                 transfer_100mbit_s_computed=0.0, upper_bound=None)  # fmt: skip
    report = {
        "command": "splitdet bench",
        "machine": {"cpu_model": "cpu", "cpu_count": 2, "platform": "linux", "versions": {}},
        "settings": {"defect_rates": [0.25], "engine_baseline": True},
        "model": {
            "depth_label": "R18",
            "input": "x",
            "gate_threshold": 0.5,
            "fingerprint": "f" * 64,
        },
        "rates": {"0.25": summaries},
        "figures": [],
    }
    row = next(line for line in markdown(report).splitlines() if "| splitdet-int8 |" in line)
    cell = f"{split['reduction_vs_same_engines']:+.1%} (95% CI {low:+.1%} to {high:+.1%})"
    assert cell in row


def test_no_interval_for_a_stream_of_one_image_of_each_kind() -> None:
    """As for the other intervals: none where every resample would be the stream itself."""
    times = {MONOLITHIC: [2.0, 2.1], SAME_ENGINES: [1.5, 1.4], "splitdet-int8": [0.6, 2.3]}
    summaries = {name: {"mean_s": float(np.mean(t))} for name, t in times.items()}
    add_engine_reductions(summaries)
    add_confidence_intervals(summaries, times, [False, True])
    assert all(s["reduction_vs_same_engines_ci95"] is None for s in summaries.values())
