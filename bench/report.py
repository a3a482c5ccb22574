"""Benchmark figures and tables: per system and defect rate, from the recorded outcomes."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from splitdet.bench.systems import SAME_ENGINES, Outcome
from splitdet.shared.agg_pyplot import agg_pyplot
from splitdet.shared.atomic_file import atomic_write
from splitdet.shared.strict_json import strict_dumps
from splitdet.training.evaluate import coco_metrics
from splitdet.training.evaluate_coco import MAP_KEPT_FLOOR
from splitdet.training.voc import VocSample

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.container import ErrorbarContainer
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

#: The paper's reported inference-time reductions at defect rates 5%, 12%, 50% (Table / Fig. 5).
PAPER_REDUCTIONS = {0.05: 0.4246, 0.12: 0.376, 0.5: 0.2128}
#: Link speeds for the computed transfer times, bits per second.
LINKS = {"100mbit": 100e6, "1gbit": 1e9}
MONOLITHIC = "monolithic"
#: A gated system's label under --oracle-gate (the gate's verdicts are the ground truth).
UPPER_BOUND = "perfect gate"
#: Below either count a defect rate's figures are noisy (report.md says so under its heading).
NOISY_DEFECTIVE = 10
NOISY_IMAGES = 50
#: A gated system's gate recall below which its rate gets a warning in report.md: its time
#: reduction then comes mostly from not sending the defective images on, not from the split.
LOW_GATE_RECALL = 0.5
#: report.json's "generator": marks a report (and the outputs beside it) as splitdet bench's.
GENERATOR = "splitdet bench"
#: Keys every report.json of splitdet bench had before it carried "generator".
OLD_REPORT_KEYS = frozenset({"command", "machine", "model", "rates"})
#: Every image through every system, one row each (`write_outcomes`): what the figures are from.
OUTCOMES_CSV = "outcomes.csv"
#: Every file a run writes (`write_report`, `write_outcomes`).
OUTPUTS = (
    OUTCOMES_CSV,
    "report.json",
    "report.md",
    "time_vs_defect_rate.png",
    "reduction_vs_defect_rate.png",
    "bytes_vs_map_kept.png",
)
#: The servers' logs (`ServiceProcess` writes them from their start; a failed run's message
#: quotes them): a run's outputs too, overwritten by the next run's servers.
LOGS = ("cloud.log", "jpeg_server.log")
#: The first line of every log in `LOGS` (`log_header`): marks it as splitdet bench's even
#: without a report.json beside it (a run stopped before its first defect rate).
LOG_HEADER = f"# {GENERATOR}: "
#: The 95% confidence intervals of each rate's mean times and reductions
#: (`add_confidence_intervals`): a paired percentile bootstrap over the stream's images,
#: stratified (its defective and defect-free images resampled apart), this many resamples,
#: this fixed seed (the same report from the same outcomes), this level.
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
#: Resampled image indices held at once (resamples × images): bounds a long stream's memory.
BOOTSTRAP_CHUNK = 1_000_000


def log_header(server: str, run_id: str) -> str:
    """The line a bench run writes at the top of a server's log (`LOG_HEADER`...)."""
    return f"{LOG_HEADER}{server} log of run {run_id}\n"


def map_kept(ours: float | None, base: float | None) -> float | None:
    """mAP `ours` as a share of the baseline's `base`; None (not measured) when either is
    missing or `base` is under `MAP_KEPT_FLOOR` (a ratio of noise)."""
    if ours is None or base is None or base < MAP_KEPT_FLOOR:
        return None
    return ours / base


def summarise(
    outcomes: Sequence[Outcome],
    stream: Sequence[VocSample],
    class_names: Sequence[str],
    monolithic: dict | None,
    oracle_gate: bool = False,
) -> dict:
    """One system's figures on one stream (see report.md for each key's meaning).

    `monolithic`: the baseline's summary, or None when these outcomes are the baseline's own
    (its reduction and mAP kept are then None: nothing to compare it with). A system without a
    gate (every `Outcome.p_defect` None) has no gate recall (None).

    `oracle_gate`: the gate's verdicts were the ground truth (`--oracle-gate`). A gated system's
    figures are then an upper bound (`upper_bound` "perfect gate"), and its gate recall and mAP
    kept are None: they would measure the ground truth, not the gate (mAP kept could exceed
    100%, the perfect gate dropping the detector's false positives on defect-free images).

    `mean_with_{link}_s`: `mean_s` (loopback) plus the transfer of the mean bytes per image at
    that link speed (`transfer_{link}_s_computed`, 0 for systems that send nothing), and
    `reduction_with_{link}` the reduction vs monolithic computed from it.
    """
    totals = np.array([o.total_s for o in outcomes])
    sent = [o for o in outcomes if o.bytes_sent]
    defective = [o for o, s in zip(outcomes, stream, strict=True) if s.is_defective]
    metrics = coco_metrics(
        stream,
        [o.boxes for o in outcomes],
        [o.scores for o in outcomes],
        [o.labels for o in outcomes],
        class_names,
    )
    bytes_per_image = float(np.mean([o.bytes_sent for o in outcomes]))
    has_gate = any(o.p_defect is not None for o in outcomes)
    summary = {
        "n_images": len(outcomes),
        "n_defective": len(defective),
        "n_unique_images": len({s.image_id for s in stream}),
        "mean_s": float(totals.mean()),
        "p50_s": float(np.percentile(totals, 50)),
        "p95_s": float(np.percentile(totals, 95)),
        "images_per_s": float(1.0 / totals.mean()),
        "edge_s": float(np.mean([o.edge_s for o in outcomes])),
        "cloud_s": float(np.mean([o.cloud_s for o in outcomes])),
        "bytes_per_image": bytes_per_image,
        "bytes_per_sent_image": float(np.mean([o.bytes_sent for o in sent])) if sent else 0.0,
        "sent_fraction": len(sent) / len(outcomes),
        "flagged_fraction": float(np.mean([o.flagged for o in outcomes])),
        "map": metrics["map"],
        "map50": metrics["map50"],
        "has_gate": has_gate,
        "gate_recall": (
            float(np.mean([o.flagged for o in defective])) if defective and has_gate else None
        ),
        # the requested rate rounded to whole images (5% of 11 images is 1 defective, 9.1%)
        "defect_rate_realised": len(defective) / len(outcomes),
    }
    # the same under its first name (it is over the images sent, defective or not)
    summary["bytes_per_defect_image"] = summary["bytes_per_sent_image"]
    for link, bits_per_s in LINKS.items():
        transfer = bytes_per_image * 8 / bits_per_s
        summary[f"transfer_{link}_s_computed"] = transfer
        summary[f"mean_with_{link}_s"] = summary["mean_s"] + transfer
    if monolithic is not None:
        summary["reduction"] = 1.0 - summary["mean_s"] / monolithic["mean_s"]
        for link in LINKS:  # monolithic sends nothing: its loopback mean is its mean anywhere
            with_link = summary[f"mean_with_{link}_s"]
            summary[f"reduction_with_{link}"] = 1.0 - with_link / monolithic["mean_s"]
        for key in ("map", "map50"):
            summary[f"{key}_kept"] = map_kept(summary[key], monolithic[key])
    else:
        summary.update(reduction=None, map_kept=None, map50_kept=None)
        summary.update({f"reduction_with_{link}": None for link in LINKS})
    summary["upper_bound"] = UPPER_BOUND if oracle_gate and has_gate else None
    if summary["upper_bound"]:
        summary.update(gate_recall=None, map_kept=None, map50_kept=None)
    return summary


