"""`--engine auto`: the fastest engine and precision installed here whose accuracy passes the gate, on this machine.

Evidence, strongest first:
1. A measurement: `mae bench --model BUNDLE` stores its rows in the user cache, keyed by the bundle's graphs, the
   CPU (model, ISA flags, threads) and the engine versions (`mae.runtime.bench_cache`). The fastest row at the
   mask ratio that matters (0 for embeddings: every token; 0.75 for reconstruction) whose pooled cosines against
   PyTorch fp32 both reach the int8 gate (0.999) wins, among the engines that can start here.
2. The hardware, when nothing was measured:
   - a CUDA GPU: the bundle's TensorRT engine when TensorRT is installed and an engine was built (fp16 first), else
     ONNX Runtime's CUDA provider when onnxruntime-gpu is installed;
   - a CPU, for embeddings: an int8 encoder that passed the export's gate (cosine >= 0.999 on held-out images):
     OpenVINO's int8 model on CPUs with AMX-INT8 or VNNI (oneDNN's int8 kernels there), ONNX Runtime's int8 graph
     elsewhere (exact there too, see `mae.export.precision`); then fp32: ONNX Runtime (exact, ~1x-2x PyTorch).
   - a CPU, for reconstruction (the decoder has no int8): ONNX Runtime fp32.
   bf16 compute (OpenVINO's default on AMX CPUs) is chosen only from a measurement: it is not verified at export.
An explicit precision is a constraint: `--engine auto --precision int8` picks the fastest int8 engine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mae.core import hardware
from mae.core.bundle import Bundle, is_bundle
from mae.core.errors import MAEError

from ..bench_cache import load_rows
from .labels import ENGINE_SPECS

GATE = 0.999  # least pooled cosine vs PyTorch fp32 (cls and mean), as the int8 export gate
PURPOSES = {"embed": 0.0, "reconstruct": 0.75}  # purpose -> the mask ratio whose speed matters


@dataclass(frozen=True)
class Choice:
    engine: str  # an engine name for create_engine
    precision: str
    options: dict[str, Any] = field(default_factory=dict)  # extra engine options (provider, inference_precision)
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.engine} {self.precision}" + "".join(f" {k}={v}" for k, v in self.options.items())

    def line(self) -> str:
        """The one line commands print."""
        return f"engine auto: {self.label} ({self.reason})"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _verified_int8(bundle: Any) -> tuple[bool, bool]:
    """(ONNX Runtime int8 graph passed the gate, OpenVINO int8 model passed the gate) for this bundle."""
    record = bundle.manifest.get("int8") or {}
    if not record or not bundle.has_graph("encoder", "int8"):
        return False, False
    gate_ok = float(record.get("min_cosine") or 0) >= GATE

    def passed(report: dict[str, Any] | None) -> bool:
        return bool(report and report.get("passed") and report.get("verified"))

    onnx_ok = gate_ok and passed((bundle.manifest.get("verification") or {}).get("int8", {}).get("encoder"))
    openvino = ((bundle.manifest.get("openvino") or {}).get("int8") or {}).get("encoder") or {}
    return onnx_ok, gate_ok and passed(openvino.get("verification"))


def _onnxruntime_providers() -> list[str]:
    if not _installed("onnxruntime"):
        return []
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def _trt_engine_precisions(bundle: Any, part: str) -> list[str]:
    engines = bundle.manifest.get("engines") or {}  # written by `mae export --format trt`
    return [p for p in ("fp16", "fp32") if (engines.get(p) or {}).get(part)]


def choose(model: Any, purpose: str = "embed", precision: str | None = None, cpu: Any = None) -> Choice:
    """The engine `auto` means for `model` (a bundle directory, or weights: then torch) and `purpose`."""

    if purpose not in PURPOSES:
        raise MAEError(f"Unknown purpose {purpose!r}", hint=f"use one of: {', '.join(PURPOSES)}")
    path = Path(str(model))
    if not is_bundle(path):
        if precision not in (None, "fp32", "bf16", "fp16"):
            raise MAEError(
                f"{path} is weights, which only the torch engine runs, and it has no {precision}.",
                hint=f"export a bundle first: mae export {path} --precision {precision}",
            )
        return Choice("torch", precision or "fp32", reason="weights, not a bundle: only the torch engine runs them")
    bundle = Bundle.load(path)
    cpu = cpu or hardware.cpu_info()

    measured = _from_measurement(bundle, purpose, precision, cpu)
    if measured is not None:
        return measured

    if hardware.cuda_gpus():
        part = "encoder" if purpose == "embed" else "decoder"
        trt = [p for p in _trt_engine_precisions(bundle, part) if precision in (None, p)]
        if trt and _installed("tensorrt"):
            return Choice("trt", trt[0], reason="CUDA GPU with this bundle's TensorRT engine")
        if "CUDAExecutionProvider" in _onnxruntime_providers() and precision in (None, "fp32", "fp16"):
            return Choice("onnx", precision or "fp32", {"provider": "cuda"}, reason="CUDA GPU, onnxruntime-gpu")

    onnx_int8, openvino_int8 = _verified_int8(bundle)
    vnni = cpu.int8_class in ("amx", "vnni")
    if purpose == "embed" and precision in (None, "int8"):
        where = f"{cpu.int8_class} int8 class CPU"
        gate = f"int8 passed the export's cosine gate >= {GATE}"
        if openvino_int8 and vnni and _installed("openvino"):
            return Choice("openvino", "int8", reason=f"{where}: OpenVINO int8 (oneDNN int8 kernels); {gate}")
        if onnx_int8 and _installed("onnxruntime"):
            return Choice("onnx", "int8", reason=f"{where}: ONNX Runtime int8; {gate}")
        if openvino_int8 and _installed("openvino"):
            return Choice("openvino", "int8", reason=f"{where}: OpenVINO int8; {gate}")
        if precision == "int8":
            raise MAEError(
                f"The bundle {bundle.path} has no int8 encoder that passed the gate (cosine >= {GATE}) for an "
                "installed engine.",
                hint=f"mae export {bundle.path} --precision int8 (with onnxruntime, and openvino for its model)",
            )
    wanted = precision or "fp32"
    if wanted == "int8":
        raise MAEError("Reconstruction runs no int8 graph: the decoder has none.", hint="use fp32 or fp16")
    if _installed("onnxruntime") and bundle.has_graph("encoder", wanted):
        return Choice("onnx", wanted, reason=f"no measurement here: ONNX Runtime {wanted}, equal to PyTorch")
    if _installed("openvino") and bundle.has_graph("encoder", wanted):
        return Choice("openvino", wanted, {"inference_precision": "f32"}, reason="no ONNX Runtime: OpenVINO f32")
    if _installed("torch"):
        return Choice("torch", "fp32", reason="no ONNX Runtime or OpenVINO installed: the PyTorch reference")
    raise MAEError(
        "No engine is installed that can run this bundle.",
        hint="pip install 'mae-toolkit[cpu]' (ONNX Runtime), or [openvino], or [gpu] on NVIDIA machines",
    )


def _from_measurement(bundle: Any, purpose: str, precision: str | None, cpu: Any) -> Choice | None:
    """The fastest gated engine of this machine's stored `mae bench` rows for this bundle, if any."""

    stored = load_rows(bundle, cpu)
    if not stored:
        return None
    rows, when = stored
    ratio = PURPOSES[purpose]
    onnx_int8, openvino_int8 = _verified_int8(bundle)
    candidates = []
    for row in rows:
        if row.get("mask_ratio") != ratio or "images_per_s" not in row or row.get("engine") not in ENGINE_SPECS:
            continue
        name, options = ENGINE_SPECS[row["engine"]]
        row_precision = options.get("precision", "fp32")
        if name == "torch" or (precision is not None and row_precision != precision):
            continue  # torch is the reference, not a deployment engine
        if min(row.get("cosine_cls", 0.0), row.get("cosine_mean", 0.0)) < GATE:
            continue
        if row_precision == "int8" and (purpose != "embed" or not (onnx_int8 if name == "onnx" else openvino_int8)):
            continue  # int8 needs its export gate too, and has no decoder
        if purpose == "reconstruct" and not bundle.has_graph("decoder", row_precision):
            continue
        if not _installed({"onnx": "onnxruntime", "trt": "tensorrt"}.get(name, name)):
            continue
        candidates.append((row["images_per_s"], row["engine"], name, row_precision, options))
    if not candidates:
        return None
    speed, label, name, row_precision, options = max(candidates)
    extra = {k: v for k, v in options.items() if k not in ("precision", "device")}
    return Choice(
        name,
        row_precision,
        extra,
        reason=f"fastest gated engine measured on this machine by `mae bench` ({when}): {label}, {speed:.1f} img/s "
        f"at mask {ratio:g}",
    )
