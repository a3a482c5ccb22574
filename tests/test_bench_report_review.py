"""The benchmark report says what it measured: a perfect gate's figures as an upper bound, the
machine and load, noisy streams, the time with the network transfer, and rates listed twice."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from splitdet.bench.report import LINKS, busy_load, markdown, noise_warning, summarise
from splitdet.bench.streams import make_stream
from splitdet.bench.systems import Outcome
from splitdet.shared.cli import main
from splitdet.training.voc import read_split


@pytest.fixture(scope="module")
def oracle_run(tiny_model, tiny_model_dir, tiny_dataset, tmp_path_factory):
    """A real 4-image `--oracle-gate` run of a tiny model (the session's export of it, gate
    threshold 0.5): report.json, report.md and the export's folder. (Two images of each kind:
    one of each gives no confidence interval.)"""
    from splitdet.shared.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bench_review")
    save_checkpoint(root / "model.pt", tiny_model, gate_threshold=0.5)
    out = root / "report"
    argv = ["bench", "--model", str(tiny_model_dir), "--checkpoint", str(root / "model.pt")]
    argv += ["--data", str(tiny_dataset), "--defect-rates", "0.5", "--images", "4"]
    argv += ["--codecs", "int8", "--rd-images", "0", "--threads", "1", "--oracle-gate"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    return report, (out / "report.md").read_text(), tiny_model_dir


def _table(text: str) -> dict[str, dict[str, str]]:
    """The first rate table of report.md: system label -> column -> cell."""
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith("| system |"))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(columns, cells, strict=True))
    return rows


def test_a_perfect_gate_is_labelled_an_upper_bound_without_gate_figures(oracle_run):
    """Under --oracle-gate the report showed gate recall 100% (the ground truth's, not the
    gate's) and mAP kept as if measured; now – / null, and the rows say "upper bound"."""
    report, text, _ = oracle_run
    rate = report["rates"]["0.5"]
    for name in ("paper", "splitdet-int8"):
        assert rate[name]["upper_bound"] == "perfect gate"
        assert rate[name]["gate_recall"] is None and rate[name]["map_kept"] is None
        assert rate[name]["map50_kept"] is None
    assert rate["jpeg95-to-cloud"]["upper_bound"] is None  # no gate: nothing to bound
    assert rate["monolithic"]["upper_bound"] is None
    assert "**Upper bound: perfect gate**" in text
    rows = _table(text)
    for name in ("paper", "splitdet-int8"):
        row = rows[f"{name} (upper bound: perfect gate)"]
        assert row["gate recall"] == "–" and row["mAP kept"] == "–"
    assert "jpeg95-to-cloud" in rows and "monolithic" in rows


def test_a_run_writes_the_intervals_of_every_rate(oracle_run):
    """A real run (servers on loopback, the session's tiny export) gives every system of every
    rate its intervals in report.json, from the times it measured (the methodology audit's
    fault 3: no spread was reported; the engine baseline's system checked too)."""
    report, _, _ = oracle_run
    rate = report["rates"]["0.5"]
    assert rate["monolithic"]["reduction_ci95"] is None
    for name, summary in rate.items():
        low, high = summary["mean_s_ci95"]
        assert low <= summary["mean_s"] <= high, name
        if name != "monolithic":
            low, high = summary["reduction_ci95"]
            assert low <= summary["reduction"] <= high, name


def test_a_perfect_gate_cannot_keep_more_than_the_monolithic_map(tiny_dataset):
    """The perfect gate drops the detector's false positives on defect-free images: mAP kept
    came out above 100%. Under the oracle it is not reported."""
    stream = make_stream(read_split(tiny_dataset, "test"), 0.5, 6, seed=0)
    names = sorted({o.name for s in stream for o in s.objects})

    def outcomes(oracle: bool) -> list[Outcome]:
        found = []
        for s in stream:
            boxes = np.array([o.box for o in s.objects], np.float32).reshape(-1, 4)
            if not s.is_defective and not oracle:  # a false positive the perfect gate drops
                boxes = np.array([[10, 10, 60, 60]], np.float32)
            labels = np.array([names.index(o.name) + 1 for o in s.objects] or [1], np.int64)
            found.append(
                Outcome(0.1, 0.1, 0.0, 0, bool(len(boxes)), 0.5 if oracle else None,
                        boxes, np.ones(len(boxes), np.float32), labels[: len(boxes)])
            )  # fmt: skip
        return found

    mono = summarise(outcomes(False), stream, names, None)
    free = summarise(outcomes(True), stream, names, mono)  # as measured, without the oracle
    assert free["map_kept"] is not None and free["map_kept"] > 1.0  # the >100% of the review
    bounded = summarise(outcomes(True), stream, names, mono, oracle_gate=True)
    assert bounded["map_kept"] is None and bounded["gate_recall"] is None
    assert bounded["upper_bound"] == "perfect gate"


def test_the_report_says_what_it_measured_on(oracle_run):
    report, text, _ = oracle_run
    assert report["machine"]["cpu_model"] and report["settings"]["threads"] == 1
    assert report["machine"]["cpu_count"] == len(os.sched_getaffinity(0))  # (not the host's)
    assert report["settings"]["image_sizes"] == ["320×256"]
    load = report["load_1min"]
    assert load["start"] is not None and load["end"] is not None
    assert f"Machine: {report['machine']['cpu_model']}, " in text
    assert "1 threads per process" in text
    assert "Original image size(s), width×height: 320×256." in text
    assert f"1-minute load average: {load['start']:.2f} at the start, {load['end']:.2f}" in text


def test_a_load_average_that_could_not_be_read_is_left_out(oracle_run):
    """Where /proc/loadavg cannot be read the start figure is None: the report's first
    write failed on it (a TypeError), losing the run."""
    report, _, _ = oracle_run
    text = markdown({**report, "load_1min": {"start": None, "end": None}})
    assert "1-minute load average" not in text and "**Busy machine**" not in text


@pytest.mark.parametrize(
    "cores, start, busy", [(2, 0.1, False), (2, 0.6, True), (64, 0.6, False), (64, 20.0, True)]
)
def test_a_run_started_on_a_busy_machine_is_flagged(oracle_run, cores, start, busy):
    """Under contention torch ran up to 4x slower in the bench's own process than in the
    servers' threads: such a run's reductions are not comparable, and the report says so. A
    load is busy against the machine's cores: 0.6 holds a third of 2 cores, not of 64."""
    report, _, _ = oracle_run
    machine = {**report["machine"], "cpu_count": cores}
    text = markdown({**report, "machine": machine, "load_1min": {"start": start, "end": start}})
    assert ("**Busy machine**" in text) == busy
    assert busy_load(None) == busy_load(1) > 0


def test_a_small_stream_is_called_noisy_under_its_heading(oracle_run):
    _, text, _ = oracle_run
    section = text.split("## Defect rate 50%", 1)[1]
    first_line = section.split("\n\n", 2)[1]
    assert first_line.startswith("**Noisy**") and "2 defective images" in first_line
    assert "4 images (fewer than 50)" in first_line


@pytest.mark.parametrize(
    "rate, n, k, noisy",
    [("0.05", 100, 5, True), ("0.5", 100, 50, False), ("0", 100, 0, False), ("0", 49, 0, True)],
)
def test_noise_warning_thresholds(rate, n, k, noisy):
    assert (noise_warning(rate, {"n_images": n, "n_defective": k}) is not None) == noisy


def test_the_time_with_the_transfer_adds_up(oracle_run):
    """The 100 Mbit/s transfer was computed but never added to the time: now each system's
    mean with it, and the reduction from that, from the report's own numbers."""
    report, text, _ = oracle_run
    rate = report["rates"]["0.5"]
    mono = rate["monolithic"]["mean_s"]
    for name, s in rate.items():
        for link, bits_per_s in LINKS.items():
            transfer = s["bytes_per_image"] * 8 / bits_per_s
            assert s[f"mean_with_{link}_s"] == pytest.approx(s["mean_s"] + transfer)
            if name != "monolithic":
                expected = 1 - (s["mean_s"] + transfer) / mono
                assert s[f"reduction_with_{link}"] == pytest.approx(expected)
    jpeg = rate["jpeg95-to-cloud"]
    assert jpeg["mean_with_100mbit_s"] > jpeg["mean_s"]  # it sends every image
    row = _table(text)["jpeg95-to-cloud"]
    assert row["mean s +100M"] == f"{jpeg['mean_with_100mbit_s']:.3f}"
    assert row["reduction +100M"] == f"{jpeg['reduction_with_100mbit']:+.1%}"
    assert row["mean s +1G"] == f"{jpeg['mean_with_1gbit_s']:.3f}"
    assert _table(text)["monolithic"]["reduction +100M"] == "–"
    assert "exclude any network transfer" in text


def test_the_request_bytes_are_counted(oracle_run, tiny_dataset):
    """bytes/img counted the tensors' data only; the request on the wire also carries their
    shapes, scales and zero points, the image's sizes and the ids."""
    from types import SimpleNamespace

    from splitdet.bench.systems import Splitdet
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.preprocess import load_image
    from splitdet.edge.runtime import EdgeRuntime

    sent = []

    class Client:
        def send_request(self, request):
            sent.append(request)
            empty = np.zeros((0, 4), np.float32)
            return SimpleNamespace(timings={"total_s": 0.0}, boxes=empty,
                                   scores=np.zeros(0), labels=np.zeros(0, np.int64))  # fmt: skip

    pipeline = EdgePipeline(EdgeRuntime(oracle_run[2], threads=1), codec="int8")
    image = load_image(read_split(tiny_dataset, "test")[0].image_path)
    outcome = Splitdet(pipeline, Client()).run(image, True)
    features = pipeline.process_array(image, True).bytes_sent
    assert outcome.bytes_sent == sent[0].ByteSize() == len(sent[0].SerializeToString())
    assert outcome.bytes_sent > features


def test_minus_zero_and_zero_are_one_rate(tmp_path, capsys):
    """ "-0.0,0" passed the duplicate check (keys "-0" and "0") and ran rate 0 twice."""
    argv = ["bench", "--model", str(tmp_path / "m"), "--checkpoint", str(tmp_path / "c")]
    argv += ["--data", str(tmp_path), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--defect-rates=-0.0,0"])
    assert stop.value.code == 2 and "defect rate 0 listed twice" in capsys.readouterr().err


def test_a_requested_rate_keeps_its_digits_in_headings():
    """`--defect-rates 0.004` was headed "Defect rate 0%", and 0.125 and 0.135 were headed
    "12%" and "14%": a rate that is not 0 shown as 0, and two rates shown alike."""
    from splitdet.bench.report import percent, rate_heading

    assert [percent(r) for r in (0.0, 0.004, 0.05, 0.12, 0.125, 0.135, 0.5, 1.0)] == [
        "0%", "0.4%", "5%", "12%", "12.5%", "13.5%", "50%", "100%"
    ]  # fmt: skip
    summary = {"n_images": 250, "n_defective": 1, "defect_rate_realised": 0.004,
               "n_unique_images": 250}  # fmt: skip
    assert rate_heading("0.004", summary).startswith("Defect rate 0.4% (run: 1 of 250 images")
