"""mae.export: weights -> a verified ONNX bundle (+ TensorRT engines).

Importing this package is cheap and torch-free (`mae export --help`, `mae info`); the functions below import the
exporter (and torch) when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mae.core.bundle import GRAPH_PRECISIONS, is_bundle
from mae.core.engine_files import DEFAULT_MAX_BATCH, DEFAULT_WORKSPACE_GIB, ENGINE_PRECISIONS
from mae.core.errors import MAEError

if TYPE_CHECKING:
    from mae.core.bundle import Bundle

    from .progress import ExportProgress


@dataclass(frozen=True)
class FormatSpec:
    """One row of the format table that drives option checks, aliases and file names."""

    name: str
    aliases: tuple[str, ...]
    precisions: tuple[str, ...]
    suffix: str  # of the files it writes
    needs: str  # what it is built from


EXPORT_FORMATS = (
    FormatSpec("onnx", (), GRAPH_PRECISIONS, ".onnx", "weights (or a bundle, to add a precision)"),
    FormatSpec("tensorrt", ("trt", "engine"), ENGINE_PRECISIONS, ".engine", "a bundle, or weights (exported first)"),
)


def resolve_format(name: str) -> FormatSpec:
    name = name.lower()
    for entry in EXPORT_FORMATS:
        if name == entry.name or name in entry.aliases:
            return entry
    names = ", ".join(entry.name for entry in EXPORT_FORMATS)
    raise MAEError(f"Unknown export format {name!r}", hint=f"use one of: {names} (trt is short for tensorrt)")


def default_out_dir(weights: Path) -> Path:
    """Where `mae export WEIGHTS` writes without --out: a bundle is extended in place, weights get a sibling."""

    return weights if is_bundle(weights) else weights.parent / "bundle"


def run_export(
    weights: Path,
    format: str = "onnx",
    out: Path | None = None,
    precision: str = "fp32",
    opset: int | None = None,
    num_heads: int | None = None,
    decoder_num_heads: int | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    opt_batch: int | None = None,
    workspace: float = DEFAULT_WORKSPACE_GIB,
    calibration: Path | None = None,
    calibration_count: int | None = None,
    int8_min_cosine: float | None = None,
    progress: ExportProgress | None = None,
) -> Bundle:
    """`mae export`: check the options against the format table, export, and return the bundle written.

    progress: told each step and note (`mae.export.progress.ExportProgress`); None says nothing.
    """
    weights = Path(weights)
    target = _check_options(weights, format, precision, calibration, calibration_count, int8_min_cosine)
    out_dir = Path(out) if out is not None else default_out_dir(weights)
    if target.name == "tensorrt":
        from .tensorrt import run_tensorrt_export  # loaded when an export runs: `import mae.export` stays light

        return run_tensorrt_export(
            weights,
            out_dir,
            precision=precision,
            opset=opset,
            num_heads=num_heads,
            decoder_num_heads=decoder_num_heads,
            max_batch=max_batch,
            opt_batch=opt_batch,
            workspace_gib=workspace,
            progress=progress,
        )

    # Loaded when an export runs (onnx_bundle imports torch): `import mae.export` stays light.
    from .calibration import DEFAULT_COUNT
    from .onnx_bundle import Int8Options, export_bundle  # (as above)

    return export_bundle(
        weights,
        out_dir,
        precisions=(precision,),
        opset=opset,
        num_heads=num_heads,
        decoder_num_heads=decoder_num_heads,
        progress=progress,
        int8=Int8Options(calibration, calibration_count or DEFAULT_COUNT, int8_min_cosine),
    )


def _check_options(
    weights: Path,
    format: str,
    precision: str,
    calibration: Path | None,
    calibration_count: int | None,
    int8_min_cosine: float | None,
) -> FormatSpec:
    """The format asked for, once the weights exist and the options suit it (before anything slow)."""
    if not weights.exists():
        raise MAEError(
            f"{weights} does not exist.", hint="pass a checkpoint, an official MAE .pth, a HF ViTMAE dir or a bundle"
        )
    target = resolve_format(format)
    if precision not in target.precisions:
        raise MAEError(
            f"--format {target.name} does not take --precision {precision}.",
            hint=f"{target.name} precisions: {', '.join(target.precisions)}",
        )
    int8_options = [
        name
        for name, value in (
            ("--calibration", calibration),
            ("--calibration-count", calibration_count),
            ("--int8-min-cosine", int8_min_cosine),
        )
        if value is not None
    ]
    if int8_options and precision != "int8":
        raise MAEError(
            f"{', '.join(int8_options)} only apply to --precision int8.", hint="add --precision int8, or leave them out"
        )
    if calibration is not None and not Path(calibration).exists() and not any(c in str(calibration) for c in "*?["):
        raise MAEError(
            f"--calibration {calibration} does not exist.",
            hint="pass a folder of images, a text file of paths or a glob; leave it out to use the shipped photos",
        )
    return target


__all__ = ["EXPORT_FORMATS", "FormatSpec", "default_out_dir", "export_bundle", "resolve_format", "run_export"]


def __getattr__(name: str) -> Any:
    """`mae.export.export_bundle` (module `onnx_bundle`) is loaded when first used: it imports torch and the
    exporter, and `import mae.export` stays light (PEP 562)."""
    if name == "export_bundle":
        from .onnx_bundle import export_bundle  # torch and the exporter: only when an export runs

        return export_bundle
    raise AttributeError(f"module 'mae.export' has no attribute {name!r}")
