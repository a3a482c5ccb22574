"""`edge run --save-annotated` copies carry the gate's p(defect), as `predict --save` copies
do: the daemon's hook drew boxes only (the outbox item did not carry the row's p_defect)."""

from __future__ import annotations

import contextlib
import hashlib
import time

import numpy as np
from PIL import Image

from splitdet.edge.annotate import annotated_bytes
from splitdet.edge.client_answers import CloudDetections
from splitdet.edge.preprocess import load_image
from splitdet.edge.sender import annotate_hook
from splitdet.edge.store import Arrival, ResultStore


def test_the_daemons_annotated_copy_shows_the_flagging_p_defect(tmp_path):
    image = tmp_path / "shot.png"
    Image.fromarray(np.full((256, 256, 3), 200, np.uint8)).save(image)
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    with contextlib.closing(ResultStore(tmp_path / "edge.sqlite")) as store:
        arrival = Arrival(str(image), f"{image.name}|1|1|1", digest, 1, time.time())
        store.record_pending(arrival, 0.87, "r1", b"x", "f" * 64, {}, threshold=0.5)
        item = store.next_due(now=time.time() + 1)
    assert item is not None and item.p_defect == 0.87
    boxes = np.array([[120, 140, 200, 200]], np.float32)
    answer = CloudDetections("r1", "f" * 64, boxes, np.array([0.9], np.float32),
                             np.array([1]), ("scratch",), {}, False)  # fmt: skip
    annotate_hook(tmp_path / "annotated")(item, answer)
    (written,) = (tmp_path / "annotated").iterdir()
    pixels = load_image(image, 8)
    shown = annotated_bytes(pixels, boxes.tolist(), [0.9], ["scratch"], written,
                            p_defect=0.87, labels=[1])  # fmt: skip
    unshown = annotated_bytes(pixels, boxes.tolist(), [0.9], ["scratch"], written, labels=[1])
    assert shown != unshown  # (the text is drawn)
    assert written.read_bytes() == shown
