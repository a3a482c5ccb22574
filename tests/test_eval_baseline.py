"""`splitdet eval --checkpoint V2 --baseline V1`: comparing two models took two eval runs and a
hand-made diff of their JSON files, and nothing said which model is better or whether a
difference on a small test split means anything. One run now evaluates both on the same split
(each gate calibrated on the same split; the baseline never written), and the JSON's
`comparison` gives each headline figure of both, the difference, and for mAP@.5 and mAP a paired
bootstrap's 95% interval of it; the summary a table and a verdict line."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from splitdet.shared.checkpoint import save_checkpoint
from splitdet.shared.cli import main
from splitdet.training.compare import (
    FIGURES,
    compare,
    comparison_table,
    labels,
    paired_bootstrap,
    resample_indices,
)

from conftest import make_tiny_model
from support import make_tiny_voc

#: What the comparison adds to the candidate's metrics; the baseline's has the other keys.
ADDED = {"baseline", "comparison"}


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory) -> Path:
    """4 images (3 defective), in train = val = test."""
    return make_tiny_voc(tmp_path_factory.mktemp("baseline_voc"), n_defective=3, n_free=1, seed=1)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Random tiny checkpoints (threshold 0.5, never calibrated): "v1" and "v2" of other
    weights (their gate AUCs differ on `voc_tree`), "other" of other classes."""
    root = tmp_path_factory.mktemp("baseline_models")
    made = {"v1": make_tiny_model(0), "v2": make_tiny_model(2),
            "other": make_tiny_model(1, class_names=("scratch", "dent"))}  # fmt: skip
    for name, model in made.items():
        save_checkpoint(root / f"{name}.pt", model)
    return {name: root / f"{name}.pt" for name in made}


def _copy(source: Path, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(source, folder / name))


def _eval(data: Path, checkpoint: Path, out: Path, *options: str) -> dict:
    """`splitdet eval` of `checkpoint` on `data` (exit status 0): its JSON."""
    assert main(["eval", "--data", str(data), "--checkpoint", str(checkpoint), "--no-progress",
                 "--json", str(out), *options]) == 0  # fmt: skip
    return json.loads(out.read_text())


def test_a_model_compared_with_itself_differs_in_nothing(
    voc_tree, models, tmp_path, capsys, one_torch_thread
):
    candidate = _copy(models["v2"], tmp_path / "v2", "best.pt")
    baseline = _copy(models["v2"], tmp_path / "v1", "best.pt")  # the same weights
    result = _eval(voc_tree, candidate, tmp_path / "self.json", "--baseline", str(baseline),
                   "--bootstrap", "10")  # fmt: skip
    comparison = result["comparison"]
    assert set(result["baseline"]) == set(result) - ADDED
    assert (comparison["candidate"], comparison["baseline"]) == ("v2/best.pt", "v1/best.pt")
    assert comparison["bootstrap"] == {"resamples": 10, "seed": 0, "interval": 0.95}
    assert set(comparison["figures"]) == {key for key, _, _ in FIGURES}
    for key, figure in comparison["figures"].items():
        assert figure["candidate"] == figure["baseline"] == result[key], key
        assert figure["difference"] == (None if result[key] is None else 0.0), key
    assert result["gate_auc"] is not None  # (compared above as a number)
    for key in ("map50", "map"):
        figure = comparison["figures"][key]
        assert figure["interval"] == [0.0, 0.0]
        assert figure["better_share"] == figure["worse_share"] == 0.0
        assert figure["resamples"] == 10
    assert comparison["verdict"] == (
        "no clear difference on mAP@.5 between v2/best.pt and v1/best.pt: the 95% interval "
        "+0.000..+0.000 includes 0 (the two score the same on every resample)"
    )
    out = capsys.readouterr().out
    assert "against the baseline v1/best.pt (4 images; candidate v2/best.pt):" in out
    assert "  mAP@.5             0.000      0.000      +0.000  +0.000..+0.000" in out
    assert out.rstrip().endswith(comparison["verdict"])


