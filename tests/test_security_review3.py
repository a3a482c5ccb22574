"""Third security and code review: a manifest's gate threshold, the cloud's message for a
pickle in its weights, token files other users can read, what GetManifest tells anyone, log
records split by control characters, and the manifest's size_divisible."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from splitdet.shared.manifest import (
    CLOUD_WEIGHTS,
    MANIFEST_NAME,
    ManifestError,
    compute_fingerprint,
    file_sha256,
    read_manifest,
)

from support import daemon_config, wait_for


def copied_export(source: Path, where: Path) -> Path:
    """A copy of the export `source` in `where`/model."""
    out = where / "model"
    shutil.copytree(source, out)
    return out


def rewrite_manifest(model_dir: Path, **changes: object) -> None:
    """Set top-level manifest fields, rehash the artifacts and recompute the fingerprint, as
    anyone who can write the folder can (the fingerprint proves nothing about the values)."""
    from splitdet.shared.config import ModelConfig

    path = model_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    data["artifacts"] = {name: file_sha256(model_dir / name) for name in data["artifacts"]}
    config = ModelConfig.from_dict(data["model_config"])
    data["fingerprint"] = compute_fingerprint(data["artifacts"], config, data["gate_threshold"])
    path.write_text(json.dumps(data, indent=2))  # (json writes NaN and Infinity as such)


# ------------------------------------------------ 1. a manifest's gate threshold


@pytest.mark.parametrize("value", [math.nan, -5.0, 1.5, math.inf, "0.5", None, True])
def test_a_manifest_gate_threshold_outside_0_to_1_is_refused(tiny_model_dir, tmp_path, value):
    """NaN judged every image ok (defective ones too), -5 flagged everything, above 1 flags
    nothing: the manifest's threshold is refused unless a p(defect) from 0 to 1, as export
    writes it, naming the file and the field."""
    model_dir = copied_export(tiny_model_dir, tmp_path)
    rewrite_manifest(model_dir, gate_threshold=value)
    for verify in (True, False):
        with pytest.raises(ManifestError) as refused:
            read_manifest(model_dir, verify=verify)
        message = str(refused.value)
        assert message.startswith(f"{model_dir / MANIFEST_NAME}: gate_threshold ")
        assert "from 0 to 1" in message and "\n" not in message


@pytest.mark.parametrize("value", [0.0, 1.0, 0.25])
def test_a_manifest_gate_threshold_from_0_to_1_is_read(tiny_model_dir, tmp_path, value):
    model_dir = copied_export(tiny_model_dir, tmp_path)
    rewrite_manifest(model_dir, gate_threshold=value)
    assert read_manifest(model_dir).gate_threshold == value


def test_no_override_warning_without_a_threshold_given(tiny_model_dir, tmp_path, caplog):
    """The override WARNING compared the threshold in use with the manifest's, which differ
    for NaN though nothing was given: "--threshold nan overrides the gate threshold nan". It
    is logged only for a --threshold given (a manifest made in memory past the checks)."""
    from splitdet.edge.daemon import EdgeDaemon
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.runtime import EdgeRuntime

    manifest = replace(read_manifest(tiny_model_dir), gate_threshold=math.nan)
    pipeline = EdgePipeline(EdgeRuntime(tiny_model_dir, threads=1, manifest=manifest))
    config = daemon_config(tiny_model_dir, tmp_path, threshold=None)
    with caplog.at_level(logging.INFO, logger="splitdet.edge"):
        assert EdgeDaemon(config, pipeline=pipeline).run() == 0
    events = [getattr(record, "fields", {}).get("event") for record in caplog.records]
    assert "started" in events and "threshold_override" not in events


# ------------------------------------------------ 2. a pickle in the cloud's weights


class Payload:
    """What a crafted cloud_heads.pt holds: an object whose unpickling calls a function."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_cloud_weights_holding_code_are_refused_in_one_safe_line(tiny_model_dir, tmp_path):
    """torch's 7-line message advised re-running torch.load with weights_only=False, which
    would run the file's code; the refusal is one line, as for a checkpoint."""
    from splitdet.cloud.core import load_cloud

    model_dir = copied_export(tiny_model_dir, tmp_path)
    torch.save({"rpn.x": Payload()}, model_dir / CLOUD_WEIGHTS)
    rewrite_manifest(model_dir)
    with pytest.raises(ManifestError) as refused:
        load_cloud(model_dir)
    message = str(refused.value)
    assert "\n" not in message and "weights_only" not in message, message
    assert message == (
        f"{model_dir / CLOUD_WEIGHTS}: cannot be loaded (it holds Python objects, not only "
        "tensors and plain data; not loaded, for safety)"
    )


