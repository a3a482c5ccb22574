"""The benchmark run: start the servers, stream the images through every system, report.

report = run_benchmark(BenchConfig(model_dir=..., checkpoint=..., data_dir=..., out_dir=...))
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import grpc
import numpy as np
import torch
from tqdm import tqdm

from splitdet.bench.foreign_cpu import foreign_cores, sample_cpu
from splitdet.bench.jpeg_server import JpegClient
from splitdet.bench.processes import (
    ServiceProcess,
    remove_stale_scratch,
    scratch_folder,
    splitdet_command,
    started,
)
from splitdet.bench.report import (
    MONOLITHIC,
    add_confidence_intervals,
    add_engine_reductions,
    earlier_outputs,
    log_header,
    map_kept,
    outcome_rows,
    remove_outputs,
    summarise,
    write_outcomes,
    write_report,
)
from splitdet.bench.streams import make_stream
from splitdet.bench.systems import (
    JpegToCloud,
    Monolithic,
    Outcome,
    PaperGated,
    SameEngines,
    Splitdet,
    jpeg_bytes,
)
from splitdet.edge.client import ClientConfig, CloudClient, CloudError
from splitdet.edge.pipeline import EdgePipeline
from splitdet.edge.preprocess import load_image
from splitdet.edge.runtime import EdgeRuntime
from splitdet.shared.checkpoint import load_model, weights_digest
from splitdet.shared.cores import usable_cores
from splitdet.shared.folder_lock import folder_lock
from splitdet.shared.manifest import CLOUD_WEIGHTS, Manifest, edge_gate_kind, read_manifest
from splitdet.shared.model import CloudHalf, MultiTaskRCNN
from splitdet.shared.progress import progress_off
from splitdet.training.evaluate import coco_metrics
from splitdet.training.voc import VocSample, read_split
from splitdet.training.voc_check_boxes import refuse_too_elongated

# what `_run_streams` runs: every system has `name` and `run(image, decision) -> Outcome`
_System = Monolithic | SameEngines | PaperGated | Splitdet | JpegToCloud


@dataclass(frozen=True)
class BenchConfig:
    """Everything one benchmark run needs.

    Attributes:
        model_dir: `splitdet export` output (edge ONNX + cloud weights).
        checkpoint: the checkpoint it was exported from (the PyTorch baselines run it).
        data_dir: a VOC dataset; streams are drawn from `split`.
        out_dir: where report.json, report.md and the figures go.
        defect_rates: fractions of defective images per stream.
        n_images: images per stream.
        codecs: feature codecs of the splitdet systems.
        jpeg_quality: quality of the JPEG-to-cloud baseline.
        rd_qualities: JPEG qualities of the rate-distortion reference curve.
        rd_images: defective images of the rate-distortion pass (0 skips it).
        threads: compute threads of every process (default: all cores).
        oracle_gate: the gated systems take the ground truth as the gate's verdict (the gate
            still runs): times a perfect gate when the weights are untrained.
        engine_baseline: also run the monolithic detector on splitdet's engines
            (`systems.SameEngines`): what the gate and the split save, the engine aside.
        run_id: in the report: tells this run's report from an earlier run's.
    """

    model_dir: Path
    checkpoint: Path
    data_dir: Path
    out_dir: Path
    defect_rates: tuple[float, ...] = (0.05, 0.12, 0.5)
    n_images: int = 100
    codecs: tuple[str, ...] = ("int8", "fp16", "fp32")
    jpeg_quality: int = 95
    rd_qualities: tuple[int, ...] = (95, 85, 70, 50, 30)
    rd_images: int = 20
    split: str = "test"
    seed: int = 0
    threads: int | None = None
    oracle_gate: bool = False
    engine_baseline: bool = True
    progress: bool = True
    command: str = field(default_factory=lambda: shlex.join(["splitdet", *sys.argv[1:]]))
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def _check_same_weights(model: MultiTaskRCNN, model_dir: Path, manifest: Manifest) -> None:
    """The checkpoint must be the one the model directory was exported from: every weight, when
    the manifest records their digest (exports since it did), else the cloud heads' weights."""
    recorded = manifest.extra.get("weights_sha256")
    if recorded is not None:
        if weights_digest(model) != recorded:
            raise ValueError(
                f"{model_dir} was not exported from this checkpoint (its weights_sha256 differs "
                "from the checkpoint's weights)"
            )
        return
    heads = torch.load(model_dir / CLOUD_WEIGHTS, map_location="cpu", weights_only=True)
    state = model.state_dict()
    for key, value in heads.items():
        if key not in state or not torch.equal(state[key], value):
            raise ValueError(
                f"{model_dir} was not exported from this checkpoint (weights differ at {key})"
            )


