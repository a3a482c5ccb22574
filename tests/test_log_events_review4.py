"""A log-parser review: warnings that carried no `event` under JSON logs (an alert keyed on
`event` missed them), their folder only inside the message. Each now has an event and its
folder (or peer) as a field: a duplicate or unreadable export in --models-dir, a file system
that cannot lock (two writers could then share a folder), a failed metrics request.

Real exports, folders, flock (made to fail as NFS without lockd fails it) and a real metrics
endpoint on loopback."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import shutil

from cloud_fixtures import shared_model_dir
from prometheus_client import CollectorRegistry

from splitdet.cloud.served_exports import export_dirs, gather_models
from splitdet.cloud.server_config import ServerConfig
from splitdet.shared.folder_lock import DirectoryLock, folder_lock
from splitdet.shared.logs import JsonLogFormatter
from splitdet.shared.metrics_http import start_metrics_server

#: A port of this review's range (53300-53399) for the metrics endpoint.
METRICS_PORT = 53311


def _json(record: logging.LogRecord) -> dict:
    """The record as its JSON log line says it."""
    return json.loads(JsonLogFormatter().format(record))


def _warned(caplog, logger: str) -> list[dict]:
    """The JSON lines of the WARNING or worse records `logger` logged."""
    return [_json(r) for r in caplog.records if r.name == logger and r.levelno >= logging.WARNING]


def test_a_duplicate_export_is_skipped_with_its_event_and_folders(tmp_path, caplog):
    _, model_dir, manifest = shared_model_dir()
    models = tmp_path / "models"
    models.mkdir()
    for name in ("a", "b"):
        shutil.copytree(model_dir, models / name)
    caplog.set_level(logging.INFO, logger="splitdet.cloud.server")
    named, found = export_dirs(ServerConfig(models_dir=models))
    served, problems, _ = gather_models(named, found, strict=False)
    assert len(served) == 1 and problems == [], problems
    [line] = _warned(caplog, "splitdet.cloud.server")
    assert line["event"] == "export_duplicate_skipped", line
    skipped, serving = (str(folder) for folder in found[::-1])
    assert line["folder"] == skipped and line["served_from"] == serving, line
    assert line["fingerprint"] == manifest.fingerprint
    assert line["msg"] == f"{skipped}: the same export as {serving}, which serves it; skipped"


def test_an_export_folder_that_cannot_be_read_is_skipped_with_its_event(tmp_path, caplog):
    """A subfolder the server cannot look into (here a symbolic link to itself: ELOOP, which
    root meets too; a lost+found is EACCES)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "loop").symlink_to(models / "loop")
    caplog.set_level(logging.INFO, logger="splitdet.cloud.server")
    assert export_dirs(ServerConfig(models_dir=models)) == ([], [])
    [line] = _warned(caplog, "splitdet.cloud.server")
    assert line["event"] == "export_unreadable" and line["folder"] == str(models / "loop"), line
    assert line["error"] == "Too many levels of symbolic links", line
    assert line["msg"].endswith("cannot read (Too many levels of symbolic links); skipped")


def _no_locks(fd: object, operation: int) -> None:
    """flock on NFS without lockd."""
    raise OSError(errno.ENOLCK, "No locks available")


def test_an_output_folder_that_cannot_be_locked_is_warned_with_its_event(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(fcntl, "flock", _no_locks)
    caplog.set_level(logging.WARNING, logger="splitdet.shared.folder_lock")
    with folder_lock(tmp_path / "out", ".splitdet-test.lock", "splitdet export", "--out"):
        pass
    [line] = _warned(caplog, "splitdet.shared.folder_lock")
    assert line["event"] == "lock_unsupported", line
    assert line["folder"] == str(tmp_path / "out") and line["option"] == "--out", line
    assert line["lock_file"] == ".splitdet-test.lock" and line["error"] == "No locks available"


def test_a_hot_folder_that_cannot_be_locked_is_warned_with_its_event(tmp_path, monkeypatch, caplog):
    """The one that matters: two daemons could share the hot folder."""
    monkeypatch.setattr(fcntl, "flock", _no_locks)
    caplog.set_level(logging.WARNING, logger="splitdet.shared.folder_lock")
    lock = DirectoryLock(tmp_path, "--watch", "`splitdet edge run`", "one per hot folder")
    assert not lock.held
    [line] = _warned(caplog, "splitdet.shared.folder_lock")
    assert line["event"] == "lock_unsupported", line
    assert line["folder"] == str(tmp_path) and line["option"] == "--watch", line
    assert line["error"] == "No locks available" and "lock_file" not in line


def test_a_failed_metrics_request_is_logged_with_its_event_and_peer(caplog):
    """The endpoint's handler for a request that failed otherwise than by its connection,
    called as socketserver calls it: while the failure is being handled."""
    server = start_metrics_server(METRICS_PORT, "127.0.0.1", CollectorRegistry())
    caplog.set_level(logging.ERROR, logger="splitdet.shared.metrics_http")
    try:
        try:
            raise ValueError("a broken collector")
        except ValueError:
            server.handle_error(None, ("10.0.0.9", 40000))
    finally:
        server.shutdown()
        server.server_close()
    [line] = _warned(caplog, "splitdet.shared.metrics_http")
    assert line["event"] == "metrics_request_failed" and line["peer"] == "10.0.0.9", line
    assert line["level"] == "ERROR" and "ValueError: a broken collector" in line["exc"]
