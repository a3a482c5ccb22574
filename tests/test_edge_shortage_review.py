"""A shortage of the process or the machine is not the image's fault, `predict` tells a torch
it cannot load from a torch not installed, and a bad option value under JSON logs is one JSON
line.

1. The edge daemon at its open-files limit (`prlimit --nofile=20:20`) recorded good images as
   errors, "cannot read (Too many open files)", and quarantined them for good. Now they wait in
   --watch and are taken once the shortage ends, with a WARNING naming it.
2. `predict` under a memory limit said "install splitdet[full]" of a torch that was installed
   but failed to load.
3. `splitdet edge run ... --threshold abc` (JSON logs) printed argparse's usage block and a
   plain-text last line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from splitdet.edge import watcher
from splitdet.edge.daemon import EdgeDaemon
from splitdet.edge.pipeline import EdgeResult, ImageMeta
from splitdet.edge.preprocess import Pixels
from splitdet.shared.config import ModelConfig

from support import daemon_config, image_rows

pytestmark = pytest.mark.timeout(120)


def png_bytes(level: int) -> bytes:
    """An 8 x 8 grey PNG of pixel value `level`."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class DarkIsFine:
    """A stand-in pipeline (no model): nothing is flagged."""

    codec = "int8"
    threshold = 0.5
    manifest = type("Manifest", (), {"fingerprint": "f" * 64, "model_config": ModelConfig()})()

    def process_array(self, image: Pixels) -> EdgeResult:
        hw = image.hw  # (the hot folder hands over the decoder's pixels)
        return EdgeResult(
            float(image.to_unit_float().mean()), False, ImageMeta(hw, hw), None, 0, {"gate": 0}
        )


def short_of(number: int, folder: Path, monkeypatch) -> None:
    """`os.open` of any file below `folder` fails with errno `number`, as it does at the
    process's open-files limit (EMFILE); every other open goes on as before."""
    real_open = os.open

    def open_short(path, flags, *args, **kwargs):
        if Path(os.fsdecode(path)).parent == folder:
            raise OSError(number, os.strerror(number), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_short)


def test_an_image_read_at_the_open_files_limit_waits_and_is_taken_later(
    tmp_path, monkeypatch, caplog
):
    config = daemon_config(tmp_path, tmp_path, after="delete", unreadable_grace_s=0.0)
    image = config.watch / "a.png"
    image.write_bytes(png_bytes(30))
    with monkeypatch.context() as patch, caplog.at_level(logging.INFO):
        short_of(errno.EMFILE, config.watch, patch)
        assert EdgeDaemon(config, pipeline=DarkIsFine()).run() == 1  # an image left: try again
    assert image_rows(config.db) == []  # no error row, no quarantine
    assert image.is_file() and not list((config.watch / "quarantine").glob("*"))
    [told] = [r for r in caplog.records
              if getattr(r, "fields", {}).get("event") == "file_read_shortage"]  # fmt: skip
    assert told.levelno == logging.WARNING and told.fields["errno"] == "EMFILE"
    assert "too many open files in this process" in told.getMessage()
    assert "LimitNOFILE" in told.getMessage() and "not quarantined" in told.getMessage()

    assert EdgeDaemon(config, pipeline=DarkIsFine()).run() == 0  # the shortage over
    [row] = image_rows(config.db)
    assert row["verdict"] == "ok" and not image.exists(), row