def bootstrap_means(
    times: dict[str, Sequence[float]],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    *,
    defective: Sequence[bool] | None = None,
) -> dict[str, np.ndarray]:
    """Each system's mean time over `resamples` resamples of one stream's images: system name
    -> [resamples] seconds.

    `times`: system name -> seconds per image, in stream order, the same images for every
    system. `defective`: whether each image (in stream order) is defective. Each resample
    draws the defective images and the defect-free ones apart, each group with replacement
    and its own size kept (a stratified bootstrap: the stream holds exactly its rate's count
    of defective images, so a resample with another count, say none of 2 in 30, would measure
    a stream of another rate, not the timing spread; a gated system's mean moves with that
    count). None: one group, all n images (for a caller that does not know them). Every system
    is averaged over the same drawn indices (a paired bootstrap: the systems ran on the same
    images, so an image slow for all of them moves all of their means, not their ratio).
    Seeded: the same times give the same resampled means.
    """
    arrays = {name: np.asarray(t, dtype=np.float64) for name, t in times.items()}
    lengths = {len(t) for t in arrays.values()}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(f"paired times need one non-zero length for all systems: {lengths}")
    (n,) = lengths
    groups = _strata(n, defective)
    rng = np.random.default_rng(seed)
    rows = max(1, BOOTSTRAP_CHUNK // n)
    means: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        drawn = np.concatenate(
            [group[rng.integers(0, len(group), size=(size, len(group)))] for group in groups],
            axis=1,
        )
        for name, t in arrays.items():
            means[name].append(t[drawn].mean(axis=1))
    return {name: np.concatenate(m) for name, m in means.items()}


def _strata(n: int, defective: Sequence[bool] | None) -> list[np.ndarray]:
    """The stream positions `bootstrap_means` resamples apart: those of the defective images
    and those of the defect-free ones (the empty group left out), or all n for None."""
    if defective is None:
        return [np.arange(n)]
    if len(defective) != n:
        raise ValueError(f"{len(defective)} defective flags for {n} images")
    kinds = np.asarray(defective, dtype=bool)
    return [group for group in (np.flatnonzero(kinds), np.flatnonzero(~kinds)) if len(group)]


def interval(values: np.ndarray, confidence: float = CONFIDENCE) -> list[float]:
    """[low, high]: the central `confidence` share of `values` (percentile interval)."""
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return [float(low), float(high)]


def add_confidence_intervals(
    summaries: dict[str, dict],
    times: dict[str, Sequence[float]],
    defective: Sequence[bool],
) -> None:
    """Give each of one rate's system summaries `mean_s_ci95` (seconds) and `reduction_ci95`
    (vs MONOLITHIC, a fraction like `reduction`; None for MONOLITHIC itself), and, when
    SAME_ENGINES was measured, `reduction_vs_same_engines_ci95` (vs it, from the same
    resamples; None for SAME_ENGINES itself), each [low, high],
    from `bootstrap_means` of `times` (system name -> seconds per image in stream order, every
    system of `summaries`, MONOLITHIC among them), stratified by `defective` (whether each
    image of the stream is defective, in stream order: ``[s.is_defective for s in stream]``).

    They say how much the figures would move with other images of the same kind, as many
    defective ones (the stream's rate), and the per-image timing noise of this run, not what
    changes between runs (other work on the machine, another machine). A stream of at most
    one image of each kind has none (None): every resample is the stream itself, and an
    interval of no width ("0.168 (95% CI 0.168 to 0.168)") would claim a certainty never
    measured.
    """
    if max(Counter(defective).values(), default=0) < 2:
        for summary in summaries.values():
            summary["mean_s_ci95"] = summary["reduction_ci95"] = None
            if SAME_ENGINES in summaries:
                summary["reduction_vs_same_engines_ci95"] = None
        return
    means = bootstrap_means({name: times[name] for name in summaries}, defective=defective)
    base = means[MONOLITHIC]
    engines = means.get(SAME_ENGINES)
    for name, summary in summaries.items():
        summary["mean_s_ci95"] = interval(means[name])
        summary["reduction_ci95"] = (
            None if name == MONOLITHIC else interval(1.0 - means[name] / base)
        )
        if engines is not None:  # (the same resamples: paired with the engine baseline too)
            summary["reduction_vs_same_engines_ci95"] = (
                None if name == SAME_ENGINES else interval(1.0 - means[name] / engines)
            )


def add_engine_reductions(summaries: dict[str, dict]) -> None:
    """Give each of one rate's system summaries its `reduction_vs_same_engines`: the reduction
    of its mean time (loopback) against SAME_ENGINES's, what the gate and the split save on
    splitdet's engines; None for SAME_ENGINES itself, and for all when it was not measured."""
    baseline = summaries.get(SAME_ENGINES)
    for name, summary in summaries.items():
        measured = baseline is not None and name != SAME_ENGINES
        summary["reduction_vs_same_engines"] = (
            1.0 - summary["mean_s"] / baseline["mean_s"] if measured else None
        )


def _engine_lines(report: dict) -> list[str]:
    """What report.md says of the engine baseline (SAME_ENGINES), or why it is missing."""
    if report.get("settings", {}).get("engine_baseline") is False:
        return [f"Engine baseline `{SAME_ENGINES}`: not measured (--no-engine-baseline).", ""]
    if SAME_ENGINES not in next(iter(report.get("rates", {}).values()), {}):
        return []  # (no rate done yet, or a report from before the baseline)
    return [
        f"Engine baseline `{SAME_ENGINES}`: the monolithic detector on splitdet's own engines, "
        "in one process: the edge's preprocessing and ONNX Runtime body and FPN for every "
        "image, then the cloud's torch heads, with no gate, codec or wire. `monolithic` runs "
        "torch eager throughout, so part of a `reduction` is the engine's; `vs same engines` "
        "is what the gate and the split save (less what the codec and the wire cost) on the "
        "same engines.",
        "",
    ]


def _edge_lines(model: dict) -> list[str]:
    """What report.md says of the export's edge graphs: float32, or int8 (`splitdet export
    --quantize-edge`: lossy, and only the ONNX Runtime systems run it); nothing for a report
    from before `model.edge_gate`."""
    kind = model.get("edge_gate")
    if kind is None:
        return []
    if kind != "int8":
        return [f"Edge graphs: {kind}.", ""]
    return [
        "**Edge graphs: int8** (`splitdet export --quantize-edge`, lossy): the splitdet systems "
        f"and `{SAME_ENGINES}` run the quantised body and FPN top; monolithic, paper and the "
        "JPEG baseline run the checkpoint's float weights. Part of a `reduction` is the int8 "
        "engine's, and the detections differ from the float model's.",
        "",
    ]


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _with_ci(value: float | None, bounds: Sequence[float] | None, spec: str) -> str:
    """A figure and its confidence interval, e.g. "+42.5% (95% CI +38.1% to +46.0%)"; the
    figure alone when there is no interval (a report from before them)."""
    if value is None or bounds is None:
        return _fmt(value, spec)
    low, high = (format(b, spec) for b in bounds)
    return f"{format(value, spec)} ({CONFIDENCE:.0%} CI {low} to {high})"


def ci_decimals(bounds: Sequence[float] | None, finest: int = 3) -> int:
    """The decimals a figure with confidence interval `bounds` ([low, high]) supports: down
    to the first significant digit of the interval's half-width (its second when that digit is
    a 1: a half-width of 0.012 s gives 3 decimals, of 0.05 s 2, of 0.3 s 1), never finer than
    `finest` (3: the millisecond, for seconds) nor coarser than whole units; `finest` without
    an interval or with one of no width."""
    if bounds is None:
        return finest
    half = (bounds[1] - bounds[0]) / 2
    if not math.isfinite(half) or half <= 0:
        return finest
    exponent = math.floor(math.log10(half))
    leading_one = half / 10**exponent < 2
    return max(0, min(finest, -exponent + int(leading_one)))


def _mean_with_ci(value: float, bounds: Sequence[float] | None) -> str:
    """A mean time in seconds and its confidence interval, each rounded to what the interval
    supports (`ci_decimals`): "2.46 (95% CI 2.40 to 2.51)", not to the millisecond."""
    return _with_ci(value, bounds, f".{ci_decimals(bounds)}f")


def system_label(name: str, summary: dict) -> str:
    """A system's name in report.md's rows and the figures' legends: "(upper bound: perfect
    gate)" after it when its times are a perfect gate's (`summary["upper_bound"]`)."""
    bound = summary.get("upper_bound")
    return f"{name} (upper bound: {bound})" if bound else name


def _kept_cell(kept: float | None, base: float | None, measured: bool = True) -> str:
    """A mAP kept cell: the share, "n/a (...)" when the baseline mAP `base` is under
    `MAP_KEPT_FLOOR`, "–" when there is nothing to compare (`measured` False: the baseline
    itself, a perfect gate; or no baseline mAP)."""
    if kept is None and measured and base is not None and base < MAP_KEPT_FLOOR:
        return f"n/a (mAP under {MAP_KEPT_FLOOR:g})"
    return _fmt(kept, ".1%")


def gate_warning(systems: dict[str, dict]) -> str | None:
    """The line under a defect rate's heading when a gated system's gate recall is under
    `LOW_GATE_RECALL`: its reduction is bought by missing the defects; None otherwise."""
    low = [
        f"{name} {s['gate_recall']:.0%}"
        for name, s in systems.items()
        if s.get("gate_recall") is not None and s["gate_recall"] < LOW_GATE_RECALL
    ]
    if not low:
        return None
    return (
        f"**Gate misses defects**: gate recall {', '.join(low)} (under "
        f"{LOW_GATE_RECALL:.0%}): these systems skip most defective images, so their "
        "reduction (and the figures' curves for them) is bought by missing the defects, "
        "not earned by the split."
    )


def percent(rate: float) -> str:
    """A requested defect rate as a percentage with the digits it was given: 5%, 12%, 13.5%,
    0.4% (never rounded to a neighbour's label, or to 0% when it is not 0)."""
    return f"{rate * 100:.4g}%"


def rate_heading(rate_key: str, summary: dict) -> str:
    """A defect rate's heading: the requested rate, then the share the run's stream really had
    (rounding: 5% of 11 images is 1 defective, 9.1%), e.g. "Defect rate 5% (run: 1 of 11
    images, 9.1%; 11 unique)"."""
    n, k = summary["n_images"], summary["n_defective"]
    return (
        f"Defect rate {percent(float(rate_key))} (run: {k} of {n} images, "
        f"{summary['defect_rate_realised']:.1%}; "
        f"{summary['n_unique_images']} unique)"
    )


def noise_warning(rate_key: str, summary: dict) -> str | None:
    """The line under a defect rate's heading when its stream is too small for steady figures:
    fewer than `NOISY_IMAGES` images, or (a rate above 0) fewer than `NOISY_DEFECTIVE`
    defective ones; None otherwise."""
    n, k = summary["n_images"], summary["n_defective"]
    few = []
    if float(rate_key) > 0 and k < NOISY_DEFECTIVE:
        few.append(f"{k} defective images (fewer than {NOISY_DEFECTIVE})")
    if n < NOISY_IMAGES:
        few.append(f"{n} images (fewer than {NOISY_IMAGES})")
    if not few:
        return None
    return f"**Noisy**: this stream has only {' and '.join(few)}; its figures are noisy."


#: A 1-minute load average per core at a run's start from which its figures are flagged as
#: unreliable (0.5 on 2 cores: a quarter of them held by other work).
BUSY_LOAD_PER_CORE = 0.25


def busy_load(cpu_count: int | None) -> float:
    """The 1-minute load average from which a run on `cpu_count` cores started busy (one core
    when the count is unknown)."""
    return BUSY_LOAD_PER_CORE * max(cpu_count or 1, 1)


def busy_rates(report: dict) -> dict[str, float]:
    """The rates (report name -> cores) during whose measurement other work kept at least
    `busy_load` of the run's cores busy (`foreign_cpu.foreign_cores`; a report without the
    figure, an older one, has none)."""
    threshold = busy_load((report.get("machine") or {}).get("cpu_count"))
    return {
        rate: cores
        for rate, cores in (report.get("foreign_cores") or {}).items()
        if cores is not None and cores >= threshold
    }


def _machine_lines(report: dict) -> list[str]:
    """What the run measured on: CPU, threads, image sizes, the load before and after."""
    machine, settings = report["machine"], report.get("settings", {})
    cpu = machine.get("cpu_model") or machine.get("processor") or "CPU model unknown"
    threads = settings.get("threads")
    lines = [
        f"Machine: {cpu}, {machine['cpu_count']} cores"
        + (f", {threads} threads per process" if threads else "")
        + f", {machine['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
        "",
    ]
    sizes = settings.get("image_sizes")
    if sizes:
        lines += [f"Original image size(s), width×height: {', '.join(sizes)}.", ""]
    load = report.get("load_1min")
    if load and load.get("start") is not None:  # (None: /proc/loadavg could not be read)
        end = _fmt(load.get("end"), ".2f")
        lines += [
            f"1-minute load average: {load['start']:.2f} at the start, {end} at the end "
            "(the run's own processes add to the end figure; a start figure well above 0 means "
            "other work shared the cores).",
            "",
        ]
        if load["start"] >= busy_load(machine.get("cpu_count")):
            lines += [
                f"**Busy machine**: other work held the cores at the start (load "
                f"{load['start']:.2f} on {machine.get('cpu_count') or 'an unknown number of'} "
                "cores). Under contention torch slows down unequally in this process "
                "(monolithic, paper) and in the servers' threads (up to 4× apart on 2 cores), "
                "so the reductions below are not comparable: run again on an idle machine.",
                "",
            ]
    foreign = {r: c for r, c in (report.get("foreign_cores") or {}).items() if c is not None}
    if foreign:
        held = ", ".join(f"{c:.2f} at {percent(float(r))}" for r, c in foreign.items())
        lines += [
            f"Cores other work kept busy while each rate was measured (this run's own "
            f"processes left out): {held}.",
            "",
        ]
    busy = busy_rates(report)
    if busy:
        named = ", ".join(percent(float(r)) for r in busy)
        lines += [
            f"**Busy machine during the run**: other work took at least "
            f"{BUSY_LOAD_PER_CORE:g} of each core while the {named} stream(s) were measured; "
            "those rates' reductions are not comparable: run again on an idle machine.",
            "",
        ]
    return lines


def _incomplete_line(report: dict) -> str:
    """What a stopped (or running) run's report.md says it holds: the rates done, and that
    the bytes-vs-mAP pass is not, when it was asked for (its `settings.rd_images` above 0;
    a report from before that setting: asked for)."""
    settings = report["settings"]
    done = ", ".join(percent(float(r)) for r in report["rates"]) or "none"
    line = (
        "**Incomplete**: the run stopped, or is still running. Done: defect rates "
        f"{done} (of {', '.join(percent(r) for r in settings['defect_rates'])})"
    )
    if settings.get("rd_images", 1) > 0:
        return line + "; the bytes-vs-mAP pass is not."
    return line + "."


def _rd_skipped_lines(report: dict) -> list[str]:
    """Why a finished run asked for the bytes-vs-mAP pass (`settings.rd_images` above 0) has
    none: its split holds no defective image (the only way a finished run skips it); nothing
    otherwise (a stopped run says so in `_incomplete_line`)."""
    settings = report.get("settings", {})
    asked = settings.get("rd_images", 0)
    if not report.get("complete", True) or report.get("rate_distortion") or not asked:
        return []
    return [
        "## Bytes per defective image vs mAP kept",
        "",
        f"Not measured: the {settings.get('split', 'test')!r} split holds no defective image "
        f"(--rd-images {asked} asked for that many), so there is no table and no "
        "`bytes_vs_map_kept.png`.",
        "",
    ]


def markdown(report: dict) -> str:
    """report.md: the command, the machine, one table per defect rate, the R-D table."""
    lines = [
        "# splitdet benchmark",
        "",
        f"Command: `{report['command']}`",
        "",
    ]
    if not report.get("complete", True):
        lines += [_incomplete_line(report), ""]
    oracle = report.get("settings", {}).get("oracle_gate", False)
    lines += _machine_lines(report)
    lines += [
        "Model: {depth_label}, input {input}, gate threshold {gate_threshold:.4f}, "
        "fingerprint {short}".format(**report["model"], short=report["model"]["fingerprint"][:16]),
        "",
        f"Gate: {report['model'].get('gate', 'the model')}.",
        "",
    ]
    lines += _edge_lines(report["model"])
    lines += _engine_lines(report)
    if oracle:
        lines += [
            "**Upper bound: perfect gate** (`--oracle-gate`): the gated systems took the ground "
            "truth as the gate's verdict (the gate still ran and was timed). Their times are "
            "what a perfect gate would give, and their gate recall and mAP kept are not "
            "measured (–): a perfect gate drops the detector's false positives on defect-free "
            "images, so mAP kept could exceed 100%.",
            "",
        ]
    lines += [
        "Times are wall-clock seconds per image, systems interleaved image by image, the "
        "edge and the servers talking over **loopback**: `mean s` and `reduction` exclude any "
        "network transfer. `edge` = camera-side compute, `cloud` = server compute as the server "
        "measured it. Transfer times are computed from the bytes (not measured): 100 Mbit/s "
        "and 1 Gbit/s; `+100M`/`+1G` columns add them to the loopback mean (and give the "
        "reduction vs monolithic from that sum; monolithic and paper send nothing). "
        "bytes/img = the serialized request on the wire (splitdet: the DetectRequest protobuf, "
        "framing of gRPC/HTTP/2 aside; JPEG: the JPEG file), averaged over all images; "
        "bytes/sent img over the images sent. "
        "mAP is COCO mAP@[.5:.95] on the stream's ground truth (pycocotools); "
        f"kept = vs monolithic, n/a when the monolithic mAP is under {MAP_KEPT_FLOOR:g} (a "
        "ratio of noise). Reduction and mAP kept are – for monolithic (the baseline), "
        "gate recall and flagged (share of images the gate sent on) – for systems without a "
        "gate. Each heading gives the requested defect rate and the share of defective images "
        "the run's stream really had (the count is rounded); the figures plot the latter. "
        f"The {CONFIDENCE:.0%} CI beside a mean and a reduction is a paired, stratified "
        f"bootstrap over the stream's images ({BOOTSTRAP_RESAMPLES} resamples, each drawing "
        "the defective images and the defect-free ones apart, with replacement, as many of "
        "each as the stream holds; the same images for every system; seed "
        f"{BOOTSTRAP_SEED}): how far the figure could move with other images of the same "
        "kind at the stream's defect rate and this run's timing noise; not what changes "
        "between runs (other work on the machine, another machine). A mean and its CI are "
        "given to the first significant digit of the CI's half-width (the second when that "
        "digit is 1), the millisecond at most; report.json keeps them unrounded.",
        "",
    ]
    for rate_key, systems in report["rates"].items():
        first = next(iter(systems.values()))
        lines += [f"## {rate_heading(rate_key, first)}", ""]
        for warning in (noise_warning(rate_key, first), gate_warning(systems)):
            if warning:
                lines += [warning, ""]
        base_map = systems.get(MONOLITHIC, {}).get("map")
        vs_engines = SAME_ENGINES in systems
        lines += [
            "| system | mean s | p50 s | p95 s | img/s | reduction | "
            + ("vs same engines | " if vs_engines else "")
            + "mean s +100M | reduction +100M | mean s +1G | reduction +1G | edge s | cloud s | "
            "bytes/img | bytes/sent img | 100 Mbit/s s | mAP | mAP@.5 | mAP kept | gate recall | "
            "flagged |",
            "|---" * (21 if vs_engines else 20) + "|",
        ]
        for name, s in systems.items():
            label = system_label(name, s)
            measured = name != MONOLITHIC and not s.get("upper_bound")
            engines_cell = (
                _with_ci(
                    s.get("reduction_vs_same_engines"),
                    s.get("reduction_vs_same_engines_ci95"),
                    "+.1%",
                )
                + " | "
                if vs_engines
                else ""
            )
            with_links = " | ".join(
                f"{_fmt(s.get(f'mean_with_{link}_s'), '.3f')} | "
                f"{_fmt(s.get(f'reduction_with_{link}'), '+.1%')}"
                for link in LINKS
            )
            lines.append(
                f"| {label} | {_mean_with_ci(s['mean_s'], s.get('mean_s_ci95'))} | "
                f"{s['p50_s']:.3f} | {s['p95_s']:.3f} | {s['images_per_s']:.2f} | "
                f"{_with_ci(s['reduction'], s.get('reduction_ci95'), '+.1%')} | "
                + engines_cell
                + f"{with_links} | "
                f"{s['edge_s']:.3f} | "
                f"{s['cloud_s']:.3f} | {s['bytes_per_image']:,.0f} | "
                f"{s['bytes_per_sent_image']:,.0f} | "
                f"{s['transfer_100mbit_s_computed']:.3f} | "
                f"{_fmt(s['map'], '.3f')} | {_fmt(s['map50'], '.3f')} | "
                f"{_kept_cell(s.get('map_kept'), base_map, measured)} | "
                f"{_fmt(s['gate_recall'], '.1%')} | "
                f"{_fmt(s['flagged_fraction'] if s.get('has_gate', True) else None, '.1%')} |"
            )
        lines.append("")
    lines += _rd_skipped_lines(report)
    if report.get("rate_distortion"):
        lines += [
            "## Bytes per defective image vs mAP kept",
            "",
            f"On {report['rate_distortion']['n_images']} defective images of the "
            f"{report.get('settings', {}).get('split', 'test')!r} split; mAP kept is "
            "relative to the monolithic detector on the original images (n/a when its mAP is "
            f"under {MAP_KEPT_FLOOR:g}: a ratio of noise).",
            "",
            "| encoding | bytes/image | mAP | mAP kept |",
            "|---|---|---|---|",
        ]
        rd_base = report["rate_distortion"].get("map_monolithic")
        for point in report["rate_distortion"]["points"]:
            lines.append(
                f"| {point['name']} | {point['bytes']:,.0f} | {_fmt(point['map'], '.3f')} | "
                f"{_kept_cell(point['map_kept'], rd_base)} |"
            )
        lines.append("")
    lines += [
        "Figures: " + ", ".join(f"`{f}`" for f in report["figures"]),
        "",
        f"Every image through every system, one row each (the figures above are from them): "
        f"`{OUTCOMES_CSV}`.",
        "",
    ]
    return "\n".join(lines)


#: Each system's colour and marker in every figure of the benchmark (`system_style`): a system
#: looks the same in time_vs_defect_rate.png, reduction_vs_defect_rate.png and
#: bytes_vs_map_kept.png, whichever systems are drawn beside it (matplotlib's colour cycle
#: gave a system another colour in a figure that leaves monolithic out).
SYSTEM_STYLES = {
    MONOLITHIC: ("tab:blue", "o"),
    SAME_ENGINES: ("tab:cyan", "s"),
    "paper": ("tab:orange", "^"),
    "splitdet-int8": ("tab:green", "D"),
    "splitdet-fp16": ("tab:olive", "v"),
    "splitdet-fp32": ("tab:brown", "<"),
}
#: The JPEG baseline's: `jpegNN-to-cloud`, and the JPEG qualities of bytes_vs_map_kept.png.
JPEG_STYLE = ("tab:purple", "P")
#: A system named otherwise: one of these, by a hash of its name (the same in every figure).
OTHER_STYLES = (("tab:red", "X"), ("tab:pink", "h"), ("tab:gray", ">"), ("goldenrod", "p"))
#: The paper's own reductions (black stars) in reduction_vs_defect_rate.png's legend: unlike
#: "paper", the paper's design as this run measured it.
PAPER_REPORTED_LABEL = "reported in the paper (its Fig. 5)"
#: What a figure's footer says of the system "paper" (beside `PAPER_REPORTED_LABEL`).
PAPER_NOTE = "paper = the paper's design (full FPN, gate, heads if flagged) measured in this run"
#: Characters per line of a figure's footer (6.4 inches at 7 points, bold).
FOOTER_WIDTH = 100


def system_style(name: str) -> tuple[str, str]:
    """(matplotlib colour, marker) of system `name` in every benchmark figure."""
    if name in SYSTEM_STYLES:
        return SYSTEM_STYLES[name]
    if name.startswith("jpeg"):
        return JPEG_STYLE
    import zlib

    return OTHER_STYLES[zlib.crc32(name.encode()) % len(OTHER_STYLES)]


def figure_caveats(report: dict) -> list[str]:
    """The flags report.md raises, one short line each, for the figures' footers: the run is
    incomplete (stopped, or still running: its figures are not final), the machine was busy,
    a rate's stream is small (noisy), a gate misses defects."""
    lines = []
    if not report.get("complete", True):
        done = ", ".join(percent(float(r)) for r in report.get("rates", {})) or "none"
        asked = report.get("settings", {}).get("defect_rates")
        of = f" of {', '.join(percent(r) for r in asked)}" if asked else ""
        lines.append(
            f"INCOMPLETE: the run stopped or is still running; defect rates done: {done}{of}"
        )
    machine = report.get("machine") or {}
    load = (report.get("load_1min") or {}).get("start")
    if load is not None and load >= busy_load(machine.get("cpu_count")):
        lines.append(
            f"BUSY MACHINE: load {load:.2f} on {machine.get('cpu_count') or '?'} cores at the "
            "start; the reductions are not comparable (run again on an idle machine)"
        )
    busy = busy_rates(report)
    if busy:
        lines.append(
            f"BUSY MACHINE during the {', '.join(percent(float(r)) for r in busy)} stream(s): "
            "other work took the cores; those reductions are not comparable"
        )
    rates = report.get("rates", {})
    firsts = {r: next(iter(systems.values()), {}) for r, systems in rates.items()}
    noisy = [
        percent(float(r))
        for r, first in firsts.items()
        if "n_images" in first and noise_warning(r, first) is not None
    ]
    if noisy:
        lines.append(f"NOISY: few images at {', '.join(noisy)} (see report.md)")
    missing = [percent(float(r)) for r, systems in rates.items() if gate_warning(systems)]
    if missing:
        lines.append(
            f"GATE MISSES DEFECTS at {', '.join(missing)}: those reductions skip defective "
            "images (see report.md)"
        )
    return lines


def _identity(report: dict) -> str | None:
    """The model a figure measured, as report.md names it (its fingerprint's first 16)."""
    model = report.get("model")
    if not model:
        return None
    parts = [str(model[k]) for k in ("depth_label", "input") if model.get(k)]
    if model.get("edge_gate") == "int8":  # (lossy, and only the ONNX Runtime systems run it)
        parts.append("int8 edge graphs (--quantize-edge)")
    if model.get("fingerprint"):
        parts.append(f"fingerprint {model['fingerprint'][:16]}")
    return "model " + ", ".join(parts) if parts else None


def _finish_figure(fig: Figure, report: dict, notes: Sequence[str] = ()) -> None:
    """Put the model's identity, `notes` (grey) and `figure_caveats` (red) under a figure,
    then lay it out with room for them."""
    import textwrap

    lines = [(line, "dimgrey") for line in filter(None, (_identity(report), *notes))]
    lines += [(line, "tab:red") for line in figure_caveats(report)]
    wrapped = [
        (part, colour) for line, colour in lines for part in textwrap.wrap(line, FOOTER_WIDTH)
    ]
    line_in = 0.14  # inches per footer line (7 points and its spacing)
    width, height = fig.get_size_inches()
    fig.set_size_inches(width, height + line_in * len(wrapped))
    height = fig.get_size_inches()[1]
    for k, (text, colour) in enumerate(reversed(wrapped)):
        fig.text(
            0.01,
            (0.05 + line_in * k) / height,
            text,
            fontsize=7,
            color=colour,
            weight="bold" if colour == "tab:red" else "normal",
            ha="left",
            va="bottom",
        )
    fig.tight_layout(rect=(0, (0.08 + line_in * len(wrapped)) / height, 1, 1))


def _legend_label(report: dict, rates: Sequence[str], name: str) -> str:
    """`system_label` of system `name` in the figures: an upper bound if at any of `rates`."""
    bounded = (report["rates"][r][name] for r in rates)
    return system_label(name, next((s for s in bounded if s.get("upper_bound")), {}))


def _curve(
    ax: Axes,
    x: Sequence[float],
    y: Sequence[float],
    bounds: Sequence[Sequence[float] | None],
    name: str,
    label: str,
    scale: float = 1.0,
) -> Line2D | ErrorbarContainer:
    """One system's curve in its `system_style`, with its confidence intervals as error bars
    when every point has one (`bounds`: [low, high] per point, or None); the legend handle."""
    colour, marker = system_style(name)
    if all(b is not None for b in bounds):
        low = [max(0.0, v - scale * b[0]) for v, b in zip(y, bounds, strict=True)]
        high = [max(0.0, scale * b[1] - v) for v, b in zip(y, bounds, strict=True)]
        return ax.errorbar(
            x, y, yerr=[low, high], color=colour, marker=marker, capsize=3, label=label
        )
    (line,) = ax.plot(x, y, color=colour, marker=marker, label=label)
    return line


def _has_intervals(report: dict, rates: Sequence[str], systems: Sequence[str], key: str) -> bool:
    return any(report["rates"][r][n].get(key) is not None for r in rates for n in systems)


def time_figure(report: dict) -> Figure:
    """The paper's Fig. 4 for our systems: mean time per image vs the streams' defect rates,
    one curve per system in its `system_style`, labelled as report.md's rows (a perfect gate's
    as an upper bound), with their 95% confidence intervals as error bars; under it the model
    and report.md's flags (`figure_caveats`)."""
    plt = agg_pyplot()

    rates = sorted(report["rates"], key=float)
    systems = list(report["rates"][rates[0]])
    x = [100 * report["rates"][r][systems[0]]["defect_rate_realised"] for r in rates]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    handles = [
        _curve(
            ax,
            x,
            [report["rates"][r][name]["mean_s"] for r in rates],
            [report["rates"][r][name].get("mean_s_ci95") for r in rates],
            name,
            _legend_label(report, rates, name),
        )
        for name in systems
    ]
    ax.set(
        xlabel="defect rate of the run's stream (%)",
        ylabel="mean time per image (s)",
        title="Time per image vs defect rate (cf. paper Fig. 4)",
    )
    return _closed_figure(fig, ax, handles, report, rates, systems, "mean_s_ci95")


def reduction_figure(report: dict) -> Figure:
    """The paper's Fig. 5 for our systems: the reduction of the mean time vs monolithic per
    defect rate, one curve per system in its `system_style` (a perfect gate's labelled an upper
    bound in its own legend entry: the title covers the systems without a gate too) with its
    95% confidence intervals as error bars, and the paper's reported ones
    (`PAPER_REPORTED_LABEL`); under it the model and report.md's flags."""
    plt = agg_pyplot()

    rates = sorted(report["rates"], key=float)
    systems = list(report["rates"][rates[0]])
    x = [100 * report["rates"][r][systems[0]]["defect_rate_realised"] for r in rates]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = [name for name in systems if name != MONOLITHIC]
    handles = [
        _curve(
            ax,
            x,
            [100 * report["rates"][r][name]["reduction"] for r in rates],
            [report["rates"][r][name].get("reduction_ci95") for r in rates],
            name,
            _legend_label(report, rates, name),
            scale=100.0,
        )
        for name in drawn
    ]
    handles += ax.plot(
        [100 * r for r in PAPER_REDUCTIONS],
        [100 * v for v in PAPER_REDUCTIONS.values()],
        "k*--",
        markersize=10,
        label=PAPER_REPORTED_LABEL,
    )
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set(
        xlabel="defect rate of the run's stream (%)",
        ylabel="reduction of mean time vs monolithic (%)",
        title="Inference time reduction (cf. paper Fig. 5)",
    )
    return _closed_figure(fig, ax, handles, report, rates, drawn, "reduction_ci95")


def _closed_figure(
    fig: Figure,
    ax: Axes,
    handles: list,
    report: dict,
    rates: list[str],
    systems: list[str],
    interval_key: str,
) -> Figure:
    """`fig` with its grid, its legend of `handles`, and under it what `paper` is (when one
    of `systems`), the error bars' meaning (when `interval_key` gives any) and
    `_finish_figure`'s identity and flags."""
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    notes = [PAPER_NOTE] if "paper" in systems else []
    if _has_intervals(report, rates, systems, interval_key):
        notes.append(f"error bars: {CONFIDENCE:.0%} CI (bootstrap over the stream's images)")
    _finish_figure(fig, report, notes)
    return fig


#: What bytes_vs_map_kept.png shows instead of empty axes when no mAP kept was measured.
MAP_NOT_PLOTTED = "mAP below floor: not plotted"


def rate_distortion_figure(report: dict) -> Figure:
    """Bytes per defective image vs mAP kept, per codec (in its system's `system_style`) and
    JPEG quality (the JPEG baseline's); when none has a mAP kept (the monolithic mAP under
    `MAP_KEPT_FLOOR`) no axes, only `MAP_NOT_PLOTTED` and why."""
    plt = agg_pyplot()

    rd = report["rate_distortion"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    kept = [p for p in rd["points"] if p["map_kept"] is not None]
    jpeg = [p for p in kept if p["name"].startswith("jpeg")]
    codecs = [p for p in kept if not p["name"].startswith("jpeg")]
    if not kept:
        base = rd.get("map_monolithic")
        ax.set_axis_off()
        ax.set_title("Bytes on the wire vs mAP kept")
        if base is not None and base < MAP_KEPT_FLOOR:
            why = (
                f"the monolithic mAP, {base:.2g}, is under {MAP_KEPT_FLOOR:g}:\n"
                "a share of it would be a ratio of noise"
            )
            headline = MAP_NOT_PLOTTED
        else:
            why, headline = "no encoding has a mAP kept", "mAP kept not measured: not plotted"
        ax.text(0.5, 0.6, headline, transform=ax.transAxes, ha="center", fontsize=14,
                weight="bold")  # fmt: skip
        ax.text(0.5, 0.4, why + "\n(report.md's table gives the bytes)",
                transform=ax.transAxes, ha="center", fontsize=9)  # fmt: skip
        _finish_figure(fig, report)
        return fig
    if jpeg:
        colour, marker = JPEG_STYLE
        ax.plot(
            [p["bytes"] / 1e3 for p in jpeg],
            [100 * p["map_kept"] for p in jpeg],
            linestyle="--",
            marker=marker,
            color=colour,
            label="JPEG of the image (qualities)",
        )
        for p in jpeg:
            ax.annotate(
                p["name"].removeprefix("jpeg"),
                (p["bytes"] / 1e3, 100 * p["map_kept"]),
                fontsize=7,
            )
    for p in codecs:
        colour, marker = system_style(p["name"])
        ax.plot(
            p["bytes"] / 1e3,
            100 * p["map_kept"],
            marker=marker,
            color=colour,
            markersize=8,
            linestyle="none",
            label=p["name"],
        )
    ax.set_xscale("log")
    ax.set(
        xlabel="bytes per defective image (kB, log)",
        ylabel="mAP kept (%)",
        title="Bytes on the wire vs mAP kept",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _finish_figure(fig, report)
    return fig


def figures(report: dict, out_dir: Path) -> list[str]:
    """The paper's Fig. 4 and 5 for our systems, and the rate-distortion figure; file names."""
    written = [
        _save(time_figure(report), out_dir / "time_vs_defect_rate.png"),
        _save(reduction_figure(report), out_dir / "reduction_vs_defect_rate.png"),
    ]
    rd = report.get("rate_distortion")
    if rd and rd["points"]:
        written.append(_save(rate_distortion_figure(report), out_dir / "bytes_vs_map_kept.png"))
    return written


def _save(fig: Figure, path: Path) -> str:
    """Write a figure as a whole PNG (through a rename), close it; the file name."""
    plt = agg_pyplot()  # (imported by the figure's maker already: here only to close it)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())
    return path.name


def is_bench_report(path: Path) -> bool:
    """Whether `path` is a report.json splitdet bench wrote: its "generator" marker, or (before
    the marker) every key of `OLD_REPORT_KEYS`."""
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict):
        return False
    return report.get("generator") == GENERATOR or report.keys() >= OLD_REPORT_KEYS


def _is_bench_log(path: Path) -> bool:
    """Whether `path` (one of `LOGS`) starts with the `LOG_HEADER` a bench run writes."""
    try:
        with path.open("rb") as log:
            return log.readline().startswith(LOG_HEADER.encode())
    except OSError:
        return False


def foreign_outputs(out_dir: Path) -> list[Path]:
    """The files of `OUTPUTS` and `LOGS` in `out_dir` that a run would replace but splitdet
    bench may not have written: all that exist, unless the report.json there is splitdet
    bench's; a log that starts with `LOG_HEADER` is bench's whatever is beside it."""
    present = [out_dir / name for name in OUTPUTS + LOGS if (out_dir / name).exists()]
    if not present or is_bench_report(out_dir / "report.json"):
        return []
    return [p for p in present if not (p.name in LOGS and _is_bench_log(p))]


def earlier_outputs(out_dir: Path) -> list[Path]:
    """The files of `OUTPUTS` an earlier splitdet bench run left in `out_dir` (for the new run
    to replace); ValueError naming the files when any of `OUTPUTS` or `LOGS` there may not be
    splitdet bench's (nothing is then to be written there: the run stops before it starts)."""
    foreign = foreign_outputs(out_dir)
    if foreign:
        names = ", ".join(str(p) for p in foreign)
        raise ValueError(
            f"--out {out_dir}: holds {names}, not from splitdet bench (its report.json is "
            "missing or not one splitdet bench wrote); choose another --out or remove them"
        )
    return [out_dir / name for name in OUTPUTS if (out_dir / name).exists()]


def remove_outputs(out_dir: Path) -> None:
    """Delete an earlier run's report and figures: a stopped run must not show them as its own.

    Only a splitdet bench run's (`earlier_outputs`: ValueError, deleting nothing, otherwise).
    A run calls it just before its first write (`run._run_streams`), not at its start: a run
    stopped before then leaves the earlier report whole.
    """
    for path in earlier_outputs(out_dir):
        path.unlink(missing_ok=True)


#: The columns of OUTCOMES_CSV.
OUTCOME_COLUMNS = (
    "defect_rate", "position", "image_id", "defective", "system", "total_s", "edge_s",
    "cloud_s", "bytes_sent", "flagged", "p_defect", "detections",
)  # fmt: skip


def outcome_rows(
    rate_key: str, stream: Sequence[VocSample], outcomes: dict[str, list[Outcome]]
) -> list[dict]:
    """One defect rate's rows of OUTCOMES_CSV: every image of `stream` (in stream order,
    `position` from 0) through every system of `outcomes` (system name -> its outcomes in
    stream order); seconds and bytes as measured, `p_defect` empty for a system without a
    gate."""
    return [
        {
            "defect_rate": rate_key,
            "position": position,
            "image_id": sample.image_id,
            "defective": int(sample.is_defective),
            "system": name,
            "total_s": f"{o.total_s:.6f}",
            "edge_s": f"{o.edge_s:.6f}",
            "cloud_s": f"{o.cloud_s:.6f}",
            "bytes_sent": o.bytes_sent,
            "flagged": int(o.flagged),
            "p_defect": "" if o.p_defect is None else f"{o.p_defect:.6f}",
            "detections": len(o.scores),
        }
        for name, found in outcomes.items()
        for position, (sample, o) in enumerate(zip(stream, found, strict=True))
    ]


def write_outcomes(rows: Sequence[dict], out_dir: Path) -> None:
    """OUTCOMES_CSV in `out_dir`: `rows` (`outcome_rows` of every rate so far), whole or not at
    all."""
    import csv

    text = io.StringIO()
    writer = csv.DictWriter(text, OUTCOME_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / OUTCOMES_CSV, text.getvalue().encode())


def write_report(report: dict, out_dir: Path) -> None:
    """report.json, report.md and the figures into `out_dir`, each file whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["generator"] = GENERATOR
    report["figures"] = figures(report, out_dir)
    atomic_write(out_dir / "report.json", (strict_dumps(report, indent=2) + "\n").encode())
    atomic_write(out_dir / "report.md", markdown(report).encode())