def test_two_models_compare_as_their_separate_evaluations(
    voc_tree, models, tmp_path, capsys, one_torch_thread
):
    """The figures are those two separate evals give; the baseline is never written (not even
    with --store, which writes the candidate), and a seeded run repeats."""
    candidate = _copy(models["v2"], tmp_path, "v2.pt")
    baseline = _copy(models["v1"], tmp_path, "v1.pt")
    alone = {
        name: _eval(voc_tree, path, tmp_path / f"{name}.json", "--no-store")
        for name, path in (("v2", candidate), ("v1", baseline))
    }
    assert alone["v2"]["gate_auc"] != alone["v1"]["gate_auc"]  # the models tell apart
    unchanged = baseline.read_bytes()

    options = ["--baseline", str(baseline), "--bootstrap", "8", "--seed", "3"]
    result = _eval(voc_tree, candidate, tmp_path / "both.json", *options, "--no-store")
    assert baseline.read_bytes() == unchanged
    assert {k: v for k, v in result.items() if k not in ADDED} == alone["v2"]
    assert result["baseline"] == alone["v1"]  # the same keys and figures as eval of it alone
    for key, figure in result["comparison"]["figures"].items():
        ours, theirs = alone["v2"][key], alone["v1"][key]
        assert (figure["candidate"], figure["baseline"]) == (ours, theirs), key
        expected = None if ours is None or theirs is None else ours - theirs
        assert figure["difference"] == expected, key
    assert result["comparison"]["figures"]["gate_auc"]["difference"] != 0
    table = capsys.readouterr().out
    auc = result["comparison"]["figures"]["gate_auc"]
    assert (
        f"  gate AUC       {auc['baseline']:>9.3f}  {auc['candidate']:>9.3f}  "
        f"{auc['difference']:>+10.3f}  -"
    ) in table

    # --store writes the candidate's threshold, never the baseline's; the same seed repeats
    again = _eval(voc_tree, candidate, tmp_path / "again.json", *options, "--store")
    assert baseline.read_bytes() == unchanged
    assert (
        again["gate_threshold_stored"] is True
        and again["baseline"]["gate_threshold_stored"] is False
    )
    assert candidate.read_bytes() != models["v2"].read_bytes()
    assert again["comparison"] == result["comparison"]


