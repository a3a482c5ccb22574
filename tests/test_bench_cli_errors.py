"""`splitdet bench`, `splitdet demo` and `python -m splitdet.bench.stages` on bad input: one line
naming the problem, exit status 2, before anything runs, and never a report of another run."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from splitdet.bench import demo as demo_module
from splitdet.bench import stages
from splitdet.shared.cli import main


@pytest.fixture(scope="module")
def exported(tiny_model, tiny_model_dir, tmp_path_factory):
    """A tiny model's checkpoint and its export: `root / "model.pt"` and `root / "model"` (the
    session's export of the same model, linked: no export of its own)."""
    from splitdet.shared.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("bench_errors")
    save_checkpoint(root / "model.pt", tiny_model, gate_threshold=0.5)
    (root / "model").symlink_to(tiny_model_dir, target_is_directory=True)
    return root


def _bench(root, data, out, *extra: str) -> list[str]:
    argv = ["bench", "--model", str(root / "model"), "--checkpoint", str(root / "model.pt")]
    argv += ["--data", str(data), "--out", str(out), "--codecs", "fp32", "--rd-images", "0"]
    return [*argv, "--threads", "1", "--no-progress", *extra]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize(
    "option, value, named",
    [
        # the report keys rates by value: the second 0.5 overwrote the first, settings kept both
        ("--defect-rates", "0.5,0.5", "defect rate 0.5 listed twice"),
        # two systems of one name: their outcomes went into one list ("zip() argument 2 ...")
        ("--codecs", "int8,int8", "codec 'int8' listed twice"),
        ("--images", "2000000", "must be 1-1000000"),  # hung building the streams
        ("--threads", "0", "must be 1-1024"),  # taken as "all cores"
        ("--threads", "-1", "must be 1-1024"),  # a torch traceback
    ],
)
def test_bad_option_values_are_refused_by_the_parser(option, value, named, tmp_path, capsys):
    argv = ["bench", "--model", str(tmp_path), "--checkpoint", str(tmp_path / "x.pt")]
    argv += ["--data", str(tmp_path), "--out", str(tmp_path / "out"), option, value]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_images_needed_by_a_rate():
    from splitdet.bench.streams import images_needed

    assert images_needed(0.0) == images_needed(1.0) == 1
    assert images_needed(0.5) == 2
    assert images_needed(0.05) == 11  # 5% of 10 rounds to no defective image
    assert images_needed(0.95) == 11  # 95% of 10 rounds to no defect-free one
    for rate in (0.05, 0.12, 0.5, 0.95, 0.001):
        n = images_needed(rate)
        assert 0 < round(rate * n) < n
        assert not 0 < round(rate * (n - 1)) < n - 1


def test_a_rate_the_stream_cannot_hold_is_named_before_anything_loads(tmp_path, capsys):
    """5% of 10 images was a stream without one defective image, reported as the 5% row."""
    argv = ["bench", "--model", str(tmp_path / "none"), "--checkpoint", str(tmp_path / "none")]
    argv += ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--images", "10"]
    argv += ["--defect-rates", "0,0.05"]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--defect-rates 0.05 with --images 10" in line and "--images 11 or more" in line
    assert not (tmp_path / "out").exists()


def test_a_split_without_the_images_a_rate_needs_is_named_before_anything_runs(
    exported, tiny_dataset, tmp_path, capsys
):
    """Before, rate 0 ran in full (servers, streams, report) before rate 0.5 found the split
    had no defective image."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    split = data / "ImageSets" / "Main" / "test.txt"
    free = [i for i in split.read_text().split() if "<object>" not in
            (data / "Annotations" / f"{i}.xml").read_text()]  # fmt: skip
    split.write_text("\n".join(free) + "\n")
    out = tmp_path / "out"
    assert main(_bench(exported, data, out, "--defect-rates", "0,0.5", "--images", "2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(data) in line and "'test' split" in line and "no defective images" in line
    assert "defect rate 0.5" in line
    assert not out.exists()  # no server started, no report


def test_an_image_too_elongated_for_the_model_is_named_before_anything_runs(
    exported, tiny_dataset, tmp_path, capsys
):
    """Its torch baselines ended in torch's traceback on it ("Input and output sizes should be
    greater than 0"); the edge refused it by name."""
    import shutil

    import numpy as np

    from splitdet.training import voc

    from support import write_voc_image

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    write_voc_image(data, "sliver", np.full((1, 4000, 3), 90, np.uint8), [])
    voc.write_split(data, "test", [*voc.read_split_ids(data, "test"), "sliver"])
    out = tmp_path / "out"
    assert main(_bench(exported, data, out, "--defect-rates", "0,0.5", "--images", "2")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"splitdet bench: error: {data / 'ImageSets' / 'Main' / 'test.txt'}")
    assert "sliver.png: 4000x1 px is too elongated for the model's input size" in line, line
    assert not out.exists()  # no server started, no report


