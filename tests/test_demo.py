"""The demo's orchestration on a tiny model: a summary computed from what happened, and Ctrl-C
stops every process it started."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from splitdet.bench import demo as demo_module
from splitdet.bench.demo import DemoConfig, make_data, run_demo, train_model
from splitdet.edge.store_file import open_readonly
from splitdet.edge.store_reads import iter_results
from splitdet.training.evaluate import coco_metrics
from splitdet.training.presets import PRESETS
from splitdet.training.voc import read_split

# threads None: training takes the test run's torch threads (one per xdist worker: conftest);
# the live cloud and edge take 2 each, the default
TINY_DEMO = dict(preset="tiny", image_size=(320, 256), dataset=(6, 3, 3, 5), stream_images=8,
                 defect_rate=0.25, bench_images=0, camera_interval_s=0.0, progress=False,
                 threads=None)  # fmt: skip


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    config = DemoConfig(workdir=tmp_path_factory.mktemp("demo"), **TINY_DEMO)
    first = run_demo(config)
    again = run_demo(config)
    return config, first, again


def test_summary_is_computed_from_the_results_database(demo):
    config, summary, _ = demo
    paths = config.paths()
    db = open_readonly(paths["live"] / "edge.sqlite")
    rows = list(iter_results(db))
    db.close()
    assert len(rows) == summary["images"] == config.stream_images
    for verdict, count in summary["verdicts"].items():
        assert count == sum(r["verdict"] == verdict for r in rows)
    assert summary["bytes_sent"] == sum(r["bytes_sent"] for r in rows)
    assert summary["bytes_sent"] > 0 or summary["verdicts"]["defect"] == 0
    assert summary["images_per_s"] > 0 and summary["wall_s"] > 0
    # mAP recomputed independently from the rows and the camera's stream order
    test = {s.image_path.name: s for s in read_split(paths["data"], "test")}
    names = sorted(rows, key=lambda r: Path(r["path"]).name)
    archived = [Path(r["stored_path"]) for r in names]
    stream = [test[_source_of(path, test)] for path in archived]
    expected = coco_metrics(
        stream,
        [r["boxes"] or [] for r in names],
        [r["scores"] or [] for r in names],
        [r["labels"] or [] for r in names],
        ["scratch"],
    )
    assert summary["map"] == pytest.approx(expected["map"])
    assert summary["defective_in_stream"] == sum(s.is_defective for s in stream) == 2
    # every process stopped cleanly, and the summary file says the same
    assert summary["exit_status"] == {"edge": 0, "cloud": 0}
    assert json.loads(paths["summary"].read_text())["images"] == summary["images"]
    annotated = list(paths["annotated"].iterdir())
    assert len(annotated) == summary["verdicts"]["defect"]


def _source_of(archived: Path, test: dict) -> str:
    """The test image an archived camera frame is a copy of (by content)."""
    data = archived.read_bytes()
    matches = [name for name, sample in test.items() if sample.image_path.read_bytes() == data]
    assert matches, archived
    return matches[0]


def test_second_run_reuses_data_model_and_export(demo):
    _, first, again = demo
    assert first["stages"]["cached"] == {"data": False, "train": False, "export": False}
    assert again["stages"]["cached"] == {"data": True, "train": True, "export": True}
    assert again["images"] == first["images"]


def test_a_new_generator_version_remakes_the_cached_data(tmp_path, monkeypatch):
    config = DemoConfig(workdir=tmp_path, **TINY_DEMO)
    assert make_data(config) is False
    assert make_data(config) is True
    monkeypatch.setattr(demo_module, "GENERATOR_VERSION", demo_module.GENERATOR_VERSION + 1)
    assert make_data(config) is False


def test_a_changed_preset_retrains_the_cached_model(tmp_path, monkeypatch):
    """The cached model is keyed on the preset's whole recipe, not its name: a demo run after an
    upgrade that changed the preset must not reuse a model trained with the old one."""
    config = DemoConfig(workdir=tmp_path, **{**TINY_DEMO, "dataset": (4, 2, 2, 2)})
    make_data(config)
    # the preset before the upgrade: one epoch (the test is of the cache, not of training)
    monkeypatch.setitem(PRESETS, "tiny", replace(PRESETS["tiny"], epochs=1))
    assert train_model(config) is False
    assert train_model(config) is True
    monkeypatch.setitem(PRESETS, "tiny", replace(PRESETS["tiny"], lr=PRESETS["tiny"].lr / 2))
    assert train_model(config) is False


def test_ctrl_c_stops_every_process(demo):
    config, _, _ = demo
    live = config.paths()["live"]
    settings = {**TINY_DEMO, "stream_images": 60, "camera_interval_s": 0.2}
    # A terminal delivers Ctrl-C to a process that handles SIGINT; a test run launched in the
    # background (`make test &`) inherits SIGINT ignored, so the script restores the handler.
    code = f"""
    import signal
    from pathlib import Path
    from splitdet.bench.demo import DemoConfig, run_demo
    if __name__ == "__main__":
        signal.signal(signal.SIGINT, signal.default_int_handler)
        run_demo(DemoConfig(workdir=Path({str(config.workdir)!r}), **{settings!r}))
    """
    shutil.rmtree(live)  # so that the ready files seen below are this run's
    script = config.workdir / "ctrl_c.py"
    script.write_text(textwrap.dedent(code))
    demo_process = subprocess.Popen(
        [sys.executable, str(script)],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready = [live / "cloud.ready.json", live / "edge.ready.json"]
        deadline = time.monotonic() + 120
        while not all(_ready(path) for path in ready):
            assert demo_process.poll() is None, demo_process.stderr.read().decode()
            assert time.monotonic() < deadline, "the demo's processes never became ready"
            time.sleep(0.2)
        pids = [json.loads(path.read_text())["pid"] for path in ready]
        assert all(_alive(pid) for pid in pids)
        os.killpg(demo_process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        demo_process.wait(timeout=60)
    finally:
        if demo_process.poll() is None:
            os.killpg(demo_process.pid, signal.SIGKILL)
            demo_process.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in pids), "a process the demo started survived Ctrl-C"
    assert demo_process.returncode != 0


def test_sigterm_while_training_stops_the_demo_with_143_and_the_demo_resumes(tmp_path, caplog):
    """SIGTERM (systemd, a container's stop) while the demo trains: train keeps its last
    finished epoch and exits 143; the demo stops with 143 too, saying that the same demo
    command continues, and it does (`--resume`), rather than starting over."""
    settings = {**TINY_DEMO, "train_minutes": 0.15}
    config = DemoConfig(workdir=tmp_path / "demo", **settings)
    make_data(config)  # in this process: the subprocess below only trains
    code = f"""
    from pathlib import Path
    from splitdet.bench.demo import DemoConfig, train_model
    train_model(DemoConfig(workdir=Path({str(config.workdir)!r}), **{settings!r}))
    """
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stderr=subprocess.PIPE, text=True
    )
    last = config.paths()["run"] / "last.pt"
    try:
        deadline = time.monotonic() + 240  # (60 s failed a run beside three busy reviewers)
        while not last.is_file():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no epoch finished in 240 s"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        err = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, err
    assert "Traceback" not in err, err
    assert err.rstrip().endswith(
        "splitdet demo: stopped on SIGTERM while training; the same `splitdet demo` command "
        "continues from its last finished epoch"
    ), err
    with caplog.at_level(logging.INFO, logger="splitdet.training"):
        assert train_model(config) is False  # trained, not cached
    # ("epoch 0 trained" after one epoch, "epochs 0-N trained" after more; never "epochs 0-0")
    assert re.search(r"resumed from .*: (epoch 0|epochs 0-[1-9]\d*) trained", caplog.text), (
        caplog.text
    )
    assert train_model(config) is True  # complete now: cached


def _ready(path: Path) -> bool:
    try:
        return "pid" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return False


def test_summary_names_the_benchmark_report_only_when_this_run_made_one(tmp_path):
    """`demo --bench-images 0` named bench/report.md, which it never wrote."""
    from splitdet.bench.demo import format_summary

    summary = {
        "images": 2, "defect_rate": 0.5, "defective_in_stream": 1, "images_per_s": 1.0,
        "wall_s": 2.0, "verdicts": {"ok": 1, "defect": 1, "error": 0}, "defective_caught": 1,
        "bytes_sent": 1000, "map": None, "map50": None,
        "defects": [{"image": "a.png", "p_defect": 0.99997, "truly_defective": True,
                     "boxes": []}],
    }  # fmt: skip
    paths = {"annotated": tmp_path / "a", "live": tmp_path / "live", "bench": tmp_path / "bench"}
    skipped = format_summary(summary, paths, benchmarked=False)
    assert "report.md" not in skipped and "not run (--bench-images 0)" in skipped
    assert "p=0.99997" in skipped  # not p=1.000
    assert str(tmp_path / "bench" / "report.md") in format_summary(summary, paths)


def test_summary_lists_the_first_flagged_images_and_counts_the_rest(tmp_path):
    """A weak model flags most of the 100-image stream: the summary listed every one."""
    from splitdet.bench.demo import SHOWN_DEFECTS, format_summary

    defects = [
        {"image": f"img_{i:03d}.png", "p_defect": 0.9, "truly_defective": i % 4 == 0, "boxes": []}
        for i in range(SHOWN_DEFECTS + 8)
    ]
    summary = {
        "images": 100, "defect_rate": 0.05, "defective_in_stream": 5, "images_per_s": 1.0,
        "wall_s": 2.0, "verdicts": {"ok": 80, "defect": len(defects), "error": 0},
        "defective_caught": 5, "bytes_sent": 1000, "map": None, "map50": None,
        "defects": defects,
    }  # fmt: skip
    paths = {"annotated": tmp_path / "a", "live": tmp_path / "live", "bench": tmp_path / "bench",
             "summary": tmp_path / "summary.json"}  # fmt: skip
    text = format_summary(summary, paths)
    listed = [line for line in text.splitlines() if "img_" in line]
    assert len(listed) == SHOWN_DEFECTS
    false_in_rest = sum(not d["truly_defective"] for d in defects[SHOWN_DEFECTS:])
    assert f"and 8 more ({false_in_rest} false alarm(s) among them)" in text
    assert str(tmp_path / "summary.json") in text
