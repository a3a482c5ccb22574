"""`splitdet demo`: the whole system on this machine, end to end, on built-in defaults.

    data      synthetic gaskets (cached)              splitdet synth
    model     the CPU preset, trained once (cached)   splitdet train / eval (gate calibrated)
    export    edge ONNX + cloud weights (cached)      splitdet export
    live      a cloud server and an edge daemon as separate processes; a "camera" drops a
              stream of images at a 5% defect rate into the daemon's hot folder; a progress
              bar follows the daemon's results database
    summary   images per second, defects found with their boxes, bytes sent, mAP on the
              stream — all read back from the daemon's database, not from memory
    bench     a short benchmark report with its figures

Every process it starts is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from splitdet.bench.processes import ServiceProcess, splitdet_command
from splitdet.bench.streams import make_stream, rates_problem, stream_problem
from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.cli import main as splitdet
from splitdet.shared.manifest import file_sha256
from splitdet.shared.progress import progress_off
from splitdet.shared.strict_json import strict_dumps
from splitdet.training.presets import PRESETS
from splitdet.training.synth_image import GENERATOR_VERSION
from splitdet.training.voc import VocSample

#: Boxes at or above this score are listed as found defects (mAP uses every box).
SHOW_SCORE = 0.5

#: The files of live/ the demo's processes write (each database with SQLite's and the writer
#: lock's files beside it, the logs, the ready files, an atomic write's hidden temporary), and
#: the folders in it that the camera and the daemon fill (hot folder, archive, quarantine).
_LIVE_FILE = re.compile(r"\.?(edge|cloud)\.(sqlite[-.\w]*|log|ready\.json)(\.\w{8}\.tmp)?")
_LIVE_FOLDERS = ("camera", "archive", "quarantine")
#: In every name in those folders: the camera's frame_NNNNN, or the daemon's names made from it
#: (ID_frame_NNNNN.png archived, its .reason.txt, hidden .part and partial copies).
_FRAME = re.compile(r"frame_\d{5}")
#: The daemon's annotated images (IMAGEID_frame_NNNNN.jpg, or their hidden temporary).
_ANNOTATED = re.compile(r"\.?\d{8}_frame_\d{5}\.jpg(\.\w{8}\.tmp)?")
#: The checkpoints `train` refuses to start afresh over, which the demo deletes to retrain.
_CHECKPOINTS = ("last.pt", "best.pt")


@dataclass(frozen=True)
class DemoConfig:
    """The demo's settings; the defaults are what `make demo` runs.

    Attributes:
        workdir: cache and outputs (data/, run/, model/, live/, bench/, summary.json).
        preset: training preset (cpu: the 30-minute CPU preset; tiny: for tests).
        train_minutes: training budget; None keeps the preset's.
        image_size: synthetic images, (width, height) px.
        dataset: counts for `splitdet synth` (defective, free, test defective, test free).
        stream_images, defect_rate: the camera's stream.
        camera_interval_s: pause between two images the camera drops.
        bench_images: images per stream of the short benchmark (0: skip it).
        threads: compute threads per process (default: all cores).
    """

    workdir: Path
    preset: str = "cpu"
    train_minutes: float | None = None
    image_size: tuple[int, int] = (612, 512)
    dataset: tuple[int, int, int, int] = (400, 150, 60, 140)
    seed: int = 0
    stream_images: int = 100
    defect_rate: float = 0.05
    camera_interval_s: float = 0.05
    bench_images: int = 20
    bench_rates: tuple[float, ...] = (0.05, 0.5)
    threads: int | None = None
    progress: bool = True
    live_timeout_s: float = 900.0

    def paths(self) -> dict[str, Path]:
        """Where each stage keeps its output."""
        root = self.workdir
        names = ("data", "run", "model", "live", "bench", "annotated")
        return {name: root / name for name in names} | {"summary": root / "summary.json"}


@dataclass
class StageTimes:
    """Wall-clock seconds per stage of this run (a cached stage costs its check only)."""

    seconds: dict[str, float] = field(default_factory=dict)
    cached: dict[str, bool] = field(default_factory=dict)


def _stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, data: dict) -> None:
    atomic_write(path, strict_dumps(data, indent=2) + "\n")


def _run(args: list[str]) -> None:
    """`splitdet ARGS` in this process; RuntimeError when it fails, KeyboardInterrupt when it
    was interrupted (130: Ctrl-C, which it reported already), SystemExit(143) when it stopped
    on SIGTERM (as `train` does, saying so)."""
    code = splitdet(args)
    if code == 130:
        raise KeyboardInterrupt
    if code == 143:  # (train stopped on SIGTERM, and said so): the demo stops as it did
        raise SystemExit(143)
    if code != 0:
        raise RuntimeError(f"splitdet {' '.join(args)} failed with status {code}")


# ------------------------------------------------------------- what the demo may delete
# The demo deletes only what it wrote: checkpoints beside its training stamp, and live/ and
# annotated/ when every file in them is of a kind it writes there. No marker file: the stamp
# (run/demo-train.json, written before every training since the first demo) and the names of
# those files are the same in a workdir an earlier version made, which a re-run keeps using.


def _train_stamp(run_dir: Path) -> dict | None:
    """The demo's training stamp in `run_dir` (a JSON object with "settings"), or None."""
    found = _stamp(run_dir / "demo-train.json")
    return found if isinstance(found, dict) and "settings" in found else None


