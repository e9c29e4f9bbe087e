"""`mae export` and `mae info` for a person: the export's steps on stderr, the graphs table after an export, a
bundle's provenance, graphs and engines (`mae.export.info.bundle_summary`), and this machine
(`mae.runtime.system.system_report`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mae.export.info import bundle_summary
from mae.export.progress import ExportProgress
from mae.export.tolerances import Tolerance
from mae.runtime.system import PACKAGES, system_report

from ..core.bundle import ENCODER_ONLY, NO_DECODER_NOTE, Bundle
from ..core.hardware import INT8_NOTES


class ExportSpinner(ExportProgress):
    """Each step as a spinner while it runs, then "✓ exporting encoder (2.1 s)" (or "✗" when it failed); notes as
    lines. On stderr unless given a console."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(text + " ..."):
            try:
                yield
            except BaseException:
                self.console.print(f"[red]✗[/red] {text}")
                raise
        self.console.print(f"[green]✓[/green] {text} [dim]({time.perf_counter() - start:.1f} s)[/dim]")

    def note(self, text: str) -> None:
        self.console.print(text)


def size_text(num_bytes: float | None) -> str:
    """'-', '512 B', '3.4 KiB', ..., '1.2 GiB'."""
    if num_bytes is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num_bytes < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return str(num_bytes)


def _number(value: Any, style: str = ".2e") -> str:
    return "-" if value is None else format(float(value), style)


def graph_table(summary: dict[str, Any], title: str) -> Table:
    """One row per graph; narrow enough for an 80-column terminal (file names are never cut)."""
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
        table.add_row(f"{graph['precision']} {graph['part']}", file_text, size_text(graph["bytes"]), diff, cosine)
    return table


def tolerance_lines(summary: dict[str, Any]) -> list[str]:
    """'fp32: max |diff| <= 0.0001' per verified precision."""
    lines = {}
    for graph in summary["graphs"]:
        tolerance = (graph["verification"] or {}).get("tolerance")
        if tolerance and graph["precision"] not in lines:
            lines[graph["precision"]] = Tolerance(**tolerance).describe()
    return [f"{precision}: {text}" for precision, text in lines.items()]


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


def _verification_lines(summary: dict[str, Any], console: Console) -> None:
    """The tolerances of the graphs table and how the int8 graphs were made."""
    tolerances = tolerance_lines(summary)
    if tolerances:
        console.print("tolerances: " + "; ".join(tolerances))
    for line in int8_lines(summary):
        console.print(line, highlight=False)


def print_export_summary(bundle: Bundle, console: Console | None = None) -> None:
    """After `mae export --format onnx`: the graphs table and where the bundle is."""
    console = console or Console()
    summary = bundle_summary(bundle.path)
    console.print(graph_table(summary, f"Bundle written: {bundle.path}"))
    _verification_lines(summary, console)
    if not summary["has_decoder"]:
        console.print(NO_DECODER_NOTE)


def overview_table(summary: dict[str, Any]) -> Table:
    """A bundle's provenance, pre-processing and architecture."""
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
    overview.add_row("decoder", "yes" if summary["has_decoder"] else f"no ({ENCODER_ONLY})")
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
    return overview


def engines_table(summary: dict[str, Any]) -> Table:
    """A bundle's TensorRT engines and what each was built for."""
    engines = Table(title="TensorRT engines", title_justify="left")
    for column in ("precision", "graph", "file", "size", "TensorRT", "GPU", "compute capability"):
        engines.add_column(column)
    for engine in summary["engines"]:
        sidecar = engine["sidecar"]
        engines.add_row(
            engine["precision"],
            engine["part"],
            engine["file"],
            size_text(engine["bytes"]),
            str(sidecar.get("tensorrt_version", "?")),
            str(sidecar.get("gpu_name", "?")),
            str(sidecar.get("compute_capability", "?")),
        )
    return engines


def describe_bundle(path: str | os.PathLike, console: Console | None = None) -> dict[str, Any]:
    """`mae info BUNDLE`: print a bundle's provenance, pre-processing, graphs (sizes, verification) and engines;
    return the facts (`bundle_summary`)."""
    summary = bundle_summary(path)
    console = console or Console()
    console.print(overview_table(summary))
    console.print(graph_table(summary, "Graphs (checked against PyTorch fp32)"))
    for graph in summary["graphs"]:
        if graph["exists"] and not graph["intact"]:
            console.print(
                f"{graph['file']} CHANGED since export: it is not the file whose sha256 mae.json records, and every "
                "engine refuses it. Restore it, or export the bundle again.",
                style="bold red",
            )
    tolerances = tolerance_lines(summary)
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
        console.print(engines_table(summary))
    for note in summary["notes"]:
        console.print(f"• {note}")
    return summary


# ---------------------------------------------------------------------------------------- mae info --system
def _engine_text(name: str, facts: dict[str, Any]) -> str:
    if "error" in facts:
        return f"[red]cannot load: {escape(facts['error'])}[/red]"
    if name == "onnxruntime":
        return "providers: " + ", ".join(p.removesuffix("ExecutionProvider") for p in facts["providers"])
    if name == "openvino":
        precision = facts.get("cpu_inference_precision")
        return "devices: " + ", ".join(facts["devices"]) + (f"; CPU computes in {precision}" if precision else "")
    if name == "torch":
        if not facts["cuda_build"]:
            return "CPU-only build"
        gpus = f"{facts['cuda_devices']} CUDA GPU(s) available" if facts["cuda_available"] else "no CUDA GPU available"
        return f"CUDA {facts['cuda_build']} build, {gpus}"
    return ""


def print_system_report(report: dict[str, Any] | None = None, console: Console | None = None) -> dict[str, Any]:
    """`mae info --system`: print `report` (default: `mae.runtime.system.system_report()`) as two tables; return
    it."""
    report = report or system_report()
    console = console or Console()
    cpu = report["cpu"]
    machine = Table(title="This machine", show_header=False, title_justify="left")
    machine.add_column(style="bold")
    machine.add_column(overflow="fold")
    machine.add_row("CPU", f"{escape(cpu['model'])} ({cpu['machine'] or '?'}), {cpu['threads']} threads")
    machine.add_row("ISA", ", ".join(cpu["isa"]) or "none of AVX2, AVX-512, AMX, NEON")
    machine.add_row("int8", f"{cpu['int8_class']}: {INT8_NOTES.get(cpu['int8_class'], '')}")
    machine.add_row(
        "bf16",
        "native (AVX512-BF16 / AMX-BF16)"
        if cpu["native_bf16"]
        else "no bf16 instructions: bf16 would be emulated (many times slower than fp32), so it is refused "
        "unless --allow-emulated-bf16",
    )
    gpus = report["cuda_gpus"]
    machine.add_row("CUDA GPUs", ", ".join(f"{escape(g['name'])} ({g['source']})" for g in gpus) or "none")
    machine.add_row("Python", f"{report['python']} on {report['platform']}; mae-toolkit {report['toolkit_version']}")
    console.print(machine)

    engines = Table(title="Installed engines and packages", title_justify="left")
    for column in ("name", "version", "runs on"):
        engines.add_column(column, overflow="fold")
    for name, facts in report["engines"].items():
        engines.add_row(name, escape(str(facts["version"])), _engine_text(name, facts))
    missing = [name for name in PACKAGES if name not in report["engines"]]
    console.print(engines)
    if missing:
        console.print(f"not installed: {', '.join(missing)}", highlight=False)
    return report
