"""A cloud serving a folder of exports (`--models-dir`) and reloading it on SIGHUP: an export
copied in is served, one removed is dropped, a broken one is skipped by name, and no reload
leaves the server with nothing to serve. Real servers on loopback, and one real process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time

import grpc
import pytest
from cloud_fixtures import (
    TINY_OVERRIDES,
    make_sample,
    scrape_metrics,
    shared_model_dir,
    start_cloud_process,
    write_model_dir,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from splitdet.cloud import served_exports
from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.edge.client import ClientConfig, CloudClient, NeverRetry
from splitdet.shared.cli import main
from splitdet.shared.manifest import PUBLISHING_MARKER

from conftest import make_tiny_model
from support import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """(model, model_dir, manifest) of another export than shared_model_dir(0)'s."""
    model = make_tiny_model(11, **TINY_OVERRIDES)
    model_dir = tmp_path_factory.mktemp("second") / "model"
    return model, model_dir, write_model_dir(model, model_dir)


def _copy(model_dir, to, exported_at: float) -> None:
    """Copy an export, its manifest dated `exported_at` (unix s): the newest is the default."""
    shutil.copytree(model_dir, to)
    os.utime(to / "manifest.json", (exported_at, exported_at))


def _two_exports(tmp_path, first_dir, second_dir, names: tuple[str, str]):
    """tmp_path/models holding both exports under `names`, the second the newer (default)."""
    folder = tmp_path / "models"
    _copy(first_dir, folder / names[0], exported_at=1e9)
    _copy(second_dir, folder / names[1], exported_at=2e9)
    return folder


def _serving_two(second, tmp_path):
    """A started server of `--models-dir` holding shared_model_dir(0)'s export as "a" and
    `second`'s as "b": (server, the folder, the first manifest, the second manifest)."""
    _, first_dir, first = shared_model_dir(0)
    _, second_dir, second_manifest = second
    folder = _two_exports(tmp_path, first_dir, second_dir, ("a", "b"))
    config = ServerConfig(models_dir=folder, listen="127.0.0.1:0", threads=2,
                          answers_db=tmp_path / "a.sqlite")  # fmt: skip
    return CloudServer(config).start(), folder, first, second_manifest


def _served(client: CloudClient, fingerprint: str) -> bool:
    try:
        return client.manifest(fingerprint).fingerprint == fingerprint
    except NeverRetry as exc:
        assert exc.code is grpc.StatusCode.FAILED_PRECONDITION, exc
        return False


