"""Every module the edge loads imports with torch made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

#: Modules the edge daemon, `splitdet predict` and the CLI load. Add each new edge module here.
EDGE_MODULES = [
    "splitdet.shared.spec",
    "splitdet.shared.config",
    "splitdet.shared.cli",
    "splitdet.shared.codec",
    "splitdet.shared.manifest",
    "splitdet.edge.preprocess",
    "splitdet.edge.runtime",
    "splitdet.edge.pipeline",
]

_BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "torchvision")):
                raise ImportError(f"torch is blocked in this test: {name}")
            return None
    sys.meta_path.insert(0, _NoTorch())
    """
)


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where importing torch raises ImportError."""
    return subprocess.run(
        [sys.executable, "-c", _BLOCK_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_blocker_really_blocks_torch():
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "torch is blocked" in result.stderr


@pytest.mark.parametrize("module", EDGE_MODULES)
def test_edge_module_imports_without_torch(module):
    result = run_without_torch(
        f"""
        import importlib, sys
        importlib.import_module({module!r})
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch loaded"
        """
    )
    assert result.returncode == 0, result.stderr


def test_cli_help_without_torch():
    result = run_without_torch(
        """
        import sys
        from splitdet.shared.cli import main
        try:
            main(["--help"])
        except SystemExit as exit:
            assert exit.code == 0
        assert "torch" not in sys.modules
        """
    )
    assert result.returncode == 0, result.stderr
    assert "splitdet" in result.stdout
