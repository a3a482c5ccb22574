"""Mutant audit, second round: the cloud's answer boxes lie on the original image.

`DetectionCore._detections`: "The output's boxes ([N, 4] x1 y1 x2 y2, original px) clamped
onto the original image: mapped back from the resized one in float32, a corner on its edge
may land a float32 step past it (400.00003 on a 400 px image)". A real tiny export's heads'
output stand-in (boxes as the postprocess may give them); the test names the mutant it kills.
"""

from __future__ import annotations

import torch

from splitdet.cloud.core import DetectionCore, load_cloud


def test_boxes_a_float32_step_past_the_edge_are_clamped_onto_the_image(tiny_model_dir):
    """Kills: `clip_boxes_to_image` dropped from `_detections` (an answer box ending at
    400.00003 on a 400 x 300 image: the edge refuses out-of-image boxes as a bad answer)."""
    core = DetectionCore(*load_cloud(tiny_model_dir))
    model = next(iter(core.models.values()))
    output = {
        "boxes": torch.tensor([[10.0, 20.0, 400.00003, 300.00003]], dtype=torch.float32),
        "scores": torch.tensor([0.9]),
        "labels": torch.tensor([1]),
    }
    [detection] = core._detections(model, output, (300, 400))
    assert detection.box == (10.0, 20.0, 400.0, 300.0)
