"""A reload review's findings on what a served export becomes over several SIGHUPs: one whose
folder is still there but damaged (its manifest, or its files after a copy had served it)
stays served from memory, and the edges that used an export are still named when it is
dropped a second time. Real servers on loopback, tiny exports."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import test_cloud_reload
from cloud_fixtures import shared_model_dir
from test_cloud_reload import _copy, _served, _serving_two

from splitdet.cloud import metrics as metrics_module
from splitdet.edge.client import ClientConfig, CloudClient

pytestmark = pytest.mark.timeout(180)

#: (model, model_dir, manifest) of another export than shared_model_dir(0)'s.
second = test_cloud_reload.second


def _events(caplog, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if getattr(r, "fields", {}).get("event") == event]  # fmt: skip


def test_a_served_export_whose_manifest_was_damaged_stays_served_until_its_folder_goes(
    second, tmp_path, caplog
):
    """Before: garbage appended to a served export's manifest.json made the next SIGHUP skip
    the folder and drop the export (`dropped_export_in_use`, its edges refused "not served
    here"), where damage to its cloud_heads.pt kept it served from memory, as the README says
    of a served export damaged on disk. It is now kept alike, and dropped once the folder is
    gone."""
    server, folder, first, second_manifest = _serving_two(second, tmp_path)
    cam = CloudClient(ClientConfig(f"127.0.0.1:{server.port}", edge_name="cam1"))
    kept = f"still serving the export loaded from it ({second_manifest.fingerprint[:16]})"
    try:
        assert _served(cam, second_manifest.fingerprint)  # cam1 checks the export it runs
        with open(folder / "b" / "manifest.json", "ab") as manifest:
            manifest.write(b"garbage")
        caplog.set_level("INFO", logger="splitdet.cloud.server")
        for _ in range(2):  # (the next reload too: the folder still holds it)
            change = server.reload()
            assert change["dropped"] == [] and len(change["problems"]) == 1, change
            problem = change["problems"][0]
            assert str(folder / "b" / "manifest.json") in problem and kept in problem, problem
            assert "skipped" not in problem, problem
            assert _served(cam, second_manifest.fingerprint)
            assert _served(cam, first.fingerprint)
        assert _events(caplog, "dropped_export_in_use") == []

        shutil.rmtree(folder / "b")  # no folder left that held it: dropped
        change = server.reload()
        assert change["dropped"] == [second_manifest.fingerprint], change
        assert not _served(cam, second_manifest.fingerprint)
    finally:
        cam.close()
        server.stop(0)


def test_a_damaged_folder_keeps_its_export_once_the_copy_that_served_it_is_gone(
    second, tmp_path, caplog
):
    """Before: `cp -r b b2` moved the export's folder to the newer copy (b reported as "the
    same export as b2"); with b's cloud_heads.pt then damaged and b2 removed, the next SIGHUP
    skipped b ("contents differ") and dropped the export, though b was still there and the
    model loaded. b now keeps it served from memory, as any served folder damaged on disk."""
    server, folder, first, second_manifest = _serving_two(second, tmp_path)
    _, second_dir, _ = second
    client = CloudClient(ClientConfig(f"127.0.0.1:{server.port}"))
    try:
        _copy(second_dir, folder / "b2", exported_at=3e9)  # newer: it serves the export now
        caplog.set_level("INFO", logger="splitdet.cloud.server")
        change = server.reload()
        assert change["problems"] == [] and change["dropped"] == [], change
        assert f"{folder / 'b'}: the same export as {folder / 'b2'}" in caplog.text

        (folder / "b" / "cloud_heads.pt").write_bytes(b"truncated")
        shutil.rmtree(folder / "b2")
        caplog.clear()
        change = server.reload()
        assert change["dropped"] == [] and len(change["problems"]) == 1, change
        problem = change["problems"][0]
        assert str(folder / "b") in problem and "differ" in problem, problem
        assert (
            f"still serving the export loaded from it ({second_manifest.fingerprint[:16]})"
            in problem
        ), problem
        assert _served(client, second_manifest.fingerprint) and _served(client, first.fingerprint)
        reloaded = _events(caplog, "reloaded")
        assert f"{second_manifest.fingerprint[:16]} ({folder / 'b'})" in reloaded[0], reloaded
    finally:
        client.close()
        server.stop(0)


def test_a_damaged_copy_does_not_take_an_export_from_its_intact_original(second, tmp_path, caplog):
    """Before: b served, a verified older copy b_copy beside it; garbage appended to b_copy's
    manifest made it the newest folder, met first at the next SIGHUP, and it took the export
    ("still serving ... from it", served from b_copy) while the intact b was called a skipped
    duplicate: an operator deleting b left the export in memory only. The damaged copy is now
    skipped and b keeps serving it."""
    server, folder, _, second_manifest = _serving_two(second, tmp_path)
    _, second_dir, _ = second
    try:
        os.utime(folder / "b" / "manifest.json", (1.6e9, 1.6e9))  # (2020: before today)
        _copy(second_dir, folder / "b_copy", exported_at=1.5e9)  # older than b: b serves
        assert server.reload()["problems"] == []
        with open(folder / "b_copy" / "manifest.json", "ab") as manifest:
            manifest.write(b"garbage")  # (now the newest manifest: met first)
        caplog.clear()
        caplog.set_level("INFO", logger="splitdet.cloud.server")
        change = server.reload()
        assert change["dropped"] == [] and len(change["problems"]) == 1, change
        problem = change["problems"][0]
        assert str(folder / "b_copy") in problem and problem.endswith("; skipped"), problem
        reloaded = _events(caplog, "reloaded")
        assert f"{second_manifest.fingerprint[:16]} ({folder / 'b'})" in reloaded[0], reloaded
        assert "the same export as" not in caplog.text
    finally:
        server.stop(0)


def test_a_model_folder_briefly_away_keeps_its_export_the_default(second, tmp_path):
    """--model a beside a --models-dir holding y and a copy of a: with a renamed away for a
    moment, a reload served a's export from the copy at the copy's place, after y, which became
    the default (the manifest answered for "", the ready file's first)."""
    from splitdet.cloud.server import CloudServer
    from splitdet.cloud.server_config import ServerConfig

    _, first_dir, first = shared_model_dir(0)
    _, second_dir, second_manifest = second
    named, folder = tmp_path / "a", tmp_path / "models"
    _copy(first_dir, named, exported_at=1e9)
    _copy(second_dir, folder / "y", exported_at=2e9)
    _copy(first_dir, folder / "acopy", exported_at=1.5e9)
    config = ServerConfig(model_dir=named, models_dir=folder, listen="127.0.0.1:0", threads=2,
                          answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    try:
        assert server.core.fingerprints == (first.fingerprint, second_manifest.fingerprint)
        named.rename(tmp_path / "a.away")
        change = server.reload()
        assert change["dropped"] == [], change
        assert server.core.fingerprints == (first.fingerprint, second_manifest.fingerprint)
        [problem] = change["problems"]
        assert f"is served from {folder / 'acopy'}" in problem, problem
    finally:
        server.stop(0)


def test_an_edge_of_an_export_dropped_served_again_and_dropped_again_is_named_again(
    second, tmp_path, caplog
):
    """Before: the first drop of an export forgot which edges had used it (`forget`), so once
    it was served again and dropped again, the `dropped_export_in_use` WARNING left out cam1,
    idle since, whose next request was then refused."""
    server, folder, _, second_manifest = _serving_two(second, tmp_path)
    cam = CloudClient(ClientConfig(f"127.0.0.1:{server.port}", edge_name="cam1"))
    dropped = second_manifest.fingerprint
    caplog.set_level("INFO", logger="splitdet.cloud.server")
    try:
        assert _served(cam, dropped)  # cam1 checks the export it runs: b
        for _ in range(2):  # b moved away (dropped), then back (served again), twice
            caplog.clear()
            (folder / "b").rename(folder / ".b")  # (dot folders are not served)
            assert server.reload()["dropped"] == [dropped]
            warned = _events(caplog, "dropped_export_in_use")
            assert len(warned) == 1 and "cam1 (" in warned[0], caplog.text
            assert str(folder / "b") in warned[0], warned
            (folder / ".b").rename(folder / "b")
            assert server.reload()["added"] == [dropped]  # cam1 idle from here on
    finally:
        cam.close()
        server.stop(0)


def test_which_edges_used_a_dropped_export_is_kept_for_the_forget_time_only():
    """Kept past a drop, the names that used an export stay bounded: a use of an export not
    served any more is forgotten `forget_edges_s` after it, one of a served export is not."""
    metrics = metrics_module.ServerMetrics(["old", "new"], forget_edges_s=0.2)
    metrics.used("cam-1", "old")
    metrics.used("cam-1", "new")
    metrics.served(["new"])
    metrics.forget(["old"])
    assert metrics.edges_using("old").keys() == {"cam-1"}  # (named if dropped again)
    time.sleep(0.3)
    metrics.forget([])  # the next reload
    assert metrics.edges_using("old") == {}
    assert metrics.edges_using("new").keys() == {"cam-1"}
