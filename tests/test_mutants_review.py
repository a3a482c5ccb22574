"""A mutation audit's survivors, each killed by a test of the behaviour its docstring promises.

Each of these one-line changes (a clamp dropped, `int` made `round`, `>=` made `>`, a bound
halved, a field left out of a digest, an error code moved to the dead letters...) left the whole
suite green, and each reads like a bug someone could write: every test here names its mutant and
fails under it. Real files, real SQLite, real numpy and torchvision, a real gRPC server on
loopback; nothing of ours is mocked.
"""

from __future__ import annotations

import io
import time
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from splitdet.cloud.core import DetectCall, InvalidRequest, request_digest
from splitdet.cloud.idempotency import IdempotencyStore, StoredAnswer
from splitdet.cloud.request_wire import MAX_PARAM_VALUES, check_request_wire
from splitdet.edge.client import ClientConfig, CloudClient
from splitdet.edge.preprocess import (
    UNWRITTEN_TAIL_BYTES,
    ImageError,
    decode_image,
    load_image,
    prepare,
    resized_size,
)
from splitdet.edge.sender import Backoff, Sender
from splitdet.edge.store import Answer, Arrival, ResultStore
from splitdet.shared import codec
from splitdet.shared.codec import CodecError, decode, encode
from splitdet.shared.config import IMAGENET_MEAN, IMAGENET_STD
from splitdet.shared.detection import ImageMeta
from splitdet.shared.spec import SplitSpec
from splitdet.shared.wire import detection_pb2 as pb
from splitdet.shared.wire import detection_pb2_grpc as pb_grpc
from splitdet.training import voc
from splitdet.training.evaluate import Prediction
from splitdet.training.evaluate_coco import gated_coco_metrics
from splitdet.training.voc import VocError, VocObject, VocSample

#: The tiny models' input sizes (conftest's TINY_CONFIG).
MIN_SIZE, MAX_SIZE = 224, 320
FINGERPRINT = "f" * 64


def _transform() -> GeneralizedRCNNTransform:
    """torchvision's own eval-mode transform, as FasterRCNN builds it for the tiny models."""
    return GeneralizedRCNNTransform(
        MIN_SIZE, MAX_SIZE, list(IMAGENET_MEAN), list(IMAGENET_STD)
    ).eval()


def _arrival(n: int) -> Arrival:
    name = f"img{n}.png"
    return Arrival(f"/hot/{name}", f"{name}|100|{n}|{n}", f"{n:064x}", 100, time.time())


def _answer() -> Answer:
    return Answer(
        boxes=[[1.0, 2.0, 3.0, 4.0]], scores=[0.9], labels=[1], class_names=["scratch"],
        timings={"round_trip": 0.01},
    )  # fmt: skip


def _pending(store: ResultStore, n: int, fingerprint: str = FINGERPRINT) -> int:
    """Record one flagged image (its outbox request a parseable DetectRequest); its id."""
    payload = pb.DetectRequest(request_id=f"req-{n}", model_fingerprint=fingerprint)
    image_id, _, _ = store.record_pending(
        _arrival(n), 0.9, f"req-{n}", payload.SerializeToString(), fingerprint, {}
    )
    return image_id


@pytest.fixture
def store(tmp_path):
    made = ResultStore(tmp_path / "edge.sqlite")
    yield made
    made.close()


# ------------------------------------------------------------------------ edge preprocessing


