"""TensorRT engines from a bundle's ONNX graphs, with the TensorRT Python API (10.x and 11.x).

Choices (docs/export.md has the longer story):
- Both versions build a *strongly typed* network from the ONNX graph of the asked-for precision: fp16 engines come
  from `*.fp16.onnx`, whose LayerNorm and softmax are already fp32 islands and which ONNX Runtime has verified.
  TensorRT 11 has no other way (BuilderFlag.FP16 is gone; strong typing is always on, and the STRONGLY_TYPED
  creation flag is deprecated and ignored). TensorRT 10 could instead take the fp32 graph plus the FP16 builder
  flag, but then TensorRT picks per-layer precisions itself, LayerNorm included (its own warning says fp16
  LayerNorm may overflow), and the 10 and 11 engines would differ. One verified graph for both is simpler to trust.
- TensorRT 10 gets `1 << STRONGLY_TYPED` at `create_network`; TensorRT 11 gets no flags.
- fp32 engines clear the TF32 builder flag: TF32 matmuls keep 10 mantissa bits, which would break the fp32
  tolerance; fp32 is asked for when exactness matters.
- One optimization profile per engine, from the graph's own inputs: batch 1..max (opt at a typical batch); kept
  tokens 1..L (opt at the default mask ratio's K); decoder latent tokens 2..1+L (opt at 1+K); ids_restore fixed at L.
- A timing cache file lives in the bundle and is reused by later builds on the same GPU and TensorRT.
- Each engine gets a sidecar JSON (TensorRT version, GPU, compute capability, profiles, precision, sha256 of the
  source ONNX). An engine only loads on the TensorRT version and GPU it was built for: `check_engine_compatible`
  (pure; no TensorRT import) says so with the command to rebuild. The runtime's TensorRT engine calls it.

The logic is in pure functions (profiles, plan, sidecar, checks) tested without TensorRT; `build_engine` only
talks to the `tensorrt` module object it is given, so its call sequence is tested against a recording fake.
"""

from __future__ import annotations

import datetime as _datetime
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae import __version__
from mae.core.bundle import OUTPUT_NAMES, Bundle, is_bundle
from mae.core.config import MAEConfig
from mae.core.engine_files import (
    DEFAULT_MAX_BATCH,
    DEFAULT_OPT_BATCH,
    DEFAULT_WORKSPACE_GIB,
    ENGINE_PRECISIONS,
    SIDECAR_FORMAT,
    engine_file,
    engine_sidecar_path,
    import_tensorrt,
    tensorrt_major,
)
from mae.core.errors import MAEError
from mae.core.files import atomic_write_bytes, atomic_write_text, sha256_file
from mae.core.hardware import cudart_gpus
from mae.runtime.engines.trt import TensorRTEngine

from .progress import ExportProgress

SUPPORTED_MAJORS = (10, 11)
TIMING_CACHE_FILE = "tensorrt.timing.cache"
INSTALL_HINT = (
    "pip install 'mae-toolkit[tensorrt]' on a machine with an NVIDIA GPU and driver "
    "(the ONNX bundle runs without TensorRT: --format onnx)"
)
Dims = tuple[int, ...]