def test_json_on_stdout_holds_the_comparison(voc_tree, models, tmp_path, capsys, one_torch_thread):
    candidate = _copy(models["v2"], tmp_path, "v2.pt")
    assert main(["eval", "--data", str(voc_tree), "--checkpoint", str(candidate), "--baseline",
                 str(models["v1"]), "--bootstrap", "0", "--no-progress", "--no-store",
                 "--calibrate-split", "none"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    comparison = result["comparison"]
    assert result["baseline"]["checkpoint"] == str(models["v1"])
    assert result["baseline"]["gate_calibrated_on"] == "given"  # its own threshold
    assert comparison["bootstrap"]["resamples"] == 0
    assert "interval" not in comparison["figures"]["map50"]
    assert (
        "(no bootstrap: --bootstrap N tells whether the difference means anything)"
        in (comparison["verdict"])
    )


def _predictions(samples, found):
    """Per sample, its objects' ground-truth boxes (score 0.9) when `found(index)`, else none."""
    import torch

    from splitdet.training.evaluate import Prediction

    out = []
    for index, sample in enumerate(samples):
        boxes = [o.box for o in sample.objects] if found(index) else []
        count = len(boxes)
        out.append(Prediction(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                              torch.full((count,), 0.9), torch.ones(count, dtype=torch.int64),
                              0.5))  # fmt: skip
    return out


@pytest.fixture(scope="module")
def detections(tmp_path_factory):
    """(samples, every object found, half the defective images' found, the other half's)."""
    from splitdet.training import voc

    root = make_tiny_voc(tmp_path_factory.mktemp("boot_voc"), n_defective=10, n_free=2, seed=4)
    samples = voc.read_split(root, "test", ("scratch",))
    return (samples, _predictions(samples, lambda i: True),
            _predictions(samples, lambda i: i % 2 == 0),
            _predictions(samples, lambda i: i % 2 == 1))  # fmt: skip


def _figures(samples, predictions) -> dict:
    """`coco_metrics` of `predictions` on `samples`, as `evaluate`'s metrics hold them."""
    from splitdet.training.evaluate import coco_metrics

    return coco_metrics(samples, [p.boxes.numpy() for p in predictions],
                        [p.scores.numpy() for p in predictions],
                        [p.labels.numpy() for p in predictions], ("scratch",))  # fmt: skip


def _compare(samples, ours, theirs, **options):
    metrics = [_figures(samples, ours), _figures(samples, theirs)]
    options = {"resamples": 100, "seed": 0, "names": ("v2", "v1"), **options}
    return compare(*metrics, samples, ours, theirs, ("scratch",), **options)


def test_the_bootstrap_resamples_images_the_same_for_both_models(detections):
    samples, perfect, half, other_half = detections
    better = _compare(samples, perfect, half)
    figure = better["figures"]["map50"]
    assert figure["interval"][0] > 0 and figure["better_share"] == 1.0
    assert better["verdict"].startswith("v2 better than v1 on mAP@.5 (")
    assert "better in 100% of 100 resamples)" in better["verdict"]
    worse = _compare(samples, half, perfect, names=("new", "old"))
    assert worse["figures"]["map"]["interval"][1] < 0
    assert worse["verdict"].startswith("new worse than old on mAP@.5 (")

    # a model beside itself: every resample draws the same images for both, so no difference
    # (resampled apart, half's mAP would vary from draw to draw)
    same = _compare(samples, half, half)
    assert same["figures"]["map50"]["interval"] == [0.0, 0.0]
    assert same["verdict"].startswith("no clear difference on mAP@.5 between v2 and v1")

    # two models each finding half of the images: it depends on the draw
    even = _compare(samples, half, other_half, resamples=100)
    low, high = even["figures"]["map50"]["interval"]
    assert low < 0 < high and 0 < even["figures"]["map50"]["better_share"] < 1
    assert even["verdict"] == (
        f"no clear difference on mAP@.5 between v2 and v1: the 95% interval {low:+.3f}.."
        f"{high:+.3f} includes 0 (12 images: a larger test split would narrow it)"
    )
    assert even["verdict"] in comparison_table(even).splitlines()

    # a few resamples call nothing better or worse, however far from 0 their interval lies
    few = _compare(samples, perfect, half, resamples=5)
    assert few["figures"]["map50"]["interval"][0] > 0
    assert few["verdict"].startswith("v2 +") and "from only 5 resamples, too few" in few["verdict"]


def test_each_resample_is_pycocotools_on_the_drawn_images(detections):
    from splitdet.training.evaluate import coco_metrics

    samples, _, half, other_half = detections
    pairs = paired_bootstrap(samples, half, other_half, ("scratch",), resamples=3, seed=7)
    assert paired_bootstrap(samples, half, other_half, ("scratch",), resamples=3, seed=7) == pairs
    assert paired_bootstrap(samples, half, other_half, ("scratch",), resamples=3, seed=8) != pairs
    for drawn, *figures in zip(resample_indices(len(samples), 3, 7), pairs["map50"], pairs["map"],
                               strict=True):  # fmt: skip
        assert len(set(drawn.tolist())) < len(samples)  # drawn with replacement
        for model, k in ((half, 0), (other_half, 1)):
            expected = coco_metrics(
                [samples[i] for i in drawn], [model[i].boxes.numpy() for i in drawn],
                [model[i].scores.numpy() for i in drawn], [model[i].labels.numpy() for i in drawn],
                ("scratch",),
            )  # fmt: skip
            assert (figures[0][k], figures[1][k]) == (expected["map50"], expected["map"])


def test_short_names_tell_the_checkpoints_apart():
    assert labels("runs/v2/best.pt", "runs/v1/best.pt") == ("v2/best.pt", "v1/best.pt")
    assert labels("v2.pt", "/deployed/v1.pt") == ("v2.pt", "v1.pt")
    assert labels("a/m.pt", "b/a/m.pt") == ("a/m.pt", "b/a/m.pt")


def test_comparisons_that_cannot_mean_anything_are_refused(
    voc_tree, models, tmp_path, capsys, monkeypatch
):
    base = ["eval", "--data", str(voc_tree), "--no-progress"]
    v2, v1 = str(models["v2"]), str(models["v1"])

    assert main([*base, "--checkpoint", v2, "--baseline", str(models["other"])]) == 2
    err = capsys.readouterr().err
    assert (
        f"--checkpoint {v2} detects classes scratch, --baseline {models['other']} classes "
        "scratch,dent: a comparison needs models of the same classes"
    ) in err

    # the same file, however it is named
    monkeypatch.chdir(models["v2"].parent)
    os.link(models["v2"], tmp_path / "linked.pt")
    for other in (v2, "v2.pt", f"../{models['v2'].parent.name}/v2.pt", str(tmp_path / "linked.pt")):
        assert main([*base, "--checkpoint", v2, "--baseline", other]) == 2, other
        assert f"--checkpoint {v2} and --baseline {other} are the same file" in (
            capsys.readouterr().err
        )

    assert main([*base, "--model", str(tmp_path), "--baseline", v1]) == 2
    assert "--baseline compares two checkpoints, not exports" in capsys.readouterr().err
    assert main([*base, "--checkpoint", v2, "--bootstrap", "5"]) == 2
    assert "--bootstrap is for --baseline only" in capsys.readouterr().err
    assert main([*base, "--checkpoint", v2, "--seed", "1"]) == 2
    assert "--seed is for --baseline only" in capsys.readouterr().err
    assert main([*base, "--checkpoint", v2, "--baseline", str(tmp_path / "none.pt")]) == 2
    assert f"{tmp_path / 'none.pt'}: no such checkpoint file" in capsys.readouterr().err

    for argv, said in (
        (["--baseline", v1, "--baseline", v2], "argument --baseline: given twice"),
        (["--baseline", v1, "--bootstrap", "-1"], "argument --bootstrap"),
        (["--baseline", v1, "--seed", "-1"], "argument --seed"),
    ):
        with pytest.raises(SystemExit) as stopped:
            main([*base, "--checkpoint", v2, *argv])
        assert stopped.value.code == 2 and said in capsys.readouterr().err


def test_the_threshold_is_stored_before_the_bootstrap_runs(
    voc_tree, models, tmp_path, monkeypatch, one_torch_thread
):
    """The check that the checkpoint was not replaced while it was evaluated ran before the
    bootstrap, the store after it: a training run writing best.pt meanwhile (minutes on a large
    split) had its newer model overwritten by the evaluated one. Now the store comes first."""
    import splitdet.training.compare as compare_module

    candidate = _copy(models["v2"], tmp_path / "v2", "best.pt")
    baseline = _copy(models["v1"], tmp_path / "v1", "best.pt")
    newer = models["v1"].read_bytes()  # what "training" writes while the bootstrap runs
    real_compare = compare_module.compare

    def training_writes_meanwhile(*args, **kwargs):
        replacement = candidate.with_name("best.pt.new")
        replacement.write_bytes(newer)
        os.replace(replacement, candidate)
        return real_compare(*args, **kwargs)

    monkeypatch.setattr(compare_module, "compare", training_writes_meanwhile)
    result = _eval(voc_tree, candidate, tmp_path / "out.json", "--baseline", str(baseline),
                   "--bootstrap", "2")  # fmt: skip
    assert result["gate_threshold_stored"] is True
    assert candidate.read_bytes() == newer  # the newer model, not the evaluated one put back