def cpu_model() -> str:
    """The CPU's name: /proc/cpuinfo's first "model name", else `platform.processor()` (else
    the machine type)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    return platform.processor() or platform.machine()


def load_1min() -> float | None:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def progress_bar(total: int, progress: bool) -> tqdm:
    """The benchmark's bar over `total` images on stderr: drawn only with `progress` and on a
    terminal (`progress_off`), never into a log file (a new line at every redraw there)."""
    disable = progress_off(not progress)
    return tqdm(total=total, unit="img", desc="benchmark", disable=disable, file=sys.stderr)


def _machine() -> dict:
    names = ("splitdet", "torch", "torchvision", "onnxruntime", "grpcio", "numpy", "zstandard")
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": usable_cores(),
        "python": platform.python_version(),
        "versions": {name: version(name) for name in names},
    }


def _make_streams(config: BenchConfig, samples: list) -> dict[float, list]:
    """Every defect rate's stream, made before anything runs: a split that lacks the images a
    rate needs is named at the start, not after the rates before it have run."""
    try:
        streams = {
            rate: make_stream(samples, rate, config.n_images, config.seed)
            for rate in config.defect_rates
        }
    except ValueError as exc:
        raise ValueError(f"{config.data_dir} ({config.split!r} split): {exc}") from None
    return streams


def _note_repeats(config: BenchConfig, samples: list, streams: dict[float, list]) -> None:
    """Say on stderr when a stream holds an image more than once (a split smaller than it)."""
    if all(len({s.image_id for s in stream}) == len(stream) for stream in streams.values()):
        return
    unique = {s.image_id for stream in streams.values() for s in stream}
    n_defective = sum(s.is_defective for s in samples)
    print(
        f"splitdet bench: note: the {config.split!r} split holds {n_defective} defective and "
        f"{len(samples) - n_defective} defect-free images, so streams of {config.n_images} "
        f"repeat images ({len(unique)} unique in all; report.md counts them per rate)",
        file=sys.stderr,
    )


def _note_stale_scratch() -> None:
    """Remove dead runs' temporary folders (`remove_stale_scratch`), saying so on stderr."""
    removed = remove_stale_scratch()
    if removed:
        print(
            f"splitdet bench: note: removed {len(removed)} temporary folder(s) of earlier runs "
            f"that were killed: {', '.join(str(f) for f in removed)}",
            file=sys.stderr,
        )


class _EarlierReport:
    """An earlier splitdet bench run's report in --out, kept until this run has its own to
    write: a run stopped (Ctrl-C) or failing before its first defect rate leaves it whole.

    Created at the start: ValueError when --out holds outputs splitdet bench may not have
    written (`report.earlier_outputs`), before anything is measured."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.paths = earlier_outputs(out_dir)

    def announce(self) -> None:
        """Say on stderr, once, that this run replaces the earlier report (if there is one)."""
        if self.paths:
            print(
                f"splitdet bench: note: --out {self.out_dir} holds an earlier run's report; "
                "this run replaces it when it writes its first defect rate (stopped before "
                "then, it leaves it as it is; cloud.log and jpeg_server.log are this run's "
                "from its start)",
                file=sys.stderr,
            )

    def remove(self) -> None:
        """Delete the earlier report and figures (once): just before this run's first write, so
        that its partial report never stands beside the earlier run's figures."""
        if self.paths:
            remove_outputs(self.out_dir)
            self.paths = []


def exclusive_out(out_dir: Path) -> contextlib.AbstractContextManager[None]:
    """Create `out_dir` and hold its lock file: a second benchmark writing there at the same
    time would mix its report and figures with this one's. ValueError naming --out otherwise."""
    return folder_lock(out_dir, ".splitdet-bench.lock", "splitdet bench", "--out")