def test_reload_adds_drops_and_skips_by_name(second, tmp_path, caplog):
    _, first_dir, first = shared_model_dir(0)
    second_model, second_dir, second_manifest = second
    folder = tmp_path / "models"
    _copy(first_dir, folder / "v1", exported_at=1e9)
    config = ServerConfig(models_dir=folder, listen="127.0.0.1:0", threads=2, metrics_port=0,
                          metrics_host="127.0.0.1", answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    client = CloudClient(ClientConfig(f"127.0.0.1:{server.port}"))
    try:
        assert server.core.fingerprints == (first.fingerprint,)
        assert not _served(client, second_manifest.fingerprint)

        _copy(second_dir, folder / "v2", exported_at=2e9)
        broken = folder / "v3"
        _copy(second_dir, broken, exported_at=3e9)
        (broken / "cloud_heads.pt").write_bytes(b"truncated")
        caplog.set_level("INFO", logger="splitdet.cloud.server")
        change = server.reload()
        assert change["added"] == [second_manifest.fingerprint] and change["dropped"] == []
        assert len(change["problems"]) == 1 and "v3" in change["problems"][0]
        assert "v3" in caplog.text and "skipped" in caplog.text
        assert _served(client, first.fingerprint) and _served(client, second_manifest.fingerprint)
        sample = make_sample(second_model, seed=3, codec="int8")
        answer = client.detect(
            sample.encoded, sample.image, "after-reload", second_manifest.fingerprint
        )
        assert answer.fingerprint == second_manifest.fingerprint
        models = scrape_metrics(server.metrics_port)
        assert (
            models[f'splitdet_cloud_model{{default="false",fingerprint="{first.fingerprint}"}}']
            == 1
        )

        shutil.rmtree(folder / "v1")
        shutil.rmtree(broken)
        change = server.reload()
        assert change["dropped"] == [first.fingerprint] and change["problems"] == []
        assert not _served(client, first.fingerprint)
        with pytest.raises(NeverRetry) as refused:  # says how this server serves one again
            client.manifest(first.fingerprint)
        assert f"--models-dir {folder}" in str(refused.value) and "SIGHUP" in str(refused.value)
        assert "--model OLD" not in str(refused.value)
        assert client.manifest().fingerprint == second_manifest.fingerprint  # the new default
        metrics = scrape_metrics(server.metrics_port)
        listed = [k for k in metrics if k.startswith("splitdet_cloud_model{")]
        assert listed == [
            f'splitdet_cloud_model{{default="true",fingerprint="{second_manifest.fingerprint}"}}'
        ]

        shutil.rmtree(folder / "v2")  # nothing left: the server keeps what it serves
        change = server.reload()
        assert change["served"] == [second_manifest.fingerprint] and change["added"] == []
        assert "holds no export" in change["problems"][0]
        assert _served(client, second_manifest.fingerprint)
    finally:
        client.close()
        server.stop(0)


def test_what_cannot_be_served_in_the_folder_is_skipped_at_start_and_at_reload(
    second, tmp_path, caplog
):
    """A broken export, a folder that cannot be read and an export also named by --model: the
    server starts with what it can serve, and a reload skips the same things; only problems are
    logged as errors (one export found twice is a warning)."""
    _, first_dir, first = shared_model_dir(0)
    _, second_dir, second_manifest = second
    folder = tmp_path / "models"
    _copy(first_dir, folder / "also-named", exported_at=1e9)  # the export --model names
    write_model_dir(make_tiny_model(12, **TINY_OVERRIDES), folder / "broken")  # a third export
    (folder / "broken" / "cloud_heads.pt").write_bytes(b"truncated")
    (folder / "loop").mkdir()
    (folder / "loop" / "manifest.json").symlink_to("manifest.json")  # unreadable: ELOOP
    (folder / "nested").mkdir()  # JSON nested past the parser's depth (crashed the server)
    (folder / "nested" / "manifest.json").write_text('{"x":' + "[" * 100_000 + "]" * 100_000 + "}")
    caplog.set_level("WARNING", logger="splitdet.cloud.server")
    config = ServerConfig(model_dir=first_dir, models_dir=folder, listen="127.0.0.1:0",
                          threads=2, answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    try:
        assert server.core.fingerprints == (first.fingerprint,)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 2 and any("broken" in e for e in errors), errors
        assert any("nested" in e and "nested too deep" in e for e in errors), errors
        assert "loop" in caplog.text  # a warning: not an export it can read
        caplog.clear()
        _copy(second_dir, folder / "good", exported_at=3e9)
        change = server.reload()
        assert change["added"] == [second_manifest.fingerprint]
        assert len(change["problems"]) == 2 and any("broken" in p for p in change["problems"])
        assert "also-named" in caplog.text  # skipped with a warning, not a problem
        assert server.core.fingerprint == first.fingerprint  # --model stays the default
    finally:
        server.stop(0)


def test_a_copy_of_a_served_export_is_verified_before_it_counts(second, tmp_path, caplog):
    """Before: a broken copy of a served export (its heads cut short) was taken, unverified, as
    the export's folder, the intact one reported skipped; with the intact one removed the
    server went on as if all were well, and a restart could serve nothing."""
    _, second_dir, second_manifest = second
    folder = tmp_path / "models"
    _copy(second_dir, folder / "v2", exported_at=2e9)
    config = ServerConfig(models_dir=folder, listen="127.0.0.1:0", threads=2,
                          answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    try:
        _copy(second_dir, folder / "v2-copy", exported_at=3e9)  # newer: listed first
        heads = folder / "v2-copy" / "cloud_heads.pt"
        heads.write_bytes(heads.read_bytes()[:1000])
        caplog.set_level("WARNING", logger="splitdet.cloud.server")
        change = server.reload()
        assert change["served"] == [second_manifest.fingerprint]
        assert len(change["problems"]) == 1, change
        assert "v2-copy" in change["problems"][0] and "differ" in change["problems"][0]
        shutil.rmtree(folder / "v2")
        change = server.reload()  # only the broken copy left: a problem, still served
        assert "v2-copy" in change["problems"][0] and "differ" in change["problems"][0]

        shutil.rmtree(folder / "v2-copy")
        _copy(second_dir, folder / "v2-copy", exported_at=3e9)  # intact now
        _copy(second_dir, folder / "v2", exported_at=1e9)  # and an older intact copy
        caplog.clear()
        change = server.reload()
        assert change["problems"] == [] and change["served"] == [second_manifest.fingerprint]
        skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
        assert len(skipped) == 1, skipped
        assert "v2: the same export as" in skipped[0] and "v2-copy, which serves it" in skipped[0]
    finally:
        server.stop(0)


def test_a_reload_names_folders_counts_outcomes_and_the_edges_of_a_dropped_export(
    second, tmp_path, caplog
):
    """Before: fingerprints alone in the serving and reload lines (which one is "v1"?), no
    metric of reloads, and an export dropped while an edge still ran it went unremarked
    until that edge's next defect was refused."""
    _, first_dir, first = shared_model_dir(0)
    _, second_dir, second_manifest = second
    folder = _two_exports(tmp_path, first_dir, second_dir, ("v1", "v2"))
    config = ServerConfig(models_dir=folder, listen="127.0.0.1:0", threads=2, metrics_port=0,
                          metrics_host="127.0.0.1", answers_db=tmp_path / "a.sqlite")  # fmt: skip
    caplog.set_level("INFO", logger="splitdet.cloud.server")
    server = CloudServer(config).start()
    cam = CloudClient(ClientConfig(f"127.0.0.1:{server.port}", edge_name="cam7"))
    try:
        serving = [r.getMessage() for r in caplog.records if "serving models" in r.getMessage()]
        assert f"{first.fingerprint[:16]} ({folder / 'v1'})" in serving[0], serving
        assert f"{second_manifest.fingerprint[:16]} ({folder / 'v2'})" in serving[0], serving
        assert _served(cam, first.fingerprint)  # cam7 checks the export it runs: v1
        metrics = scrape_metrics(server.metrics_port)
        assert metrics['splitdet_cloud_reloads_total{outcome="ok"}'] == 0

        shutil.rmtree(folder / "v1")
        caplog.clear()
        server.reload()
        warned = [r for r in caplog.records if "which edges used" in r.getMessage()]
        assert len(warned) == 1 and warned[0].levelname == "WARNING", caplog.text
        message = warned[0].getMessage()
        assert first.fingerprint[:16] in message and str(folder / "v1") in message, message
        assert "cam7 (0 min ago)" in message, message
        reloaded = [r.getMessage() for r in caplog.records if "reloaded" in r.getMessage()]
        assert f"{second_manifest.fingerprint[:16]} ({folder / 'v2'})" in reloaded[0]

        (folder / "broken").mkdir()
        (folder / "broken" / "manifest.json").write_text("{")
        server.reload()
        shutil.rmtree(folder / "v2")
        shutil.rmtree(folder / "broken")
        server.reload()  # nothing left: refused
        metrics = scrape_metrics(server.metrics_port)
        for outcome, count in (("ok", 1), ("problems", 1), ("refused", 1)):
            assert metrics[f'splitdet_cloud_reloads_total{{outcome="{outcome}"}}'] == count
    finally:
        cam.close()
        server.stop(0)


def test_a_reexport_killed_in_a_served_folder_is_a_problem_its_export_still_served(
    second, tmp_path
):
    """Before: the reload skipped verifying the folder it served from, so a re-export killed
    midway (the publishing marker, one new file beside the old manifest) went unreported,
    and the next start refused the folder."""
    _, first_dir, first = shared_model_dir(0)
    _, second_dir, _ = second
    folder = tmp_path / "models"
    _copy(first_dir, folder / "v1", exported_at=1e9)
    config = ServerConfig(models_dir=folder, listen="127.0.0.1:0", threads=2,
                          answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    try:
        (folder / "v1" / PUBLISHING_MARKER).write_text("pid 1\n")  # the state a kill leaves
        shutil.copy(second_dir / "cloud_heads.pt", folder / "v1" / "cloud_heads.pt")
        change = server.reload()
        assert change["served"] == [first.fingerprint], change  # still served, from memory
        assert len(change["problems"]) == 1 and "interrupted" in change["problems"][0], change
        assert "still serving the export it held" in change["problems"][0], change
    finally:
        server.stop(0)


def test_sighup_reloads_a_running_process(second, tmp_path):
    _, first_dir, first = shared_model_dir(0)
    _, second_dir, second_manifest = second
    folder = tmp_path / "models"
    shutil.copytree(first_dir, folder / "v1")
    cloud = start_cloud_process(first_dir, tmp_path, "hup", "--models-dir", str(folder))
    client = CloudClient(ClientConfig(cloud.address))
    try:
        assert _served(client, first.fingerprint)  # --model and the folder: one export twice
        shutil.copytree(second_dir, folder / "v2")
        cloud.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not _served(client, second_manifest.fingerprint):
            assert time.monotonic() < deadline, cloud.log()
            assert cloud.process.poll() is None, cloud.log()
            time.sleep(0.2)
        ready = json.loads((tmp_path / "hup.ready.json").read_text())
        deadline = time.monotonic() + 30
        while second_manifest.fingerprint not in ready["fingerprints"]:  # rewritten after it
            assert time.monotonic() < deadline, ready
            time.sleep(0.1)
            ready = json.loads((tmp_path / "hup.ready.json").read_text())
        cloud.process.send_signal(signal.SIGTERM)
        assert cloud.process.wait(timeout=30) == 0
    finally:
        client.close()
        cloud.stop()
    assert "reloaded" in cloud.log()


def test_models_dir_refusals(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["cloud", "--listen", "127.0.0.1:0"]) == 2
    assert "--model MODEL_DIR or --models-dir DIR" in capsys.readouterr().err
    assert main(["cloud", "--models-dir", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["cloud", "--models-dir", str(empty), "--listen", "127.0.0.1:0",
                 "--answers-db", str(tmp_path / "a.sqlite")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "holds no export" in err and "Traceback" not in err


def test_a_named_export_that_cannot_be_read_at_reload_keeps_serving(second, tmp_path, caplog):
    """`--model A --model B`: a SIGHUP while B's folder is away for a moment (a copy in
    progress, a file server's hiccup) dropped B, and every edge on B was refused until the next
    SIGHUP. B now keeps the export it held; re-exported in place it is served anew."""
    _, first_dir, first = shared_model_dir(0)
    _, second_dir, second_manifest = second
    named = tmp_path / "b"
    shutil.copytree(second_dir, named)
    config = ServerConfig(model_dir=first_dir, more_model_dirs=(named,), listen="127.0.0.1:0",
                          threads=2, answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    client = CloudClient(ClientConfig(f"127.0.0.1:{server.port}"))
    try:
        named.rename(tmp_path / "b.away")
        caplog.set_level("INFO", logger="splitdet.cloud.server")
        change = server.reload()
        assert change["dropped"] == [] and len(change["problems"]) == 1
        assert (
            f"still serving the export it held ({second_manifest.fingerprint[:16]})"
            in (change["problems"][0])
        )
        assert "skipped" not in caplog.text
        assert _served(client, second_manifest.fingerprint)
        assert server.core.fingerprints == (first.fingerprint, second_manifest.fingerprint)

        (tmp_path / "b.away").rename(named)  # back, then re-exported in place: the new one
        third = make_tiny_model(12, **TINY_OVERRIDES)
        shutil.rmtree(named)
        third_manifest = write_model_dir(third, named)
        change = server.reload()
        assert change["added"] == [third_manifest.fingerprint]
        assert change["dropped"] == [second_manifest.fingerprint] and change["problems"] == []
        assert _served(client, third_manifest.fingerprint)
    finally:
        client.close()
        server.stop(0)


def test_a_call_waiting_for_a_slot_when_its_export_is_dropped_is_still_answered(second, tmp_path):
    """ "Calls in flight finish on the model they started with": a Detect admitted (its export
    served) but waiting for a slot looked its model up again once it had one, and a reload
    that dropped the export meanwhile refused it with FAILED_PRECONDITION ("not served
    here... deploy the same export on both sides"). It now holds its model from admission."""
    first_model, first_dir, first = shared_model_dir(0)
    second_model, second_dir, second_manifest = second
    folder = _two_exports(tmp_path, first_dir, second_dir, ("a", "b"))
    config = ServerConfig(models_dir=folder, listen="127.0.0.1:0", threads=4, max_concurrent=1,
                          max_queued=4, debug_delay_s=2.0, metrics_port=0,
                          metrics_host="127.0.0.1", answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    holder, queued = (make_sample(m, seed=5, codec="int8") for m in (first_model, second_model))
    answers: dict[str, object] = {}

    def send(name: str, sample, fingerprint: str) -> None:
        with CloudClient(ClientConfig(f"127.0.0.1:{server.port}", own_connection=True)) as c:
            try:
                answers[name] = c.detect(sample.encoded, sample.image, name, fingerprint)
            except Exception as exc:
                answers[name] = exc

    def gauge(name: str) -> float:
        return scrape_metrics(server.metrics_port).get(name, 0.0)

    threads = [
        threading.Thread(target=send, args=("holds", holder, first.fingerprint), daemon=True),
        threading.Thread(target=send, args=("waits", queued, second_manifest.fingerprint),
                         daemon=True),
    ]  # fmt: skip
    try:
        threads[0].start()
        wait_for(lambda: gauge("splitdet_cloud_in_flight") == 1, 30, "the first call's slot")
        threads[1].start()
        wait_for(lambda: gauge("splitdet_cloud_queued") == 1, 30, "the second call queued")
        (folder / "b").rename(folder / ".b")  # (dot folders are not served)
        assert server.reload()["dropped"] == [second_manifest.fingerprint]
        for thread in threads:
            thread.join(60)
        waited = answers["waits"]
        assert not isinstance(waited, Exception), waited
        assert waited.fingerprint == second_manifest.fingerprint
        assert len(waited.boxes) == len(queued.reference["boxes"])
    finally:
        server.stop(0)


def test_a_models_dir_that_cannot_be_listed_at_reload_is_named_as_the_cause(
    second, tmp_path, caplog
):
    """`--model A --models-dir D`, D gone at a SIGHUP: everything is kept, but the log said
    "nothing left to serve", blaming A too. It now says that D cannot be listed."""
    _, first_dir, first = shared_model_dir(0)
    _, second_dir, second_manifest = second
    folder = tmp_path / "models"
    _copy(second_dir, folder / "b", exported_at=2e9)
    config = ServerConfig(model_dir=first_dir, models_dir=folder, listen="127.0.0.1:0",
                          threads=2, answers_db=tmp_path / "a.sqlite")  # fmt: skip
    server = CloudServer(config).start()
    try:
        folder.rename(tmp_path / "models.away")
        caplog.set_level("INFO", logger="splitdet.cloud.server")
        change = server.reload()
        assert sorted(change["served"]) == sorted([first.fingerprint, second_manifest.fingerprint])
        refused = [r for r in caplog.records if getattr(r, "fields", {}).get("event") ==
                   "reload_refused"]  # fmt: skip
        assert len(refused) == 1
        message = refused[0].getMessage()
        assert f"--models-dir {folder} cannot be listed" in message
        assert "nothing left to serve" not in message
    finally:
        server.stop(0)


def test_a_served_export_whose_files_were_damaged_is_reported_at_reload(second, tmp_path, caplog):
    """An export kept as loaded at a SIGHUP was not looked at: its cloud_heads.pt truncated on
    disk, the reload said all was well, and only the next restart refused the folder. Now the
    reload reports it, and the server keeps serving the copy it loaded."""
    server, folder, first, second_manifest = _serving_two(second, tmp_path)
    client = CloudClient(ClientConfig(f"127.0.0.1:{server.port}"))
    try:
        assert server.reload()["problems"] == []  # (unchanged files: nothing to say)
        (folder / "b" / "cloud_heads.pt").write_bytes(b"truncated")
        caplog.set_level("INFO", logger="splitdet.cloud.server")
        change = server.reload()
        assert change["dropped"] == [] and len(change["problems"]) == 1
        problem = change["problems"][0]
        assert str(folder / "b") in problem and "cloud_heads.pt" in problem
        assert f"still serving the export loaded from it ({second_manifest.fingerprint[:16]})" in (
            problem
        )
        assert problem in caplog.text
        assert _served(client, second_manifest.fingerprint) and _served(client, first.fingerprint)
    finally:
        client.close()
        server.stop(0)


def test_each_served_export_has_a_health_name_that_follows_reloads(second, tmp_path):
    """A probe could not tell which exports a server serves: health had only "" and the
    service's name. Each export's fingerprint is now a health name, SERVING while served,
    unknown once a reload drops it (its watchers hear SERVICE_UNKNOWN)."""
    server, folder, first, second_manifest = _serving_two(second, tmp_path)
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    health = health_pb2_grpc.HealthStub(channel)
    status = health_pb2.HealthCheckResponse

    def check(name: str) -> int | grpc.StatusCode:
        try:
            return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
        except grpc.RpcError as exc:
            return exc.code()

    try:
        dropped = second_manifest.fingerprint
        assert check(first.fingerprint) == check(dropped) == status.SERVING
        assert check("0" * 64) is grpc.StatusCode.NOT_FOUND
        watch = health.Watch(health_pb2.HealthCheckRequest(service=dropped), timeout=60)
        assert next(watch).status == status.SERVING
        (folder / "b").rename(folder / ".b")
        assert server.reload()["dropped"] == [dropped]
        assert next(watch).status == status.SERVICE_UNKNOWN
        assert check(dropped) is grpc.StatusCode.NOT_FOUND
        assert check(first.fingerprint) == check("") == status.SERVING
        (folder / ".b").rename(folder / "b")
        assert server.reload()["added"] == [dropped]
        assert next(watch).status == status.SERVING and check(dropped) == status.SERVING
        watch.cancel()
    finally:
        channel.close()
        server.stop(0)


def test_a_reload_hashes_only_the_kept_exports_whose_files_changed(second, tmp_path, monkeypatch):
    """Checking every kept export's files in full made each SIGHUP as slow as hashing all of
    them (0.2 s for six exports of 60 MB, more on network storage); the files' sizes and
    times decide now which are hashed again."""
    server, folder, _, _ = _serving_two(second, tmp_path)
    hashed: list = []
    real = served_exports._damage
    monkeypatch.setattr(served_exports, "_damage", lambda d: hashed.append(d) or real(d))
    try:
        assert server.reload()["problems"] == [] and hashed == []
        heads = folder / "b" / "cloud_heads.pt"
        os.utime(heads, ns=(heads.stat().st_atime_ns, heads.stat().st_mtime_ns + 10**9))
        assert server.reload()["problems"] == [] and hashed == [folder / "b"]
        assert server.reload()["problems"] == [] and hashed == [folder / "b"]  # (recorded)
        # bytes changed in place, the times put back (`touch -r`, a restore): the ctime shows
        before = heads.stat()
        with open(heads, "r+b") as file:
            file.seek(before.st_size // 2)
            file.write(b"\0" * 64)
        os.utime(heads, ns=(before.st_atime_ns, before.st_mtime_ns))
        change = server.reload()
        assert hashed == [folder / "b"] * 2 and len(change["problems"]) == 1, change
    finally:
        server.stop(0)


def test_a_checkpoint_given_as_an_export_is_named_as_such(tmp_path, capsys):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"a checkpoint, not an export folder")
    assert main(["cloud", "--model", str(checkpoint), "--listen", "127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint}: a file, not the folder `splitdet export` makes" in err
    assert f"splitdet export --checkpoint {checkpoint} --out DIR" in err
