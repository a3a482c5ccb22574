"""Other work during a benchmark's rates (`bench.foreign_cpu`): the start's load average was
the only busy check, so other work that began mid-run inflated a rate's reductions without a
flag (a review saw splitdet-int8's reduction go from +84% at one rate to +4% at the next as
the load changed)."""

from __future__ import annotations

import os
import time

import pytest

from splitdet.bench import foreign_cpu
from splitdet.bench import report as bench_report
from splitdet.bench.foreign_cpu import CpuSample, foreign_cores, sample_cpu
from splitdet.bench.report import busy_rates, figure_caveats

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc")


def test_proc_counters_are_read_and_this_process_cpu_counts_as_its_own():
    before = sample_cpu()
    assert before is not None and before.cores == len(os.sched_getaffinity(0))
    spin_until = time.process_time() + 0.3
    while time.process_time() < spin_until:
        pass
    after = sample_cpu()
    assert after.ours_ticks - before.ours_ticks >= 0.2 * os.sysconf("SC_CLK_TCK")
    assert after.busy_ticks >= before.busy_ticks
    assert foreign_cores(before, after) is not None


def test_busy_ticks_sum_only_the_cores_this_process_may_use():
    stat = (
        "cpu  100 0 100 900 0 0 0 0 0 0\n"
        "cpu0 10 1 20 500 7 3 4 5 0 0\n"
        "cpu1 90 0 80 400 0 0 0 0 0 0\n"
        "intr 12345\n"
    )
    assert foreign_cpu._busy_ticks(stat, {0}) == 10 + 1 + 20 + 3 + 4 + 5  # (not idle, iowait)
    assert foreign_cpu._busy_ticks(stat, {0, 1}) == 43 + 170


def test_foreign_cores_is_the_busy_time_this_run_did_not_spend():
    ticks = os.sysconf("SC_CLK_TCK")
    before = CpuSample(wall_s=10.0, busy_ticks=0, ours_ticks=0, cores=2)
    after = CpuSample(wall_s=12.0, busy_ticks=3 * ticks, ours_ticks=2 * ticks, cores=2)
    assert foreign_cores(before, after) == pytest.approx(0.5)  # 1 core-second over 2 s
    assert foreign_cores(before, None) is None
    assert foreign_cores(after, before) is None


def _report(foreign: dict) -> dict:
    system = {"n_images": 10, "n_defective": 5, "mean_s": 1.0}
    return {
        "machine": {"cpu_count": 2, "cpu_model": "cpu", "platform": "linux", "versions": {}},
        "settings": {"defect_rates": [0.05, 0.5], "threads": 2},
        "load_1min": {"start": 0.0, "end": 1.0},
        "foreign_cores": foreign,
        "rates": {"0.05": {"monolithic": system}, "0.5": {"monolithic": system}},
        "complete": True,
    }


def test_a_rate_measured_while_other_work_took_the_cores_is_flagged():
    report = _report({"0.05": 0.02, "0.5": 1.3})
    assert busy_rates(report) == {"0.5": 1.3}
    assert any("BUSY MACHINE during the 50% stream" in line for line in figure_caveats(report))
    text = "\n".join(bench_report._machine_lines(report))  # (report.md's machine part)
    assert "**Busy machine during the run**" in text and "the 50% stream(s)" in text
    assert "0.02 at 5%, 1.30 at 50%" in text


def test_an_idle_run_or_an_older_report_raises_no_flag():
    for foreign in ({"0.05": 0.1, "0.5": None}, None):
        report = _report(foreign)
        assert busy_rates(report) == {}
        assert not any("BUSY" in line for line in figure_caveats(report))
        assert "Busy machine" not in "\n".join(bench_report._machine_lines(report))
