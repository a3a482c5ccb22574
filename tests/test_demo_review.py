"""Review of `splitdet demo`: it deletes only what it wrote (checkpoints beside its training
stamp, live/ and annotated/ of its own files), refusing with one line otherwise; and --threads
applies to its in-process training and evaluation, whose log names what set the count."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
import torch

from splitdet.bench.demo import DemoConfig, make_data, run_live, train_model
from splitdet.shared.cli import main as splitdet
from splitdet.training.presets import PRESETS

TINY_DEMO = dict(preset="tiny", image_size=(320, 256), dataset=(4, 2, 2, 2), stream_images=8,
                 defect_rate=0.25, bench_images=0, camera_interval_s=0.0, progress=False,
                 threads=None)  # fmt: skip

#: What an earlier demo's live run leaves (names as every version wrote them; no marker).
EARLIER_LIVE = [
    "edge.sqlite", "edge.sqlite-wal", "edge.sqlite-shm", "edge.sqlite.lock", "cloud.sqlite",
    "edge.log", "cloud.log", "cloud.ready.json", "camera/.frame_00003.png.part",
    "archive/00000001_frame_00000.png", "quarantine/00000002_frame_00001.png",
    "quarantine/00000002_frame_00001.png.reason.txt",
]  # fmt: skip


def _user_checkpoints(config: DemoConfig) -> dict[str, bytes]:
    """A user's run copied into the demo's run/ (no demo stamp): name -> bytes."""
    run_dir = config.paths()["run"]
    run_dir.mkdir(parents=True)
    kept = {"best.pt": b"the user's best checkpoint", "last.pt": b"the user's last checkpoint"}
    for name, data in kept.items():
        (run_dir / name).write_bytes(data)
    return kept


def test_training_never_deletes_checkpoints_the_demo_did_not_write(tmp_path):
    """best.pt and last.pt in run/ beside no demo-train.json were deleted to train afresh."""
    config = DemoConfig(workdir=tmp_path, **TINY_DEMO)
    kept = _user_checkpoints(config)
    with pytest.raises(ValueError) as refused:
        train_model(config)
    message = str(refused.value)
    assert str(config.paths()["run"]) in message and "best.pt" in message, message
    assert "another --workdir" in message and "remove them yourself" in message, message
    for name, data in kept.items():
        assert (config.paths()["run"] / name).read_bytes() == data


def test_demo_command_refuses_foreign_checkpoints_before_any_stage(tmp_path, capsys):
    """The command exits 2 with one line, before the data and training stages."""
    config = DemoConfig(workdir=tmp_path, **TINY_DEMO)
    kept = _user_checkpoints(config)
    args = ["demo", "--workdir", str(tmp_path), "--preset", "tiny", "--train-minutes", "0.1",
            "--images", "20", "--bench-images", "0", "--threads", "1", "--no-progress"]  # fmt: skip
    assert splitdet(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "last.pt, best.pt" in err, err
    assert not config.paths()["data"].exists()  # refused before the first stage
    assert {p.name: p.read_bytes() for p in config.paths()["run"].iterdir()} == kept


def test_the_demos_own_stamp_lets_it_replace_its_checkpoints(tmp_path):
    """A run/ with the stamp every demo version wrote before training (here an earlier
    version's: other settings, complete) is the demo's: retraining may clear it."""
    from splitdet.bench.demo import check_checkpoints, foreign_checkpoints

    config = DemoConfig(workdir=tmp_path, **TINY_DEMO)
    _user_checkpoints(config)
    stamp = {"settings": {"preset": "cpu", "minutes": None, "seed": 0, "data": None},
             "complete": True, "checkpoint_sha256": "0" * 64}  # fmt: skip
    (config.paths()["run"] / "demo-train.json").write_text(json.dumps(stamp))
    assert foreign_checkpoints(config.paths()["run"]) == []
    check_checkpoints(config)


@pytest.mark.parametrize(("folder", "name"), [("live", "important.txt"),
                                              ("annotated", "keep.jpg")])  # fmt: skip
def test_live_run_never_clears_files_the_demo_did_not_write(tmp_path, folder, name):
    """run_live deleted live/ and annotated/ whatever they held."""
    config = DemoConfig(workdir=tmp_path, **TINY_DEMO)
    user_file = config.paths()[folder] / name
    user_file.parent.mkdir(parents=True)
    user_file.write_text("the user's")
    (config.paths()["annotated"]).mkdir(exist_ok=True)
    (config.paths()["annotated"] / "00000001_frame_00000.jpg").write_bytes(b"the demo's")
    with pytest.raises(ValueError) as refused:
        run_live(config)
    message = str(refused.value)
    assert str(config.paths()[folder]) in message and name in message, message
    assert "another --workdir" in message, message
    assert user_file.read_text() == "the user's"
    assert (config.paths()["annotated"] / "00000001_frame_00000.jpg").is_file()


def test_an_earlier_demos_live_outputs_are_cleared_without_a_marker(tmp_path):
    """A workdir an earlier version made (no marker): its live/ and annotated/ hold only the
    demo's kinds of files, so the next live run clears them."""
    from splitdet.bench.demo import clear_live_outputs

    config = DemoConfig(workdir=tmp_path, **TINY_DEMO)
    paths = config.paths()
    for name in EARLIER_LIVE:
        (paths["live"] / name).parent.mkdir(parents=True, exist_ok=True)
        (paths["live"] / name).write_bytes(b"earlier demo")
    paths["annotated"].mkdir()
    (paths["annotated"] / "00000001_frame_00000.jpg").write_bytes(b"earlier demo")
    clear_live_outputs(config)
    assert not paths["live"].exists() and not paths["annotated"].exists()


def test_threads_apply_to_the_demos_training_and_the_log_names_who_set_them(
    tmp_path, monkeypatch, caplog
):
    """--threads 1 trained with torch's 2 threads, logged as "set by OMP_NUM_THREADS" although
    it was unset; the count is the demo's now, and put back after."""
    config = DemoConfig(workdir=tmp_path, **{**TINY_DEMO, "threads": 1})
    make_data(config)
    monkeypatch.setitem(PRESETS, "tiny", replace(PRESETS["tiny"], epochs=1))  # (one epoch)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO, logger="splitdet.training"):
            assert train_model(config) is False
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(before)
    line = next(r.getMessage() for r in caplog.records if "torch thread" in r.getMessage())
    assert "1 torch thread(s) (set by the caller or torch's default" in line, line