def test_a_shortage_is_warned_once_per_image_and_its_end_told(tmp_path, monkeypatch, caplog):
    (tmp_path / "a.png").write_bytes(png_bytes(20))
    folder = watcher.HotFolder(tmp_path, settle_s=0, unreadable_grace_s=0)
    monkeypatch.setattr(watcher, "SHORTAGE_RETRY_S", 0, raising=False)  # read again now
    folder.scan()
    caplog.set_level(logging.INFO, "splitdet.edge.watcher")
    with monkeypatch.context() as patch:
        short_of(errno.ENOMEM, tmp_path, patch)
        for _ in range(3):
            assert folder.read(folder.next_candidate()) is None
        assert folder.pending() == 0  # it waits for the shortage, not for the daemon
    events = [r.fields["event"] for r in caplog.records if hasattr(r, "fields")]
    assert events == ["file_read_shortage"], caplog.text  # warned once, not on every read
    assert "out of memory" in caplog.records[0].getMessage()
    ready = folder.read(folder.next_candidate())
    assert ready is not None and ready.error is None and ready.image is not None
    events = [r.fields["event"] for r in caplog.records if hasattr(r, "fields")]
    assert events == ["file_read_shortage", "file_readable"], caplog.text


@pytest.mark.parametrize(("number", "lines"), [(errno.EMFILE, 1), (errno.EAGAIN, 20)])
def test_a_shortage_of_the_whole_process_is_one_line_for_all_the_files(
    tmp_path, monkeypatch, caplog, number, lines
):
    """A review: at the open-files limit a backlog of 300 images gave 300 WARNINGs at once,
    again every 5 minutes. A shortage of the process is now one line for all the files it
    holds back, naming how many; EAGAIN (one file's lease) stays one line per file."""
    for index in range(20):
        (tmp_path / f"{index:02d}.png").write_bytes(png_bytes(index))
    folder = watcher.HotFolder(tmp_path, settle_s=0, unreadable_grace_s=0)
    folder.scan()
    caplog.set_level(logging.INFO, "splitdet.edge.watcher")
    with monkeypatch.context() as patch:
        short_of(number, tmp_path, patch)
        while (candidate := folder.next_candidate()) is not None:
            assert folder.read(candidate) is None
    told = [r for r in caplog.records if getattr(r, "fields", {}).get("event")
            == "file_read_shortage"]  # fmt: skip
    assert len(told) == lines, [r.getMessage() for r in told]
    assert folder.pending() == 0
    if number == errno.EMFILE:
        assert told[0].fields["files_waiting"] == 1  # (the first met: told at once)


def test_a_model_run_short_of_memory_is_not_told_over_at_each_retry(tmp_path, monkeypatch, caplog):
    """A review: an image held back for a model run short of memory read fine at each retry,
    so each retry said "can be read now" (INFO file_readable, one per file every 2 s) while
    the shortage went on, and its time held restarted at 0. It is told once, and its time
    held counts from the first failure."""
    (tmp_path / "a.png").write_bytes(png_bytes(20))
    folder = watcher.HotFolder(tmp_path, settle_s=0, unreadable_grace_s=0)
    monkeypatch.setattr(watcher, "SHORTAGE_RETRY_S", 0)
    monkeypatch.setattr(watcher, "SHORTAGE_WARN_EVERY_S", 0)  # (every failure told: seen)
    folder.scan()
    caplog.set_level(logging.INFO, "splitdet.edge.watcher")
    for _ in range(3):
        candidate = folder.next_candidate()
        assert folder.read(candidate) is not None  # read whole; the model run then fails
        folder.short_of_memory(candidate, "RuntimeError: Failed to allocate memory")
    events = [r.fields["event"] for r in caplog.records if hasattr(r, "fields")]
    assert events == ["file_read_shortage"] * 3, events  # no file_readable between them
    assert [" for " in r.getMessage() for r in caplog.records] == [False, True, True]
    assert all(r.fields["stage"] == "process" for r in caplog.records)


