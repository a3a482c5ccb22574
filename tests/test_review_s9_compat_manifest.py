"""A manifest another splitdet version wrote, or one edited or pieced together by hand, is
refused naming the file, the field, both versions and what to do (review s9, compat).

1. A hand-edited `input` block (what an edge of one's own resizes and normalises by,
   proto/README.md) was accepted though it disagreed with model_config, which splitdet's own
   edge and cloud go by: two kinds of edge fed one export differently.
2. A manifest of a newer format or split spec was told "re-export the model with this
   version", never that upgrading this splitdet is the other way, nor which splitdet made it;
   a spec_version written as the number 1 read "split spec 1, this splitdet speaks '1'".
3. An unknown default_codec was loaded, and refused only later without naming the manifest.
4. A missing key read "malformed manifest (KeyError('default_codec'))"; an artifact of
   another export "contents differ from the manifest's hash"; an edited manifest "fingerprint
   does not match": none said what to do.
5. A model_config key this splitdet does not know (a newer export's setting) said nothing of
   versions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from splitdet.shared.cli import main
from splitdet.shared.manifest import MANIFEST_NAME, ManifestError, read_manifest


def _copy(source: Path, where: Path, **edits) -> Path:
    """A copy of the export `source`, its manifest.json edited: key -> value (None deletes;
    "a.b" reaches into an object)."""
    out = where / "model"
    shutil.copytree(source, out)
    data = json.loads((out / MANIFEST_NAME).read_text())
    for dotted, value in edits.items():
        *parents, last = dotted.split(".")
        node = data
        for key in parents:
            node = node[key]
        if value is None:
            del node[last]
        else:
            node[last] = value
    (out / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    return out


def _refusal(model_dir: Path) -> str:
    with pytest.raises(ManifestError) as refused:
        read_manifest(model_dir)
    return str(refused.value)


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("input.min_size", 800, "input.min_size 800 differs from model_config's 224"),
        ("input.image_mean", [0, 0, 0], "input.image_mean [0, 0, 0] differs"),
        ("input.size_divisible", 64, "input.size_divisible 64 differs from the split spec's 32"),
        ("input.pixel_bits", 8, "input.pixel_bits 8 differs from model_config's 16"),
    ],
)
def test_an_edited_input_block_is_refused(tiny_model_dir, tmp_path, key, value, shown):
    model_dir = _copy(tiny_model_dir, tmp_path, **{key: value})
    message = _refusal(model_dir)
    assert str(model_dir / MANIFEST_NAME) in message and shown in message, message
    assert "re-export the model" in message, message


def test_an_export_without_input_or_with_an_unknown_input_key_is_still_read(
    tiny_model_dir, tmp_path
):
    """An older export's input lacking a key, or a newer one's with one more, is read."""
    model_dir = _copy(tiny_model_dir, tmp_path, **{"input.pixel_bits": None})
    data = json.loads((model_dir / MANIFEST_NAME).read_text())
    data["input"]["later_setting"] = 3
    (model_dir / MANIFEST_NAME).write_text(json.dumps(data))
    assert read_manifest(model_dir).fingerprint == read_manifest(tiny_model_dir).fingerprint


@pytest.mark.parametrize(("key", "value"), [("format", 2), ("spec_version", "2")])
def test_a_newer_manifest_says_to_upgrade_and_who_made_it(tiny_model_dir, tmp_path, key, value):
    made_by = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())["extra"]["splitdet"]
    message = _refusal(_copy(tiny_model_dir, tmp_path, **{key: value}))
    assert f"{key} {json.dumps(value)}" in message, message
    assert f"made by splitdet {made_by}" in message, message
    assert "upgrade splitdet here" in message and "or re-export" in message, message


def test_a_spec_version_written_as_a_number_is_told_apart(tiny_model_dir, tmp_path):
    message = _refusal(_copy(tiny_model_dir, tmp_path, spec_version=1))
    assert 'spec_version 1 where export writes "1"' in message and "edited" in message, message


def test_an_unknown_default_codec_is_refused_naming_the_field(tiny_model_dir, tmp_path, capsys):
    model_dir = _copy(tiny_model_dir, tmp_path, default_codec="int4")
    message = _refusal(model_dir)
    assert f'{model_dir / MANIFEST_NAME}: default_codec "int4"' in message, message
    assert "upgrade splitdet here" in message, message
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (64, 64), (128, 128, 128)).save(image)
    assert main(["predict", str(image), "--model", str(model_dir), "--json", "-"]) == 2
    err = capsys.readouterr().err
    assert 'default_codec "int4"' in err and "Traceback" not in err, err


def test_a_missing_key_is_named_with_what_to_do(tiny_model_dir, tmp_path):
    message = _refusal(_copy(tiny_model_dir, tmp_path, default_codec=None))
    assert "lacks 'default_codec'" in message and "copy the export again" in message, message


def test_an_artifact_of_another_export_says_what_to_do(tiny_model_dir, tmp_path):
    model_dir = _copy(tiny_model_dir, tmp_path)
    (model_dir / "edge_complete.onnx").write_bytes(b"another export's graph")
    message = _refusal(model_dir)
    assert "edge_complete.onnx: contents differ from the manifest's hash" in message, message
    assert "copied from another export" in message and "copy the export again" in message


def test_an_edited_fingerprint_says_what_to_do(tiny_model_dir, tmp_path):
    message = _refusal(_copy(tiny_model_dir, tmp_path, fingerprint="0" * 64))
    assert "fingerprint does not match" in message and "re-export the model" in message


def test_an_unknown_model_config_setting_says_to_upgrade(tiny_model_dir, tmp_path):
    message = _refusal(_copy(tiny_model_dir, tmp_path, **{"model_config.later_knob": 1}))
    assert "later_knob" in message and "upgrade splitdet here" in message, message
