"""Provenance (a reviewer in a regulated plant: every released model traceable, each reported
figure tied to the exact model and data bytes and the code version).

The eval JSON named the checkpoint and data only by the paths typed (relative, no working
folder); a run's checkpoints kept only the last dataset's path, replaced by a resume onto
other data; an export named no splitdet version. Now: the eval JSON's "provenance" holds the
checkpoint's weights digest (the one an export's manifest records), its epoch, absolute paths,
the evaluated data's digest and the version; checkpoints hold a "data_history" over resumes,
the version and the resolved precision; the manifest holds the version, outside the
fingerprint.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import splitdet.shared
from splitdet.shared.checkpoint import read_checkpoint
from splitdet.shared.cli import main
from splitdet.shared.manifest import compute_fingerprint, read_manifest
from splitdet.training import voc
from splitdet.training.provenance import splitdet_version
from splitdet.training.train import train
from splitdet.training.train_epoch import autocast_dtype

from conftest import ONE_EPOCH
from support import make_tiny_voc


def _sha256_hex(value: object) -> bool:
    """Whether `value` is a SHA-256 hex digest."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= set("0123456789abcdef")


def _digest(root: Path, split: str = "train") -> str:
    """The data digest of `root`'s `split` (`provenance.data_digest`)."""
    from splitdet.training.provenance import data_digest

    return data_digest(root, voc.read_split(root, split, ["scratch"]))


# ------------------------------------------- 1: the eval JSON names the weights and the data


def test_eval_json_holds_the_weights_digest_an_export_of_the_checkpoint_records(
    finished_run, tiny_voc, tmp_path, monkeypatch, one_torch_thread
):
    """`eval --checkpoint` (which rewrites the file to store its threshold) records the digest
    of the weights that `export` of the same checkpoint records as `extra.weights_sha256`, and
    `eval --model` of that export the same again; paths are absolute, typed relative."""
    shutil.copy(finished_run / "last.pt", tmp_path / "model.pt")
    shutil.copytree(tiny_voc, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--data", "data", "--checkpoint", "model.pt", "--split", "test",
                 "--calibrate-split", "val", "--no-progress",
                 "--json", "ckpt.json"]) == 0  # fmt: skip
    result = json.loads((tmp_path / "ckpt.json").read_text())
    assert read_checkpoint(tmp_path / "model.pt")["gate_calibrated"]  # (the file was rewritten)
    assert (result["checkpoint"], result["data"]) == ("model.pt", "data")  # (kept as they were)
    assert main(["export", "--checkpoint", "model.pt", "--out", "export"]) == 0
    manifest = read_manifest(tmp_path / "export")
    assert main(["eval", "--data", "data", "--model", "export", "--split", "test",
                 "--no-progress", "--json", "export.json"]) == 0  # fmt: skip
    deployed = json.loads((tmp_path / "export.json").read_text())["provenance"]

    provenance = result["provenance"]
    assert provenance["splitdet"] == splitdet_version() == deployed["splitdet"]
    weights = provenance["checkpoint"]["weights_sha256"]
    assert _sha256_hex(weights)
    assert weights == manifest.extra["weights_sha256"] == deployed["model"]["weights_sha256"]
    assert provenance["checkpoint"] == {
        "path": str(tmp_path / "model.pt"), "weights_sha256": weights, "epoch": 0,
    }  # fmt: skip
    data = {"path": str(tmp_path / "data"), "split": "test", "images": 4,
            "sha256": _digest(tmp_path / "data", "test")}  # fmt: skip
    assert provenance["data"] == data == deployed["data"]
    calibrated = {**data, "split": "val", "sha256": _digest(tmp_path / "data", "val")}
    assert provenance["calibrate_data"] == calibrated
    assert deployed["model"]["fingerprint"] == manifest.fingerprint
    assert deployed["model"]["path"] == str(tmp_path / "export")


# ------------------------------------------------------------- 2: what the data digest covers


def test_the_data_digest_changes_with_one_byte_and_not_with_the_folder(tmp_path):
    """One byte of one annotation, or of one image, changes the digest; moving the dataset to
    another folder (or listing its ids in another order) does not."""
    root = make_tiny_voc(tmp_path / "data", n_defective=2, n_free=1)
    before = _digest(root)
    assert _sha256_hex(before)

    moved = Path(shutil.move(root, tmp_path / "elsewhere" / "data"))
    assert _digest(moved) == before
    split = moved / "ImageSets" / "Main" / "train.txt"
    split.write_text("\n".join(reversed(split.read_text().split())) + "\n")
    assert _digest(moved) == before

    annotation = moved / "Annotations" / "img_001.xml"
    text = annotation.read_bytes()
    annotation.write_bytes(text.replace(b"<name>scratch</name>", b"<name>scratch</name> ", 1))
    assert _digest(moved) != before  # (one byte more: still the same objects when parsed)
    annotation.write_bytes(text)
    assert _digest(moved) == before

    image = next((moved / "JPEGImages").glob("img_002.*"))
    data = bytearray(image.read_bytes())
    data[-20] ^= 1  # (the digest reads bytes: no image is decoded)
    image.write_bytes(bytes(data))
    assert _digest(moved) != before


# ------------------------------------------------- 3: a resume onto other data keeps the first