def test_a_checkpoint_whose_edge_half_differs_from_the_export_is_named(
    exported, tiny_dataset, tmp_path, capsys
):
    """Only the backbone changed, the cloud heads as exported: before, the check compared the
    heads alone, and the benchmark ran torch and ONNX Runtime on different models unawares."""
    import torch

    from splitdet.shared.checkpoint import load_model, save_checkpoint

    model, _ = load_model(exported / "model.pt")
    with torch.no_grad():
        next(model.backbone.body.parameters()).view(-1)[0] += 0.5
    save_checkpoint(tmp_path / "edited.pt", model, gate_threshold=0.5)
    out = tmp_path / "out"
    argv = _bench(exported, tiny_dataset, out, "--defect-rates", "1", "--images", "1")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "edited.pt")
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "was not exported from this checkpoint" in line and "weights_sha256" in line
    assert not out.exists()


@pytest.mark.parametrize("out", ["a_file", "a_file/report"])
def test_an_out_that_cannot_be_a_folder_is_one_line(out, exported, tiny_dataset, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    argv = _bench(exported, tiny_dataset, tmp_path / out, "--defect-rates", "1", "--images", "1")
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    why = "a file is in the way" if out == "a_file" else "Not a directory"
    assert f"--out {tmp_path / out}: cannot make the folder ({why})" in line


def test_a_failed_run_does_not_point_at_an_earlier_runs_report(exported, tmp_path, capsys):
    """--out holds a whole report of an earlier run; this run fails on its checkpoint. Before,
    the error ended "the defect rates finished before it: .../report.md": the earlier run's."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = json.dumps({"run_id": "earlier", "complete": True})
    (out / "report.json").write_text(earlier)
    (out / "report.md").write_text("# an earlier run")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    argv = _bench(exported, tmp_path, out, "--defect-rates", "1", "--images", "1")
    argv[argv.index("--checkpoint") + 1] = str(tmp_path / "garbage.pt")
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "not a readable checkpoint" in line and "report.md" not in line
    assert (out / "report.json").read_text() == earlier


@pytest.fixture(scope="module")
def contested_run(exported, tiny_dataset, tmp_path_factory):
    """One bench run (rate 1, 4 images) into an --out holding an earlier bench run's
    report.json and a figure, with a second bench into the same --out started while the first
    streams. Two tests check it: each of their checks is on one run, so they share it.

    Returns `out`, the first run's exit status and stderr, and the second run's ("code", its
    stderr "err", and the first's stderr until then "first's err")."""
    import splitdet.bench.run as bench_run

    out = tmp_path_factory.mktemp("contested") / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"generator": "splitdet bench", "run_id": "x"}))
    (out / "bytes_vs_map_kept.png").write_bytes(b"an earlier run's figure")
    real_streams = bench_run._run_streams
    second, first_err = {}, io.StringIO()

    def a_second_bench_meanwhile(*args, **kwargs):
        if not second:  # once: a second bench that ran would start a third
            second["first's err"] = first_err.getvalue()
            argv = _bench(exported, tiny_dataset, out, "--defect-rates", "0", "--images", "1")
            with contextlib.redirect_stderr(io.StringIO()) as err:
                second["code"] = main(argv)
            second["err"] = err.getvalue()
        return real_streams(*args, **kwargs)

    # 4 defective images from a split of 3: the streams repeat some, and say so
    argv = _bench(exported, tiny_dataset, out, "--defect-rates", "1", "--images", "4")
    argv.append("--no-engine-baseline")  # (what is checked needs no engine baseline)
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(first_err):
        patch.setattr(bench_run, "_run_streams", a_second_bench_meanwhile)
        code = main(argv)
    return out, code, first_err.getvalue(), second


def test_a_second_bench_into_the_same_out_is_refused_while_the_first_runs(contested_run):
    """Two benchmarks into one --out both removed and wrote report.json/.md and the figures:
    the last writer's report could sit beside the other's figures. The second now stops at
    once, naming the first; the first's report is whole and its own."""
    import splitdet.bench.run as bench_run

    out, code, err, second = contested_run
    assert code == 0, err
    assert second["code"] == 2
    line = _one_error_line(second["err"])
    assert f"--out {out}: another splitdet bench" in line and "another --out" in line
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and set(report["rates"]) == {"1"}
    assert "repeat images" in second["first's err"] and "3 unique" in second["first's err"]
    with bench_run.exclusive_out(out):  # the first run let go of --out when it ended
        pass