def _run_streams(
    config: BenchConfig,
    systems: list[_System],
    streams: dict[float, list[VocSample]],
    class_names: list[str],
    bar: tqdm,
    on_rate: Callable[[dict[str, dict]], object],
    pixel_bits: int,
    before_write: Callable[[], object] = lambda: None,
    foreign: dict[str, float | None] | None = None,
) -> dict:
    """Every defect rate's stream through every system; `on_rate(results)` after each rate.
    `pixel_bits`: the model's `ModelConfig.pixel_bits` (how 16-bit images are read).
    `before_write()` before each write of the outputs (`_EarlierReport.remove`). `foreign`,
    when given, gets each rate's `foreign_cpu.foreign_cores` (the cores other work kept
    busy while it was measured) before `on_rate` is called."""
    results: dict[str, dict] = {}
    rows: list[dict] = []
    position = 0  # (the order rotates on across rates: no system always goes first in one)
    for rate, stream in streams.items():
        outcomes: dict[str, list[Outcome]] = {s.name: [] for s in systems}
        started = sample_cpu()
        for sample in stream:
            image = load_image(sample.image_path, pixel_bits)
            shift = position % len(systems)  # rotate the order: drift favours no system
            position += 1
            decision = sample.is_defective if config.oracle_gate else None
            for system in systems[shift:] + systems[:shift]:
                outcomes[system.name].append(system.run(image, decision))
            bar.update()
        key = f"{rate:g}"  # (the report's name of the rate)
        if foreign is not None:
            foreign[key] = foreign_cores(started, sample_cpu())
        monolithic = summarise(outcomes[MONOLITHIC], stream, class_names, None)
        results[key] = {MONOLITHIC: monolithic} | {
            name: summarise(found, stream, class_names, monolithic, config.oracle_gate)
            for name, found in outcomes.items()
            if name != MONOLITHIC
        }
        add_engine_reductions(results[key])
        add_confidence_intervals(
            results[key],
            {name: [o.total_s for o in found] for name, found in outcomes.items()},
            [sample.is_defective for sample in stream],
        )
        rows += outcome_rows(key, stream, outcomes)
        before_write()
        write_outcomes(rows, config.out_dir)
        on_rate(results)
    return results


def _rate_distortion(
    config: BenchConfig,
    model: MultiTaskRCNN,
    pipelines: list[EdgePipeline],
    client: CloudClient,
    samples: list[VocSample],
    class_names: list[str],
    bar: tqdm,
) -> dict:
    """mAP kept vs bytes for each codec and JPEG quality on defective test images."""
    defective = [s for s in samples if s.is_defective][: config.rd_images]
    runs: dict[str, list[Outcome]] = {}
    monolithic = Monolithic(model)
    splits = [Splitdet(p, client) for p in pipelines]
    for sample in defective:
        image = load_image(sample.image_path, model.config.pixel_bits)
        runs.setdefault("original", []).append(monolithic.run(image))
        for system in splits:  # every image sent: the codec's loss, not the gate's misses
            runs.setdefault(system.name, []).append(system.run(image, True))
        for quality in config.rd_qualities:
            data = jpeg_bytes(image, quality)
            outcome = monolithic.run(load_image_bytes(data))
            outcome.bytes_sent = len(data)
            runs.setdefault(f"jpeg{quality}", []).append(outcome)
        bar.update()

    def score(outcomes: list[Outcome]) -> float | None:
        return coco_metrics(
            defective,
            [o.boxes for o in outcomes],
            [o.scores for o in outcomes],
            [o.labels for o in outcomes],
            class_names,
        )["map"]

    base = score(runs.pop("original"))
    points = []
    for name, outcomes in runs.items():
        value = score(outcomes)
        points.append(
            {
                "name": name,
                "bytes": float(np.mean([o.bytes_sent for o in outcomes])),
                "map": value,
                "map_kept": map_kept(value, base),
            }
        )
    return {"n_images": len(defective), "map_monolithic": base, "points": points}


def load_image_bytes(data: bytes) -> np.ndarray:
    """Decode JPEG bytes as the edge would (Float32[3, H, W] in [0, 1])."""
    from splitdet.edge.preprocess import decode_image

    return decode_image(data, "<jpeg>")


