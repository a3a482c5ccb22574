"""`splitdet bench` after a review: a re-run keeps the earlier report until it has its own, the
servers and the temporary folder do not outlive a killed run, mAP kept is not a ratio of
noise, a gate that misses the defects is called out, and a pass never asked for is not
reported as missing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from splitdet.bench.report import markdown, summarise
from splitdet.bench.streams import make_stream
from splitdet.bench.systems import Outcome
from splitdet.shared.cli import main
from splitdet.training.voc import read_split


@pytest.fixture(scope="module")
def exported(tiny_model, tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model's checkpoint (`root / "model.pt"`) and the session's export of it
    (`root / "model"`, linked)."""
    from splitdet.shared.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bench_review")
    save_checkpoint(root / "model.pt", tiny_model, gate_threshold=0.5)
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    return root


def _bench(root: Path, data: Path, out: Path) -> list[str]:
    argv = ["bench", "--model", str(root / "model"), "--checkpoint", str(root / "model.pt")]
    argv += ["--data", str(data), "--out", str(out), "--codecs", "fp32", "--rd-images", "0"]
    argv += ["--defect-rates", "1", "--images", "1", "--threads", "1", "--no-progress"]
    return [*argv, "--no-engine-baseline"]


# -- fault 1: a re-run deleted the earlier report before it measured anything ----------------


def test_a_rerun_that_fails_before_its_first_rate_keeps_the_earlier_report(
    exported, tiny_dataset, tmp_path, capsys
):
    """The earlier report was deleted at start-up: a re-run stopped or failing before its
    first rate left only the servers' logs. Here the re-run fails at its warm-up (an image
    that cannot be read, after the servers started): the earlier report stays whole, and the
    run said once that it would replace it."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    first = read_split(data, "test")[0]  # the warm-up image: its header read, pixels cut off
    first.image_path.write_bytes(first.image_path.read_bytes()[:1000])
    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        "out/report.json": json.dumps({"generator": "splitdet bench", "run_id": "earlier"}),
        "out/report.md": "# the earlier run",
        "out/time_vs_defect_rate.png": "the earlier run's figure",
    }
    for name, text in earlier.items():
        (tmp_path / name).write_text(text)
    assert main(_bench(exported, data, out)) == 2
    for name, text in earlier.items():
        assert (tmp_path / name).read_text() == text, name
    err = capsys.readouterr().err
    assert f"{first.image_path}: corrupt or truncated image" in err
    assert str(out / "report.md") not in err  # (the earlier run's: not pointed at)
    assert err.count("holds an earlier run's report") == 1
    assert (out / "cloud.log").read_text().startswith("# splitdet bench: cloud server log")


def test_foreign_server_logs_in_out_are_refused_and_kept(exported, tiny_dataset, tmp_path, capsys):
    """cloud.log and jpeg_server.log were overwritten whatever wrote them; now they are
    outputs like report.md: not bench's, they stop the run before anything starts."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "cloud.log").write_text("my own cloud's log")
    assert main(_bench(exported, tiny_dataset, out)) == 2
    err = capsys.readouterr().err
    assert f"--out {out}: holds {out / 'cloud.log'}, not from splitdet bench" in err
    assert (out / "cloud.log").read_text() == "my own cloud's log"
    assert not (out / "jpeg_server.log").exists()  # no server started


def test_a_bench_log_alone_is_bench_s(tmp_path):
    """A run stopped before its first rate leaves its logs and no report.json: they carry the
    bench's header line, so the next run takes them for bench's, not a stranger's."""
    from splitdet.bench.report import foreign_outputs, log_header

    (tmp_path / "cloud.log").write_text(log_header("cloud server", "abc") + "serving\n")
    (tmp_path / "jpeg_server.log").write_text("PORT 1234\n")  # no header: not known as bench's
    assert foreign_outputs(tmp_path) == [tmp_path / "jpeg_server.log"]


