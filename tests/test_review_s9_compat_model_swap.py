"""A manifest copied into a running edge's --model folder ahead of its files, or beside
another export's, is not taken for a new export (review s9, compat).

Before: the daemon read only the manifest's fingerprint and said "--model M now holds another
export (...): restart the edge to run the new one"; the operator who restarted it found the
edge refusing to start ("contents differ from the manifest's hash"): the line stood still.
Now such a folder is said to hold another export's manifest but not its files, and the
restart advice comes once the files match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

from splitdet.edge.model_probe import ModelOnDisk
from splitdet.shared.config import ModelConfig
from splitdet.shared.manifest import MANIFEST_NAME, compute_fingerprint, read_manifest


def _events(caplog, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "fields", {}).get("event") == name]


def test_a_manifest_copied_ahead_of_its_files_is_not_a_new_export(tiny_model_dir, tmp_path, caplog):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    running = read_manifest(model).fingerprint
    on_disk = ModelOnDisk(model, running)
    assert on_disk.check(force=True) is None

    # the new export's manifest arrives first: its cloud_heads.pt is still the old one
    new_heads = b"the new export's cloud heads"
    data = json.loads((model / MANIFEST_NAME).read_text())
    data["artifacts"]["cloud_heads.pt"] = hashlib.sha256(new_heads).hexdigest()
    config = ModelConfig.from_dict(data["model_config"])
    data["fingerprint"] = compute_fingerprint(data["artifacts"], config, data["gate_threshold"])
    (model / MANIFEST_NAME).write_text(json.dumps(data, indent=2))
    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        on_disk.check(force=True)
        on_disk.check(force=True)  # (said once)
    assert not _events(caplog, "model_changed_on_disk"), caplog.text
    [line] = _events(caplog, "model_on_disk_incomplete")
    message = line.getMessage()
    assert data["fingerprint"][:16] in message and "cloud_heads.pt" in message, message
    assert "a restart now would refuse to start" in message, message

    # the copy finishes: now it is the new export, and a restart is the advice
    caplog.clear()
    (model / "cloud_heads.pt").write_bytes(new_heads)
    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        assert on_disk.check(force=True) == data["fingerprint"]
    [line] = _events(caplog, "model_changed_on_disk")
    assert "restart the edge to run the new one" in line.getMessage()
    assert read_manifest(model).fingerprint == data["fingerprint"]  # (a restart would start)
