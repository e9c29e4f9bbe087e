"""`mae info BUNDLE`: what a bundle holds, where it came from, and how well each graph matched PyTorch.

Torch-free (numpy, onnx, rich): it reads mae.json, the graphs' metadata_props and the engine sidecars.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mae.core.bundle import PRECISIONS, Bundle
from mae.core.errors import MAEError
from mae.core.integrity import verify_entry

from .metadata import read_metadata
from .tolerances import Tolerance


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return str(num_bytes)


def _number(value: Any, style: str = ".2e") -> str:
    return "-" if value is None else format(float(value), style)


def graph_metadata_of(path: Path) -> dict[str, Any]:
    """The mae.* metadata_props of one graph file (its weights are not read)."""
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and OSError
        raise MAEError(f"Cannot read {path} as ONNX: {exc}", hint="re-run `mae export`") from exc
    return read_metadata(proto)


def _intact(bundle: Bundle, entry: dict[str, Any]) -> bool:
    """Whether the files of a graph entry are those mae.json records (`mae.core.integrity`)."""
    try:
        verify_entry(bundle.path, entry)
    except MAEError:
        return False
    return True


def bundle_summary(path: str | os.PathLike) -> dict[str, Any]:
    """What `mae info BUNDLE` prints, as plain data."""
    bundle = Bundle.load(path)
    manifest = bundle.manifest
    graphs = []
    for precision in PRECISIONS:
        for part, entry in (manifest.get("graphs", {}).get(precision) or {}).items():
            file_path = bundle.path / entry["file"]
            report = (manifest.get("verification", {}).get(precision) or {}).get(part) or {}
            on_disk = file_path.stat().st_size if file_path.is_file() else None
            data = entry.get("external_data")
            if on_disk is not None and data and (bundle.path / data["file"]).is_file():
                on_disk += (bundle.path / data["file"]).stat().st_size
            graphs.append(
                {
                    "precision": precision,
                    "part": part,
                    "file": entry["file"],
                    "exists": file_path.is_file(),
                    "intact": _intact(bundle, entry),
                    "bytes": on_disk,
                    "sha256": entry.get("sha256"),
                    "metadata": graph_metadata_of(file_path) if file_path.is_file() else {},
                    "verification": report,
                }
            )
    for precision, parts in (manifest.get("openvino") or {}).items():  # the NNCF int8 model
        for part, entry in (parts or {}).items():
            file_path = bundle.path / entry["file"]
            graphs.append(
                {
                    "precision": precision,
                    "part": f"{part} (OpenVINO)",
                    "file": entry["file"],
                    "exists": file_path.is_file(),
                    "intact": _intact(bundle, entry),
                    "bytes": entry.get("bytes"),
                    "sha256": entry.get("sha256"),
                    "metadata": {},
                    "verification": entry.get("verification") or {},
                }
            )
    engines = []
    for precision, parts in (manifest.get("engines") or {}).items():
        for part, entry in parts.items():
            sidecar_path = bundle.path / entry.get("sidecar", entry["file"] + ".json")
            sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.is_file() else {}
            engine_path = bundle.path / entry["file"]
            engines.append(
                {
                    "precision": precision,
                    "part": part,
                    "file": entry["file"],
                    "bytes": engine_path.stat().st_size if engine_path.is_file() else None,
                    "sidecar": sidecar,
                }
            )
    return {
        "path": str(bundle.path),
        "format_version": manifest.get("format_version"),
        "toolkit_version": manifest.get("toolkit_version"),
        "config": bundle.config.to_dict(),
        "preprocessing": bundle.preprocessing.to_dict(),
        "norm_pix_loss": bundle.norm_pix_loss,
        "source": manifest.get("source") or {},
        "opset": manifest.get("opset"),
        "exporter": manifest.get("exporter"),
        "versions": manifest.get("versions") or {},
        "has_decoder": bundle.has_decoder,
        "graphs": graphs,
        "engines": engines,
        "inputs": next(
            (report.get("inputs") for report in (manifest.get("verification") or {}).values() if "inputs" in report),
            None,
        ),
        "int8": manifest.get("int8"),
        "notes": manifest.get("notes") or [],
    }


def int8_lines(summary: dict[str, Any]) -> list[str]:
    """How the int8 graphs were made and where they were verified, for `mae info` and `mae export`."""
    record = summary.get("int8")
    if not record:
        return []
    calibration = record.get("calibration") or {}
    lines = [f"int8 {engine}: {method}" for engine, method in (record.get("method") or {}).items()]
    lines.append(
        f"int8 calibration: {calibration.get('count')} images from {calibration.get('source')}, "
        f"{calibration.get('held_out')} held out; gate: pooled cosine >= {record.get('min_cosine')}"
    )
    cpu = record.get("verified_on")
    lines.append(
        f"int8 verified on: {cpu['model']} ({', '.join(cpu['isa'])}; {cpu['int8_class']} int8 class)"
        if cpu
        else "int8 not verified (exported with verify=False)"
    )
    if record.get("openvino_refused"):
        lines.append(f"int8 OpenVINO model left out: {record['openvino_refused']}")
    return lines


def _graph_table(summary: dict[str, Any], title: str):  # noqa: ANN202 - rich Table
    """One row per graph; narrow enough for an 80-column terminal (file names are never cut)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("graph")
    table.add_column("file", overflow="fold")
    table.add_column("size", justify="right")
    table.add_column("max |diff|", justify="right")
    table.add_column("cosine", justify="left")  # encoder: cls / mean-pooled; decoder: the prediction
    for graph in summary["graphs"]:
        report = graph["verification"]
        verified = report.get("verified", "max_abs_diff" in report)
        if not verified:
            diff, cosine = "not verified", ""
        else:
            diff = _number(report.get("max_abs_diff"))
            if "cosine_cls" in report:
                cosine = f"cls {report['cosine_cls']:.6f} mean {report['cosine_mean']:.6f}"
            else:
                cosine = f"pred {_number(report.get('cosine_pred'), '.6f')}"
        file_text = graph["file"] if graph["exists"] else f"{graph['file']} (missing)"
        if graph["exists"] and not graph["intact"]:
            file_text += " (changed)"
        table.add_row(f"{graph['precision']} {graph['part']}", file_text, _size(graph["bytes"]), diff, cosine)
    return table