def test_an_enlarged_image_is_resized_as_torchvision_resizes_it():
    """Mutant: `_bilinear_axis` without its clamp of the source position at 0. An image
    smaller than min_size is enlarged, and the first output pixels then map to a source
    position below 0: torch clamps it (reads pixel 0), unclamped it floors to index -1 and
    blends in the opposite edge's pixels. The tested sizes (300x410 and up) only ever shrink."""
    image = np.random.default_rng(3).random((3, 100, 150), dtype=np.float32)
    ours = prepare(image, MIN_SIZE, MAX_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    with torch.inference_mode():
        reference, _ = _transform()([torch.from_numpy(image)])
    assert ours.resized_hw == tuple(reference.image_sizes[0]) == (213, 320)  # enlarged
    assert ours.batch.shape == tuple(reference.tensors.shape)
    np.testing.assert_allclose(ours.batch, reference.tensors.numpy(), rtol=0, atol=2e-6)


def test_the_resized_size_is_truncated_as_torch_truncates_it():
    """Mutant: `resized_size` rounding instead of truncating. 201x298 at 224/320 scales by
    320/298: its height 215.8 px, which torch truncates to 215 (round would give 216, and the
    cloud would read the boxes on another frame than the edge's features)."""
    image = np.zeros((3, 201, 298), dtype=np.float32)
    with torch.inference_mode():
        reference, _ = _transform()([torch.from_numpy(image)])
    assert resized_size(201, 298, MIN_SIZE, MAX_SIZE) == tuple(reference.image_sizes[0])
    assert resized_size(201, 298, MIN_SIZE, MAX_SIZE) == (215, 320)


def test_a_negative_32_bit_pixel_is_refused_naming_the_file(tmp_path):
    """Mutant: `_check_wide_range` checking only the top of the range. The module docstring
    says a pixel below 0 is refused (the model was not made for it); a signed 32-bit TIFF
    holding -5 beside in-range values was read as if -5 / 65535 were a pixel."""
    values = np.array([[0, 100, 30000], [-5, 7, 65535]], dtype=np.int32)
    path = tmp_path / "signed.tif"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I"  # what the edge is given: signed 32-bit integers
    with pytest.raises(ImageError) as refused:
        load_image(path)
    message = str(refused.value)
    assert str(path) in message and "outside 0..65535" in message and "-5" in message
    within = tmp_path / "within.tif"
    Image.fromarray(np.abs(values)).save(within)
    assert load_image(within).max() == pytest.approx(1.0)  # the same file without it is read


def _png_cut_short() -> bytes:
    """A PNG cut before its IEND chunk, at a byte that is not zero (so that the zeros added
    after it are all the zeros it ends in)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
        buffer, "PNG"
    )
    data = buffer.getvalue()
    cut = len(data) - 40
    while data[cut - 1] == 0:
        cut -= 1
    return data[:cut]


def test_a_png_ending_in_exactly_the_bound_of_zeros_is_not_all_written():
    """Mutant: `_unwritten_tail` taking `tail <= UNWRITTEN_TAIL_BYTES` as too few zeros. The
    bound is "at least this many zero bytes" (preprocess.UNWRITTEN_TAIL_BYTES): a PNG whose
    chunks do not reach IEND before exactly that many zeros is a file not all written yet,
    refused as such (the hot folder waits for it), not decoded with a grey or black part."""
    start = _png_cut_short()
    with pytest.raises(ImageError, match="not all written yet") as refused:
        decode_image(start + b"\0" * UNWRITTEN_TAIL_BYTES, "cam/part.png")
    assert f"last {UNWRITTEN_TAIL_BYTES} of" in str(refused.value)
    # one zero fewer is not the sign: whatever Pillow makes of it, not that refusal
    try:
        decode_image(start + b"\0" * (UNWRITTEN_TAIL_BYTES - 1), "cam/part.png")
    except ImageError as exc:
        assert "not all written" not in str(exc)


# ------------------------------------------------------------------------ the edge's store


def test_a_retry_within_the_backoff_cap_is_not_made_due_by_the_clock_step_check(store):
    """Mutant: `_due_after_clock_step`'s limit without max_wait_s (now + 1 s). Only a next_try
    further ahead than the sender's backoff cap can predate a backward clock step; one 20 s
    ahead with a 30 s cap is an ordinary retry and must wait, while one a day ahead is due."""
    near, far = _pending(store, 1), _pending(store, 2)
    now = time.time()
    store.retry_later(near, now + 20, "UNAVAILABLE: down")
    store.retry_later(far, now + 86_400, "UNAVAILABLE: down")
    item = store.next_due(now, max_wait_s=30)
    assert item is not None and item.image_id == far  # the clock stepped back a day
    assert store.complete(far, _answer())
    assert store.next_due(now, max_wait_s=30) is None  # the near one still waits
    assert store.next_try_at() == pytest.approx(now + 20)


def test_a_request_answered_at_its_first_try_counts_one_attempt(store):
    """Mutant: `complete` not counting its attempt. `edge results` shows how many calls a
    result took: one answered at once took 1, not 0 (a retried one counts each failure
    and its answer)."""
    image_id = _pending(store, 1)
    assert store.complete(image_id, _answer())
    [row] = store.results()
    assert row["verdict"] == "defect" and row["attempts"] == 1


def test_holding_an_export_never_brings_a_later_retry_forward(store):
    """Mutant: `hold_export` setting next_try to the hold's end whatever it was. Its docstring:
    a later next_try is kept; a request already scheduled past the hold must not be sent
    earlier because its export was held (and one due sooner is pushed to the hold's end)."""
    late, soon = _pending(store, 1), _pending(store, 2)
    now = time.time()
    store.retry_later(late, now + 100, "UNAVAILABLE: down")
    assert store.hold_export(FINGERPRINT, now + 10, "FAILED_PRECONDITION: not served") == 2
    assert store.next_due(now + 50).image_id == soon  # held to now + 10 only
    assert store.complete(soon, _answer())
    assert store.next_due(now + 50) is None  # the later retry kept its time
    assert store.next_try_at() == pytest.approx(now + 100)


# ------------------------------------------------------------------------ training


def test_a_box_of_zero_width_is_refused_naming_the_file(tmp_path):
    """Mutant: the empty-box check `x2 < x1` instead of `x2 <= x1`. VOC's 1-based xmin=10,
    xmax=9 is x1 = x2 = 9 in 0-based continuous px: a box of no width, which must be refused
    as empty (naming the annotation), not trained on."""
    Image.new("RGB", (64, 48), (90, 90, 90)).save(_made(tmp_path / "JPEGImages") / "z.jpg")
    (_made(tmp_path / "Annotations") / "z.xml").write_text(
        "<annotation><filename>z.jpg</filename><size><width>64</width><height>48</height>"
        "<depth>3</depth></size><object><name>scratch</name><difficult>0</difficult><bndbox>"
        "<xmin>10</xmin><ymin>2</ymin><xmax>9</xmax><ymax>10</ymax></bndbox></object>"
        "</annotation>"
    )
    voc.write_split(tmp_path, "s", ["z"])
    with pytest.raises(VocError, match="empty") as refused:
        voc.read_split(tmp_path, "s")
    assert "z.xml" in str(refused.value)


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_a_prediction_exactly_at_the_threshold_keeps_its_boxes_in_the_gated_map():
    """Mutant: `gated_coco_metrics` keeping boxes only above the threshold. The edge flags an
    image whose p_defect >= threshold (README: "p ≥ threshold" goes to the cloud), so the gated
    mAP must count the boxes of an image exactly at it, as the deployed system finds them."""
    samples = [VocSample("a", Path("a.jpg"), 200, 160, (VocObject("scratch", (10, 10, 50, 50)),))]
    hit = Prediction(
        torch.tensor([[10.0, 10.0, 50.0, 50.0]]), torch.tensor([0.9]), torch.tensor([1]), 0.5
    )

    def map50(threshold: float) -> float:
        return gated_coco_metrics(samples, [hit], ["scratch"], threshold)["map50"]

    assert map50(0.5) == pytest.approx(1.0)  # p == threshold: flagged, its box found
    assert map50(0.51) == 0.0  # under it: not flagged, nothing found


# ------------------------------------------------------------------------ codec and cloud


def test_the_decoded_bound_counts_float32_bytes_of_int8_tensors():
    """Mutant: `decode` counting the stored bytes (1 per int8 value) against max_total_bytes.
    The bound is on the float32 arrays decoding makes (its docstring), 4 bytes a value: int8
    tensors whose float32 size passes it by one byte must be refused even though their int8
    bytes are a quarter of it."""
    spec, padded = SplitSpec(fpn_channels=8), (64, 96)
    shapes = codec.expected_level_shapes(spec, padded)
    rng = np.random.default_rng(0)
    levels = {n: rng.random(s, dtype=np.float32) for n, s in shapes.items()}
    encoded = encode(levels, "int8")
    floats = sum(int(np.prod(s)) * 4 for s in shapes.values())
    assert decode(encoded, shapes, max_total_bytes=floats).keys() == shapes.keys()
    with pytest.raises(CodecError, match="total decoded size"):
        decode(encoded, shapes, max_total_bytes=floats - 1)


def _with_params(field: str, count: int) -> bytes:
    tensor = pb.EncodedTensor(name="0", codec="int8", dtype="uint8", **{field: [0.5] * count})
    request = pb.DetectRequest(request_id="req-1", model_fingerprint=FINGERPRINT, tensors=[tensor])
    return request.SerializeToString()


@pytest.mark.parametrize("field", ["scale", "zero_point"])
def test_one_packed_parameter_past_the_bound_is_refused_before_parsing(field):
    """Mutant: `check_request_wire` counting 16 bytes per packed double (half the values). A
    tensor's scale or zero_point holding MAX_PARAM_VALUES + 1 doubles must be refused on the
    wire walk, before protobuf parses them; MAX_PARAM_VALUES pass that bound."""
    assert check_request_wire(_with_params(field, MAX_PARAM_VALUES)) == ("req-1", FINGERPRINT)
    with pytest.raises(InvalidRequest, match=f"{field} has more than {MAX_PARAM_VALUES} values"):
        check_request_wire(_with_params(field, MAX_PARAM_VALUES + 1))


def test_the_request_digest_covers_the_resized_size():
    """Mutant: `request_digest` without resized_hw. The resized size decides where the boxes
    land in the original image, so it decides the answer: the same request id and tensors with
    another resized size is another request, whose stored answer must not be given back."""
    tensors = encode({"0": np.ones((8, 16, 16), dtype=np.float32)}, "int8")

    def call(resized_hw: tuple[int, int]) -> DetectCall:
        return DetectCall("req-1", FINGERPRINT, ImageMeta((240, 300), resized_hw), tensors)

    assert request_digest(call((224, 280))) == request_digest(call((224, 280)))
    assert request_digest(call((224, 280))) != request_digest(call((200, 250)))


def test_a_store_of_capacity_3_keeps_exactly_the_3_newest_answers(tmp_path):
    """Mutant: the eviction keeping capacity - 1 answers. The store keeps "the newest
    `capacity` answers": after 5 answers in a store of 3, answers 3, 4 and 5 are there (a retry
    of the third-newest is answered from the store, not computed again)."""
    store = IdempotencyStore(tmp_path / "answers.sqlite", capacity=3)
    try:
        for i in range(5):
            assert store.put(f"id-{i}", StoredAnswer("fp", f"digest-{i}", f"answer-{i}".encode()))
        assert len(store) == 3
        assert [store.get(f"id-{i}") is not None for i in range(5)] == [False, False] + [True] * 3
    finally:
        store.close()


class _Refusing(pb_grpc.DetectionServicer):
    """A cloud on loopback that refuses every Detect call with one status code."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code = code
        self.calls = 0

    def Detect(self, request, context):
        self.calls += 1
        context.abort(self.code, "token not allowed for this model")


def test_a_request_refused_permission_denied_stays_in_the_outbox(store):
    """Mutant: PERMISSION_DENIED taken out of the sender's OPERATOR_PROBLEMS. A token the cloud
    does not allow is the operator's to fix, and the request itself is fine (sender docstring):
    it stays in the outbox, its attempt counted, retried at the backoff cap; it is no dead
    letter, which only `edge requeue` would bring back."""
    refusing = _Refusing(grpc.StatusCode.PERMISSION_DENIED)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DetectionServicer_to_server(refusing, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        image_id = _pending(store, 1)
        clients: list[CloudClient] = []

        def client() -> CloudClient:
            clients.append(CloudClient(ClientConfig(f"127.0.0.1:{port}", timeout_s=30)))
            return clients[-1]

        try:
            before = time.time()
            # (its `send`, as its thread calls it: the outcome is the store's)
            pause = Sender(store, client, Backoff(0.5, 30.0)).send(store.next_due())
        finally:
            for made in clients:
                made.close()
    finally:
        server.stop(grace=None)
    assert refusing.calls == 1
    [row] = store.results()
    assert row["id"] == image_id and row["verdict"] == "pending" and row["attempts"] == 1
    assert store.outbox_stats().depth == 1 and store.counters() == {}
    assert pause == 30.0  # retried at the cap, as a refused token is
    assert store.next_try_at() >= before + 30.0
