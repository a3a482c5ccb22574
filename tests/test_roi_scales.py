"""The box ROI pooling's level scales are the strides, not what the first request implies.

torchvision's MultiScaleRoIAlign infers each level's scale from its first call's feature and
image sizes and keeps it. A wire-fuzz review: a fresh cloud whose first Detect was an image
resized to 66x160 px (an elongated image the edge itself sends) or 1x1 px answered every later
request with wrong boxes, and stored them in --answers-db.
"""

from __future__ import annotations

import torch
from cloud_fixtures import make_sample, tiny_model

#: An image resized to 22x288 px (padded to 32x288): P2 is 8 px high over 22 px of image,
#: which torchvision rounds to a scale of 1/2 instead of 1/4.
ELONGATED_HW = (23, 300)


def test_an_elongated_first_image_leaves_later_boxes_unchanged():
    clean = make_sample(tiny_model(0), seed=1).reference
    model = tiny_model(0)
    make_sample(model, seed=2, image_hw=ELONGATED_HW)  # the first call on this model's heads
    after = make_sample(model, seed=1).reference
    assert len(clean["boxes"]) > 0
    assert torch.equal(after["boxes"], clean["boxes"])
    assert torch.equal(after["scores"], clean["scores"])
    pool = model.roi_heads.box_roi_pool
    assert pool.scales == [1 / 4, 1 / 8, 1 / 16, 1 / 32]


def test_a_fingerprint_differing_past_its_shortened_form_is_shown_whole(tmp_path):
    """The same review: a fingerprint matching the served one in its first 16 characters was
    refused as "'3f281a586df5e530…' is not served here; this server serves
    '3f281a586df5e530…'", which told the operator nothing."""
    from cloud_fixtures import shared_model_dir

    from splitdet.cloud.core import DetectionCore, FingerprintMismatch, load_cloud

    _, model_dir, manifest = shared_model_dir(0)
    core = DetectionCore(*load_cloud(model_dir))
    damaged = manifest.fingerprint[:-1] + ("0" if manifest.fingerprint[-1] != "0" else "1")
    try:
        core.model(damaged)
    except FingerprintMismatch as exc:
        message = str(exc)
    else:
        raise AssertionError("a damaged fingerprint was served")
    assert repr(damaged) in message and repr(manifest.fingerprint) in message, message
    try:
        core.model("0123456789abcdef0123")
    except FingerprintMismatch as exc:
        assert "'0123456789abcdef…'" in str(exc)  # another export: still shortened