def _report_head(
    config: BenchConfig,
    manifest: Manifest,
    threads: int,
    streams: dict[float, list[VocSample]] | None = None,
) -> dict:
    """The report's command, machine, model and settings: all but the measurements.

    `complete` stays False until every rate and the rate-distortion pass are done, so a report
    written after each rate says what a stopped run holds. `load_1min` holds the 1-minute load
    average now ("start"); its "end" is set at each write of the report.
    """
    gate = manifest.gate_threshold
    sizes = {(s.width, s.height) for stream in (streams or {}).values() for s in stream}
    return {
        "command": config.command,
        "run_id": config.run_id,
        "machine": _machine(),
        "model": {
            "depth_label": f"ResNet{manifest.model_config.depth}-FPN "
            f"({manifest.model_config.fpn_channels} channels)",
            "input": f"min_size {manifest.model_config.min_size}, "
            f"max_size {manifest.model_config.max_size}",
            "gate_threshold": gate,
            "gate": "oracle (ground truth verdicts)" if config.oracle_gate else "the model's",
            "gate_level": manifest.model_config.gate_level,
            # "int8": `export --quantize-edge`, a lossy edge that every splitdet system and
            # monolithic-split-engines run, but not the torch baselines
            "edge_gate": edge_gate_kind(manifest),
            "fingerprint": manifest.fingerprint,
        },
        "settings": {
            "defect_rates": list(config.defect_rates),
            "n_images": config.n_images,
            "codecs": list(config.codecs),
            "jpeg_quality": config.jpeg_quality,
            "split": config.split,
            "seed": config.seed,
            "threads": threads,
            "oracle_gate": config.oracle_gate,
            "engine_baseline": config.engine_baseline,
            "rd_images": config.rd_images,
            # as the streams' VOC annotations give them (the model resizes: model.input)
            "image_sizes": [f"{w}×{h}" for w, h in sorted(sizes)],
        },
        "load_1min": {"start": load_1min(), "end": None},
        "rate_distortion": None,
        "complete": False,
    }


def _ended(head: dict) -> dict:
    """`head` with the 1-minute load average now as its `load_1min` "end"."""
    return head | {"load_1min": head["load_1min"] | {"end": load_1min()}}


def _measure(
    config: BenchConfig,
    model: MultiTaskRCNN,
    pipelines: list[EdgePipeline],
    samples: list,
    streams: dict[float, list],
    class_names: list[str],
    gate: float,
    head: dict,
    cloud_address: str,
    jpeg_address: str,
    before_write: Callable[[], object],
) -> tuple[dict, dict | None]:
    """Warm up, then every stream through every system and the bytes-vs-mAP pass.

    Returns the per-rate summaries and the rate-distortion result (None when skipped); writes
    a partial report after each rate (`before_write()` before each write)."""
    client = CloudClient(ClientConfig(cloud_address, timeout_s=600))
    jpeg_client = JpegClient(jpeg_address)
    try:
        engines = [SameEngines(pipelines[0], CloudHalf(model))] if config.engine_baseline else []
        systems = [
            Monolithic(model),
            *engines,
            PaperGated(model, gate),
            *(Splitdet(p, client) for p in pipelines),
            JpegToCloud(jpeg_client, config.jpeg_quality),
        ]
        warmup = load_image(samples[0].image_path, model.config.pixel_bits)
        for system in systems:  # first calls pay one-off allocations; not measured
            system.run(warmup, True)  # the whole path, heads and gRPC too, whatever the gate
        n_rd = min(config.rd_images, sum(s.is_defective for s in samples))
        total = len(config.defect_rates) * config.n_images + n_rd
        head["foreign_cores"] = {}  # (filled rate by rate: each write of the report has it)
        with progress_bar(total, config.progress) as bar:
            rates = _run_streams(
                config,
                systems,
                streams,
                class_names,
                bar,
                on_rate=lambda done: write_report(_ended(head) | {"rates": done}, config.out_dir),
                pixel_bits=model.config.pixel_bits,
                before_write=before_write,
                foreign=head["foreign_cores"],
            )
            rd = (
                _rate_distortion(config, model, pipelines, client, samples, class_names, bar)
                if n_rd
                else None
            )
    finally:
        client.close()
        jpeg_client.close()
    return rates, rd


