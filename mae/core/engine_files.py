"""A bundle's TensorRT engine files: their names, their sidecar JSON, and when one can load here.

Written by `mae.export.tensorrt` (which builds engines) and read by `mae.runtime.engines.trt` (which runs them), so
it lives in the base both use. Pure: no TensorRT import.

Sidecar (`<engine>.json`, format "mae-tensorrt-engine"): the TensorRT version, the GPU name and compute capability,
the optimization profiles, the precision, the source ONNX file with its sha256, and the engine's own sha256.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import MAEError

ENGINE_PRECISIONS = ("fp32", "fp16")  # what `mae export --format trt` builds
SIDECAR_FORMAT = "mae-tensorrt-engine"
# How `mae export --format trt` builds by default (the sidecar records what was used): the optimization profile's
# largest batch and the batch it is tuned for (None: min(DEFAULT_OPT_BATCH, max batch)), the builder's workspace.
DEFAULT_MAX_BATCH = 64
DEFAULT_OPT_BATCH = 32  # the embed command's default batch
DEFAULT_WORKSPACE_GIB = 4.0


# --------------------------------------------------------------------------------------------- file names
def engine_file(part: str, precision: str) -> str:
    """encoder.engine, decoder.fp16.engine, ..."""
    return f"{part}.engine" if precision == "fp32" else f"{part}.{precision}.engine"


def engine_sidecar_path(engine_path: str | os.PathLike) -> Path:
    """The JSON beside an engine: encoder.fp16.engine -> encoder.fp16.engine.json."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def load_sidecar(engine_path: str | os.PathLike) -> dict[str, Any]:
    """An engine's sidecar, or an error saying to rebuild (an engine without one cannot be checked)."""
    sidecar_path = engine_sidecar_path(engine_path)
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as exc:
        raise MAEError(
            f"Cannot read {sidecar_path}, which says what {Path(engine_path).name} was built for: {exc}",
            hint="rebuild the engines: mae export BUNDLE --format trt",
        ) from exc
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise MAEError(f"{sidecar_path} is not an mae engine sidecar.", hint="rebuild: mae export BUNDLE --format trt")
    return sidecar


# ------------------------------------------------------------------------------------------ compatibility
def tensorrt_major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError as exc:
        raise MAEError(f"Cannot read the TensorRT version {version!r}.") from exc


def _capability_text(capability: Any) -> str:
    """(8, 9), [8, 9], "8.9", 8.9 -> "8.9"."""
    if isinstance(capability, (tuple, list)):
        return ".".join(str(int(part)) for part in capability)
    return str(capability).strip()


def check_engine_compatible(
    sidecar: dict[str, Any], trt_version: str, gpu_name: str, compute_capability: Any
) -> str | None:
    """Raise MAEError (saying to rebuild) unless the engine described by `sidecar` can load here; return a note
    when it loads on another GPU model than the one that built it.

    TensorRT's rule: the same TensorRT version, and the same compute capability (an engine built with a
    hardware-compatibility level, recorded as `hardware_compatibility` "ampere_plus", runs on any GPU of compute
    capability 8.0 or more). The GPU model itself need not match (an A100 40GB engine runs on an A100 80GB); its
    tactics were timed on the builder's GPU, so speed may differ. Pure: no TensorRT import.
    """
    engine = sidecar.get("engine", "the engine")
    rebuild = f"rebuild it here: mae export BUNDLE --format trt --precision {sidecar.get('precision', 'fp32')}"
    built_version = str(sidecar.get("tensorrt_version", "unknown"))
    if built_version != str(trt_version):
        raise MAEError(
            f"{engine} was built with TensorRT {built_version}, and this is TensorRT {trt_version}: an engine "
            "only loads on the TensorRT version that built it.",
            hint=rebuild,
        )
    built_capability = _capability_text(sidecar.get("compute_capability", "unknown"))
    built_gpu, here_gpu = str(sidecar.get("gpu_name", "unknown")).strip(), str(gpu_name).strip()
    here_capability = _capability_text(compute_capability)
    level = str(sidecar.get("hardware_compatibility") or "none").lower()
    if level == "ampere_plus":
        if _capability_number(here_capability) < 8.0:
            raise MAEError(
                f"{engine} was built for Ampere and newer GPUs (compute capability 8.0 or more), and this GPU is "
                f"{here_gpu} (compute capability {here_capability}).",
                hint=rebuild,
            )
    elif built_capability != here_capability:
        raise MAEError(
            f"{engine} was built for {built_gpu} (compute capability {built_capability}), and this GPU is "
            f"{here_gpu} (compute capability {here_capability}): an engine only loads on the compute capability "
            "that built it.",
            hint=rebuild,
        )
    if built_gpu != here_gpu:
        return (
            f"{engine} was built on {built_gpu} and runs here on {here_gpu} (same compute capability "
            f"{here_capability}); its kernels were timed there, so rebuilding here may be faster"
        )
    return None


def _capability_number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def engine_file_path(manifest: dict[str, Any], bundle_dir: Path, part: str, precision: str) -> Path:
    """The engine file of `part` at `precision` listed in mae.json, with errors that say what to do."""
    if precision not in ENGINE_PRECISIONS:
        raise MAEError(
            f"TensorRT engines are {' or '.join(ENGINE_PRECISIONS)}, not {precision}.",
            hint="for int8 use the onnx engine with the bundle's int8 graph",
        )
    engines = manifest.get("engines") or {}
    entry = (engines.get(precision) or {}).get(part)
    if entry is None:
        have = sorted(p for p, parts in engines.items() if part in (parts or {}))
        built = f"it has {part} engines for: {', '.join(have)}" if have else "it has no TensorRT engines"
        raise MAEError(
            f"The bundle {bundle_dir} has no {precision} TensorRT {part} engine ({built}).",
            hint=f"build one on this machine: mae export {bundle_dir} --format trt --precision {precision}",
        )
    engine_path = bundle_dir / entry["file"]
    if not engine_path.is_file():
        hint = f"mae export {bundle_dir} --format trt --precision {precision}"
        raise MAEError(f"{engine_path} is listed in mae.json but missing.", hint=hint)
    return engine_path


def check_engine_source(sidecar: dict[str, Any], manifest: dict[str, Any], part: str, engine_path: Path) -> None:
    """An engine built from an ONNX graph that has since been re-exported would run the old weights."""
    onnx_entry = sidecar.get("onnx") or {}
    graph = manifest.get("graphs", {}).get(onnx_entry.get("precision", "fp32"), {}).get(part, {})
    built_from, current = onnx_entry.get("sha256"), graph.get("sha256")
    if built_from and current and built_from != current:
        raise MAEError(
            f"{engine_path.name} was built from an earlier {graph.get('file', 'ONNX graph')} (the bundle was "
            "re-exported since): it would run the old weights.",
            hint=f"rebuild it: mae export {engine_path.parent} --format trt --precision {sidecar.get('precision')}",
        )


def import_tensorrt() -> Any | None:
    """The `tensorrt` module, or None where it is not installed (PyPI's stub without NVIDIA's libraries included)."""
    import importlib

    try:
        return importlib.import_module("tensorrt")
    except ImportError:
        return None