# ------------------------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class ShapeRange:
    min: Dims
    opt: Dims
    max: Dims

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def profile_shapes(
    graph_inputs: Sequence[tuple[str, Sequence[int | str | None]]],
    config: MAEConfig,
    max_batch: int,
    opt_batch: int | None = None,
    mask_ratio: float | None = None,
) -> dict[str, ShapeRange]:
    """min/opt/max shapes for every input of a graph, from the graph's own dims (ints fixed, others dynamic).

    graph_inputs: (name, dims) with a dim an int > 0 when fixed, or a name / None / 0 when dynamic.
    Dynamic axis 0 is the batch: 1..max_batch, opt at opt_batch (default min(32, max_batch)). Axis 1 of
    `ids_keep` is the kept tokens: 1..L, opt at the default mask ratio's K; axis 1 of `latent` is 1 + kept tokens.
    """
    if max_batch < 1:
        raise MAEError(f"--max-batch must be at least 1, got {max_batch}.")
    opt_batch = min(DEFAULT_OPT_BATCH, max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt_batch <= max_batch:
        raise MAEError(f"--opt-batch {opt_batch} must be between 1 and --max-batch {max_batch}.")
    length = config.num_patches
    ratio = config.mask_ratio if mask_ratio is None else mask_ratio
    kept_opt = min(max(1, config.num_kept(ratio)), length)
    token_axes = {
        "ids_keep": (1, kept_opt, length),  # K
        "latent": (2, 1 + kept_opt, 1 + length),  # 1 + K
    }

    def axis_range(name: str, axis: int, dim: int | str | None) -> tuple[int, int, int]:
        if isinstance(dim, int) and dim > 0:
            return dim, dim, dim
        if axis == 0:
            return 1, opt_batch, max_batch
        if axis == 1 and name in token_axes:
            return token_axes[name]
        raise MAEError(
            f"Input {name!r} has a dynamic axis {axis} ({dim!r}) that mae does not know how to bound.",
            hint="is this an mae bundle graph? re-export it with `mae export`",
        )

    shapes: dict[str, ShapeRange] = {}
    for name, dims in graph_inputs:
        ranges = [axis_range(name, axis, dim) for axis, dim in enumerate(dims)]  # [(min, opt, max) per axis]
        shapes[name] = ShapeRange(*(tuple(r[i] for r in ranges) for i in range(3)))
    return shapes


def onnx_graph_inputs(onnx_path: Path) -> list[tuple[str, list[int | str | None]]]:
    """(name, dims) of a graph's inputs, read without its weights."""
    import onnx

    proto = onnx.load(os.fspath(onnx_path), load_external_data=False)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    inputs = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims: list[int | str | None] = []
        for dim in value.type.tensor_type.shape.dim:
            dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
        inputs.append((value.name, dims))
    return inputs


# ---------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class BuildPlan:
    """How one engine is built on one TensorRT version."""

    tensorrt_version: str
    precision: str  # of the engine: "fp32" | "fp16"
    onnx_precision: str  # the bundle graph it is built from
    strongly_typed_flag: bool  # pass 1 << STRONGLY_TYPED to create_network (TensorRT 10)
    clear_flags: tuple[str, ...] = field(default_factory=tuple)  # BuilderFlag names to clear

    @property
    def major(self) -> int:
        return tensorrt_major(self.tensorrt_version)


def build_plan(trt_version: str, precision: str) -> BuildPlan:
    major = tensorrt_major(trt_version)
    if major not in SUPPORTED_MAJORS:
        raise MAEError(
            f"TensorRT {trt_version} is not supported: mae builds engines with TensorRT 10 or 11.",
            hint="pip install 'tensorrt>=10,<12'",
        )
    if precision not in ENGINE_PRECISIONS:
        raise MAEError(
            f"TensorRT engines are fp32 or fp16, not {precision}.",
            hint="int8 needs explicit Q/DQ quantization; use the ONNX int8 graph on CPUs instead",
        )
    return BuildPlan(
        tensorrt_version=str(trt_version),
        precision=precision,
        onnx_precision=precision,  # fp16 engines come from the verified fp16 graph on 10 and 11 alike
        strongly_typed_flag=major == 10,  # 11: always strongly typed, the flag is deprecated and ignored
        clear_flags=("TF32",) if precision == "fp32" else (),
    )


def network_flags(trt: Any, plan: BuildPlan) -> int:
    if plan.strongly_typed_flag:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0


# -------------------------------------------------------------------------------------------------- build
def build_engine(
    trt: Any,
    onnx_path: Path,
    profiles: dict[str, ShapeRange],
    plan: BuildPlan,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    timing_cache_path: Path | None = None,
) -> bytes:
    """Parse `onnx_path` and build a serialized engine with the TensorRT module `trt`; update the timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise MAEError(
            f"TensorRT {plan.tensorrt_version} cannot parse {onnx_path.name}: {'; '.join(errors) or 'no details'}",
            hint="re-export with the default opset (mae export WEIGHTS --format onnx), then build again",
        )
    network_inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    if network_inputs != set(profiles):
        raise MAEError(
            f"{onnx_path.name} has inputs {sorted(network_inputs)} but the profile covers {sorted(profiles)}.",
            hint="re-export the bundle with `mae export`",
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    for flag_name in plan.clear_flags:
        flag = getattr(trt.BuilderFlag, flag_name, None)
        if flag is not None:
            config.clear_flag(flag)
    _add_profile(builder, config, profiles, onnx_path)
    if timing_cache_path is not None:
        _use_timing_cache(config, timing_cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise MAEError(
            f"TensorRT {plan.tensorrt_version} failed to build an engine from {onnx_path.name} (see its log above).",
            hint="a larger --workspace or a smaller --max-batch may help",
        )
    if timing_cache_path is not None:
        atomic_write_bytes(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


# ------------------------------------------------------------------------------------------------ sidecar
@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.9"


def make_sidecar(
    engine_name: str,
    part: str,
    plan: BuildPlan,
    gpu: GpuInfo,
    profiles: dict[str, ShapeRange],
    onnx_file: str,
    onnx_sha256: str,
    workspace_gib: float,
) -> dict[str, Any]:
    return {
        "format": SIDECAR_FORMAT,
        "engine": engine_name,
        "part": part,
        "precision": plan.precision,
        "tensorrt_version": plan.tensorrt_version,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "strongly_typed": True,
        "profiles": [{name: shape.to_dict() for name, shape in profiles.items()}],
        "onnx": {"file": onnx_file, "sha256": onnx_sha256, "precision": plan.onnx_precision},
        "workspace_gib": workspace_gib,
        "toolkit_version": __version__,
        "built_at": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------- environment
def gpu_info() -> GpuInfo | None:
    """The CUDA GPU engines are built on (device 0) as the runtime's TensorRT engine sees it, through cuda-python
    (`mae.core.hardware.cudart_gpus`); None without cuda-python or a GPU."""
    gpus = cudart_gpus() or []
    return GpuInfo(gpus[0].name, str(gpus[0].compute_capability)) if gpus else None


def _add_profile(builder: Any, config: Any, profiles: dict[str, ShapeRange], onnx_path: Path) -> None:
    """The one optimization profile; TensorRT's refusals (set_shape raises, add_optimization_profile returns -1)
    become errors naming the input and the shapes."""
    profile = builder.create_optimization_profile()
    for name, shape in profiles.items():
        try:
            accepted = profile.set_shape(name, shape.min, shape.opt, shape.max)
        except (RuntimeError, TypeError, ValueError) as exc:
            accepted, reason = False, f": {exc}"
        else:
            reason = ""
        if accepted is False:
            raise MAEError(
                f"TensorRT refused the optimization profile of {onnx_path.name} input {name} (min {list(shape.min)}, "
                f"opt {list(shape.opt)}, max {list(shape.max)}){reason}.",
                hint="check --max-batch and --opt-batch (1 <= opt <= max)",
            )
    if config.add_optimization_profile(profile) < 0:
        raise MAEError(f"TensorRT refused the optimization profile of {onnx_path.name} (add_optimization_profile: -1).")


def _use_timing_cache(config: Any, path: Path) -> None:
    """Reuse the bundle's timing cache; one TensorRT cannot read (another version, a cut file: create_timing_cache
    gives None) or that another GPU or version made (set_timing_cache refuses it) is replaced by a fresh one."""
    previous = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(previous) if previous else None
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise MAEError(
            "TensorRT could not create a timing cache for this build.", hint="rerun; report it if it persists"
        )


def check_tensorrt_available() -> tuple[Any, GpuInfo]:
    """The tensorrt module and the GPU, or one MAEError naming everything that is missing."""
    problems = []
    trt = import_tensorrt()
    if trt is None:
        problems.append("the Python package 'tensorrt' (not installed)")
    gpu = gpu_info()
    if gpu is None:
        problems.append("a CUDA GPU (none is visible to cuda-python, or it is not installed)")
    if problems:
        raise MAEError(f"--format trt needs {' and '.join(problems)}.", hint=INSTALL_HINT)
    build_plan(trt.__version__, "fp32")  # rejects unsupported versions before any work
    return trt, gpu


# -------------------------------------------------------------------------------------------- end to end
def run_tensorrt_export(
    weights: Path,
    out_dir: Path,
    precision: str = "fp32",
    opset: int | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    workspace_gib: float = DEFAULT_WORKSPACE_GIB,
    verify: bool = True,
    progress: ExportProgress | None = None,
) -> Bundle:
    """`mae export WEIGHTS_OR_BUNDLE --format trt`: engines for every graph of `precision` in the bundle.

    Weights are exported to a bundle first (into out_dir); a bundle gets the engines (and, when missing, the ONNX
    graph of that precision) added in place. verify: run each engine, as the runtime's TensorRT engine runs it,
    against the bundle's fp32 ONNX graphs before anything is written. progress: told each step and note.
    """
    progress = progress or ExportProgress()
    trt, gpu = check_tensorrt_available()  # before anything slow
    plan = build_plan(trt.__version__, precision)
    if opt_batch is not None and not 1 <= opt_batch <= max_batch:
        raise MAEError(f"--opt-batch {opt_batch} must be between 1 and --max-batch {max_batch}.")
    if is_bundle(weights) and Path(out_dir).resolve() != Path(weights).resolve():
        raise MAEError(
            f"Engines are written into the bundle itself ({weights}); --out {out_dir} would be ignored.",
            hint="leave --out out when building engines from a bundle",
        )
    bundle_dir = Path(weights) if is_bundle(weights) else Path(out_dir)
    bundle = Bundle.load(bundle_dir) if is_bundle(bundle_dir) else None
    if bundle is None or plan.onnx_precision not in bundle.precisions:
        from .onnx_bundle import export_bundle  # torch and the exporter: only when the graph must be made first

        bundle = export_bundle(
            weights,  # weights, or the bundle itself (its recorded source weights are used)
            bundle_dir,
            precisions=(plan.onnx_precision,),
            opset=opset,
            num_heads=num_heads,
            decoder_num_heads=decoder_num_heads,
            progress=progress,
        )

    built: dict[str, tuple[bytes, dict[str, Any]]] = {}
    for part in [part for part in ("encoder", "decoder") if bundle.has_graph(part, plan.onnx_precision)]:
        onnx_path = bundle.graph(part, plan.onnx_precision)
        profiles = profile_shapes(onnx_graph_inputs(onnx_path), bundle.config, max_batch, opt_batch)
        name = engine_file(part, precision)
        with progress.step(f"building {name} with TensorRT {trt.__version__} on {gpu.name}"):
            engine_bytes = build_engine(trt, onnx_path, profiles, plan, workspace_gib, bundle.path / TIMING_CACHE_FILE)
        sidecar = make_sidecar(name, part, plan, gpu, profiles, onnx_path.name, sha256_file(onnx_path), workspace_gib)
        built[part] = (engine_bytes, sidecar)
    if verify:
        for part, report in verify_engines(bundle, built, precision, progress).items():
            built[part][1]["verification"] = report
    names = _write_engines(bundle, built, precision)
    progress.note(f"TensorRT engines written into {bundle.path}: {', '.join(names)}")
    return Bundle.load(bundle.path)


def _write_engines(bundle: Bundle, built: dict[str, tuple[bytes, dict[str, Any]]], precision: str) -> list[str]:
    """Engines and sidecars first, mae.json last: until then the bundle describes what it had. Returns the engine
    files the bundle lists at `precision`."""
    entries = bundle.manifest.setdefault("engines", {}).setdefault(precision, {})
    for part, (engine_bytes, sidecar) in built.items():
        engine_path = bundle.path / engine_file(part, precision)
        atomic_write_bytes(engine_path, engine_bytes)
        sidecar["sha256"] = sha256_file(engine_path)
        atomic_write_text(engine_sidecar_path(engine_path), json.dumps(sidecar, indent=2) + "\n")
        entries[part] = {"file": engine_path.name, "sidecar": engine_sidecar_path(engine_path).name}
    bundle.save()
    return sorted(entry["file"] for entry in entries.values())


# ---------------------------------------------------------------------------------------------- verify
ENGINE_TOLERANCE_FP32_ABS = 1e-3  # GPU kernels (fused GELU/LayerNorm, other reduction orders), TF32 off


def verify_engines(
    bundle: Bundle, built: dict[str, tuple[bytes, dict[str, Any]]], precision: str, progress: ExportProgress
) -> dict[str, dict[str, Any]]:
    """Hold each freshly built engine ({part: (serialized engine, its sidecar)}), run by the runtime's
    `TensorRTEngine` as users run it, to the bundle's fp32 ONNX graphs (verified against PyTorch at export) on the
    real photos; the report of each part, or a VerificationError."""
    from .verify import TOLERANCES, OnnxReference, Tolerance, compare_outputs  # onnx and torch: only to verify

    reference = OnnxReference(bundle)
    tolerance = Tolerance(max_abs=ENGINE_TOLERANCE_FP32_ABS) if precision == "fp32" else TOLERANCES[precision]
    reports = {}
    for part, (engine_bytes, sidecar) in built.items():
        engine = TensorRTEngine.from_plan(bundle, part, precision, engine_bytes, sidecar)
        with progress.step(f"verifying {sidecar['engine']} against {reference.label} ({tolerance.describe()})"):
            report = compare_outputs(
                lambda feeds, engine=engine: engine.run(feeds)[OUTPUT_NAMES[engine.part][0]],
                sidecar["engine"],
                part,
                precision,
                reference,
                tolerance,
            )
        report["verified"] = True
        reports[part] = report
    return reports
