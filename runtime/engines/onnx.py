"""ONNX Runtime engine: one bundle graph in an InferenceSession on TensorRT, CUDA or CPU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mae.core.errors import MAEError, require

from .base import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    check_graph_precision,
    check_inputs,
    load_bundle,
    warn,
    warn_int8_cpu,
)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("tensorrt", "cuda", "cpu")  # fastest first
ONNX_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def resolve_providers(requested: str, available: list[str]) -> list[str]:
    """The provider list to ask ONNX Runtime for; CPU always closes the list as the fallback.

    "auto" takes every available one of TensorRT, CUDA, CPU in that order; a named provider that this
    onnxruntime build lacks is an error (a silent CPU run is a surprise, not a feature).
    """
    if requested == "auto":
        chosen = [PROVIDERS[name] for name in AUTO_ORDER if PROVIDERS[name] in available]
        return chosen or ["CPUExecutionProvider"]
    if requested not in PROVIDERS:
        raise MAEError(f"Unknown ONNX Runtime provider {requested!r}", hint="use auto, cpu, cuda or tensorrt")
    wanted = PROVIDERS[requested]
    if wanted not in available:
        raise MAEError(
            f"This onnxruntime has no {wanted} (it has: {', '.join(available)}).",
            hint="for GPUs install onnxruntime-gpu instead of onnxruntime: pip install 'mae-toolkit[gpu]'"
            " (TensorRT also needs the TensorRT libraries)",
        )
    if requested == "tensorrt":  # TensorRT hands unsupported nodes to CUDA
        return [wanted] + [PROVIDERS["cuda"]] * (PROVIDERS["cuda"] in available) + [PROVIDERS["cpu"]]
    return [wanted] if requested == "cpu" else [wanted, PROVIDERS["cpu"]]


def session_options(ort, num_threads: int | None):  # noqa: ANN001, ANN201 - onnxruntime module / SessionOptions
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one graph, parallel inside the ops
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    return options


def _trt_cache_dir(bundle_dir: Path) -> str | None:
    """Where TensorRT EP may keep its built engines (building takes minutes): inside the bundle when writable."""
    cache = bundle_dir / "ort_trt_cache"
    try:
        cache.mkdir(exist_ok=True)
    except OSError:
        return None
    return str(cache) if os.access(cache, os.W_OK) else None


class OnnxEngine:
    """One graph ("encoder" | "decoder") of a bundle at `precision` (fp32 | fp16 | int8) in ONNX Runtime."""

    name = "onnx"

    def __init__(
        self,
        model: object,
        part: str = "encoder",
        precision: str = "fp32",
        provider: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        ort = require("onnxruntime", "cpu", "The onnx engine")
        self.part = part
        self.precision = precision
        check_graph_precision(precision, "onnx")
        self.bundle = load_bundle(model, "onnx")
        self.config = self.bundle.config
        graph_path = self.bundle.graph(part, precision)
        if precision == "int8":
            warn_int8_cpu(self.bundle, "onnx")

        requested = resolve_providers(provider, ort.get_available_providers())
        provider_options = []
        for name in requested:
            cache = _trt_cache_dir(self.bundle.path) if name == PROVIDERS["tensorrt"] else None
            provider_options.append({"trt_engine_cache_enable": True, "trt_engine_cache_path": cache} if cache else {})
        try:
            self.session = ort.InferenceSession(
                str(graph_path),
                sess_options=session_options(ort, num_threads),
                providers=requested,
                provider_options=provider_options,
            )
        except Exception as exc:  # onnxruntime raises its own exception types for corrupt or unsupported graphs
            raise MAEError(
                f"ONNX Runtime cannot load {graph_path}: {exc}", hint="re-run `mae export`, or upgrade onnxruntime"
            ) from exc

        # What really runs it: a provider whose libraries fail to load is dropped by ONNX Runtime with a log line.
        self.providers: list[str] = self.session.get_providers()
        if provider != "auto" and self.providers[0] != requested[0]:
            warn(f"onnxruntime could not start {requested[0]}; running on {self.providers[0]} instead")
        self.input_types = {i.name: ONNX_TYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = [name for name in INPUT_NAMES[part] if name not in self.input_types]
        if missing or OUTPUT_NAMES[part][0] not in self.output_names:
            raise MAEError(
                f"{graph_path} is not an MAE {part} graph (inputs {list(self.input_types)}, outputs "
                f"{self.output_names}).",
                hint="re-run `mae export`",
            )
        threads = f", {num_threads} threads" if num_threads else ""
        self.description = f"onnxruntime {ort.__version__} {self.providers[0]} {precision} ({graph_path.name}{threads})"

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = check_inputs(self.part, inputs)
        # An fp16 graph may take fp16 data; ids stay int64.
        feeds = {name: array.astype(self.input_types[name], copy=False) for name, array in checked.items()}
        output_name = OUTPUT_NAMES[self.part][0]
        (output,) = self.session.run([output_name], feeds)
        return {output_name: np.asarray(output, dtype=np.float32)}
