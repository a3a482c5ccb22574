"""Every module the edge loads imports with torch made unimportable."""

from __future__ import annotations

import pytest

from support import run_without_torch

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
    "splitdet.edge.predict",
    "splitdet.edge.annotate",
    "splitdet.edge.cli_predict",
    "splitdet.edge.client",
    "splitdet.edge.client_answers",
    "splitdet.edge.client_channel",
    "splitdet.edge.client_errors",
    "splitdet.edge.cloud_args",
    "splitdet.edge.check",
    "splitdet.edge.collect",
    "splitdet.edge.ignore_marker",
    "splitdet.bench.load",
    "splitdet.bench.cli_load",
    "splitdet.training.voc",
    "splitdet.training.voc_annotations",
    "splitdet.training.voc_image",
    "splitdet.training.voc_names",
    "splitdet.training.voc_types",
    "splitdet.training.voc_xml",
    "splitdet.edge.cli_edge",
    "splitdet.edge.cli_edge_options",
    "splitdet.edge.cli_edge_run",
    "splitdet.edge.cli_edge_results",
    "splitdet.edge.cli_edge_maintenance",
    "splitdet.edge.cli_edge_status",
    "splitdet.edge.cli_edge_check",
    "splitdet.edge.cli_edge_collect",
    "splitdet.edge.after_actions",
    "splitdet.edge.daemon",
    "splitdet.edge.daemon_config",
    "splitdet.edge.daemon_log",
    "splitdet.edge.daemon_metrics",
    "splitdet.edge.file_moves",
    "splitdet.edge.intake",
    "splitdet.edge.model_probe",
    "splitdet.edge.partial_sweep",
    "splitdet.edge.result_pruner",
    "splitdet.edge.sender",
    "splitdet.edge.store",
    "splitdet.edge.store_arrivals",
    "splitdet.edge.store_connection",
    "splitdet.edge.store_dead_letters",
    "splitdet.edge.file_identity",
    "splitdet.edge.store_file",
    "splitdet.edge.store_maintenance",
    "splitdet.edge.store_outbox",
    "splitdet.edge.store_reads",
    "splitdet.edge.store_schema",
    "splitdet.edge.store_types",
    "splitdet.edge.watcher",
    "splitdet.edge.watcher_listing",
    "splitdet.edge.watcher_reports",
    "splitdet.shared.edge_name",
    "splitdet.shared.logs",
    "splitdet.shared.detection",
    "splitdet.shared.messages",
    "splitdet.cloud.cli_cloud",
    "splitdet.shared.wire.detection_pb2_grpc",
]


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


def test_full_install_commands_explain_themselves_without_torch(tmp_path):
    result = run_without_torch(
        f"""
        from splitdet.shared.cli import main
        status = main(["train", "--data", {str(tmp_path)!r}, "--out", {str(tmp_path / "run")!r}])
        assert status == 2, status
        """
    )
    assert result.returncode == 0, result.stderr
    assert "needs torch" in result.stderr and "splitdet[full]" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_demo_without_torch_is_refused_before_it_makes_its_data(tmp_path):
    """On the edge-only install, `splitdet demo` rendered its whole dataset (26 s, 46 MB) before
    it said it needs torch; now at once, its workdir not made."""
    workdir = tmp_path / "demo"
    result = run_without_torch(
        f"""
        from splitdet.shared.cli import main
        status = main(["demo", "--workdir", {str(workdir)!r}, "--no-progress"])
        assert status == 2, status
        """
    )
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stderr and 'pip install ".[full]"' in result.stderr
    assert not workdir.exists()


def test_an_install_without_onnx_runtime_says_which_extra_to_install(tmp_path):
    """The base install leaves ONNX Runtime to an extra ([edge] or [gpu]); without it every edge
    command ended in a traceback (ModuleNotFoundError: onnxruntime). Now one line naming the
    extras, exit 2."""
    code = f"""
        import sys
        class _NoOrt:
            def find_spec(self, name, path=None, target=None):
                if name == "onnxruntime" or name.startswith("onnxruntime."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        sys.meta_path.insert(0, _NoOrt())
        from splitdet.shared.cli import main
        status = main(["predict", {str(tmp_path)!r}, "--model", {str(tmp_path)!r}])
        assert status == 2, status
        """
    (tmp_path / "a.png").write_bytes(b"")
    result = run_without_torch(code)
    assert result.returncode == 0, result.stderr
    assert "needs ONNX Runtime" in result.stderr and "splitdet[edge]" in result.stderr
    assert "Traceback" not in result.stderr
