"""Review 4, export integrity: what is loaded is what the manifest hashed (a folder swapped by
rename during a load is refused), a gate's p_defect that is no probability stops the run rather
than judging the image ok, external ONNX data is refused, a broken edge graph is one line, and a
half-copied export is named as one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from splitdet.edge import runtime as edge_runtime
from splitdet.edge.check import check_edge
from splitdet.edge.runtime import EdgeRuntime
from splitdet.shared.manifest import (
    CLOUD_WEIGHTS,
    GATE_ONNX,
    MANIFEST_NAME,
    ManifestError,
    read_manifest,
    write_manifest,
)


def _copy(model_dir: Path, to: Path) -> Path:
    shutil.copytree(model_dir, to)
    return to


def _remanifest(model_dir: Path) -> None:
    """Hash the (edited) artifacts anew: a consistent export, as an attacker can write one."""
    m = read_manifest(model_dir, verify=False)
    write_manifest(model_dir, m.model_config, m.gate_threshold, m.default_codec, m.extra)


def _rewire(model: onnx.ModelProto, output: str, nodes, elem_type: int | None = None) -> None:
    """Make the graph's `output` what `nodes(original, output)` compute from the original."""
    graph = model.graph
    for node in graph.node:
        node.output[:] = [f"{output}_orig" if o == output else o for o in node.output]
        node.input[:] = [f"{output}_orig" if i == output else i for i in node.input]
    graph.node.extend(nodes(f"{output}_orig", output))
    for out in graph.output:
        if out.name == output and elem_type is not None:
            out.type.tensor_type.elem_type = elem_type


def _const(name: str, values: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(values))


def _add(value: float):
    return lambda a, b: [
        _const("c_add", np.array([value], np.float32)),
        helper.make_node("Add", [a, "c_add"], [b]),
    ]


def _gate_variant(model_dir: Path, to: Path, edit) -> Path:
    """A consistent export like `model_dir` whose gate `edit` changed."""
    out = _copy(model_dir, to)
    model = onnx.load(out / GATE_ONNX)
    edit(model)
    onnx.save(model, out / GATE_ONNX)
    _remanifest(out)
    return out


def _first_level(model_dir: Path) -> str:
    model = onnx.load(model_dir / GATE_ONNX, load_external_data=False)
    return next(o.name for o in model.graph.output if o.name.startswith("level_"))


def _grey(runtime: EdgeRuntime) -> np.ndarray:
    config = runtime.manifest.model_config
    return np.full((1, 3, config.min_size, config.max_size), 0.1, np.float32)


# ------------------------------------------------------------- 1. the bytes hashed are loaded


def _other_heads(model_dir: Path, to: Path) -> Path:
    """A consistent export like `model_dir` with other (fitting) cloud heads."""
    import torch

    out = _copy(model_dir, to)
    heads = torch.load(out / CLOUD_WEIGHTS, weights_only=True)
    torch.save({k: v + 1.0 if v.is_floating_point() else v for k, v in heads.items()},
               out / CLOUD_WEIGHTS)  # fmt: skip
    _remanifest(out)
    return out


def test_cloud_refuses_heads_of_a_folder_swapped_in_after_its_manifest_was_read(
    tiny_model_dir, tmp_path, monkeypatch
):
    """Before: the manifest of A was read, then cloud_heads.pt by path again, after A and B
    were swapped by rename: B's heads served under A's fingerprint."""
    import splitdet.cloud.core as core

    root = tmp_path / "models"
    a = _copy(tiny_model_dir, root / "A")
    b = _other_heads(tiny_model_dir, root / "B")
    read = core.read_manifest

    def read_then_swap(model_dir: Path, verify: bool = True, **options):
        manifest = read(model_dir, verify=verify, **options)
        os.rename(a, root / ".t")  # the README's rename, as a SIGHUP reload runs
        os.rename(b, a)
        os.rename(root / ".t", b)
        return manifest

    monkeypatch.setattr(core, "read_manifest", read_then_swap)
    with pytest.raises(ManifestError, match=r"cloud_heads\.pt: contents differ from the manifest"):
        core.load_cloud(a)
    monkeypatch.setattr(core, "read_manifest", read)
    assert core.load_cloud(a)[1].fingerprint == read_manifest(a).fingerprint  # (whole: served)