def _tolerance_lines(summary: dict[str, Any]) -> list[str]:
    """'fp32: max |diff| <= 0.0001' per verified precision."""

    lines = {}
    for graph in summary["graphs"]:
        tolerance = (graph["verification"] or {}).get("tolerance")
        if tolerance and graph["precision"] not in lines:
            lines[graph["precision"]] = Tolerance(**tolerance).describe()
    return [f"{precision}: {text}" for precision, text in lines.items()]


def describe_bundle(path: str | os.PathLike, console: Any = None) -> dict[str, Any]:
    """Print a bundle's provenance, pre-processing, graphs (sizes, verification) and engines; return the facts."""
    from rich.console import Console
    from rich.table import Table

    summary = bundle_summary(path)
    console = console or Console()
    source = summary["source"]
    overview = Table(title=f"Bundle: {summary['path']}", show_header=False, title_justify="left")
    overview.add_column(style="bold")
    overview.add_column(overflow="fold")
    overview.add_row("source", f"{source.get('path', '?')} ({source.get('format', '?')})")
    overview.add_row("source sha256", str(source.get("sha256", "?")))
    overview.add_row("toolkit version", str(summary["toolkit_version"]))
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    exporter = f"{summary['opset']} / {summary['exporter']}" + (f" ({versions})" if versions else "")
    overview.add_row("opset / exporter", exporter)
    overview.add_row("decoder", "yes" if summary["has_decoder"] else "no (encoder-only: embeddings, no reconstruction)")
    overview.add_row("norm_pix_loss", "on (pred is per-patch normalized)" if summary["norm_pix_loss"] else "off")
    pre = summary["preprocessing"]
    overview.add_row(
        "preprocessing",
        f"{pre['size']} px, resize {pre['resize']} (crop_pct {pre['crop_pct']}), {pre['interpolation']}, "
        f"mean {pre['mean']}, std {pre['std']}",
    )
    config = summary["config"]
    overview.add_row(
        "architecture",
        f"ViT {config['embed_dim']}-d x {config['depth']} blocks, {config['num_heads']} heads, patch "
        f"{config['patch_size']}, img {config['img_size']}; decoder {config['decoder_embed_dim']}-d x "
        f"{config['decoder_depth']}, {config['decoder_num_heads']} heads",
    )
    console.print(overview)
    console.print(_graph_table(summary, "Graphs (checked against PyTorch fp32)"))
    for graph in summary["graphs"]:
        if graph["exists"] and not graph["intact"]:
            console.print(
                f"{graph['file']} CHANGED since export: it is not the file whose sha256 mae.json records, and every "
                "engine refuses it. Restore it, or export the bundle again.",
                style="bold red",
            )
    tolerances = _tolerance_lines(summary)
    if tolerances:
        console.print("tolerances: " + "; ".join(tolerances))
    if summary["inputs"]:
        inputs = summary["inputs"]
        console.print(
            f"verified on {', '.join(inputs['images'])}; mask ratios {inputs['mask_ratios']}, "
            f"batch sizes {inputs['batch_sizes']}"
        )
    for line in int8_lines(summary):
        console.print(line, highlight=False)
    if summary["engines"]:
        engines = Table(title="TensorRT engines", title_justify="left")
        for column in ("precision", "graph", "file", "size", "TensorRT", "GPU", "compute capability"):
            engines.add_column(column)
        for engine in summary["engines"]:
            sidecar = engine["sidecar"]
            engines.add_row(
                engine["precision"],
                engine["part"],
                engine["file"],
                _size(engine["bytes"]),
                str(sidecar.get("tensorrt_version", "?")),
                str(sidecar.get("gpu_name", "?")),
                str(sidecar.get("compute_capability", "?")),
            )
        console.print(engines)
    for note in summary["notes"]:
        console.print(f"• {note}")
    return summary


def print_export_summary(bundle: Bundle, console: Any = None) -> None:
    """After `mae export`: the graphs table and where the bundle is."""
    from rich.console import Console

    console = console or Console()
    summary = bundle_summary(bundle.path)
    console.print(_graph_table(summary, f"Bundle written: {bundle.path}"))
    tolerances = _tolerance_lines(summary)
    if tolerances:
        console.print("tolerances: " + "; ".join(tolerances))
    for line in int8_lines(summary):
        console.print(line, highlight=False)
    if not summary["has_decoder"]:
        console.print("The weights have no decoder: the bundle holds the encoder only (embeddings, no reconstruction).")
