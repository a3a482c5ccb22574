"""A model configuration read from an untrusted file (an export's manifest.json, a checkpoint)
is checked field by field, and an export the cloud cannot load is that folder's problem alone.

Before: a forged manifest (its fingerprint recomputed, as anyone who can write --models-dir can)
with box_head_dim -1 made a SIGHUP reload fail whole ("RuntimeError: Trying to create tensor
with negative dimension", no folder named, a good export beside it not served, no reload
counted) and `splitdet cloud` exit 1 with a traceback; min_size "800" or 0 loaded, and then
every Detect failed; top-n and detections per image of 10^9 made one small request take minutes
and gigabytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from cloud_fixtures import TINY_OVERRIDES, scrape_metrics, shared_model_dir, write_model_dir

from splitdet.cloud import core
from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.shared.checkpoint import CheckpointError, load_model, save_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.config import ModelConfig
from splitdet.shared.manifest import (
    MANIFEST_NAME,
    ManifestError,
    compute_fingerprint,
    read_manifest,
)
from splitdet.training.presets import PRESETS

from conftest import make_tiny_model

pytestmark = pytest.mark.timeout(180)

#: (field, value accepted before, words the refusal must hold: the allowed range)
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("min_size", "800", "1-8192"),
    ("min_size", 0, "1-8192"),
    ("max_size", 10**9, "1-8192"),
    ("rpn_pre_nms_top_n_test", 10**9, "1-10000"),
    ("rpn_post_nms_top_n_test", 0, "1-10000"),
    ("box_detections_per_img", 10**9, "1-1000"),
    ("box_head_dim", -1, "1-4096"),
    ("fpn_channels", 0, "1-1024"),
    ("box_score_thresh", -0.5, "[0.0, 1.0]"),
    ("box_score_thresh", "0.05", "[0.0, 1.0]"),
    ("box_nms_thresh", 2.0, "[0.0, 1.0]"),
    ("box_nms_thresh", float("nan"), "[0.0, 1.0]"),
    ("image_std", [0.2, 0.2, 0.0], "[0.0001, 1.0]"),
    ("image_mean", [0.5, 0.5], "3 numbers"),
    ("anchor_sizes", [32, 64, 128, 256, -1], "1-8192"),
    ("anchor_ratios", [], "1-16"),
    ("anchor_ratios", [0.5, "1"], "[0.01, 100.0]"),
    ("class_names", ["scratch", "scratch"], "twice"),
    ("class_names", ["a\nb"], "printable"),
    ("depth", 50.0, "18, 34 or 50"),
    ("box_roi_sampling_ratio", True, "1-4"),
    ("box_refine_steps", 1.0, "0-4"),
    ("zero_init_residual", 1, "true or false"),
    ("image_mean", [0.5, 0.5, 2.0], "[0.0, 1.0]"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_VALUES)
def test_each_field_is_checked_for_type_and_range(field, value, allowed):
    """Refused naming the field, the value and what it may be; every preset and the paper's
    configuration (ResNet50, 2448x2048 images) stay valid."""
    data = ModelConfig().to_dict()
    data[field] = value
    with pytest.raises(ValueError) as refused:
        ModelConfig.from_dict(data)
    message = str(refused.value)
    assert field in message and allowed in message, message
    shown = repr(tuple(value) if isinstance(value, list) else value)
    assert shown[:40] in message or repr(value[-1]) in message, message
    for preset in PRESETS.values():
        assert ModelConfig.from_dict(preset.model.to_dict()) == preset.model
    paper = ModelConfig(depth=50, min_size=2048, max_size=2448, box_detections_per_img=100)
    assert ModelConfig.from_dict(json.loads(json.dumps(paper.to_dict()))) == paper


def _forge(source: Path, to: Path, **changes: Any) -> Path:
    """Copy an export, change its manifest's model_config and recompute its fingerprint so that
    it verifies (the reviewer's mkexport.py, without building a ModelConfig of the values)."""
    shutil.copytree(source, to)
    manifest = json.loads((to / MANIFEST_NAME).read_text())
    manifest["model_config"].update(changes)
    if "class_names" in changes:  # (the top-level copy must agree: read_manifest checks)
        manifest["class_names"] = list(changes["class_names"])
    settings = manifest["model_config"]

    class Raw:  # what compute_fingerprint reads of a ModelConfig
        def to_dict(self) -> dict[str, Any]:
            return settings

    manifest["fingerprint"] = compute_fingerprint(
        manifest["artifacts"],
        Raw(),
        manifest["gate_threshold"],  # type: ignore[arg-type]
    )
    (to / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return to


def test_a_forged_manifest_is_refused_naming_its_file_field_and_range(tmp_path):
    _, source, _ = shared_model_dir(0)
    forged = _forge(source, tmp_path / "forged", min_size="800")
    with pytest.raises(ManifestError) as refused:
        read_manifest(forged)
    message = str(refused.value)
    assert str(forged / MANIFEST_NAME) in message, message
    assert "min_size must be an integer 1-8192, got '800'" in message, message
    with pytest.raises(ManifestError, match="box_detections_per_img"):
        core.load_cloud(_forge(source, tmp_path / "many", box_detections_per_img=10**9))


def test_a_checkpoint_config_is_checked_too(tmp_path):
    model = make_tiny_model(0, **TINY_OVERRIDES)
    path = tmp_path / "run.pt"
    save_checkpoint(path, model)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["rpn_post_nms_top_n_test"] = 10**9
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"rpn_post_nms_top_n_test .*1-10000"):
        load_model(path)


@pytest.fixture
def unbuildable(monkeypatch):
    """Torch fails to build any model whose class list is ("boom",): a configuration the checks
    let through but the builder cannot make (what box_head_dim -1 was)."""
    real = core.MultiTaskRCNN

    def build(config: ModelConfig):
        if config.class_names == ("boom",):
            raise RuntimeError("Trying to create tensor with negative dimension -1: [-1, 64]")
        return real(config)

    monkeypatch.setattr(core, "MultiTaskRCNN", build)


def _server(tmp_path: Path, **config: Any) -> CloudServer:
    return CloudServer(
        ServerConfig(
            listen="127.0.0.1:0",
            threads=1,
            metrics_port=0,
            metrics_host="127.0.0.1",
            answers_db=tmp_path / "a.sqlite",
            **config,
        )
    )


@pytest.mark.parametrize("fault", ["checked", "unbuildable"])
def test_an_export_that_cannot_be_built_is_skipped_the_others_served(
    fault, tmp_path, caplog, request
):
    """At start and at a reload, the folder is named with its cause, the good export beside it
    is served, and the reload counted as one with problems."""
    if fault == "unbuildable":
        request.getfixturevalue("unbuildable")
    changes = {"box_head_dim": -1} if fault == "checked" else {"class_names": ["boom"]}
    _, first_dir, first = shared_model_dir(0)
    folder = tmp_path / "models"
    shutil.copytree(first_dir, folder / "v1")
    _forge(first_dir, folder / "bad-at-start", **changes)
    caplog.set_level("INFO", logger="splitdet.cloud.server")
    server = _server(tmp_path, models_dir=folder).start()
    try:
        assert server.core.fingerprints == (first.fingerprint,)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and str(folder / "bad-at-start") in errors[0], errors
        second = make_tiny_model(21, **TINY_OVERRIDES)
        added = write_model_dir(second, folder / "v2")
        _forge(first_dir, folder / "bad-at-reload", **changes)
        caplog.clear()
        change = server.reload()
        assert change["added"] == [added.fingerprint], change
        problems = change["problems"]
        assert len(problems) == 2 and all("skipped" in p for p in problems), problems
        bad = next(p for p in problems if str(folder / "bad-at-reload") in p)
        assert ("box_head_dim" if fault == "checked" else "cannot be built") in bad, bad
        assert "Traceback" not in caplog.text
        metrics = scrape_metrics(server.metrics_port)
        assert metrics['splitdet_cloud_reloads_total{outcome="problems"}'] == 1
    finally:
        server.stop(0)


@pytest.mark.parametrize("fault", ["checked", "unbuildable"])
def test_a_named_export_that_cannot_be_built_is_one_line_exit_2(fault, tmp_path, capsys, request):
    if fault == "unbuildable":
        request.getfixturevalue("unbuildable")
    changes = {"box_head_dim": -1} if fault == "checked" else {"class_names": ["boom"]}
    _, first_dir, _ = shared_model_dir(0)
    bad = _forge(first_dir, tmp_path / "bad", **changes)
    argv = ["cloud", "--model", str(bad), "--listen", "127.0.0.1:0"]
    assert main([*argv, "--answers-db", str(tmp_path / "a.sqlite")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert str(bad) in lines[0], err