def test_another_shortage_is_told_on_its_own(tmp_path, monkeypatch, caplog):
    """A review: every process-wide shortage shared one timer, so a read at the open-files
    limit hid a model run out of memory for five minutes. Each (errno, stage) is told."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes(20))
    folder = watcher.HotFolder(tmp_path, settle_s=0, unreadable_grace_s=0)
    folder.scan()
    caplog.set_level(logging.INFO, "splitdet.edge.watcher")
    with monkeypatch.context() as patch:
        real_open = os.open

        def a_at_the_limit(path, flags, *args, **kwargs):
            if Path(os.fsdecode(path)).name == "a.png":
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), os.fsdecode(path))
            return real_open(path, flags, *args, **kwargs)

        patch.setattr(os, "open", a_at_the_limit)
        first = folder.next_candidate()
        assert first.name == "a.png" and folder.read(first) is None
        second = folder.next_candidate()
        assert second.name == "b.png" and folder.read(second) is not None
    folder.short_of_memory(second, "RuntimeError: Failed to allocate memory")
    told = [(r.fields["errno"], r.fields["stage"]) for r in caplog.records
            if getattr(r, "fields", {}).get("event") == "file_read_shortage"]  # fmt: skip
    assert told == [("EMFILE", "read"), ("ENOMEM", "process")], told


class OutOfMemoryOnce(DarkIsFine):
    """A stand-in pipeline whose first run fails as ONNX Runtime's does when memory runs out."""

    def __init__(self) -> None:
        self.failed = 0

    def process_array(self, image: np.ndarray) -> EdgeResult:
        if not self.failed:
            self.failed += 1
            raise RuntimeError(
                "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned "
                "while running Conv node. Failed to allocate memory for requested buffer of "
                "size 52428800"
            )
        return super().process_array(image)


def test_an_image_whose_model_run_runs_out_of_memory_waits_and_is_taken_later(tmp_path, caplog):
    """The shortage helper's note: a model run that failed for want of memory (ONNX Runtime's
    failed allocation, a MemoryError) quarantined the good image for good, as a file that
    cannot be read did. It now waits in --watch, unrecorded, and is taken once memory is
    back; the --once run that met the shortage ends all the same, with status 1 (a review:
    it said 0, "nothing to do", to a cron wrapper)."""
    config = daemon_config(tmp_path, tmp_path, after="delete")
    image = config.watch / "a.png"
    image.write_bytes(png_bytes(30))
    pipeline = OutOfMemoryOnce()
    with caplog.at_level(logging.INFO):
        assert EdgeDaemon(config, pipeline=pipeline).run() == 1  # an image left: try again
    assert pipeline.failed == 1 and image_rows(config.db) == []  # no error row
    assert image.is_file() and not list((config.watch / "quarantine").glob("*"))
    [told] = [r for r in caplog.records
              if getattr(r, "fields", {}).get("event") == "file_read_shortage"]  # fmt: skip
    assert told.levelno == logging.WARNING and told.fields["stage"] == "process"
    assert "Failed to allocate memory" in told.getMessage(), told.getMessage()
    assert "not quarantined" in told.getMessage()

    assert EdgeDaemon(config, pipeline=pipeline).run() == 0  # memory back
    [row] = image_rows(config.db)
    assert row["verdict"] == "ok" and not image.exists(), row


#: Run in the test's subprocess before its code: torch (BROKEN = "torch") fails to load as a
#: memory limit makes it fail, or torchvision (BROKEN = "torchvision") is not installed.
_BREAK_TORCH = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys

    class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" and BROKEN == "torchvision":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            if name == "torch" and BROKEN == "torch":  # found, as installed, but not loaded
                return importlib.machinery.ModuleSpec(name, self)
            return None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError(
                "/opt/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so: failed to "
                "map segment from shared object"
            )

    sys.meta_path.insert(0, _Broken())
    """
)


@pytest.mark.parametrize("broken", ["torch", "torchvision"])
def test_predict_tells_a_torch_that_cannot_load_from_one_not_installed(
    tiny_model_dir, tmp_path, broken
):
    (tmp_path / "a.png").write_bytes(png_bytes(200))
    code = f"""
