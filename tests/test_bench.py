"""`splitdet bench` on a tiny model: the report's structure, and that its numbers are measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from splitdet.edge.preprocess import load_image
from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.training.export import export_model
from splitdet.training.voc import read_split

from conftest import make_tiny_model

SYSTEMS = {
    "monolithic", "monolithic-split-engines", "paper", "splitdet-int8", "splitdet-fp32",
    "jpeg95-to-cloud",
}  # fmt: skip
#: The systems without a gate.
GATELESS = ("monolithic", "monolithic-split-engines", "jpeg95-to-cloud")


@pytest.fixture(scope="module")
def bench_report(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = make_tiny_model(seed=5)
    test = read_split(tiny_dataset, "test")
    with torch.inference_mode():
        p = [
            float(model.defect_probability([torch.from_numpy(load_image(s.image_path))])[0])
            for s in test
        ]
    threshold = float(np.median(p))  # about half the images flagged, whatever their label
    save_checkpoint(root / "model.pt", model, gate_threshold=threshold)
    export_model(model, root / "model", gate_threshold=threshold)
    out = root / "report"
    code = main(
        [
            "bench",
            "--model",
            str(root / "model"),
            "--checkpoint",
            str(root / "model.pt"),
            "--data",
            str(tiny_dataset),
            "--defect-rates",
            "0,0.5",
            "--images",
            "2",
            "--codecs",
            "int8,fp32",
            "--rd-images",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    return out, json.loads((out / "report.json").read_text()), threshold


def test_report_structure(bench_report):
    out, report, threshold = bench_report
    assert set(report["rates"]) == {"0", "0.5"}
    for systems in report["rates"].values():
        assert set(systems) == SYSTEMS
        for summary in systems.values():
            for key in (
                "mean_s",
                "p50_s",
                "p95_s",
                "reduction",
                "bytes_per_image",
                "bytes_per_defect_image",
                "bytes_per_sent_image",
                "map",
                "map_kept",
                "edge_s",
                "cloud_s",
                "transfer_100mbit_s_computed",
                "transfer_1gbit_s_computed",
            ):
                assert key in summary, key
            assert summary["mean_s"] > 0 and summary["p95_s"] >= summary["p50_s"] > 0
    assert report["model"]["gate_threshold"] == pytest.approx(threshold)
    for name in (
        "report.md",
        "time_vs_defect_rate.png",
        "reduction_vs_defect_rate.png",
        "bytes_vs_map_kept.png",
    ):
        assert (out / name).stat().st_size > 0
    assert "monolithic" in (out / "report.md").read_text()
    assert "On 1 defective images of the 'test' split" in (out / "report.md").read_text()
    assert report["complete"] is True and "Incomplete" not in (out / "report.md").read_text()


def test_report_numbers_are_measured(bench_report):
    _, report, _ = bench_report
    free_only, half = report["rates"]["0"], report["rates"]["0.5"]
    assert free_only["monolithic"]["n_defective"] == 0 and half["monolithic"]["n_defective"] == 1
    # (times are the benchmark's to compare, side by side in one run, not a test's to assert:
    # on a loaded machine the gate-only edge path measured slower than the monolithic mean)
    assert free_only["monolithic"]["mean_s"] > 0 and free_only["splitdet-int8"]["edge_s"] > 0
    # monolithic is its own reference; the others are measured against it
    assert free_only["monolithic"]["reduction"] is None
    assert half["paper"]["reduction"] != 0.0 and half["splitdet-int8"]["reduction"] != 0.0
    # bytes: features only for flagged images, fp32 costs more than int8, JPEG for every image
    for rate in (free_only, half):
        int8, fp32, jpeg = rate["splitdet-int8"], rate["splitdet-fp32"], rate["jpeg95-to-cloud"]
        if int8["sent_fraction"] > 0:
            assert fp32["bytes_per_defect_image"] > int8["bytes_per_defect_image"] > 0
        assert jpeg["sent_fraction"] == 1.0 and jpeg["bytes_per_image"] > 0
        assert int8["sent_fraction"] == fp32["sent_fraction"] == int8["flagged_fraction"]
        assert int8["flagged_fraction"] == rate["paper"]["flagged_fraction"]  # the same gate
    sent = [r["splitdet-int8"]["sent_fraction"] for r in (free_only, half)]
    assert any(0 < s < 1 for s in sent) or sent[0] != sent[1]
    # lossless split and the monolithic detector agree on the detections
    assert half["splitdet-fp32"]["map50"] == pytest.approx(half["paper"]["map50"], abs=1e-6)
    rd = report["rate_distortion"]
    assert {p["name"] for p in rd["points"]} >= {"splitdet-int8", "jpeg95", "jpeg30"}
    jpeg_bytes = {p["name"]: p["bytes"] for p in rd["points"]}
    assert jpeg_bytes["jpeg95"] > jpeg_bytes["jpeg30"]


def test_the_engine_baseline_runs_the_same_detector_on_splitdets_engines(bench_report):
    """splitdet's edge runs ONNX Runtime and `monolithic` torch eager, so part of splitdet's
    reduction was the engine's: `monolithic-split-engines` runs the same detector on splitdet's
    engines (ONNX Runtime body and FPN, torch heads) for every image, and every system's
    `reduction_vs_same_engines` (report.md: "vs same engines") is measured against it."""
    out, report, _ = bench_report
    text = (out / "report.md").read_text()
    assert "Engine baseline `monolithic-split-engines`: the monolithic detector on" in text
    header = next(x for x in text.splitlines() if x.startswith("| system |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    for rate_key, systems in report["rates"].items():
        mono, engines = systems["monolithic"], systems["monolithic-split-engines"]
        # the same detections as torch's on every image of the stream: the same mAP
        assert engines["map50"] == pytest.approx(mono["map50"], abs=1e-9)
        assert engines["map"] == pytest.approx(mono["map"], abs=1e-9)
        assert engines["flagged_fraction"] == 1.0 and engines["bytes_per_image"] == 0
        assert 0 < engines["edge_s"] < engines["mean_s"]  # (the rest: the heads)
        assert engines["reduction_vs_same_engines"] is None
        heading = "Defect rate 0%" if rate_key == "0" else "Defect rate 50%"
        for name, summary in systems.items():
            cells = dict(zip(columns, _row(text, heading, name), strict=True))
            if name == "monolithic-split-engines":
                assert cells["vs same engines"] == "–"
                continue
            expected = 1 - summary["mean_s"] / engines["mean_s"]
            assert summary["reduction_vs_same_engines"] == pytest.approx(expected)
            # (its interval beside it, where the stream has two images of each kind it holds)
            ci = summary["reduction_vs_same_engines_ci95"]
            assert ci is not None or summary["n_defective"] in (1, summary["n_images"] - 1)
            interval = f" (95% CI {ci[0]:+.1%} to {ci[1]:+.1%})" if ci is not None else ""
            assert cells["vs same engines"] == f"{expected:+.1%}{interval}"


def test_every_figure_follows_from_the_per_image_outcomes(bench_report, tiny_dataset):
    """report.json held only aggregates: nothing to check its means and shares against. Now
    outcomes.csv holds every image through every system, in stream order."""
    import csv

    out, report, _ = bench_report
    with (out / "outcomes.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    test = {s.image_id: s.is_defective for s in read_split(tiny_dataset, "test")}
    for rate_key, systems in report["rates"].items():
        for name, summary in systems.items():
            mine = [r for r in rows if r["defect_rate"] == rate_key and r["system"] == name]
            assert [int(r["position"]) for r in mine] == list(range(summary["n_images"]))
            assert sum(int(r["defective"]) for r in mine) == summary["n_defective"]
            assert all(int(r["defective"]) == test[r["image_id"]] for r in mine)
            totals = [float(r["total_s"]) for r in mine]
            assert summary["mean_s"] == pytest.approx(np.mean(totals), abs=1e-5)
            assert summary["p50_s"] == pytest.approx(np.percentile(totals, 50), abs=1e-5)
            sent = [int(r["bytes_sent"]) for r in mine]
            assert summary["bytes_per_image"] == pytest.approx(np.mean(sent))
            flagged = [int(r["flagged"]) for r in mine]
            assert summary["flagged_fraction"] == pytest.approx(np.mean(flagged))
            assert all((r["p_defect"] == "") == (name in GATELESS) for r in mine)
    assert "`outcomes.csv`" in (out / "report.md").read_text()


def test_a_stopped_run_keeps_the_rates_it_finished(bench_report, tiny_dataset, monkeypatch, capsys):
    """Ctrl-C in the last pass (after every rate's stream): report.json/.md hold the rates done."""
    import splitdet.bench.run as bench_run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "_rate_distortion", interrupted)
    root = bench_report[0].parent
    out = root / "stopped"
    out.mkdir()
    older = {"generator": "splitdet bench", "run_id": "older"}  # must not pass for this run's
    (out / "report.json").write_text(json.dumps(older))
    argv = ["bench", "--model", str(root / "model"), "--checkpoint", str(root / "model.pt")]
    argv += ["--data", str(tiny_dataset), "--defect-rates", "0,0.5", "--images", "2"]
    argv += ["--codecs", "int8", "--rd-images", "1", "--threads", "1", "--out", str(out)]
    argv += ["--no-progress"]
    assert main([*argv, "--no-engine-baseline"]) == 130
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is False and set(report["rates"]) == {"0", "0.5"}
    assert report["rates"]["0.5"]["monolithic"]["mean_s"] > 0
    # --no-engine-baseline: no engine baseline, and report.md says so
    assert "monolithic-split-engines" not in report["rates"]["0.5"]
    assert report["settings"]["engine_baseline"] is False
    assert report["rates"]["0.5"]["paper"]["reduction_vs_same_engines"] is None
    assert "not measured (--no-engine-baseline)" in (out / "report.md").read_text()
    assert report["rate_distortion"] is None
    text = (out / "report.md").read_text()
    assert "Incomplete" in text and "Defect rate 50%" in text
    assert str(out / "report.md") in capsys.readouterr().err


