"""The edge checks every answer of the cloud before anything of it is stored.

A security review ran the edge against a fake cloud (a plain gRPC server speaking
splitdet.v1.Detection and grpc health) and the edge stored whatever it answered: another
request's id or model, NaN and infinite corners, label 99 of a one-class model (which `edge
collect` wrote as training data), a 1000-character class name, 3,000,000 boxes (87 MB: 1.7 GB of
edge memory, a 147 MB row); `edge results --json` then printed NaN, which strict JSON parsers
refuse. Such an answer is now BadAnswer (a NeverRetry naming what is wrong), the request a dead
letter kept for `edge requeue`; an answer is received only up to MAX_ANSWER_BYTES.

The fake cloud here is that review's: a small gRPC server on loopback built from the generated
modules, answering GetManifest with the real manifest of the session's tiny export (so its
answers are checked by that model's rules: 1 class, box_detections_per_img 50) and Detect with
whatever the test sets.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from concurrent import futures
from contextlib import closing
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from PIL import Image

from splitdet.edge.client import (
    MAX_ANSWER_BYTES,
    AnswerRules,
    BadAnswer,
    ClientConfig,
    CloudClient,
    NeverRetry,
    forget_rules,
)
from splitdet.shared.cli import main
from splitdet.shared.manifest import MANIFEST_NAME, read_manifest
from splitdet.shared.wire import detection_pb2 as pb
from splitdet.shared.wire import detection_pb2_grpc as pb_grpc

pytestmark = pytest.mark.timeout(180)

#: The request's original image (h, w) in the client tests.
ORIGINAL_HW = (240, 300)


def good_answer(request: pb.DetectRequest) -> pb.DetectResponse:
    """What a splitdet cloud of the tiny export could answer: two boxes in the image, one with
    a corner a float32 step past its edge (the cloud's float32 scaling does that)."""
    h, w = request.image.original_height, request.image.original_width
    return pb.DetectResponse(
        request_id=request.request_id,
        model_fingerprint=request.model_fingerprint,
        boxes=[
            pb.Box(x1=1, y1=2, x2=w / 2, y2=h / 2, score=0.9, label=1, class_name="scratch"),
            pb.Box(x1=0, y1=0, x2=w + 3e-5, y2=h, score=0.06, label=1, class_name="scratch"),
        ],
        timings=pb.ServerTimings(decode_s=0.001, rpn_s=0.002, roi_s=0.003, total_s=0.007),
    )


def spoiled(**changes) -> Callable[[pb.DetectRequest], pb.DetectResponse]:
    """good_answer with fields of the answer (request_id, model_fingerprint), of its first
    box (box_x1, box_label, ...) or of its timings (timings_total_s, ...) changed."""

    def answer(request: pb.DetectRequest) -> pb.DetectResponse:
        response = good_answer(request)
        for name, value in changes.items():
            if name.startswith("box_"):
                setattr(response.boxes[0], name.removeprefix("box_"), value)
            elif name.startswith("timings_"):
                setattr(response.timings, name.removeprefix("timings_"), value)
            else:
                setattr(response, name, value)
        return response

    return answer


def many_boxes(n: int) -> Callable[[pb.DetectRequest], pb.DetectResponse]:
    """good_answer's first box n times (parsed from bytes: 3,000,000 Box objects one by one
    take a while)."""

    def answer(request: pb.DetectRequest) -> pb.DetectResponse:
        box = pb.DetectResponse(boxes=[good_answer(request).boxes[0]]).SerializeToString()
        response = pb.DetectResponse.FromString(box * n)
        response.request_id = request.request_id
        response.model_fingerprint = request.model_fingerprint
        return response

    return answer


class FakeCloud(pb_grpc.DetectionServicer):
    """A gRPC server on loopback that answers Detect with `self.answer(request)` and
    GetManifest with `self.manifest_json` (the real export's unless changed), SERVING health."""

    def __init__(self, model_dir: Path) -> None:
        self.manifest_json = (model_dir / MANIFEST_NAME).read_text()
        self.fingerprint = json.loads(self.manifest_json)["fingerprint"]
        self.answer: Callable[[pb.DetectRequest], pb.DetectResponse] = good_answer
        self.detect_calls = 0
        self.calls: list[str] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_DetectionServicer_to_server(self, self.server)
        checker = health.HealthServicer()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"
        self.server.start()

    def Detect(self, request: pb.DetectRequest, context) -> pb.DetectResponse:
        self.detect_calls += 1
        self.calls.append("Detect")
        return self.answer(request)

    def GetManifest(self, request: pb.GetManifestRequest, context) -> pb.ManifestResponse:
        self.calls.append("GetManifest")
        return pb.ManifestResponse(
            model_fingerprint=request.model_fingerprint or self.fingerprint,
            manifest_json=self.manifest_json,
            served_fingerprints=[self.fingerprint],
        )

    def stop(self) -> None:
        self.server.stop(grace=None)


@pytest.fixture
def cloud(tiny_model_dir):
    forget_rules()  # (kept per process: each test's fake cloud is asked afresh)
    fake = FakeCloud(tiny_model_dir)
    yield fake
    fake.stop()


@pytest.fixture
def client(cloud):
    with CloudClient(ClientConfig(cloud.address, timeout_s=30)) as made:
        yield made


def request_to(cloud: FakeCloud, request_id: str = "req-1") -> pb.DetectRequest:
    """A Detect request of the tiny export (no features: the fake cloud reads none)."""
    h, w = ORIGINAL_HW
    return pb.DetectRequest(
        request_id=request_id,
        model_fingerprint=cloud.fingerprint,
        image=pb.ImageMeta(original_height=h, original_width=w, resized_height=224,
                           resized_width=280),
    )  # fmt: skip


# ------------------------------------------------------------------------ the client's checks


def test_a_good_answer_is_taken_its_rounding_clamped_onto_the_image(cloud, client):
    """The checks are not too strict: a splitdet cloud's answer passes, a corner a float32
    step past the image's edge is clamped onto it, the rest is as sent."""
    answer = client.send_request(request_to(cloud))
    h, w = ORIGINAL_HW
    assert answer.request_id == "req-1" and answer.fingerprint == cloud.fingerprint
    np.testing.assert_array_equal(answer.boxes, np.array([[1, 2, w / 2, h / 2], [0, 0, w, h]]))
    assert answer.boxes.dtype == np.float32
    np.testing.assert_allclose(answer.scores, [0.9, 0.06], rtol=1e-6)
    assert answer.labels.tolist() == [1, 1] and answer.class_names == ("scratch", "scratch")
    assert answer.timings["total_s"] == pytest.approx(0.007)


def test_no_call_is_added_and_a_manifest_read_for_its_own_sake_gives_the_rules(cloud, client):
    """Answers are checked without asking the cloud anything more (a lookup that failed would
    hold or lose an answer the cloud gave: a review); a manifest the process read anyway (a
    start-up check, `predict`'s) and that hashes to the fingerprint gives the model's rules."""
    for k in range(3):
        client.send_request(request_to(cloud, f"req-{k}"))
    assert cloud.calls == ["Detect", "Detect", "Detect"]
    client.manifest(cloud.fingerprint)
    cloud.answer = spoiled(box_label=2)
    with pytest.raises(BadAnswer, match=r"holds label 2, beyond the model's 1 class\(es\)"):
        client.send_request(request_to(cloud, "req-3"))


def test_without_the_models_rules_an_answer_keeps_the_bounds_of_every_answer(cloud, client):
    """A request of an earlier export whose manifest this process never read: its labels and
    class names cannot be matched, but a label from 1, a class name of 1 to 256 characters and
    at most 1000 boxes are asked of every answer."""
    cloud.answer = spoiled(box_label=2, box_class_name="dent")  # another model's classes
    assert client.send_request(request_to(cloud)).labels.tolist()[0] == 2
    for answer, message in (
        (spoiled(box_class_name="x" * 1000), r"names label 1 'x{40}'… \(1000 characters\)"),
        (spoiled(box_class_name=""), r"names label 1 '' \(box 1 of 2\), not a class name"),
        (spoiled(box_label=0), r"label 0 \(box 1 of 2\), not a class index"),
        (many_boxes(1001), r"holds 1001 boxes, beyond the 1000 any answer may hold"),
    ):
        cloud.answer = answer
        with pytest.raises(BadAnswer, match=message):
            client.send_request(request_to(cloud))


def test_rules_from_the_edges_own_manifest_spare_the_manifest_call(cloud, client, tiny_model_dir):
    """`CloudClient.expect` with the rules of the export the edge runs (read and verified from
    its model directory): no GetManifest call, and the answers are checked all the same."""
    client.expect(AnswerRules.from_manifest(read_manifest(tiny_model_dir)))
    client.send_request(request_to(cloud))
    cloud.answer = spoiled(box_label=2)
    with pytest.raises(BadAnswer, match=r"holds label 2, beyond the model's 1 class\(es\)"):
        client.send_request(request_to(cloud))
    assert cloud.calls == ["Detect", "Detect"]


def test_an_answer_without_boxes_is_taken(cloud, client):
    cloud.answer = lambda request: pb.DetectResponse(
        request_id=request.request_id, model_fingerprint=request.model_fingerprint
    )
    answer = client.send_request(request_to(cloud))
    assert answer.boxes.shape == (0, 4) and answer.labels.tolist() == []


HOSTILE = {
    "another request's id": (spoiled(request_id="req-2"), r"is for request_id 'req-2', not "
                             r"this request's 'req-1'"),
    "another model": (spoiled(model_fingerprint="f" * 64),
                      r"comes from model 'ffffffffffffffff…', not this request's"),
    "a NaN corner": (spoiled(box_x1=float("nan")), r"non-finite corner or score \(box 1 of 2"),
    "an infinite corner": (spoiled(box_y2=float("inf")), r"non-finite corner"),
    "a -infinite corner": (spoiled(box_x1=float("-inf")), r"non-finite corner"),
    "a NaN score": (spoiled(box_score=float("nan")), r"non-finite corner or score"),
    "a score past 1": (spoiled(box_score=1.5), r"score 1.5 \(box 1 of 2\), outside \[0, 1\]"),
    "a negative score": (spoiled(box_score=-0.1), r"score -0.1 .*outside \[0, 1\]"),
    "label 99": (spoiled(box_label=99), r"holds label 99, beyond the model's 1 class\(es\)"),
    "label 0": (spoiled(box_label=0), r"label 0 \(box 1 of 2\), not a class index"),
    "a negative label": (spoiled(box_label=-5), r"label -5 .*not a class index"),
    "a 1000-character class name": (spoiled(box_class_name="x" * 1000),
                                    r"names label 1 'x{40}'… \(1000 characters\) \(box 1 of 2\),"
                                    r" not the model's 'scratch'"),
    "another class name": (spoiled(box_class_name="dent"), r"names label 1 'dent'"),
    "an empty class name": (spoiled(box_class_name=""), r"names label 1 ''"),
    "a box outside the image": (spoiled(box_x2=5000.0),
                                r"box 1 of 2 \(1, 2, 5000, 120\) outside the 300x240 px image"),
    "a box left of the image": (spoiled(box_x1=-3.0), r"outside the 300x240 px image"),
    "an inverted box": (spoiled(box_x1=200.0), r"box 1 of 2 \(200, 2, 150, 120\) that is empty "
                        r"or inverted"),
    "51 boxes of a 50-box model": (many_boxes(51), r"holds 51 boxes, beyond the model's "
                                   r"box_detections_per_img \(50\)"),
    "a NaN timing": (spoiled(timings_total_s=float("nan")), r"holds timing total_s = nan"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_answer_is_refused_naming_the_problem(cloud, client, case, tiny_model_dir):
    client.expect(AnswerRules.from_manifest(read_manifest(tiny_model_dir)))  # as the daemon
    cloud.answer, message = HOSTILE[case]
    with pytest.raises(BadAnswer, match=message) as refused:
        client.send_request(request_to(cloud))
    assert isinstance(refused.value, NeverRetry) and not refused.value.retry
    assert refused.value.code is grpc.StatusCode.INTERNAL
    assert refused.value.message.startswith("the cloud's answer ")


def test_three_million_boxes_are_refused_by_the_receive_bound_naming_the_answer(cloud, client):
    """The review's 3,000,000 boxes (here 114 MB): gRPC refuses the answer past
    MAX_ANSWER_BYTES (it never reaches Python objects), and the message is about the cloud's
    answer, not the edge's request (no "use a smaller codec", no "larger than max" that the
    README reads as the edge's)."""
    cloud.answer = many_boxes(3_000_000)
    with pytest.raises(BadAnswer) as refused:
        client.send_request(request_to(cloud))
    error = refused.value
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED and not error.retry
    assert error.message.startswith("the cloud's answer of ")
    assert f"is larger than this edge takes ({MAX_ANSWER_BYTES} bytes" in error.message
    assert "codec" not in error.message and "larger than max" not in error.message


def test_the_receive_bound_fits_a_real_answer_and_a_manifest():
    config = ClientConfig("127.0.0.1:1")
    assert 4 << 20 <= config.receive_bytes == MAX_ANSWER_BYTES < config.max_message_bytes
    assert ClientConfig("127.0.0.1:1", max_message_bytes=7).receive_bytes == 7


def test_a_manifest_that_is_not_the_models_cannot_vouch_for_an_answer(
    cloud, client, tiny_model_dir
):
    """A cloud that lies about the model's classes in its manifest as well: the manifest's
    contents no longer hash to the fingerprint, so label 99 is still refused."""
    data = json.loads(cloud.manifest_json)
    data["model_config"]["class_names"] = [f"c{k}" for k in range(100)]
    data["class_names"] = data["model_config"]["class_names"]
    cloud.manifest_json = json.dumps(data)
    client.manifest(cloud.fingerprint)  # read, not believed: its contents hash elsewhere
    cloud.answer = spoiled(box_label=99, box_class_name="c" * 300)
    with pytest.raises(BadAnswer, match=r"not a class name \(1 to 256 characters\)"):
        client.send_request(request_to(cloud))
    client.expect(AnswerRules.from_manifest(read_manifest(tiny_model_dir)))
    client.manifest(cloud.fingerprint)  # nor does it replace the rules the edge holds
    cloud.answer = spoiled(box_label=99, box_class_name="c98")
    with pytest.raises(BadAnswer, match=r"holds label 99, beyond the model's 1 class\(es\)"):
        client.send_request(request_to(cloud))


def test_a_manifest_nested_too_deep_is_a_bad_manifest_not_a_crash(cloud, client):
    """json.loads raises RecursionError (not ValueError) past its nesting limit: before the
    catch it escaped `CloudClient.manifest` as an unexpected error."""
    cloud.manifest_json = '{"x":' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(NeverRetry, match=r"server sent a bad manifest") as refused:
        client.manifest(cloud.fingerprint)
    assert refused.value.code is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("sent", ["[1, 2]", "7", '"text"', "null"])
def test_a_manifest_that_is_json_but_no_object_is_a_bad_manifest(cloud, client, sent):
    """Any JSON passed: a list or a number came back as the manifest's data, which its
    readers (`ServedManifest.class_names`) would fail on."""
    cloud.manifest_json = sent
    with pytest.raises(NeverRetry, match=r"server sent a bad manifest: a JSON \w+, not an"):
        client.manifest(cloud.fingerprint)


# ------------------------------------------------------------------------ `edge run`, end to end


def _edge(*args: str | Path) -> int:
    return main([str(a) for a in args])


def _image_rows(db: Path) -> list[dict]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        con.row_factory = sqlite3.Row
        return [dict(row) for row in con.execute("SELECT * FROM images ORDER BY id")]


def _strict_json(text: str):
    """json.loads refusing NaN and Infinity, as strict parsers do."""

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_edge_run_dead_letters_a_nan_answer_then_requeue_delivers_it(
    cloud, tiny_model_dir, tmp_path, capsys, caplog
):
    """`edge run --once` against a cloud answering NaN corners: the image ends a dead letter
    with the reason, the store holds no NaN, the run exits 0 (nothing pending: a dead letter is
    final until requeued). Nothing is lost: `edge status` counts the kept request, and once
    the cloud answers properly `edge requeue` and another run deliver it."""
    watch, db = tmp_path / "hot", tmp_path / "edge.sqlite"
    watch.mkdir()
    pixels = np.random.default_rng(3).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(watch / "a.png")
    run = ("edge", "run", "--model", tiny_model_dir, "--watch", watch, "--db", db,
           "--cloud", cloud.address, "--once", "--settle", "0", "--poll", "0.05",
           "--threshold", "0", "--threads", "1", "--retry-initial", "0.1", "--retry-max", "0.5",
           "--log-format", "text")  # fmt: skip
    cloud.answer = spoiled(box_x1=float("nan"), box_y2=float("inf"))

    assert _edge(*run) == 0
    [row] = _image_rows(db)
    assert (row["verdict"], row["error_kind"]) == ("error", "dead_letter"), row
    assert row["reason"].startswith("dead letter: refused the cloud's answer, stored nothing: "
                                    "INTERNAL: the cloud's answer holds a box with a non-finite "
                                    "corner or score (box 1 of 2: (nan, 2, 40, inf)")  # fmt: skip
    assert row["boxes"] is None and row["scores"] is None
    [dead] = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event")
              == "dead_letter"]  # fmt: skip
    assert dead["code"] == "INTERNAL" and dead["reason"] == row["reason"]
    assert cloud.detect_calls == 1  # not retried

    assert _edge("edge", "results", "--db", db, "--json") == 0
    [result] = _strict_json(capsys.readouterr().out)
    assert result["verdict"] == "error" and "non-finite" in result["reason"]
    assert _edge("edge", "status", "--db", db, "--json") == 0
    assert _strict_json(capsys.readouterr().out)["dead_letters"]["kept"] == 1

    cloud.answer = good_answer  # the cloud fixed
    assert _edge("edge", "requeue", "--db", db) == 0
    assert "requeued 1 dead letter(s)" in capsys.readouterr().out
    assert _edge(*run) == 0
    [row] = _image_rows(db)
    assert row["verdict"] == "defect", row
    assert json.loads(row["boxes"]) == [[1.0, 2.0, 40.0, 32.0], [0.0, 0.0, 80.0, 64.0]]
    assert json.loads(row["labels"]) == [1, 1]
    assert cloud.detect_calls == 2
    assert _edge("edge", "status", "--db", db, "--json") == 0
    assert _strict_json(capsys.readouterr().out)["dead_letters"]["kept"] == 0


def test_a_call_the_cloud_cancels_is_retried_not_a_dead_letter(tiny_model_dir):
    """A network review: a cloud stopping while a slow edge still uploaded its request cut the
    call with CANCELLED, which the client called NeverRetry: the sender made the request a
    dead letter, kept from the cloud until someone ran `edge requeue`. The request is not at
    fault: retried later."""
    from splitdet.edge.client import RetryLater

    class Cancelling(FakeCloud):
        def Detect(self, request, context):
            context.abort(grpc.StatusCode.CANCELLED, "Cancelling all calls")

    forget_rules()
    fake = Cancelling(tiny_model_dir)
    try:
        with (
            CloudClient(ClientConfig(fake.address, timeout_s=30)) as client,
            pytest.raises(RetryLater) as failed,
        ):
            client.send_request(request_to(fake))
        assert failed.value.code is grpc.StatusCode.CANCELLED
    finally:
        fake.stop()