def foreign_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoints in `run_dir` that retraining would delete but the demo may not have
    written: all that are there, unless its training stamp is beside them."""
    present = [run_dir / name for name in _CHECKPOINTS if (run_dir / name).exists()]
    if not present or _train_stamp(run_dir) is not None:
        return []
    return present


def _foreign_in_live(live: Path) -> list[Path]:
    """What in `live` the demo's processes never write (see `_LIVE_FILE`, `_LIVE_FOLDERS`)."""
    foreign = []
    for entry in sorted(live.iterdir()):
        if entry.name in _LIVE_FOLDERS and entry.is_dir() and not entry.is_symlink():
            foreign += _foreign_files(entry, _FRAME.search)
        elif not (_LIVE_FILE.fullmatch(entry.name) and _regular_file(entry)):
            foreign.append(entry)
    return foreign


def _foreign_files(folder: Path, matches: Callable[[str], object]) -> list[Path]:
    """What in `folder` is not a regular file whose name `matches` (a folder, a link, another
    name): nothing the demo puts there."""
    return [p for p in sorted(folder.iterdir()) if not (matches(p.name) and _regular_file(p))]


def _regular_file(path: Path) -> bool:
    """A file, not a link to one (the demo makes no links; rmtree would delete a link)."""
    return path.is_file() and not path.is_symlink()


def foreign_outputs(folder: Path, kind: str) -> list[Path]:
    """What in the demo's `kind` folder ("live" or "annotated") it did not write: its whole
    contents would be deleted for the next live run. `[folder]` itself when it is a link or not
    a folder; [] when it is not there."""
    if not folder.exists() and not folder.is_symlink():
        return []
    if folder.is_symlink() or not folder.is_dir():
        return [folder]
    if kind == "live":
        return _foreign_in_live(folder)
    return _foreign_files(folder, _ANNOTATED.fullmatch)


def _refusal(config: DemoConfig, folder: Path, foreign: list[Path], why: str) -> ValueError:
    """The one-line refusal to delete `foreign`, which the demo did not write, in `folder`."""
    shown = ", ".join(p.name if p != folder else str(p) for p in foreign[:3])
    if len(foreign) > 3:
        shown += f" and {len(foreign) - 3} more"
    return ValueError(
        f"--workdir {config.workdir}: {folder} holds {shown}, which splitdet demo did not "
        f"write ({why}) and would delete; choose another --workdir or remove them yourself"
    )


def check_checkpoints(config: DemoConfig) -> None:
    """ValueError when retraining would delete checkpoints the demo did not write."""
    run_dir = config.paths()["run"]
    foreign = foreign_checkpoints(run_dir)
    if foreign:
        raise _refusal(config, run_dir, foreign, "no demo-train.json beside them")


