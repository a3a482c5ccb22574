"""torchvision imported without torch._dynamo (`splitdet.shared.torchvision_import`): the
same detections, the real `torch._dynamo` for whoever imports it later, and the plain import
when torchvision wants more of it than the stand-in has. Each case runs in a fresh process,
where nothing has imported torchvision yet."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import TINY_CONFIG

#: Detections of a random tiny model on a fixed image, then which torch modules are imported.
_DETECT = """
import json, sys
{prologue}
import torch
from splitdet.shared.config import ModelConfig
from splitdet.shared.model import build_model

torch.manual_seed(0)
model = build_model(ModelConfig(**{config})).eval()
model.roi_heads.score_thresh = 0.0
with torch.no_grad():
    out = model([torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(1))])[0]
assert len(out["boxes"]) > 0, "no boxes: roi_align never ran"
result = {{"boxes": out["boxes"].tolist(), "dynamo": "torch._dynamo" in sys.modules}}
import torch._dynamo
roi_align = sys.modules["torchvision.ops.roi_align"]
utils = sys.modules["torch._dynamo.utils"]
result["real_dynamo"] = hasattr(torch._dynamo, "optimize") and hasattr(utils, "counters")
result["answers"] = [roi_align.is_compile_supported(d) for d in ("cpu", "meta")]
result["real_answers"] = [torch._dynamo.utils.is_compile_supported(d) for d in ("cpu", "meta")]
print(json.dumps(result))
"""


def _run(code: str, cwd: Path | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _detections(prologue: str) -> dict:
    return _run(_DETECT.format(prologue=prologue, config=repr(TINY_CONFIG)))


def test_a_command_detects_the_same_boxes_without_importing_torch_dynamo():
    deferred = _detections(
        "from splitdet.shared.cli import before_torch_imports\nbefore_torch_imports()"
    )
    plain = _detections("")
    assert plain["dynamo"], "torchvision no longer imports torch._dynamo: the module is moot"
    assert not deferred["dynamo"]
    assert deferred["boxes"] == plain["boxes"]
    assert deferred["real_dynamo"]  # (imported later: the real one, not the stand-in)
    assert deferred["answers"] == deferred["real_answers"]


def test_a_torchvision_that_wants_more_than_the_stand_in_has_is_imported_the_plain_way(tmp_path):
    package = tmp_path / "fakevision"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "wants_more.py").write_text(
        "from torch._dynamo.utils import is_compile_supported, counters\n"
    )
    result = _run(
        """
        import json, sys
        import torch
        from splitdet.shared import torchvision_import
        torchvision_import._ROI_ALIGN = "fakevision.wants_more"
        torchvision_import.defer_dynamo_import()
        import fakevision.wants_more as module
        print(json.dumps({
            "real": module.counters is sys.modules["torch._dynamo.utils"].counters,
            "stand_in_gone": isinstance(sys.modules["torch._dynamo.utils"].__file__, str),
            "finder_gone": not any(
                type(f).__name__ == "_RoiAlignFinder" for f in sys.meta_path),
        }))
        """,
        cwd=tmp_path,
    )
    assert result == {"real": True, "stand_in_gone": True, "finder_gone": True}