from splitdet.shared.cli import main
raise SystemExit(main(["predict", {str(tmp_path / "a.png")!r}, "--model",
                       {str(tiny_model_dir)!r}, "--threshold", "0", "--no-progress"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", f"BROKEN = {broken!r}\n" + _BREAK_TORCH + code],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("splitdet predict: error: in-process detection needs "), last
    if broken == "torch":
        assert "torch, which is installed but could not be loaded" in last, last
        assert "failed to map segment" in last and "ulimit -v" in last, last
        assert "splitdet[full]" not in last, last
    else:
        assert "install splitdet[full]" in last and "torchvision" in last, last


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["edge", "run", "--model", "m", "--watch", "w", "--db", "d.sqlite", "--cloud",
          "127.0.0.1:9", "--threshold", "abc"], "--threshold"),  # JSON by default
        (["cloud", "--log-format", "json", "--model", "m", "--bad-value"], "--bad-value"),
        (["cloud", "--model", "m", "--max-message-mib", "x", "--log-format", "json"],
         "--max-message-mib"),  # given after the bad value
    ],
)  # fmt: skip
def test_a_bad_option_under_json_logs_is_one_json_fatal_line(argv, option, capsys):
    from splitdet.shared.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines  # no usage block
    entry = json.loads(lines[0])
    assert (entry["level"], entry["event"], entry["command"]) == ("ERROR", "fatal", argv[0])
    assert entry["msg"].startswith("splitdet") and ": error: " in entry["msg"], entry
    assert option in entry["msg"], entry


EDGE_RUN = ["edge", "run", "--model", "m", "--watch", "w", "--db", "d.sqlite", "--cloud",
            "127.0.0.1:9"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["cloud", "--model", "m", "--max-message-mib", "x"], "--max-message-mib"),
        ([*EDGE_RUN, "--log-format", "text", "--threshold", "abc"], "--threshold"),
    ],
)  # fmt: skip
def test_a_bad_option_under_text_logs_keeps_argparses_usage(capsys, argv, option):
    """Text logs, the cloud's default or given to `edge run`."""
    from splitdet.shared.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    command = " ".join(argv[:2]) if argv[0] == "edge" else argv[0]
    assert err.startswith(f"usage: splitdet {command} "), err
    assert err.splitlines()[-1].startswith(f"splitdet {command}: error: argument {option}")


def test_an_abbreviated_log_format_is_no_log_format(capsys):
    """No option may be abbreviated (`--log-f json` was read as `--log-format json`): the
    cloud's parse error is in its default text logs."""
    from splitdet.shared.cli import main

    with pytest.raises(SystemExit):
        main(["cloud", "--log-f", "json", "--model", "m", "--max-message-mib", "x"])
    err = capsys.readouterr().err
    assert err.startswith("usage: splitdet cloud "), err


def test_the_images_held_back_are_a_metric(tmp_path, monkeypatch):
    """The images a shortage holds back are in no row, so `edge status` cannot count them (a
    review): splitdet_edge_files_held_back does, and drops back to 0 once they are taken."""
    from prometheus_client import generate_latest

    from splitdet.edge.daemon_metrics import EdgeMetrics
    from splitdet.edge.store import ResultStore

    (tmp_path / "hot").mkdir()
    (tmp_path / "hot" / "a.png").write_bytes(png_bytes(20))
    folder = watcher.HotFolder(tmp_path / "hot", settle_s=0, unreadable_grace_s=0)
    monkeypatch.setattr(watcher, "SHORTAGE_RETRY_S", 0)
    folder.scan()
    store = ResultStore(tmp_path / "edge.sqlite")
    try:
        metrics = EdgeMetrics(store, folder)

        def held() -> str:
            lines = generate_latest(metrics.registry).decode().splitlines()
            return next(line for line in lines if line.startswith("splitdet_edge_files_held_back "))

        assert held() == "splitdet_edge_files_held_back 0.0"
        with monkeypatch.context() as patch:
            short_of(errno.EMFILE, tmp_path / "hot", patch)
            assert folder.read(folder.next_candidate()) is None
        assert held() == "splitdet_edge_files_held_back 1.0"
        assert folder.read(folder.next_candidate()) is not None
        assert held() == "splitdet_edge_files_held_back 0.0"
    finally:
        store.close()