def test_files_in_out_that_bench_did_not_write_are_refused_and_kept(
    exported, tiny_dataset, tmp_path, capsys
):
    """A user's own report.md and report.json in --out were deleted at the start of a run.
    Now the run stops before anything is measured, naming them; both stay as they were."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("# my notes")
    (out / "report.json").write_text('{"mine": true}')
    argv = _bench(exported, tiny_dataset, out, "--defect-rates", "0", "--images", "1")
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out / "report.md") in line and str(out / "report.json") in line
    assert "choose another --out or remove them" in line
    assert (out / "report.md").read_text() == "# my notes"
    assert (out / "report.json").read_text() == '{"mine": true}'
    assert not (out / "cloud.log").exists()  # no server started


def test_an_earlier_bench_runs_outputs_are_replaced(contested_run):
    """A report.json splitdet bench wrote marks the outputs beside it as bench's: a new run
    removes them and writes its own."""
    out, code, err, _ = contested_run  # (--out held an earlier run's report.json and a figure)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["generator"] == "splitdet bench" and report["complete"] is True
    assert report["run_id"] != "x"  # (the earlier run's)
    assert not (out / "bytes_vs_map_kept.png").exists()  # --rd-images 0: not written anew


@pytest.mark.parametrize(
    "earlier, bench_wrote_it",
    [
        ({"generator": "splitdet bench", "run_id": "earlier"}, True),
        # before the "generator" marker: the keys every bench report had
        ({"command": "splitdet bench", "machine": {}, "model": {}, "rates": {}}, True),
        ({"command": "splitdet bench", "machine": {}, "rates": {}}, False),  # one key short
        ({"generator": "my own tool"}, False),
        (["splitdet bench"], False),
    ],
)
def test_outputs_beside_a_bench_report_are_removed_and_others_kept(
    earlier, bench_wrote_it, tmp_path
):
    """`remove_outputs`, which every run calls first, on the report.json kinds it may find."""
    from splitdet.bench.report import remove_outputs

    (tmp_path / "report.json").write_text(json.dumps(earlier))
    (tmp_path / "bytes_vs_map_kept.png").write_bytes(b"an earlier run's figure")
    if bench_wrote_it:
        remove_outputs(tmp_path)
        assert not (tmp_path / "report.json").exists()
        assert not (tmp_path / "bytes_vs_map_kept.png").exists()
    else:
        with pytest.raises(ValueError, match="not from splitdet bench"):
            remove_outputs(tmp_path)
        assert (tmp_path / "report.json").read_text() == json.dumps(earlier)
        assert (tmp_path / "bytes_vs_map_kept.png").exists()


@pytest.fixture
def no_demo_stage(monkeypatch):
    """A demo stage that runs fails the test: the bad option must be named before any stage."""

    def ran(config):
        raise AssertionError("a demo stage ran")

    monkeypatch.setattr(demo_module, "make_data", ran)


@pytest.mark.parametrize(
    "options, named",
    [
        (["--images", "0"], "argument --images: must be 1-1000000"),
        (["--defect-rate", "nan"], "argument --defect-rate: must be 0-1"),
        (["--defect-rate", "1.5"], "argument --defect-rate: must be 0-1"),
        (["--train-minutes", "-1"], "argument --train-minutes: must be >= 0.1"),
        (["--train-minutes", "inf"], "argument --train-minutes: must be >= 0.1"),
        (["--train-minutes", "0"], "argument --train-minutes: must be >= 0.1"),  # 1000 epochs
        (["--bench-images", "-1"], "argument --bench-images: must be 0-1000000"),
        (["--threads", "0"], "argument --threads: must be 1-1024"),
    ],
)
def test_demo_option_values_are_refused_by_the_parser(
    options, named, no_demo_stage, tmp_path, capsys
):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--workdir", str(tmp_path / "demo"), "--preset", "tiny", *options])
    assert stop.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, named",
    [  # each was found only after the data and the training (30 minutes with --preset cpu)
        (["--images", "10"], "--defect-rate 0.05 with --images 10"),
        (["--bench-images", "5"], "rate 0.05 with --bench-images 5"),
    ],
)
def test_demo_streams_that_miss_their_rate_are_named_before_any_stage(
    options, named, no_demo_stage, tmp_path, capsys
):
    workdir = tmp_path / "demo"
    argv = ["demo", "--workdir", str(workdir), "--preset", "tiny", "--no-progress", *options]
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert named in line and "or more" in line
    assert not workdir.exists()


@pytest.mark.parametrize("workdir", ["a_file", "a_file/demo"])
def test_demo_workdir_that_cannot_be_a_folder_is_one_line(workdir, no_demo_stage, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    argv = ["demo", "--workdir", str(tmp_path / workdir), "--preset", "tiny", "--no-progress"]
    assert main(argv) == 2
    assert f"--workdir {tmp_path / workdir}: cannot create it" in _one_error_line(
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "options, named",
    [
        (["--size", "abc"], "argument --size: size must be WIDTHxHEIGHT"),
        (["--size", "0x0"], "between 256 and 16384"),
        (["--repeats", "0"], "argument --repeats: must be 1-1000"),  # a median of nothing
    ],
)
def test_stages_options_are_refused_by_the_parser(options, named, monkeypatch, capsys):
    def measured(*args):
        raise AssertionError("measured")

    monkeypatch.setattr(stages, "measure", measured)
    with pytest.raises(SystemExit) as stop:
        stages.main(["--depth", "18", *options])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and named in err and "Traceback" not in err


def test_stages_names_an_unreadable_checkpoint(tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    argv = ["--checkpoint", str(tmp_path / "garbage.pt"), "--size", "256x256", "--repeats", "1"]
    with pytest.raises(SystemExit) as stop:
        stages.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert "--checkpoint" in err and "not a readable checkpoint" in err