def test_a_reload_refuses_a_folder_whose_manifest_changed_between_its_reads(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The reload reads a folder's fingerprint, then loads it: swapped in between, the model
    loaded (whole, of B) was filed under A's fingerprint."""
    import splitdet.cloud.served_exports as served

    root = tmp_path / "models"
    a = _copy(tiny_model_dir, root / "A")
    b = _other_heads(tiny_model_dir, root / "B")
    read = served.read_manifest
    swapped = []

    def read_then_swap(model_dir: Path, verify: bool = True):
        manifest = read(model_dir, verify=verify)
        if not swapped:
            swapped.append(model_dir)
            os.rename(a, root / ".t")
            os.rename(b, a)
            os.rename(root / ".t", b)
        return manifest

    monkeypatch.setattr(served, "read_manifest", read_then_swap)
    with pytest.raises(ManifestError, match="changed while it was read"):
        served._load_or_keep(a, False, {}, {}, {}, {})


def test_edge_refuses_a_gate_replaced_after_its_manifest_was_read(tiny_model_dir, tmp_path):
    """Before: the session was built from the file's path, whatever it held by then."""
    model_dir = _copy(tiny_model_dir, tmp_path / "A")
    manifest = read_manifest(model_dir)
    other = _gate_variant(tiny_model_dir, tmp_path / "B", lambda m: _rewire(
        m, "p_defect", lambda a, b: [helper.make_node("Identity", [a], [b])]))  # fmt: skip
    os.replace(other / GATE_ONNX, model_dir / GATE_ONNX)
    with pytest.raises(ManifestError, match=r"edge_gate\.onnx: contents differ from the manifest"):
        EdgeRuntime(model_dir, threads=1, manifest=manifest)


# ------------------------------------------------------------------ 2. p_defect, checked


@pytest.mark.parametrize(
    ("name", "edit", "said"),
    [
        ("nan", lambda m: _rewire(m, "p_defect", _add(float("nan"))), "p_defect is nan"),
        ("seven", lambda m: _rewire(m, "p_defect", _add(7.0)), "not a p(defect) from 0 to 1"),
        ("empty", lambda m: _rewire(m, "p_defect", lambda a, b: [
            _const("none", np.array([], np.int64)),
            helper.make_node("Gather", [a, "none"], [b], axis=0)]), "holds 0 values"),
        ("two", lambda m: _rewire(m, "p_defect", lambda a, b: [
            helper.make_node("Concat", [a, a], [b], axis=0)]), "holds 2 values"),
    ],
)  # fmt: skip
def test_a_gate_whose_p_defect_is_no_probability_gives_no_verdict(
    tiny_model_dir, tmp_path, name, edit, said
):
    """Before: NaN >= threshold is False: every image judged ok (an empty one: IndexError)."""
    model_dir = _gate_variant(tiny_model_dir, tmp_path / name, edit)
    runtime = EdgeRuntime(model_dir, threads=1)
    with pytest.raises(edge_runtime.ModelOutputError) as caught:
        runtime.gate(_grey(runtime))
    text = str(caught.value)
    assert said in text and str(model_dir / GATE_ONNX) in text and "re-export" in text, text
    assert "\n" not in text


def test_edge_check_fails_on_a_nan_gate(tiny_model_dir, tmp_path):
    """Before: `ok image ... p(defect) nan`, exit 0."""
    model_dir = _gate_variant(
        tiny_model_dir, tmp_path / "pnan", lambda m: _rewire(m, "p_defect", _add(float("nan")))
    )
    steps = check_edge(model_dir, None)
    assert [s.name for s in steps] == ["model", "image"] and steps[0].ok, steps
    assert not steps[1].ok and "p_defect is nan" in steps[1].detail, steps[1]


def test_a_nan_gate_stops_edge_run_and_predict_leaving_the_images(tiny_model_dir, tmp_path, capsys):
    """Before: edge run quarantined every good image as the image's fault ("cannot process
    (ModelOutputError ...)"), exit 0; predict ended in a traceback."""
    from PIL import Image

    from splitdet.shared.cli import main

    model_dir = _gate_variant(
        tiny_model_dir, tmp_path / "pnan", lambda m: _rewire(m, "p_defect", _add(float("nan")))
    )
    watch = tmp_path / "watch"
    watch.mkdir()
    image = watch / "good.png"
    Image.new("RGB", (64, 48), (90, 90, 90)).save(image)
    status = main(["edge", "run", "--model", str(model_dir), "--watch", str(watch),
                   "--db", str(tmp_path / "edge.sqlite"), "--cloud", "127.0.0.1:9", "--once",
                   "--drain-timeout", "0", "--settle", "0", "--threads", "1", "--quarantine",
                   str(tmp_path / "quarantine"), "--log-format", "text"])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2, err
    assert "p_defect is nan" in err and "the image being handled stays in --watch" in err, err
    assert image.is_file() and not any((tmp_path / "quarantine").iterdir())
    status = main(["predict", str(image), "--model", str(model_dir), "--no-progress"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and "p_defect is nan" in err, err


def test_a_gate_level_of_nan_gives_no_verdict(tiny_model_dir, tmp_path):
    level = _first_level(tiny_model_dir)
    model_dir = _gate_variant(tiny_model_dir, tmp_path / "lvlnan", lambda m: _rewire(
        m, level, lambda a, b: [_const("c_nan", np.array([np.nan], np.float32)),
                                helper.make_node("Mul", [a, "c_nan"], [b])]))  # fmt: skip
    runtime = EdgeRuntime(model_dir, threads=1)
    with pytest.raises(edge_runtime.ModelOutputError, match=f"{level} holds NaN or infinite"):
        runtime.gate(_grey(runtime))


# --------------------------------------------------------------------- 3. external data


def test_a_gate_with_external_data_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    """Before: it loaded and ran; its weights file, which no hash covers, changed p(defect)
    under the same fingerprint. Refused wherever the data file is: beside the graph, or in the
    working directory (where ONNX Runtime looks for a graph loaded from bytes)."""
    model_dir = _copy(tiny_model_dir, tmp_path / "ext")
    model = onnx.load(model_dir / GATE_ONNX)
    onnx.save_model(model, model_dir / GATE_ONNX, save_as_external_data=True,
                    location="gate.data", size_threshold=1024)  # fmt: skip
    _remanifest(model_dir)
    monkeypatch.chdir(model_dir)
    with pytest.raises(ManifestError) as caught:
        EdgeRuntime(model_dir, threads=1)
    text = str(caught.value)
    assert text.startswith(f"{model_dir / GATE_ONNX}: uses external data ("), text
    assert "which the fingerprint does not cover: re-export" in text and "\n" not in text, text


# ------------------------------------------------------------------- 4. broken edge graphs


def _custom_op(model: onnx.ModelProto) -> None:
    _rewire(model, "p_defect", lambda a, b: [helper.make_node("EvilOp", [a], [b], domain="evil")])
    model.opset_import.append(helper.make_opsetid("evil", 1))


def _double_level(model: onnx.ModelProto) -> None:
    level = next(o.name for o in model.graph.output if o.name.startswith("level_"))
    _rewire(model, level, lambda a, b: [helper.make_node("Cast", [a], [b], to=TensorProto.DOUBLE)],
            elem_type=TensorProto.DOUBLE)  # fmt: skip


def _renamed_p_defect(model: onnx.ModelProto) -> None:
    _rewire(model, "p_defect", lambda a, b: [helper.make_node("Identity", [a], [b])])
    for node in model.graph.node:
        node.output[:] = ["p_other" if o == "p_defect" else o for o in node.output]
    next(o for o in model.graph.output if o.name == "p_defect").name = "p_other"


@pytest.mark.parametrize(
    ("name", "edit", "said"),
    [
        ("custom", _custom_op, "not a loadable ONNX graph ("),
        ("double", _double_level, "tensor(double), not float32 levels"),
        ("renamed", _renamed_p_defect, "has no p_defect output"),
    ],
)  # fmt: skip
def test_a_broken_gate_is_refused_at_load_in_one_line(tiny_model_dir, tmp_path, name, edit, said):
    """Before: ONNX Runtime's exception (a traceback), or a float64 level sent on."""
    model_dir = _gate_variant(tiny_model_dir, tmp_path / name, edit)
    with pytest.raises(ManifestError) as caught:
        EdgeRuntime(model_dir, threads=1)
    text = str(caught.value)
    assert text.startswith(f"{model_dir / GATE_ONNX}: ") and said in text, text
    assert text.endswith("re-export") and "\n" not in text, text


def test_a_gate_that_is_not_onnx_fails_edge_check_in_one_line(tiny_model_dir, tmp_path):
    """Before: InvalidProtobuf's traceback out of `edge check`."""
    model_dir = _copy(tiny_model_dir, tmp_path / "notonnx")
    (model_dir / GATE_ONNX).write_bytes(b"not an onnx graph at all")
    _remanifest(model_dir)
    steps = check_edge(model_dir, None)
    assert len(steps) == 1 and not steps[0].ok, steps
    assert "edge_gate.onnx: not a loadable ONNX graph (" in steps[0].detail, steps[0]


# ------------------------------------------------------------------ 5. half-copied exports


def test_an_export_without_its_manifest_is_not_taken_for_a_training_run(tiny_model_dir, tmp_path):
    """Before: "it holds cloud_heads.pt, a training checkpoint: export it first", which fails."""
    model_dir = _copy(tiny_model_dir, tmp_path / "half")
    (model_dir / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError) as caught:
        read_manifest(model_dir)
    text = str(caught.value)
    assert "copy the export again, whole" in text and "checkpoint" not in text, text
    assert f"{model_dir} holds edge_gate.onnx" in text, text


@pytest.mark.parametrize("kind", ["fifo", "devzero"])
def test_a_manifest_that_is_no_regular_file_is_named_as_what_it_is(tiny_model_dir, tmp_path, kind):
    """Before: "manifest.json: missing" for a FIFO, or a link to /dev/zero."""
    model_dir = _copy(tiny_model_dir, tmp_path / kind)
    path = model_dir / MANIFEST_NAME
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")
    named = "a FIFO" if kind == "fifo" else "a character device"
    with pytest.raises(ManifestError, match=f"not a regular file \\({named}\\)") as caught:
        read_manifest(model_dir)
    assert "missing" not in str(caught.value), caught.value


def test_an_artifact_that_is_no_regular_file_is_named_as_what_it_is(tiny_model_dir, tmp_path):
    """Before: "cloud_heads.pt: missing from the model directory" for a link to /dev/zero."""
    model_dir = _copy(tiny_model_dir, tmp_path / "devzero")
    (model_dir / CLOUD_WEIGHTS).unlink()
    (model_dir / CLOUD_WEIGHTS).symlink_to("/dev/zero")
    with pytest.raises(ManifestError, match=r"cloud_heads\.pt: not a regular file \(a character"):
        read_manifest(model_dir)