def written_by(config: BenchConfig) -> Path | None:
    """report.md of `config`'s own run (partial or whole), or None: not an earlier run's."""
    try:
        report = json.loads((config.out_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("run_id") != config.run_id:
        return None
    return config.out_dir / "report.md"


def run_benchmark(config: BenchConfig) -> dict:
    """Run every system on every stream; write and return the report."""
    threads = config.threads or usable_cores()
    torch.set_num_threads(threads)
    manifest = read_manifest(config.model_dir)
    # the torch baselines post-process as the export does (its box refinement may differ
    # from the checkpoint's own: `splitdet export --box-refine-steps`)
    refine = manifest.model_config.box_refine_steps
    model, _ = load_model(config.checkpoint, box_refine_steps=refine)
    _check_same_weights(model, config.model_dir, manifest)
    class_names = list(manifest.class_names)
    samples = read_split(config.data_dir, config.split, class_names)  # a foreign class: named
    if not samples:
        raise ValueError(f"{config.data_dir}: the {config.split!r} split is empty")
    refuse_too_elongated(  # (the torch baselines would end in torch's traceback on one)
        samples, manifest.model_config.min_size, manifest.model_config.max_size,
        config.data_dir / "ImageSets" / "Main" / f"{config.split}.txt", "the model's input size",
    )  # fmt: skip
    streams = _make_streams(config, samples)
    with exclusive_out(config.out_dir):
        return _run_locked(config, manifest, model, samples, streams, class_names, threads)


def _run_locked(
    config: BenchConfig,
    manifest: Manifest,
    model: MultiTaskRCNN,
    samples: list[VocSample],
    streams: dict[float, list[VocSample]],
    class_names: list[str],
    threads: int,
) -> dict:
    """The run, once --out is this run's alone: servers up, every system measured, reported."""
    refine = manifest.model_config.box_refine_steps
    earlier = _EarlierReport(config.out_dir)  # (outputs bench did not write: stop here)
    earlier.announce()
    _note_repeats(config, samples, streams)
    _note_stale_scratch()
    runtime = EdgeRuntime(config.model_dir, threads=threads, manifest=manifest)
    pipelines = [EdgePipeline(runtime, codec=codec) for codec in config.codecs]
    gate = manifest.gate_threshold
    # written after each rate: partial reports
    head = _report_head(config, manifest, threads, streams)

    with scratch_folder() as scratch:
        cloud = ServiceProcess(
            splitdet_command(
                "cloud",
                "--model",
                str(config.model_dir),
                "--listen",
                "127.0.0.1:0",
                "--threads",
                str(threads),
                "--answers-db",
                str(scratch / "answers.sqlite"),
                "--ready-file",
                str(scratch / "cloud.json"),
            ),
            log_path=config.out_dir / "cloud.log",
            name="cloud server",
            ready_file=scratch / "cloud.json",
            log_header=log_header("cloud server", config.run_id),
        )
        jpeg = ServiceProcess(
            [
                sys.executable,
                "-m",
                "splitdet.bench.jpeg_server",
                "--checkpoint",
                str(config.checkpoint),
                "--threads",
                str(threads),
                "--box-refine-steps",
                str(refine),
            ],
            log_path=config.out_dir / "jpeg_server.log",
            name="JPEG baseline server",
            ready_prefix="PORT ",
            log_header=log_header("JPEG baseline server", config.run_id),
        )
        with started(cloud, jpeg):  # (their start-ups overlap)
            cloud_address = f"127.0.0.1:{cloud.ready['port']}"
            jpeg_address = f"127.0.0.1:{jpeg.ready['line'].split()[1]}"
            try:
                rates, rd = _measure(
                    config,
                    model,
                    pipelines,
                    samples,
                    streams,
                    class_names,
                    gate,
                    head,
                    cloud_address,
                    jpeg_address,
                    before_write=earlier.remove,
                )
            except CloudError as exc:  # e.g. the server died: name it, show the end of its log
                raise cloud.failed_mid_run(str(exc)) from None
            except grpc.RpcError as exc:
                raise jpeg.failed_mid_run(f"{exc.code().name}: {exc.details()}") from None

    report = _ended(head) | {"rates": rates, "rate_distortion": rd, "complete": True}
    earlier.remove()  # (done before the first rate's write already)
    write_report(report, config.out_dir)
    return report