def check_live_outputs(config: DemoConfig) -> None:
    """ValueError when clearing live/ or annotated/ would delete what the demo did not write."""
    paths = config.paths()
    for kind in ("live", "annotated"):
        foreign = foreign_outputs(paths[kind], kind)
        if foreign:
            why = "not a folder" if foreign == [paths[kind]] else "not a file the demo writes"
            raise _refusal(config, paths[kind], foreign, why)


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the demo's in-process train and eval (which
    take no thread option), put back after; left as it is (torch's, or OMP_NUM_THREADS's) when
    None."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------- stages


def make_data(config: DemoConfig) -> bool:
    """Synthetic dataset; True when it was already there."""
    out = config.paths()["data"]
    wanted = {
        "size": list(config.image_size),
        "counts": list(config.dataset),
        "seed": config.seed,
        "generator_version": GENERATOR_VERSION,  # a new generator makes the cached data stale
    }
    stamp = out / "demo-data.json"
    if _stamp(stamp) == wanted:
        return True
    defective, free, test_defective, test_free = config.dataset
    width, height = config.image_size
    args = [
        "synth",
        "--out",
        str(out),
        "--size",
        f"{width}x{height}",
        "--seed",
        str(config.seed),
        "--defective",
        str(defective),
        "--free",
        str(free),
        "--test-defective",
        str(test_defective),
        "--test-free",
        str(test_free),
    ]
    if out.exists():
        args.append("--overwrite")
    if progress_off(not config.progress):  # (no bars into a log file either)
        args.append("--no-progress")
    _run(args)
    _write_stamp(stamp, wanted)
    return False


def train_model(config: DemoConfig) -> bool:
    """Train the preset and calibrate its gate on the validation split; True when cached."""
    paths = config.paths()
    run_dir, data = paths["run"], paths["data"]
    wanted = {
        "preset": config.preset,
        "recipe": PRESETS[config.preset].to_dict(),  # a changed preset retrains
        "minutes": config.train_minutes,
        "seed": config.seed,
        "data": _stamp(data / "demo-data.json"),
    }
    stamp = run_dir / "demo-train.json"
    checkpoint = run_dir / "best.pt"
    found = _stamp(stamp)
    if (
        found
        and found.get("settings") == wanted
        and checkpoint.is_file()
        and found.get("checkpoint_sha256") == file_sha256(checkpoint)
    ):
        return True
    args = [
        "train",
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--preset",
        config.preset,
        "--seed",
        str(config.seed),
    ]
    if config.train_minutes is not None:
        args += ["--minutes", str(config.train_minutes)]
    if (run_dir / "last.pt").is_file() and found and found.get("settings") == wanted:
        args.append("--resume")  # an interrupted demo continues where it stopped
    else:  # train refuses to start afresh over a run: clear the demo's own (of other settings)
        check_checkpoints(config)  # (and never one it did not write)
        for name in _CHECKPOINTS:
            (run_dir / name).unlink(missing_ok=True)
    if progress_off(not config.progress):  # (no bars into a log file either)
        args.append("--no-progress")
    _write_stamp(stamp, {"settings": wanted, "complete": False})
    with _torch_threads(config.threads):  # --threads: train and eval have no option for it
        _train(args, run_dir)
        _run(
            [
                "eval",
                "--data",
                str(data),
                "--checkpoint",
                str(checkpoint),
                "--split",
                "test",
                "--calibrate-split",
                "val",
                "--json",
                str(run_dir / "eval.json"),
                "--no-progress",
            ]
        )
    _write_stamp(
        stamp, {"settings": wanted, "complete": True, "checkpoint_sha256": file_sha256(checkpoint)}
    )
    return False


def _train(args: list[str], run_dir: Path) -> None:
    """`splitdet train ARGS`; on SIGTERM, says what the same demo command does next."""
    try:
        _run(args)
    except SystemExit:  # SIGTERM: train named its own command; the demo's is simpler
        kept = "continues from its last finished epoch"
        if not (run_dir / "last.pt").is_file():
            kept = "trains from the start (no epoch had finished)"
        print(f"splitdet demo: stopped on SIGTERM while training; the same `splitdet demo` "
              f"command {kept}", file=sys.stderr)  # fmt: skip
        raise