# ------------------------------------------------ 3. token files other users can read


def token_file(where: Path, mode: int, name: str = "token.txt") -> Path:
    path = where / name
    path.write_text("s3cret-token\n")
    path.chmod(mode)
    return path


@pytest.fixture
def reachable():
    """A folder every user may reach (0755, under the system's temporary folder): pytest's
    own tmp_path lies under a 0700 folder, which keeps others from any file in it."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


def open_file_warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if getattr(r, "fields", {}).get("event") == "token_file_open"]  # fmt: skip


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_an_edge_token_file_others_can_read_is_warned_of_once(reachable, tmp_path, caplog):
    """The README's `echo ... > token.txt` gives 0644: a WARNING names the file, its mode and
    `chmod 600`, once; a private (0600) or group (0640) file is not warned of, nor (a review)
    one in a folder that keeps other users out (0700 on the way)."""
    from splitdet.shared.cli import read_token

    path = token_file(reachable, 0o644)
    with caplog.at_level(logging.WARNING):
        assert read_token(path) == "s3cret-token"
        assert read_token(path) == "s3cret-token"
        for mode in (0o600, 0o640):
            assert read_token(token_file(reachable, mode, f"{mode:o}.txt")) == "s3cret-token"
        private = tmp_path / "private"
        private.mkdir(mode=0o700)
        assert read_token(token_file(private, 0o644)) == "s3cret-token"
    [warning] = open_file_warnings(caplog)
    assert warning.levelno == logging.WARNING
    message = warning.getMessage()
    assert f"--token-file {path} has mode 0644" in message and f"chmod 600 {path}" in message


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_a_cloud_token_file_others_can_read_is_warned_of_at_start_not_at_each_reread(
    reachable, caplog
):
    """The cloud reads its --token-file again at each change: the warning comes at start, not
    again at a re-read of a file as open as before."""
    from splitdet.cloud.tokens import AcceptedTokens

    path = token_file(reachable, 0o604)
    with caplog.at_level(logging.INFO):
        tokens = AcceptedTokens(token_file=path)
        try:
            assert len(open_file_warnings(caplog)) == 1
            path.write_text("s3cret-token\nnew-token-line\n")  # a rotation: one more token
            wait_for(lambda: tokens.accepts("Bearer new-token-line"), 30, "the re-read")
        finally:
            tokens.close()
    [warning] = open_file_warnings(caplog)
    assert "has mode 0604" in warning.getMessage()


# ------------------------------------------------ 4. what GetManifest tells anyone


def test_get_manifest_leaves_out_the_exports_own_notes(tmp_path):
    """A cloud without tokens answered anyone with manifest.json whole, the training
    machine's checkpoint path in `extra` included. `extra` is left out (no client reads it);
    the answer still hashes to the fingerprint, which the edge checks."""
    from cloud_fixtures import shared_model_dir

    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig
    from splitdet.edge.client import ClientConfig, CloudClient
    from splitdet.edge.client_answers import AnswerRules

    model_dir = copied_export(shared_model_dir(0)[1], tmp_path)
    path = model_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["extra"] = {"checkpoint": "/home/trainer/secret-runs/best.pt"}  # (not fingerprinted)
    path.write_text(json.dumps(data))
    config = ServerConfig(model_dir=model_dir, listen="127.0.0.1:0", threads=1, metrics_port=0,
                          answers_db=tmp_path / "answers.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    try:
        client = CloudClient(ClientConfig(f"127.0.0.1:{server.port}"))
        served = client.manifest(data["fingerprint"])
        client.close()
    finally:
        server.stop(0)
    assert "secret-runs" not in json.dumps(served.data) and "extra" not in served.data
    assert served.data == {key: value for key, value in data.items() if key != "extra"}
    rules = AnswerRules.from_served(data["fingerprint"], served.data)  # (raises otherwise)
    assert rules.class_names == tuple(data["class_names"])


# ------------------------------------------------ 5. one line per log record


@pytest.mark.parametrize("name", ["a\nb.jpg", "a\rb.jpg", "a\x1b[2Jb.jpg", "a\u2028b.jpg"])
def test_a_control_character_in_a_message_does_not_split_the_record(name):
    """`file_skipped` embeds the raw path in its message: a newline in a file name split the
    text record over two lines. The message is escaped as the fields are; JSON already was."""
    from splitdet.shared.logs import JsonLogFormatter, TextLogFormatter

    path = f"/hot/{name}"
    record = logging.LogRecord("splitdet.edge.watcher", logging.INFO, __file__, 1,
                               "skipped %s: no extension taken", (path,), None)  # fmt: skip
    record.fields = {"event": "file_skipped", "path": path}
    text = TextLogFormatter().format(record)
    assert len(text.splitlines()) == 1 and not any(c in text for c in "\r\x1b"), repr(text)
    escaped = json.dumps(name, ensure_ascii=False)[1:-1]
    if "\u2028" in name:
        escaped = escaped.replace("\u2028", "\\u2028")
    assert f"skipped /hot/{escaped}: no extension taken" in text
    assert f'path="/hot/{escaped}"' in text  # (the exact value, as a field)
    line = JsonLogFormatter().format(record)
    assert len(line.splitlines()) == 1 and json.loads(line)["msg"] == record.getMessage()


def test_eval_s_table_of_operating_points_keeps_its_lines(tiny_model_dir, tmp_path):
    """A review: the escaping folded `splitdet eval`'s table of gate operating points (one
    record, "a table on stderr" in training/README) into one line of literal \\n. Its
    event is one of the records meant to span lines, as SIGUSR1's stacks."""
    from splitdet.shared.logs import TextLogFormatter

    table = "gate operating points:\n  target recall  threshold\n  99.5%  0.25"
    record = logging.LogRecord("splitdet.training.cli_eval", logging.INFO, __file__, 1,
                               "%s", (table,), None)  # fmt: skip
    record.fields = {"event": "gate_operating_points"}
    lines = TextLogFormatter().format(record).splitlines()
    assert lines[-2] == "  target recall  threshold" and lines[-1].startswith("  99.5%  0.25")


# ------------------------------------------------ 6. the manifest's size_divisible


def test_the_manifest_size_divisible_is_the_specs(tiny_model_dir):
    """manifest.json's input.size_divisible is spec.SIZE_DIVISIBLE, what padded_size and the
    cloud pad to; it is not fingerprinted, so an export's fingerprint stays as it was."""
    from splitdet.shared.spec import SIZE_DIVISIBLE, padded_size

    manifest = read_manifest(tiny_model_dir)
    written = json.loads((tiny_model_dir / MANIFEST_NAME).read_text())
    assert manifest.to_dict()["input"]["size_divisible"] == SIZE_DIVISIBLE == 32
    assert written["input"]["size_divisible"] == SIZE_DIVISIBLE
    assert padded_size(33, 65) == (64, 96)
    again = compute_fingerprint(manifest.artifacts, manifest.model_config, manifest.gate_threshold)
    assert again == manifest.fingerprint == written["fingerprint"]