def test_a_resume_onto_other_data_keeps_both_datasets_records(tmp_path, one_torch_thread):
    """A run trained on one dataset, resumed onto another: last.pt keeps both in its
    "data_history" (path, train digest, the epoch each started at, version, precision as
    resolved), and each metrics row names the digest of the data it trained on."""
    first = make_tiny_voc(tmp_path / "first", n_defective=3, n_free=1, seed=0)
    second = make_tiny_voc(tmp_path / "second", n_defective=3, n_free=1, seed=1)
    run = tmp_path / "run"
    train(ONE_EPOCH, first, run, progress=False, max_iters=1)
    auto = replace(ONE_EPOCH, epochs=2, precision="auto")
    train(auto, second, run, resume=True, progress=False, max_iters=1)

    checkpoint = read_checkpoint(run / "last.pt")
    version = splitdet_version()
    resolved = "bf16" if autocast_dtype("auto", torch.device("cpu")) else "fp32"
    history = checkpoint["data_history"]
    assert [(h["path"], h["train_sha256"], h["started_epoch"]) for h in history] == [
        (str(first.resolve()), _digest(first), 0),
        (str(second.resolve()), _digest(second), 1),
    ]
    assert [(h["splitdet"], h["precision_used"]) for h in history] == [
        (version, "fp32"), (version, resolved)
    ]  # fmt: skip
    assert _digest(first) != _digest(second)
    assert (checkpoint["splitdet"], checkpoint["precision_used"]) == (version, resolved)
    assert checkpoint["data"] == str(second.resolve())  # (as before: the last start's)
    rows = json.loads((run / "metrics.json").read_text())
    assert [row["train_sha256"] for row in rows] == [_digest(first), _digest(second)]
    assert [row["precision_used"] for row in rows] == ["fp32", resolved]


def test_a_resume_onto_changed_data_at_the_same_path_is_warned(tmp_path, caplog):
    """The same path holding other train bytes at a resume: warned (the path alone hid it)."""
    from splitdet.training.provenance import training_segment
    from splitdet.training.run_start import data_history

    root = make_tiny_voc(tmp_path / "data", n_defective=2, n_free=1)
    samples = voc.read_split(root, "train", ["scratch"])
    start = training_segment(root, samples, [], 0, "fp32")
    image = samples[0].image_path
    image.write_bytes(image.read_bytes() + b"\0")
    again = training_segment(root, samples, [], 1, "fp32")
    with caplog.at_level("WARNING"):
        kept = data_history({"data_history": [start]}, again, tmp_path / "last.pt")
    assert kept == [start, again]
    assert "changed since this run's epoch 0" in caplog.text
    # a checkpoint of an older splitdet: its path kept, what it did not record as None
    older = data_history({"data": "/old/data"}, start, tmp_path / "last.pt")
    assert older[0] == {**dict.fromkeys(start), "path": "/old/data"}  # (every key, as a new one)


# ------------------------------------ 4: the export's version, outside its fingerprint


def test_the_export_records_its_version_outside_the_fingerprint(tiny_model_dir):
    """The manifest's `extra.splitdet` names the version that exported it; the fingerprint
    (which the edge and the cloud compare) is still what the artifacts, the model's settings
    and the threshold alone give (`compute_fingerprint`, which takes nothing of `extra`): the
    version changes no export's fingerprint."""
    manifest = read_manifest(tiny_model_dir, verify=True)
    assert manifest.extra["splitdet"] == splitdet_version()
    assert manifest.fingerprint == compute_fingerprint(
        manifest.artifacts, manifest.model_config, manifest.gate_threshold
    )


# ------------------------------------------- 5: the code's version, and a file changing


def test_the_version_names_the_commit_of_a_git_work_tree(tmp_path):
    """An editable install's metadata keeps the version of the commit it was installed at
    ("0.1.0" for every later commit): the records name the commit the code runs from too."""
    import subprocess

    from splitdet.shared.version import _git_source

    assert _git_source(tmp_path) is None  # (no work tree: the version alone)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert _git_source(tmp_path) == f"git {head[:12]}"
    (tmp_path / "a.py").write_text("x = 2\n")
    assert _git_source(tmp_path) == f"git {head[:12]}, modified"
    assert splitdet_version().startswith(splitdet.shared.__version__)


def test_a_file_rewritten_while_hashed_keeping_its_size_is_named(tmp_path, monkeypatch):
    """Only a change of size was seen: a rewrite in place of the same size gave the digest of
    a half-written file without a word. Its modification time is looked at too."""
    from splitdet.training import provenance

    root = make_tiny_voc(tmp_path / "data", n_defective=1, n_free=0)
    samples = voc.read_split(root, "train", ["scratch"])
    real_fstat, calls = os.fstat, []

    def fstat(fd):  # the file touched between the digest's first look and its last
        found = real_fstat(fd)
        calls.append(fd)
        if len(calls) % 2 == 0:
            return SimpleNamespace(st_mtime_ns=found.st_mtime_ns + 1, st_size=found.st_size)
        return found

    monkeypatch.setattr(provenance.os, "fstat", fstat)
    with pytest.raises(ValueError, match="changed while its digest was taken"):
        provenance.data_digest(root, samples)