def _row(markdown_text: str, rate_heading: str, system: str) -> list[str]:
    """The cells of `system`'s row in the table under the heading that starts `rate_heading`."""
    section = markdown_text.split(rate_heading, 1)[1].split("\n## ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith(f"| {system} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_systems_without_a_gate_or_a_reference_show_a_dash(bench_report):
    """monolithic and jpeg95-to-cloud showed "gate recall 100.0%" (no gate), and monolithic
    "mAP kept 100.0%" (kept vs itself): now "–" in report.md, None in report.json."""
    out, report, _ = bench_report
    half = report["rates"]["0.5"]
    mono, jpeg, paper = half["monolithic"], half["jpeg95-to-cloud"], half["paper"]
    assert mono["gate_recall"] is None and jpeg["gate_recall"] is None
    assert mono["map_kept"] is None and mono["map50_kept"] is None and mono["reduction"] is None
    assert paper["gate_recall"] is not None and jpeg["reduction"] is not None
    text = (out / "report.md").read_text()
    header = next(x for x in text.splitlines() if x.startswith("| system |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    for system, summary in half.items():
        cells = dict(zip(columns, _row(text, "Defect rate 50%", system), strict=True))
        assert cells["gate recall"] == ("–" if system in GATELESS
                                        else f"{summary['gate_recall']:.1%}")  # fmt: skip
        if system == "monolithic":
            assert cells["mAP kept"] == cells["reduction"] == "–"


def test_the_flagged_share_stands_beside_gate_recall(bench_report):
    """The share of images the gate sent on (flagged_fraction) was in report.json only."""
    out, report, _ = bench_report
    text = (out / "report.md").read_text()
    header = next(x for x in text.splitlines() if x.startswith("| system |"))
    columns = [cell.strip() for cell in header.strip("|").split("|")]
    assert columns[columns.index("gate recall") + 1] == "flagged"
    for system, summary in report["rates"]["0.5"].items():
        cells = dict(zip(columns, _row(text, "Defect rate 50%", system), strict=True))
        gated = system not in GATELESS
        assert cells["flagged"] == (f"{summary['flagged_fraction']:.1%}" if gated else "–")


def test_the_realised_defect_rate_is_shown_beside_the_requested_one(tiny_dataset, tmp_path):
    """5% of 11 images is 1 defective image, 9.1%: the report said "Defect rate 5%" and plotted
    the point at 5%. The heading and report.json now give the run's own share too."""
    from splitdet.bench.report import markdown, summarise, write_report
    from splitdet.bench.streams import make_stream
    from splitdet.bench.systems import Outcome

    stream = make_stream(read_split(tiny_dataset, "test"), 0.05, 11, seed=0)
    boxes = [np.array([o.box for o in s.objects], np.float32).reshape(-1, 4) for s in stream]
    labels = [np.ones(len(b), np.int64) for b in boxes]

    def outcomes(gated: bool) -> list[Outcome]:
        return [
            Outcome(0.1, 0.05, 0.05, 10, True, 0.9 if gated else None, b, np.ones(len(b)), c)
            for b, c in zip(boxes, labels, strict=True)
        ]

    names = sorted({o.name for s in stream for o in s.objects})
    mono = summarise(outcomes(False), stream, names, None)
    report = {
        "command": "splitdet bench",
        "machine": {"cpu_count": 2, "platform": "test", "versions": {}},
        "model": {"depth_label": "R", "input": "i", "gate_threshold": 0.5, "fingerprint": "f"},
        "rates": {"0.05": {"monolithic": mono,
                           "paper": summarise(outcomes(True), stream, names, mono)}},
    }  # fmt: skip
    write_report(report, tmp_path)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["rates"]["0.05"]["paper"]["defect_rate_realised"] == pytest.approx(1 / 11)
    assert "## Defect rate 5% (run: 1 of 11 images, 9.1%; " in markdown(saved)
    assert "time_vs_defect_rate.png" in saved["figures"]


def test_oracle_decision_drives_the_papers_gate():
    from splitdet.bench.systems import PaperGated

    paper = PaperGated(make_tiny_model(seed=5), threshold=0.5)
    image = np.random.default_rng(0).random((3, 200, 260), dtype=np.float32)
    assert paper.run(image, decision=True).flagged
    skipped = paper.run(image, decision=False)
    assert not skipped.flagged and len(skipped.boxes) == 0 and skipped.p_defect is not None


def test_the_bytes_vs_map_pass_sends_every_image_whatever_the_gate(
    bench_report, tiny_dataset, tmp_path
):
    """The codec points measure the codec: every defective image is sent even when the gate
    would pass it (here a threshold no image reaches). Before, a gate miss counted 0 bytes and
    no boxes, mixing the gate's misses into the codec's mAP kept."""
    root = bench_report[0].parent
    model = make_tiny_model(seed=5)
    export_model(model, tmp_path / "model", gate_threshold=1.0)
    out = tmp_path / "report"
    argv = ["bench", "--model", str(tmp_path / "model"), "--checkpoint", str(root / "model.pt")]
    argv += ["--data", str(tiny_dataset), "--defect-rates", "0", "--images", "1", "--codecs"]
    argv += ["fp32", "--rd-images", "1", "--threads", "1", "--out", str(out), "--no-progress"]
    assert main([*argv, "--no-engine-baseline"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rates"]["0"]["splitdet-fp32"]["sent_fraction"] == 0.0  # the gate passed all
    rd = {p["name"]: p for p in report["rate_distortion"]["points"]}
    assert rd["splitdet-fp32"]["bytes"] > 0
    assert (
        rd["splitdet-fp32"]["map"] == rd["jpeg95"]["map"]
        or rd["jpeg95"]["map"] is None
        or (rd["splitdet-fp32"]["map_kept"] == pytest.approx(1.0))
    )


def test_a_class_the_model_does_not_know_is_named_before_anything_runs(
    bench_report, tiny_dataset, tmp_path, capsys
):
    import shutil

    root = bench_report[0].parent
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    victim = next(
        p for p in sorted((data / "Annotations").iterdir()) if "<name>scratch" in p.read_text()
    )
    victim.write_text(victim.read_text().replace("<name>scratch", "<name>dent", 1))
    split = [p.stem for p in (data / "Annotations").iterdir()]
    (data / "ImageSets" / "Main" / "test.txt").write_text("\n".join(split) + "\n")
    argv = ["bench", "--model", str(root / "model"), "--checkpoint", str(root / "model.pt")]
    argv += ["--data", str(data), "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert victim.name in err and "dent" in err and "Traceback" not in err


def test_a_server_that_dies_mid_run_is_named_with_its_log(
    bench_report, tiny_dataset, tmp_path, monkeypatch, capsys
):
    """The cloud server killed after warm-up: one error naming it, its state and its log's end,
    no traceback, and no report passed off as this run's."""
    import os
    import signal

    import splitdet.bench.run as bench_run

    started = []

    class Recorded(bench_run.ServiceProcess):
        def launch(self):
            started.append(super().launch())
            return self

    real_streams = bench_run._run_streams

    def kill_the_cloud_first(*args, **kwargs):
        cloud = next(s for s in started if s.name == "cloud server")
        os.killpg(cloud.process.pid, signal.SIGKILL)
        cloud.process.wait()
        return real_streams(*args, **kwargs)

    monkeypatch.setattr(bench_run, "ServiceProcess", Recorded)
    monkeypatch.setattr(bench_run, "_run_streams", kill_the_cloud_first)
    root = bench_report[0].parent
    out = tmp_path / "out"
    out.mkdir()
    (out / "time_vs_defect_rate.png").write_bytes(b"an older run's figure")
    (out / "report.json").write_text(json.dumps({"generator": "splitdet bench"}))
    argv = ["bench", "--model", str(root / "model"), "--checkpoint", str(root / "model.pt")]
    argv += ["--data", str(tiny_dataset), "--defect-rates", "1", "--images", "2"]
    argv += ["--codecs", "fp32", "--rd-images", "0", "--threads", "1", "--out", str(out)]
    assert main([*argv, "--no-progress", "--no-engine-baseline"]) == 2
    err = capsys.readouterr().err
    assert "cloud server failed a call mid-run" in err and "UNAVAILABLE" in err
    assert "exited with status -9" in err and str(out / "cloud.log") in err
    assert "Traceback" not in err and str(out / "report.md") not in err
    # failed before its first rate: the earlier run's report is left as it was, not deleted
    assert (out / "time_vs_defect_rate.png").read_bytes() == b"an older run's figure"
    assert json.loads((out / "report.json").read_text()) == {"generator": "splitdet bench"}


@pytest.mark.parametrize("codecs, named", [("", "at least one codec"), ("fp32,int9", "'int9'")])
def test_codecs_are_checked_before_anything_loads(codecs, named, tmp_path, capsys):
    argv = ["bench", "--model", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "none")]
    argv += ["--data", str(tmp_path), "--codecs", codecs, "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err