def export_model(config: DemoConfig) -> bool:
    """Export the calibrated checkpoint; True when the export is already of this checkpoint."""
    paths = config.paths()
    checkpoint = paths["run"] / "best.pt"
    stamp = paths["model"] / "demo-export.json"
    digest = file_sha256(checkpoint)
    if (_stamp(stamp) or {}).get("checkpoint_sha256") == digest:
        return True
    _run(["export", "--checkpoint", str(checkpoint), "--out", str(paths["model"])])
    _write_stamp(stamp, {"checkpoint_sha256": digest})
    return False


def _final_rows(db_path: Path) -> list[dict]:
    from splitdet.edge.store_file import StoreError, open_readonly
    from splitdet.edge.store_reads import iter_results
    from splitdet.edge.store_schema import FINAL_VERDICTS

    try:
        db = open_readonly(db_path)
    except StoreError:
        return []
    try:
        return [r for r in iter_results(db) if r["verdict"] in FINAL_VERDICTS]
    finally:
        db.close()


def run_live(config: DemoConfig) -> dict:
    """Cloud server + edge daemon + camera; returns the summary read back from the database."""
    from splitdet.training.voc import read_split

    paths = config.paths()
    live = paths["live"]
    clear_live_outputs(config)
    hot = live / "camera"
    hot.mkdir(parents=True)
    db_path = live / "edge.sqlite"
    threads = str(config.threads or 2)
    samples = read_split(paths["data"], "test")
    stream = make_stream(samples, config.defect_rate, config.stream_images, config.seed)

    cloud = ServiceProcess(
        splitdet_command(
            "cloud",
            "--model",
            str(paths["model"]),
            "--listen",
            "127.0.0.1:0",
            "--threads",
            threads,
            "--answers-db",
            str(live / "cloud.sqlite"),
            "--metrics-port",
            "0",
            "--metrics-host",
            "127.0.0.1",
            "--ready-file",
            str(live / "cloud.ready.json"),
        ),
        log_path=live / "cloud.log",
        name="cloud server",
        ready_file=live / "cloud.ready.json",
    )
    with cloud:
        edge = ServiceProcess(
            splitdet_command(
                "edge",
                "run",
                "--model",
                str(paths["model"]),
                "--watch",
                str(hot),
                "--cloud",
                f"127.0.0.1:{cloud.ready['port']}",
                "--db",
                str(db_path),
                "--after",
                "archive",
                "--archive",
                str(live / "archive"),
                "--quarantine",
                str(live / "quarantine"),
                "--threads",
                threads,
                "--settle",
                "0.2",
                "--poll",
                "0.1",
                "--retry-max",
                "5",
                "--save-annotated",
                str(paths["annotated"]),
                "--metrics-port",
                "0",
                "--metrics-host",
                "127.0.0.1",
                "--ready-file",
                str(live / "edge.ready.json"),
            ),
            log_path=live / "edge.log",
            name="edge daemon",
            ready_file=live / "edge.ready.json",
        )
        with edge:
            names = _feed_camera(config, stream, hot, db_path)
            edge_status = edge.stop()
        cloud_status = cloud.stop()
    rows = _final_rows(db_path)
    summary = summarise_live(rows, names, stream, config)
    summary["exit_status"] = {"edge": edge_status, "cloud": cloud_status}
    return summary


def clear_live_outputs(config: DemoConfig) -> None:
    """Delete an earlier live run's live/ and annotated/: this run's summary and images must be
    its own. Only the demo's: ValueError naming what it did not write, deleting nothing."""
    check_live_outputs(config)
    for kind in ("live", "annotated"):
        if config.paths()[kind].exists():
            shutil.rmtree(config.paths()[kind])


