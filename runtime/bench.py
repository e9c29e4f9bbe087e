"""`mae bench`: encoder images/s per engine and mask ratio, against PyTorch eager fp32 measured in the same run.

The encoder alone is timed (the embedding path). For fairness on a machine whose speed drifts, engines are timed in
interleaved rounds (one batch each per round) and the median batch time is reported; every engine sees the same
inputs, and its pooled features (cls token, mean of patch tokens) are compared with PyTorch fp32 by cosine.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mae.core import hardware
from mae.core.bundle import Bundle, is_bundle
from mae.core.config import PRESETS
from mae.core.errors import MAEError
from mae.core.masking import masking_from_noise, random_noise
from mae.core.numerics import cosine_rows, pooled

from .bench_cache import save_rows
from .bench_options import DEFAULT_BATCH_SIZE, DEFAULT_MASK_RATIOS, DEFAULT_SECONDS
from .engines import Engine, create_engine
from .engines.auto import GATE
from .engines.labels import ENGINE_SPECS
from .engines.torch import torch_details
from .roofline import Peak, encoder_flops, measure_peaks
from .system import installed_engines

BASELINE = "torch"
MIN_ROUNDS = 3
MAX_ROUNDS = 1000
WARMUP_RUNS = 2
ON_REQUEST = ("onnx-fp16", "openvino-f32")  # variants of a default engine, never chosen by default


def parse_engines(spec: str | Sequence[str]) -> list[str]:
    """ "torch,onnx-int8" -> ["torch", "onnx-int8"], checked against ENGINE_SPECS; duplicates dropped."""
    labels = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [label for label in labels if label not in ENGINE_SPECS]
    if unknown:
        raise MAEError(f"Unknown bench engine(s): {', '.join(unknown)}", hint=f"choose from: {', '.join(ENGINE_SPECS)}")
    if not labels:
        raise MAEError("No engines to benchmark.", hint="e.g. --engines torch,onnx,openvino")
    return list(dict.fromkeys(labels))


def _model_kind(model: str) -> tuple[str, Bundle | None]:
    """("preset" | "bundle" | "weights" | "missing", the bundle when it is one)."""
    if model in PRESETS:
        return "preset", None
    path = Path(model)
    if is_bundle(path):
        return "bundle", Bundle.load(path)
    return ("weights" if path.exists() else "missing"), None


def default_engines(
    model: str,
    cpu: hardware.CpuInfo | None = None,
    gpus: Sequence[object] | None = None,
    packages: Mapping[str, str] | None = None,
    onnx_providers: Sequence[str] | None = None,
    torch_cuda: bool | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(labels, {label left out: why}): every engine that can run `model` here, as `mae bench` runs by default.

    torch, torch-bf16 (CPUs with bf16 instructions), onnx, onnx-int8, openvino, openvino-int8 (when installed; int8
    where the bundle has an int8 graph: a preset's temporary bundle gets one), and with a CUDA GPU torch-cuda,
    torch-cuda-fp16, onnx-cuda and trt / trt-fp16 (engines built into the bundle). What is not given is looked up.
    """

    cpu = cpu or hardware.cpu_info()
    gpus = hardware.cuda_gpus() if gpus is None else gpus
    packages = installed_engines() if packages is None else packages
    if onnx_providers is None:
        onnx_providers = []
        if "onnxruntime" in packages:
            import onnxruntime

            onnx_providers = onnxruntime.get_available_providers()
    if torch_cuda is None:
        torch_cuda = False
        if gpus and "torch" in packages:
            torch_cuda = bool(torch_details()["cuda_available"])
    kind, bundle = _model_kind(model)

    def has_graph(precision: str) -> str | None:
        """Why the model's bundle cannot run `precision` graphs (None: it can)."""
        if kind == "weights":
            return "weights run on torch only: export a bundle for the others"
        if bundle is not None and not bundle.has_graph("encoder", precision):
            return f"the bundle has no {precision} graph"
        return None

    def has_trt_engine(precision: str) -> str | None:
        if kind != "bundle":
            return "TensorRT engines are built into a bundle: mae export BUNDLE --format trt"
        if "encoder" not in ((bundle.manifest.get("engines") or {}).get(precision) or {}):
            return f"the bundle has no {precision} TensorRT engine"
        return None

    gpu_build = bool(gpus) and any(p in onnx_providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
    no_gpu = None if gpus else "no CUDA GPU"
    offers: dict[str, str | None] = {
        "torch": None,
        "torch-bf16": None if cpu.native_bf16 else "no bf16 instructions on this CPU",
    }
    no_onnx = None if "onnxruntime" in packages else "onnxruntime is not installed"
    # On a GPU build, "onnx" (provider auto) would run on the GPU: the CPU row is onnx-cpu there.
    offers["onnx-cpu" if gpu_build else "onnx"] = no_onnx or has_graph("fp32")
    offers["onnx-int8"] = no_onnx or has_graph("int8")
    no_openvino = None if "openvino" in packages else "openvino is not installed"
    offers["openvino"] = no_openvino or has_graph("fp32")
    offers["openvino-int8"] = no_openvino or has_graph("int8")
    no_torch_cuda = None if torch_cuda else "PyTorch here has no CUDA"
    offers["torch-cuda"] = no_gpu or no_torch_cuda
    offers["torch-cuda-fp16"] = no_gpu or no_torch_cuda
    no_cuda_provider = None if "CUDAExecutionProvider" in onnx_providers else "onnxruntime has no CUDA provider"
    offers["onnx-cuda"] = no_gpu or no_onnx or no_cuda_provider or has_graph("fp32")
    no_tensorrt = None if {"tensorrt", "cuda-python"} <= set(packages) else "tensorrt / cuda-python not installed"
    offers["trt"] = no_gpu or no_tensorrt or has_trt_engine("fp32")
    offers["trt-fp16"] = no_gpu or no_tensorrt or has_trt_engine("fp16")
    chosen = [label for label, reason in offers.items() if reason is None]
    left_out = {label: reason for label, reason in offers.items() if reason is not None}
    if gpu_build:
        left_out["onnx"] = "its provider auto picks the GPU: onnx-cpu and onnx-cuda instead"
    for label in (*ON_REQUEST, "onnx-cpu"):
        left_out.setdefault(label, "only on request: --engines")
    return chosen, left_out


def describe_choice(labels: Sequence[str], left_out: Mapping[str, str]) -> str:
    """'engines: torch, onnx, ...; left out: trt, trt-fp16 (no CUDA GPU); onnx-fp16 (only on request: --engines)'."""
    by_reason: dict[str, list[str]] = {}
    for label, reason in left_out.items():
        by_reason.setdefault(reason, []).append(label)
    left = "; ".join(f"{', '.join(group)} ({reason})" for reason, group in by_reason.items())
    return f"engines: {', '.join(labels)}" + (f"; left out: {left}" if left else "")


def timing_rounds(
    runners: dict[str, Any],
    budget_s: float,
    block_s: float = 0.25,
    min_rounds: int = MIN_ROUNDS,
    max_rounds: int = MAX_ROUNDS,
    on_round: Callable[[int, float], None] | None = None,
) -> dict[str, list[float]]:
    """Batch times per runner, from rounds in which each runner in turn runs one block of batches.

    Interleaving keeps slow drifts of the machine (other jobs, clocks) from favouring whichever engine ran first.
    Each block opens with an untimed batch: thread pools of the engine that ran before (OpenMP, TBB, ONNX Runtime)
    keep spinning for a while and would slow the first batch of the next one. A block lasts about `block_s`.
    Rounds go on until `budget_s` is spent, and at least `min_rounds`. on_round(rounds done, seconds spent) is
    called after each round (progress bars).
    """
    block_runs = {}
    for label, runner in runners.items():  # one timed call sizes the blocks
        began = time.perf_counter()
        runner()
        block_runs[label] = max(1, int(block_s / max(time.perf_counter() - began, 1e-6)))
    times: dict[str, list[float]] = {label: [] for label in runners}
    # As timeit does: no garbage collection inside the timed region. A full collection over a big heap (an export
    # that just ran in this process leaves millions of objects) takes long enough to swamp a batch.
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for round_index in range(max_rounds):
            if round_index >= min_rounds and time.perf_counter() - start >= budget_s:
                break
            for label, runner in runners.items():
                runner()  # settles the threads after the previous engine
                for _ in range(block_runs[label]):
                    began = time.perf_counter()
                    runner()
                    times[label].append(time.perf_counter() - began)
            if on_round is not None:
                on_round(round_index + 1, time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


@dataclass
class Prepared:
    """What a benchmark runs: a bundle for the graph engines and weights for the PyTorch baseline."""

    bundle: str | None  # the bundle directory
    torch_source: str  # weights for the PyTorch baseline
    notes: list[str] = field(default_factory=list)


def _runs_a_graph(label: str) -> bool:
    """Whether the engine runs one of the bundle's ONNX graphs (torch runs weights, trt its own engines)."""
    return ENGINE_SPECS[label][0] in ("onnx", "openvino")


def prepare_model(model: str, labels: Sequence[str]) -> Prepared:
    """A bundle directory (its recorded source weights are the PyTorch baseline) or weights (torch engines only).
    A preset name (random weights) is exported first by `mae.benchmark`, which needs PyTorch and the exporter."""
    needs_bundle = any(ENGINE_SPECS[label][0] != "torch" for label in labels)
    path = Path(model)
    if not path.exists():
        raise MAEError(f"{model} is neither a bundle, weights nor a preset.", hint=f"presets: {', '.join(PRESETS)}")
    if is_bundle(path):
        return Prepared(str(path), str(path))  # the torch engine loads the bundle's recorded source weights
    if needs_bundle:
        raise MAEError(
            f"{path} is weights, and engines other than torch run an exported bundle.",
            hint=f"export it first (`mae export {path} --out BUNDLE`) and pass the bundle",
        )
    return Prepared(None, str(path))


def graph_precisions(labels: Sequence[str]) -> list[str]:
    """The bundle precisions the graph engines among `labels` run (fp32 always: the bundle's base)."""
    wanted = {ENGINE_SPECS[label][1]["precision"] for label in labels if _runs_a_graph(label)}
    return ["fp32"] + [precision for precision in ("fp16", "int8") if precision in wanted]


def _create(label: str, prepared: Prepared) -> Engine:
    name, options = ENGINE_SPECS[label]
    return create_engine(name, prepared.torch_source if name == "torch" else prepared.bundle, "encoder", **options)


def peak_kind(label: str, on_cpu: bool = True, cpu: hardware.CpuInfo | None = None) -> str | None:
    """The precision whose CPU peak an engine row is held against: int8 graphs -> int8; torch-bf16, and openvino
    left to choose on a CPU with bf16 instructions (it computes in bf16 there) -> bf16; else fp32. None on a GPU."""
    if not on_cpu:
        return None
    name, options = ENGINE_SPECS[label]
    if options["precision"] == "int8":
        return "int8"
    if name == "torch" and options["precision"] == "bf16":
        return "bf16"
    if name == "openvino" and "inference_precision" not in options and (cpu or hardware.cpu_info()).native_bf16:
        return "bf16"
    return "fp32"


def _on_cpu(engine: Engine) -> bool:
    """Whether the engine computes on the CPU (ONNX Runtime: its first provider; TensorRT: never)."""
    providers = getattr(engine, "providers", None)
    if providers:
        return providers[0] == "CPUExecutionProvider"
    if engine.name in ("trt", "tensorrt"):
        return False
    return str(getattr(engine, "device", "cpu")).lower() == "cpu"


class BenchProgress:
    """What `bench` tells the person running it: two stages, starting the engines (one unit each) and timing them
    (seconds of the budget), and each row as soon as its mask ratio is measured. This one says nothing; `mae bench`
    shows bars and lines (`mae.benchmark`)."""

    def stage(self, description: str, total: float) -> None:
        """A stage of `total` units begins."""

    def update(self, completed: float | None = None, description: str | None = None) -> None:
        """How many of the stage's units are done, and what it is doing now (None: as before)."""

    def measured(self, row: dict[str, Any]) -> None:
        """A row is measured (`row_line` says it in one line)."""

    def done(self) -> None:
        """The stage is over."""


def bench(
    prepared: Prepared,
    engines: str | Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mask_ratios: Sequence[float] = DEFAULT_MASK_RATIOS,
    seconds: float = DEFAULT_SECONDS,
    seed: int = 0,
    progress: BenchProgress | None = None,
    peaks: Mapping[str, Peak] | None = None,
    roofline: bool = True,
) -> list[dict[str, Any]]:
    """One row per (engine, mask ratio): images/s (median), ratio vs PyTorch eager fp32, pooled cosines, and the
    roofline: encoder GFLOP per image, effective GFLOP/s, the peak it is held against and the fraction of it.

    engines: None runs every engine that can run here (`default_engines`). The PyTorch fp32 baseline is always
    measured (added when not listed). An engine that cannot start here (missing package, no GPU, graph not in the
    bundle) gets a row with `error` instead of numbers. peaks: from `measure_peaks` (measured here when None and
    `roofline`; roofline=False leaves peak_gflops and fraction_of_peak out). progress: told the stages and each
    row (None says nothing).
    """
    labels = default_engines(prepared.bundle or prepared.torch_source)[0] if engines is None else parse_engines(engines)
    if BASELINE not in labels:
        labels.insert(0, BASELINE)
    if batch_size < 1:
        raise MAEError("batch size must be at least 1")
    for ratio in mask_ratios:
        if not 0.0 <= ratio < 1.0:
            raise MAEError(f"mask ratio {ratio} must be in [0, 1)")
    if peaks is None:
        peaks = measure_peaks()[0] if roofline else {}  # before the engines start their thread pools
    progress = progress or BenchProgress()
    ready, errors = _start_engines(prepared, labels, progress)
    measurement = _Measurement(labels, ready, errors, batch_size, seconds, seed, dict(peaks), progress)
    rows: list[dict[str, Any]] = []
    progress.stage("benchmark", measurement.budget * len(mask_ratios))
    try:
        for index, ratio in enumerate(mask_ratios):
            measured = measurement.rows(index, ratio)
            for row in measured:  # as each mask ratio is measured, not only in the final table
                progress.measured(row)
            progress.update(completed=(index + 1) * measurement.budget)
            rows += measured
    finally:
        progress.done()
    _add_masked_speedup(rows)
    return rows


def _start_engines(
    prepared: Prepared, labels: list[str], progress: BenchProgress
) -> tuple[dict[str, Engine], dict[str, str]]:
    """({label: engine} of those that started, {label: why not} of the others); the baseline must start."""
    ready: dict[str, Engine] = {}
    errors: dict[str, str] = {}
    progress.stage("starting engines", len(labels))
    try:
        for done, label in enumerate(labels):
            progress.update(completed=done, description=f"starting {label}")
            try:
                ready[label] = _create(label, prepared)
            except Exception as exc:  # one engine that cannot start here must not stop the others
                if label == BASELINE:
                    raise
                errors[label] = _reason(exc)
        progress.update(completed=len(labels))
    finally:
        progress.done()
    return ready, errors


@dataclass
class _Measurement:
    """The started engines of one benchmark, the inputs they share, and what their rows are held against."""

    labels: list[str]
    ready: dict[str, Engine]
    errors: dict[str, str]  # label -> why it did not start
    batch_size: int
    seconds: float
    seed: int
    peaks: dict[str, Peak]
    progress: BenchProgress

    def __post_init__(self) -> None:
        self.cfg = self.ready[BASELINE].config  # every engine here carries the MAEConfig it runs
        cpu = hardware.cpu_info()
        self.kinds = {label: peak_kind(label, _on_cpu(engine), cpu) for label, engine in self.ready.items()}
        rng = np.random.default_rng(self.seed)
        size = self.cfg.img_size
        self.pixel_values = rng.standard_normal((self.batch_size, 3, size, size), dtype=np.float32)
        # The estimate: each mask ratio times every engine for `seconds` (plus warm-up, not counted).
        self.budget = self.seconds * len(self.ready)

    def rows(self, index: int, ratio: float) -> list[dict[str, Any]]:
        """The rows of mask ratio `ratio` (the `index`-th), one per label."""
        ids_keep = masking_from_noise(random_noise(self.batch_size, self.cfg.num_patches, self.seed), ratio).ids_keep
        inputs = {"pixel_values": self.pixel_values, "ids_keep": ids_keep}  # [B, 3, S, S], [B, K]
        self.progress.update(description=f"mask {ratio:g}: warm-up")
        outputs, failed = self._warm_up(inputs)
        runners = {label: _runner(self.ready[label], inputs) for label in self.ready if label not in failed}
        done = index * self.budget

        def advance(rounds: int, spent: float) -> None:
            completed = done + min(spent, self.budget)
            self.progress.update(completed=completed, description=f"mask {ratio:g}: timing, round {rounds}")

        self.progress.update(completed=done, description=f"mask {ratio:g}: timing {len(runners)} engines")
        times = timing_rounds(runners, self.seconds * len(runners), on_round=advance)
        kept = int(ids_keep.shape[1])
        head = {"mask_ratio": ratio, "kept": kept, "batch_size": self.batch_size}
        head["gflops_per_image"] = encoder_flops(self.cfg, kept) / 1e9
        reference = pooled(outputs[BASELINE])
        base_s = statistics.median(times[BASELINE])
        rows = []
        for label in self.labels:
            row = {"engine": label, **head}
            if label in failed:
                rows.append({**row, "error": failed[label]})
            else:
                rows.append(self._measured(row, times[label], outputs[label], reference, base_s))
        return rows

    def _warm_up(self, inputs: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """({label: latent} of the engines that ran, {label: why not} of those that did not start or failed)."""
        outputs, failed = {}, dict(self.errors)
        for label, engine in self.ready.items():
            try:
                for _ in range(WARMUP_RUNS):
                    outputs[label] = engine.run(inputs)["latent"]  # [B, 1+K, D]
            except Exception as exc:
                if label == BASELINE:
                    raise
                failed[label] = _reason(exc)
        return outputs, failed

    def _measured(
        self,
        row: dict[str, Any],
        times: list[float],
        latent: np.ndarray,
        reference: dict[str, np.ndarray],
        base_s: float,
    ) -> dict[str, Any]:
        """`row` with its speed, its cosines against the baseline's pooled features and its roofline."""
        label = row["engine"]
        median_s = statistics.median(times)
        features = pooled(latent)
        images_per_s = self.batch_size / median_s
        row.update(
            description=self.ready[label].description,
            images_per_s=images_per_s,
            ms_per_batch=1000 * median_s,
            timed_batches=len(times),
            ratio_vs_torch=base_s / median_s,
            cosine_cls=float(cosine_rows(features["cls"], reference["cls"]).min()),
            cosine_mean=float(cosine_rows(features["mean"], reference["mean"]).min()),
            **_roofline(row["gflops_per_image"] * images_per_s, self.kinds[label], self.peaks),
        )
        row["below_gate"] = min(row["cosine_cls"], row["cosine_mean"]) < GATE
        return row


def _roofline(effective_gflops: float, kind: str | None, peaks: Mapping[str, Peak]) -> dict[str, Any]:
    peak = peaks.get(kind) if kind else None
    return {
        "effective_gflops": effective_gflops,
        "peak_kind": kind,
        "peak_gflops": None if peak is None else peak.gflops,
        "fraction_of_peak": None if peak is None else effective_gflops / peak.gflops,
    }


def _reason(exc: Exception) -> str:
    if isinstance(exc, MAEError):
        return exc.message
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _runner(engine: Engine, inputs: dict[str, np.ndarray]):  # noqa: ANN202
    return lambda: engine.run(inputs)


def _add_masked_speedup(rows: list[dict[str, Any]]) -> None:
    """time(mask 0.75) / time(mask 0) per engine, when both were measured: what masking saves (the encoder sees a
    quarter of the tokens at 0.75, so well below 1)."""
    by_key = {(r["engine"], r["mask_ratio"]): r for r in rows if "ms_per_batch" in r}
    for (label, ratio), row in by_key.items():
        full = by_key.get((label, 0.0))
        if full is not None and ratio > 0:
            row["time_vs_mask0"] = row["ms_per_batch"] / full["ms_per_batch"]


def row_line(row: dict[str, Any]) -> str:
    """One measured row as a line: printed as soon as its mask ratio is done."""
    head = f"{row['engine']:<15} mask {row['mask_ratio']:<4g}"
    if "error" in row:
        return f"{head} not run: {row['error']}"
    flag = f"  ! below {GATE}: never picked" if row.get("below_gate") else ""
    return (
        f"{head} {row['images_per_s']:8.1f} img/s {row['ratio_vs_torch']:5.2f}x torch  cos "
        f"{row['cosine_cls']:.5f}/{row['cosine_mean']:.5f}{flag}"
    )


def summary_lines(rows: list[dict[str, Any]], min_cosine: float = GATE) -> list[str]:
    """Per mask ratio: the fastest torch-free engine whose pooled features stay within `min_cosine` of PyTorch
    (the int8 export's gate: an engine below it is never the one named)."""
    lines = []
    for ratio in dict.fromkeys(r["mask_ratio"] for r in rows):
        candidates = [
            r
            for r in rows
            if r["mask_ratio"] == ratio
            and "images_per_s" in r
            and ENGINE_SPECS[r["engine"]][0] != "torch"
            and min(r["cosine_cls"], r["cosine_mean"]) >= min_cosine
        ]
        if not candidates:
            continue
        best = max(candidates, key=lambda r: r["images_per_s"])
        masked = f", t/t(mask 0) {best['time_vs_mask0']:.2f}" if "time_vs_mask0" in best else ""
        lines.append(
            f"mask {ratio:g}: fastest torch-free engine with pooled cosine >= {min_cosine}: {best['engine']}, "
            f"{best['ratio_vs_torch']:.2f}x PyTorch eager fp32{masked}"
        )
    return lines


def gflops_text(value: float) -> str:
    """Three significant figures without exponents: 1234, 56.7, 0.0263 (tiny test models)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def peaks_line(peaks: Mapping[str, Peak], missing: Mapping[str, str]) -> str:
    """'peak GEMM (1024x1024x1024, best of 5): fp32 131 GFLOP/s (onnxruntime ...), ...; not measured: bf16 (...)'."""
    parts = [peak.describe() for peak in peaks.values()]
    parts += [f"{kind} not measured ({reason})" for kind, reason in missing.items()]
    if not peaks:
        return "peak GEMM: " + "; ".join(parts)
    first = next(iter(peaks.values()))
    return f"peak GEMM ({'x'.join(map(str, first.shape))}, best of {first.runs}): " + "; ".join(parts)


def remember(model: str, rows: list[dict[str, Any]]) -> Path | None:
    """Store the rows of a bundle's benchmark for `--engine auto` (`mae.runtime.bench_cache`); presets and weights
    have no bundle to remember them by."""
    if not is_bundle(Path(model)):
        return None

    return save_rows(Bundle.load(Path(model)), rows)
