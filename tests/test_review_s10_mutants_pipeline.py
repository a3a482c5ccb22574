"""Mutant audit (session 10): edge/pipeline.py's verdict at its threshold, and with the gate off.

`EdgeResult` documents ``flagged: p_defect >= threshold (or the gate is off)`` and ``threshold``
None when the gate is off; the edge tests never put an image's score exactly on the threshold
nor read the recorded threshold of an ungated run. Real exported model, real ONNX Runtime.
"""

from __future__ import annotations

import numpy as np

from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.runtime import EdgeRuntime


def _image() -> np.ndarray:
    rng = np.random.default_rng(7)
    return rng.random((3, 64, 80), dtype=np.float32)


def test_an_image_scoring_exactly_the_threshold_is_flagged(tiny_model_dir):
    """Kills: `gate.p_defect >= self.threshold` made `>` (an image scoring on the calibrated
    threshold, which `calibrated_threshold` places for recall, passed as ok)."""
    runtime = EdgeRuntime(tiny_model_dir)
    p_defect = EdgePipeline(runtime).process_array(_image()).p_defect
    on = EdgePipeline(runtime, threshold=p_defect).process_array(_image())
    assert on.p_defect == p_defect and on.flagged and on.threshold == p_defect
    assert on.encoded is not None and on.bytes_sent > 0
    above = EdgePipeline(runtime, threshold=float(np.nextafter(p_defect, 2.0)))
    result = above.process_array(_image())
    assert not result.flagged and result.encoded is None and result.bytes_sent == 0


def test_with_the_gate_off_every_image_is_flagged_at_no_threshold(tiny_model_dir):
    """Kills: `threshold=self.threshold if self.gate_enabled else None` made
    `threshold=self.threshold` (an ungated verdict recorded as taken at a threshold), and the
    `(not self.gate_enabled) or` dropped (the gate off still judging)."""
    runtime = EdgeRuntime(tiny_model_dir)
    result = EdgePipeline(runtime, gate=False, threshold=1.5).process_array(_image())
    assert result.flagged and result.threshold is None and result.encoded is not None
    gated = EdgePipeline(runtime, threshold=1.5).process_array(_image())
    assert not gated.flagged and gated.threshold == 1.5
