"""`splitdet loadtest` against a real cloud process: every call it counts is one the server
computed (no answer from its store), refusals it calls busy are the server's
RESOURCE_EXHAUSTED, and each simulated edge is seen under its own name."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cloud_fixtures import shared_model_dir, start_cloud_process
from PIL import Image

from splitdet.shared.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load_images")
    rng = np.random.default_rng(0)
    for k in range(3):
        pixels = rng.integers(0, 255, (240, 300, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{k}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def cloud(tmp_path_factory):
    _, model_dir, manifest = shared_model_dir()
    server = start_cloud_process(
        model_dir, tmp_path_factory.mktemp("load_cloud"), "cloud", "--max-concurrent", "1"
    )
    yield server, model_dir, manifest
    server.stop()


def test_loadtest_counts_what_the_server_computed(cloud, images, tmp_path, capsys):
    server, model_dir, manifest = cloud
    out = tmp_path / "load.json"
    code = main(
        ["loadtest", str(images), "--model", str(model_dir), "--cloud", server.address,
         "--name", "bench", "--clients", "1,3", "--seconds", "1", "--json", str(out)]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "broken.png" in captured.err  # skipped, named; the others still used
    report = json.loads(out.read_text())
    assert report["model_fingerprint"] == manifest.fingerprint
    levels = {row["clients"]: row for row in report["levels"]}
    assert set(levels) == {1, 3}
    assert all(row["answered"] > 0 and row["failed"] == {} for row in levels.values())
    assert levels[1]["busy"] == 0  # one edge never meets a second call

    metrics = server.metrics()
    answers = 'splitdet_cloud_edge_answers_total{edge="bench-load%d",fingerprint="%s"}'
    per_edge = [metrics.get(answers % (k, manifest.fingerprint), 0) for k in range(4)]
    warmups = 1 + 3  # one call per edge per level before the clock starts
    assert sum(per_edge) == levels[1]["answered"] + levels[3]["answered"] + warmups
    assert per_edge[1] > 0 and per_edge[2] > 0 and per_edge[3] == 0  # three edges, by name
    assert metrics.get("splitdet_cloud_cache_hits_total", 0) == 0  # all computed
    busy = metrics.get(
        'splitdet_cloud_failures_total{code="RESOURCE_EXHAUSTED",method="Detect"}', 0
    )
    assert busy == levels[3]["busy"]
    assert f"{levels[3]['answers_per_second']:.2f}" in captured.out
    spread = levels[3]["answered_per_edge"]
    assert spread["min"] >= 1 and spread["max"] <= levels[3]["answered"]


def test_without_queue_one_edge_takes_every_slot_and_with_it_each_gets_its_turn(images, tmp_path):
    """The case --max-queued fixes: one slot, four saturating edges. Refused edges back off
    and the edge answered last takes the freed slot; a queue serves them in turn."""
    from splitdet.bench.load import measure_level
    from splitdet.edge.client import ClientConfig, CloudClient
    from splitdet.edge.pipeline import EdgePipeline
    from splitdet.edge.runtime import EdgeRuntime
    from splitdet.shared.messages import build_request

    _, model_dir, manifest = shared_model_dir()
    pipeline = EdgePipeline(EdgeRuntime(model_dir, threads=1), gate=False)
    result = pipeline.process_file(images / "0.png")
    requests = [build_request(result.encoded, result.meta, "x", manifest.fingerprint)]
    spreads = {}
    for queued in (0, 8):
        server = start_cloud_process(
            model_dir, tmp_path / f"q{queued}", "cloud", "--max-concurrent", "1",
            "--max-queued", str(queued), "--debug-delay", "0.05",
        )  # fmt: skip
        try:
            level = measure_level(
                lambda k, port=server.port: CloudClient(ClientConfig(f"127.0.0.1:{port}")),
                requests, 4, 3.0,
            )  # fmt: skip
        finally:
            server.stop()
        spreads[queued] = sorted(level.per_edge)
    assert spreads[0][0] <= spreads[0][-1] // 4  # some edge starved beside the busiest
    assert spreads[8][0] >= spreads[8][-1] // 2  # every edge got about its share


def test_a_cloud_that_cannot_answer_is_one_line(images, tmp_path, capsys):
    _, model_dir, _ = shared_model_dir()
    other_dir = shared_model_dir(seed=1)[1]  # a cloud serving another export
    server = start_cloud_process(other_dir, tmp_path / "other", "other")
    try:
        code = main(["loadtest", str(images), "--model", str(model_dir), "--cloud",
                     server.address, "--seconds", "0.5", "--clients", "1"])  # fmt: skip
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert code == 2 and "the first call of an edge failed" in err
    assert "FAILED_PRECONDITION" in err and "Traceback" not in err


def test_no_usable_image_is_one_line(tmp_path, capsys):
    _, model_dir, _ = shared_model_dir()
    (tmp_path / "a.png").write_bytes(b"")
    code = main(["loadtest", str(tmp_path), "--model", str(model_dir), "--cloud", "127.0.0.1:1"])
    err = capsys.readouterr().err
    assert code == 2 and f"no usable image among {tmp_path}" in err and "a.png" in err


def test_the_json_records_its_settings_and_whether_every_level_ran(
    cloud, images, tmp_path, monkeypatch, capsys
):
    """The JSON held neither the options it ran with nor whether it finished: after Ctrl-C the
    levels done looked like a whole run. Now `settings` and `complete` say so."""
    import splitdet.bench.load as load

    server, model_dir, _ = cloud
    real = load.measure_level

    def stopped_at_the_second_level(make_client, requests, clients, seconds, *rest):
        if clients == 2:
            raise KeyboardInterrupt
        return real(make_client, requests, clients, seconds, *rest)

    monkeypatch.setattr(load, "measure_level", stopped_at_the_second_level)
    argv = ["loadtest", str(images), "--model", str(model_dir), "--cloud", server.address,
            "--codec", "fp16", "--distinct", "2", "--seconds", "0.5"]  # fmt: skip
    stopped, whole = tmp_path / "stopped.json", tmp_path / "whole.json"
    assert main([*argv, "--clients", "1,2", "--json", str(stopped)]) == 130
    report = json.loads(stopped.read_text())
    assert report["complete"] is False and [r["clients"] for r in report["levels"]] == [1]
    assert report["settings"] == {
        "codec": "fp16", "clients": [1, 2], "distinct": 2, "seconds": 0.5,
        "max_concurrent": None, "max_queued": None, "cloud_threads": None,
    }  # fmt: skip
    assert main([*argv, "--clients", "1", "--json", str(whole)]) == 0, capsys.readouterr().err
    assert json.loads(whole.read_text())["complete"] is True


def test_edges_that_got_no_answer_are_counted_and_named_in_the_table(images, tmp_path, capsys):
    """One slot, no queue, a call of 1 s, 0.5 s of sending, three edges: the first takes the
    slot and the other two are refused until the end. The latency was the one edge's alone,
    unsaid; now the level counts the edges without an answer and the table warns."""
    _, model_dir, _ = shared_model_dir()
    server = start_cloud_process(
        model_dir, tmp_path / "slow", "cloud", "--max-concurrent", "1", "--max-queued", "0",
        "--debug-delay", "1.0",
    )  # fmt: skip
    out = tmp_path / "load.json"
    argv = ["loadtest", str(images / "0.png"), "--model", str(model_dir), "--cloud"]
    argv += [server.address, "--clients", "3", "--seconds", "0.5", "--json", str(out)]
    try:
        code = main(argv)
    finally:
        server.stop()
    captured = capsys.readouterr()
    assert code == 0, captured.err
    (level,) = json.loads(out.read_text())["levels"]
    assert level["answered"] >= 1 and level["edges_unanswered"] == 2
    assert "2 of 3 edges got no answer: latency describes the answered calls only" in captured.out