def test_out_has_help(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out DIR folder of report.json, report.md" in text


# -- fault 2: a SIGKILLed bench left its servers serving and its temporary folder -----------


def test_a_service_whose_parent_died_before_it_started_does_not_start(tmp_path):
    """The parent may die between the fork and the request for its death signal: the child
    then sees another parent and exits instead of serving with nobody to stop it."""
    from splitdet.bench.processes import ORPHANED_STATUS

    marker = tmp_path / "ran"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    not_our_parent = ["1"] if os.getpid() != 1 else ["2"]
    done = subprocess.run(
        [sys.executable, "-m", "splitdet.bench.processes", *not_our_parent, *command],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == ORPHANED_STATUS, done.stderr
    assert "is gone; not starting it" in done.stderr and not marker.exists()
    ours = [sys.executable, "-m", "splitdet.bench.processes", str(os.getpid()), *command]
    assert subprocess.run(ours, timeout=30).returncode == 0 and marker.exists()


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from splitdet.bench.processes import scratch_folder

    with scratch_folder(Path(sys.argv[1])) as folder:
        (folder / "answers.sqlite").write_text("x")
        print(folder, flush=True)
        time.sleep(600)
    """
)


def _holder(root: Path) -> tuple[subprocess.Popen, Path]:
    """A process inside `run.scratch_folder(root)`; it and its folder."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True
    )
    return process, Path(process.stdout.readline().strip())


def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """A SIGKILLed run cannot remove its /tmp/splitdet-bench-* folder; the next run removes
    those whose run is gone, and no other."""
    from splitdet.bench.processes import SCRATCH_PREFIX, remove_stale_scratch

    killed, killed_folder = _holder(tmp_path)
    live, live_folder = _holder(tmp_path)
    try:
        killed.kill()
        killed.wait()
        unknown = tmp_path / f"{SCRATCH_PREFIX}older"  # no owner file: whose is not known
        unknown.mkdir()
        assert killed_folder.is_dir() and live_folder.is_dir()
        assert remove_stale_scratch(tmp_path) == [killed_folder]
        assert not killed_folder.exists()
        assert live_folder.is_dir() and unknown.is_dir()
    finally:
        live.kill()
        live.wait()


# -- fault 3: mAP kept of noise; a gate that misses every defect -----------------------------


def _stream_and_names(tiny_dataset) -> tuple[list, list[str]]:
    stream = make_stream(read_split(tiny_dataset, "test"), 0.5, 6, seed=0)
    return stream, sorted({o.name for s in stream for o in s.objects})


def _outcomes(stream, names, p_defect: float | None, flag_defects: bool) -> list[Outcome]:
    """Every ground-truth box found; a gated system (`p_defect` given) flags the defective
    images only if `flag_defects` (and never the others)."""
    found = []
    for s in stream:
        boxes = np.array([o.box for o in s.objects], np.float32).reshape(-1, 4)
        labels = np.array([names.index(o.name) + 1 for o in s.objects], np.int64)
        flagged = p_defect is None or (s.is_defective and flag_defects)
        seconds = 1.0 if flagged else 0.1
        found.append(
            Outcome(seconds, seconds, 0.0, 0, flagged, p_defect,
                    boxes, np.ones(len(boxes), np.float32), labels)
        )  # fmt: skip
    return found


def _report(rates: dict, complete: bool = True, rd_images: int = 0) -> dict:
    """A report as `run` writes it, around `rates` (rate key -> system -> summary)."""
    return {
        "command": "splitdet bench ...",
        "machine": {"cpu_model": "a CPU", "cpu_count": 2, "platform": "Linux", "versions": {}},
        "model": {"depth_label": "ResNet18-FPN", "input": "min_size 224, max_size 320",
                  "gate_threshold": 0.5, "gate": "the model's", "fingerprint": "f" * 64},
        "settings": {"defect_rates": [0.5, 0.12], "split": "test", "rd_images": rd_images},
        "rates": rates,
        "rate_distortion": None,
        "complete": complete,
        "figures": [],
    }  # fmt: skip


def _cells(text: str, system: str) -> dict[str, str]:
    lines = text.splitlines()
    header = next(x for x in lines if x.startswith("| system |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    row = next(x for x in lines if x.startswith(f"| {system} |"))
    return dict(zip(columns, [c.strip() for c in row.strip("|").split("|")], strict=True))


def test_map_kept_of_a_noise_map_is_not_measured(tiny_dataset):
    """Monolithic mAP 7.0e-06: every system's "mAP kept" was a confident ratio of noise."""
    stream, names = _stream_and_names(tiny_dataset)
    mono = summarise(_outcomes(stream, names, None, True), stream, names, None)
    mono |= {"map": 7.0e-6, "map50": 4.8e-6}  # an untrained model's
    ours = summarise(_outcomes(stream, names, 0.9, True), stream, names, mono)
    assert ours["map"] == pytest.approx(1.0) and ours["map_kept"] is None
    assert ours["map50_kept"] is None
    from splitdet.bench.report import MAP_KEPT_FLOOR

    text = markdown(_report({"0.5": {"monolithic": mono, "splitdet-int8": ours}}))
    assert _cells(text, "splitdet-int8")["mAP kept"] == f"n/a (mAP under {MAP_KEPT_FLOOR:g})"
    assert _cells(text, "monolithic")["mAP kept"] == "–"
    measured = summarise(_outcomes(stream, names, 0.9, True), stream, names, mono | {"map": 0.5})
    assert measured["map_kept"] == pytest.approx(2.0)  # above the floor: measured


def test_a_gate_that_misses_the_defects_is_called_out(tiny_dataset):
    """Gate recall 0%: the table showed a large reduction (defective images skipped) and said
    nothing of why."""
    stream, names = _stream_and_names(tiny_dataset)
    mono = summarise(_outcomes(stream, names, None, True), stream, names, None)
    blind = summarise(_outcomes(stream, names, 0.1, False), stream, names, mono)
    seeing = summarise(_outcomes(stream, names, 0.9, True), stream, names, mono)
    assert blind["gate_recall"] == 0.0 and blind["reduction"] > 0.5
    text = markdown(_report({"0.5": {"monolithic": mono, "paper": blind}}))
    section = text.split("## Defect rate 50%", 1)[1].split("| system |", 1)[0]
    assert "**Gate misses defects**: gate recall paper 0%" in section
    assert "bought by missing the defects" in section
    fine = markdown(_report({"0.5": {"monolithic": mono, "paper": seeing}}))
    assert "**Gate misses defects**" not in fine


# -- fault 4: a stopped run named a pass that was never asked for -----------------------------


@pytest.mark.parametrize("rd_images, named", [(0, False), (5, True)])
def test_a_stopped_run_names_the_bytes_vs_map_pass_only_when_asked_for(
    tiny_dataset, rd_images, named
):
    stream, names = _stream_and_names(tiny_dataset)
    mono = summarise(_outcomes(stream, names, None, True), stream, names, None)
    report = _report({"0.5": {"monolithic": mono}}, complete=False, rd_images=rd_images)
    text = markdown(report)
    assert "Done: defect rates 50% (of 50%, 12%)" in text
    assert ("bytes-vs-mAP pass" in text) == named


def test_the_report_records_the_bytes_vs_map_images_asked_for(exported):
    """report.md tells from `settings.rd_images` whether the pass was asked for."""
    from splitdet.bench.run import BenchConfig, _report_head
    from splitdet.shared.manifest import read_manifest

    config = BenchConfig(exported / "model", exported / "model.pt", exported, exported,
                         rd_images=0)  # fmt: skip
    assert _report_head(config, read_manifest(exported / "model"), 1)["settings"]["rd_images"] == 0
