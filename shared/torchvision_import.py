"""torchvision imported without torch's compiler (`torch._dynamo`), which nothing of ours runs:
about half of a torch command's start-up time.

torchvision's `ops/roi_align.py` imports `torch._dynamo.utils` for one function,
`is_compile_supported`, which it calls only when torchvision's compiled operators are missing
or on a GPU in deterministic mode (its own `lazy_compile` says it exists to avoid "eagerly
importing dynamo"). That import builds all of `torch._dynamo`: about 2.7 s of CPU at every
start of `cloud`, `predict`, `eval`, `train` or `bench`, where torch itself takes about 2.8 s.

`defer_dynamo_import()` puts a finder on `sys.meta_path` that sees only that module's import:
while `roi_align` runs its code, `torch._dynamo.utils` is a stand-in whose
`is_compile_supported` imports the real one at its first call. The stand-in leaves
`sys.modules` as that module's code ends, so a later `import torch._dynamo` (ONNX export uses
it) gets the real module. A torchvision that needs more than that one function from it is
imported the plain way.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from typing import Any

_DYNAMO_UTILS = "torch._dynamo.utils"
_ROI_ALIGN = "torchvision.ops.roi_align"


def defer_dynamo_import() -> None:
    """Have torchvision's coming import leave `torch._dynamo` unimported (see the module).
    Does nothing when torchvision's `roi_align` is imported already or the finder is in place;
    imports nothing itself."""
    if _ROI_ALIGN in sys.modules or any(isinstance(f, _RoiAlignFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _RoiAlignFinder())


def _is_compile_supported(device_type: str) -> bool:
    """torch's `torch._dynamo.utils.is_compile_supported`, imported at the first call."""
    from torch._dynamo.utils import is_compile_supported

    return bool(is_compile_supported(device_type))


class _RoiAlignFinder(importlib.abc.MetaPathFinder):
    """Finds torchvision's `roi_align` as the path finder does, with `_StandInLoader` as its
    loader; leaves `sys.meta_path` at its first use."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _ROI_ALIGN:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _StandInLoader(spec.loader)
        return spec


class _StandInLoader(importlib.abc.Loader):
    """The path finder's loader, running the module's code with the stand-in in place."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:  # (get_source, get_filename, ...: the real one's)
        return getattr(self._loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if _DYNAMO_UTILS in sys.modules:
            self._loader.exec_module(module)
            return
        stand_in = types.ModuleType(_DYNAMO_UTILS, "splitdet's stand-in while roi_align imports")
        stand_in.is_compile_supported = _is_compile_supported  # type: ignore[attr-defined]
        sys.modules[_DYNAMO_UTILS] = stand_in
        try:
            self._loader.exec_module(module)
        except ImportError:  # (more than that one function wanted: its imports come first)
            _drop(stand_in)
            self._loader.exec_module(module)
        finally:
            _drop(stand_in)


def _drop(stand_in: types.ModuleType) -> None:
    """Take the stand-in out of `sys.modules` (not a real module put there since)."""
    if sys.modules.get(_DYNAMO_UTILS) is stand_in:
        del sys.modules[_DYNAMO_UTILS]
