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


def check_engine_compatible(sidecar: dict[str, Any], trt_version: str, gpu_name: str, compute_capability: Any) -> None:
    """Raise MAEError (saying to rebuild) unless the engine described by `sidecar` can load here.

    TensorRT engines are tied to the exact TensorRT version that built them and to the GPU: its compute
    capability for correctness, the GPU model for the tactics chosen. Pure: no TensorRT import.
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
    built_gpu = str(sidecar.get("gpu_name", "unknown")).strip()
    here_capability = _capability_text(compute_capability)
    if built_capability != here_capability or built_gpu != str(gpu_name).strip():
        raise MAEError(
            f"{engine} was built for {built_gpu} (compute capability {built_capability}), and this GPU is "
            f"{str(gpu_name).strip()} (compute capability {here_capability}): engines are specific to a GPU.",
            hint=rebuild,
        )


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