def _feed_camera(
    config: DemoConfig, stream: list[VocSample], hot: Path, db_path: Path
) -> list[str]:
    """Drop the stream's images into the hot folder as a camera would; wait for their results."""
    names = []
    bar = tqdm(
        total=len(stream),
        unit="img",
        desc="edge results",
        disable=progress_off(not config.progress),  # (no bars into a log file)
        file=sys.stderr,
    )
    deadline = time.monotonic() + config.live_timeout_s
    done = 0
    for index, sample in enumerate(stream):
        name = f"frame_{index:05d}{sample.image_path.suffix}"
        # written under a temporary name and renamed: what camera software does to publish a
        # complete file (the daemon also copes with slow writers; see its tests)
        tmp = hot / f".{name}.part"
        shutil.copyfile(sample.image_path, tmp)
        tmp.rename(hot / name)
        names.append(name)
        time.sleep(config.camera_interval_s)
        done = _update(bar, db_path, done)
    while done < len(stream):
        if time.monotonic() > deadline:
            bar.close()
            raise TimeoutError(
                f"only {done} of {len(stream)} images had a final result after "
                f"{config.live_timeout_s:.0f} s; see the logs in {hot.parent}"
            )
        time.sleep(0.25)
        done = _update(bar, db_path, done)
    bar.close()
    return names


def _update(bar: tqdm, db_path: Path, done: int) -> int:
    now = len(_final_rows(db_path))
    bar.update(now - done)
    return now


def summarise_live(
    rows: list[dict], names: list[str], stream: list[VocSample], config: DemoConfig
) -> dict:
    """The demo's summary, computed from the daemon's result rows.

    `names[i]` is the file name the camera gave `stream[i]`; rows are matched to it by name.
    """
    from splitdet.training.evaluate import coco_metrics

    by_name = {Path(r["path"]).name: r for r in rows}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no final result, e.g. {missing[:3]}")
    matched = [by_name[n] for n in names]
    started = min(r["arrived"] for r in matched)
    finished = max(r["finished"] for r in matched)
    boxes = [r["boxes"] or [] for r in matched]
    scores = [r["scores"] or [] for r in matched]
    labels = [r["labels"] or [] for r in matched]
    class_names = sorted({o.name for s in stream for o in s.objects}) or ["scratch"]
    metrics = coco_metrics(stream, boxes, scores, labels, class_names)
    defects = []
    for name, row, sample in zip(names, matched, stream, strict=True):
        if row["verdict"] != "defect":
            continue
        shown = [
            {"box": [round(v, 1) for v in box], "score": round(score, 3), "class": cls}
            for box, score, cls in zip(
                row["boxes"] or [], row["scores"] or [], row["class_names"] or [], strict=True
            )
            if score >= SHOW_SCORE
        ]
        defects.append(
            {
                "image": name,
                "p_defect": row["p_defect"],
                "truly_defective": sample.is_defective,
                "boxes": shown,
            }
        )
    truly = sum(s.is_defective for s in stream)
    caught = sum(d["truly_defective"] for d in defects)
    return {
        "images": len(matched),
        "defect_rate": config.defect_rate,
        "verdicts": {v: sum(r["verdict"] == v for r in matched) for v in ("ok", "defect", "error")},
        "images_per_s": len(matched) / max(finished - started, 1e-9),
        "wall_s": finished - started,
        "defective_in_stream": truly,
        "defective_caught": caught,
        "bytes_sent": int(sum(r["bytes_sent"] or 0 for r in matched)),
        "map": metrics["map"],
        "map50": metrics["map50"],
        "defects": defects,
    }


#: Flagged images the terminal's summary lists one by one; summary.json holds every one.
SHOWN_DEFECTS = 12


