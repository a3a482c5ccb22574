"""`splitdet edge check` against real exports and a real server on loopback: every step passes
on a good deployment, and each kind of broken one fails at the step that names it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from cloud_fixtures import TINY_OVERRIDES, shared_model_dir, write_model_dir
from PIL import Image

from splitdet.cloud.server import CloudServer
from splitdet.cloud.server_config import ServerConfig
from splitdet.shared.cli import main

from conftest import make_tiny_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server for shared_model_dir(0)'s export."""
    _, model_dir, _ = shared_model_dir(0)
    answers = tmp_path_factory.mktemp("cloud") / "answers.sqlite"
    config = ServerConfig(model_dir=model_dir, listen="127.0.0.1:0", threads=2, answers_db=answers)
    started = CloudServer(config).start()
    yield started
    started.stop(0)


def _check(capsys, *options: str) -> tuple[int, dict[str, dict]]:
    code = main(["edge", "check", "--json", *options])
    steps = json.loads(capsys.readouterr().out)
    return code, {step["name"]: step for step in steps}


def test_a_good_deployment_passes_every_step(server, tmp_path, capsys):
    _, model_dir, manifest = shared_model_dir(0)
    image = tmp_path / "camera.png"
    Image.fromarray((np.random.default_rng(1).random((90, 120)) * 255).astype(np.uint8)).save(image)
    code, steps = _check(capsys, "--model", str(model_dir), "--image", str(image),
                         "--cloud", f"127.0.0.1:{server.port}")  # fmt: skip
    assert code == 0
    assert list(steps) == ["model", "image", "cloud", "served", "detect"]
    assert all(step["ok"] for step in steps.values()), steps
    assert manifest.fingerprint[:12] in steps["model"]["detail"]
    assert "camera.png (120x90)" in steps["image"]["detail"]
    detail = steps["detect"]["detail"]  # every box, and those predict shows by default
    found = re.match(r"(\d+) boxes \((\d+) scoring 0\.5 or more, what predict shows", detail)
    assert found and int(found[1]) >= int(found[2]) and "; round trip" in detail, detail


def test_without_a_cloud_only_the_edge_is_checked(capsys):
    _, model_dir, _ = shared_model_dir(0)
    assert main(["edge", "check", "--model", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "model"], ["ok", "image"]]
    assert "mid-grey" in lines[1]


def test_a_cloud_serving_another_export_fails_at_served(server, tmp_path, capsys):
    other = make_tiny_model(5, **TINY_OVERRIDES)
    other_dir = tmp_path / "other"
    write_model_dir(other, other_dir)
    code, steps = _check(capsys, "--model", str(other_dir), "--cloud", f"127.0.0.1:{server.port}")
    assert code == 1
    assert steps["cloud"]["ok"] and not steps["served"]["ok"]
    assert "FAILED_PRECONDITION" in steps["served"]["detail"]
    assert "detect" not in steps  # nothing to ask once the model is not served


def test_a_dead_cloud_fails_at_cloud_quickly(capsys):
    _, model_dir, _ = shared_model_dir(0)
    code, steps = _check(capsys, "--model", str(model_dir), "--cloud", "127.0.0.1:9")
    assert code == 1
    assert not steps["cloud"]["ok"] and "UNAVAILABLE" in steps["cloud"]["detail"]
    assert steps["cloud"]["seconds"] < 15 and "served" not in steps


def test_a_broken_export_and_a_bad_image_are_named(server, tmp_path, capsys):
    code, steps = _check(capsys, "--model", str(tmp_path / "missing"))
    assert code == 1 and list(steps) == ["model"]
    assert "manifest.json" in steps["model"]["detail"]

    _, model_dir, _ = shared_model_dir(0)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    code, steps = _check(capsys, "--model", str(model_dir), "--image", str(bad),
                         "--cloud", f"127.0.0.1:{server.port}")  # fmt: skip
    assert code == 1
    assert not steps["image"]["ok"] and str(bad) in steps["image"]["detail"]
    assert steps["served"]["ok"] and "detect" not in steps  # the cloud is still checked


def test_an_image_the_model_cannot_take_fails_its_step(tmp_path, capsys):
    """Too elongated for the model's input size: the image step says so, no traceback."""
    _, model_dir, _ = shared_model_dir(0)
    thin = tmp_path / "thin.png"
    Image.fromarray(np.zeros((4, 6000), np.uint8)).save(thin)
    code, steps = _check(capsys, "--model", str(model_dir), "--image", str(thin))
    assert code == 1
    assert steps["model"]["ok"] and not steps["image"]["ok"]
    assert "elongated" in steps["image"]["detail"]


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e300", "0"])
def test_a_timeout_that_is_not_one_is_refused(timeout, capsys):
    _, model_dir, _ = shared_model_dir(0)
    options = ["--model", str(model_dir), "--cloud", "127.0.0.1:9", "--timeout", timeout]
    assert main(["edge", "check", *options]) == 2
    assert "--timeout" in capsys.readouterr().err