def format_summary(summary: dict, paths: dict[str, Path], benchmarked: bool = True) -> str:
    """The summary as the terminal shows it (`benchmarked`: whether this run made the short
    benchmark's report; a report an earlier run left is not named)."""
    from splitdet.shared.probability_format import format_probability

    lines = [
        "",
        "splitdet demo — what happened",
        f"  images           {summary['images']} at a {summary['defect_rate']:.0%} defect rate "
        f"({summary['defective_in_stream']} defective)",
        f"  throughput       {summary['images_per_s']:.2f} images/s "
        f"({summary['wall_s']:.1f} s from first arrival to last result)",
        f"  verdicts         {summary['verdicts']['ok']} ok, {summary['verdicts']['defect']} "
        f"defect, {summary['verdicts']['error']} error; {summary['defective_caught']} of "
        f"{summary['defective_in_stream']} defective images flagged",
        f"  bytes sent       {summary['bytes_sent'] / 1e6:.2f} MB of features "
        f"({summary['bytes_sent'] / max(summary['images'], 1) / 1e3:.1f} kB per image)",
        f"  mAP on stream    {_num(summary['map'])} (mAP@.5 {_num(summary['map50'])})",
        "  defects found (boxes scoring >= 0.5, original pixels):",
    ]
    defects = summary["defects"]
    for defect in defects[:SHOWN_DEFECTS]:
        truth = "" if defect["truly_defective"] else "  (false alarm)"
        boxes = "; ".join(f"{b['class']} {b['score']:.2f} at {b['box']}" for b in defect["boxes"])
        p = format_probability(defect["p_defect"])
        lines.append(f"    {defect['image']}  p={p}  {boxes or '-'}{truth}")
    if len(defects) > SHOWN_DEFECTS:  # (a weak model flags most of a stream: 100 lines)
        rest = defects[SHOWN_DEFECTS:]
        false = sum(not d["truly_defective"] for d in rest)
        lines.append(
            f"    and {len(rest)} more ({false} false alarm(s) among them): every one in "
            f"{paths['summary']}"
        )
    lines += [
        f"  annotated images {paths['annotated']}",
        f"  results database {paths['live'] / 'edge.sqlite'} (splitdet edge results --db ...)",
        "  benchmark        "
        + (str(paths["bench"] / "report.md") if benchmarked else "not run (--bench-images 0)"),
    ]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_bench(config: DemoConfig) -> None:
    """A short benchmark of the trained model on the test split."""
    from splitdet.bench.run import BenchConfig, run_benchmark

    paths = config.paths()
    run_benchmark(
        BenchConfig(
            model_dir=paths["model"],
            checkpoint=paths["run"] / "best.pt",
            data_dir=paths["data"],
            out_dir=paths["bench"],
            defect_rates=config.bench_rates,
            n_images=config.bench_images,
            codecs=("int8",),
            rd_qualities=(95, 50),
            rd_images=min(5, config.bench_images),
            seed=config.seed,
            threads=config.threads,
            progress=config.progress,
            command="splitdet demo",
        )
    )


def check_config(config: DemoConfig) -> None:
    """ValueError naming the option, before the stages: not after half an hour of training."""
    problem = stream_problem("--defect-rate", config.defect_rate, "--images", config.stream_images)
    if problem:
        raise ValueError(problem)
    if config.bench_images:  # (each rate possible, and two never the same stream)
        problem = rates_problem("the benchmark's rate", config.bench_rates, "--bench-images",
                                config.bench_images)  # fmt: skip
        if problem:
            raise ValueError(problem + " (or 0 to skip the benchmark)")
    try:
        config.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"--workdir {config.workdir}: cannot create it ({exc.strerror or exc})"
        ) from None
    if not os.access(config.workdir, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir {config.workdir}: not writable")
    check_checkpoints(config)  # what the stages would delete, refused now: not after training
    check_live_outputs(config)


def run_demo(config: DemoConfig) -> dict:
    """All stages; returns the summary (also written to workdir/summary.json)."""
    check_config(config)
    times = StageTimes()
    for name, stage in (("data", make_data), ("train", train_model), ("export", export_model)):
        start = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        times.cached[name] = stage(config)
        times.seconds[name] = time.perf_counter() - start
        if times.cached[name]:
            print(f"   cached ({config.paths()[_OUTPUT[name]]})", file=sys.stderr)
    start = time.perf_counter()
    print("== live: cloud server + edge daemon + camera", file=sys.stderr, flush=True)
    summary = run_live(config)
    times.seconds["live"] = time.perf_counter() - start
    if config.bench_images:
        start = time.perf_counter()
        print("== bench", file=sys.stderr, flush=True)
        run_bench(config)
        times.seconds["bench"] = time.perf_counter() - start
    summary["stages"] = asdict(times)
    summary["config"] = {
        k: str(v) if isinstance(v, Path) else v for k, v in asdict(replace(config)).items()
    }
    _write_stamp(config.paths()["summary"], summary)
    print(format_summary(summary, config.paths(), benchmarked=bool(config.bench_images)))
    return summary


_OUTPUT = {"data": "data", "train": "run", "export": "model"}
