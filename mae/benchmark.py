"""`mae bench` for a person: presets (random weights exported to a temporary bundle), the tables and the JSON file.

The app layer over `mae.runtime.bench` (which measures a bundle or weights and returns rows): exporting a preset
needs PyTorch and the exporter, which the torch-free runtime never imports, and printing tables is the app's job.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mae.export import export_bundle
from mae.runtime.bench import (
    BASELINE,
    ENGINE_SPECS,
    BenchProgress,
    Prepared,
    default_engines,
    describe_choice,
    gflops_text,
    graph_precisions,
    parse_engines,
    peaks_line,
    prepare_model,
    remember,
    row_line,
    summary_lines,
)
from mae.runtime.bench import bench as measure
from mae.runtime.bench_options import DEFAULT_BATCH_SIZE, DEFAULT_MASK_RATIOS, DEFAULT_MODEL, DEFAULT_SECONDS
from mae.runtime.engines.auto import GATE
from mae.runtime.roofline import Peak, measure_peaks

from .checkpoint import save_random_weights
from .core import hardware
from .core.config import PRESETS
from .core.files import atomic_write_text
from .reports.export import ExportSpinner

TABLE_COLUMNS = ("engine", "mask", "K", "img/s", "vs torch fp32", "cos cls", "cos mean", "t/t(mask 0)", "GFLOP/s",
                 "of peak")  # fmt: skip


class BenchBars(BenchProgress):
    """`mae bench` while it runs: a transient bar per stage (elapsed, time left), and each row's line as soon as its
    mask ratio is measured."""

    def __init__(self) -> None:
        self._bar: Progress | None = None
        self._task = None

    def stage(self, description: str, total: float) -> None:
        columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TextColumn("left"))
        self._bar = Progress(*columns, TimeRemainingColumn(), transient=True)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def update(self, completed: float | None = None, description: str | None = None) -> None:
        self._bar.update(self._task, completed=completed, description=description)

    def measured(self, row: dict[str, Any]) -> None:
        self._bar.console.print(row_line(row), highlight=False)

    def done(self) -> None:
        self._bar.stop()


def bench(
    model: str = DEFAULT_MODEL,
    engines: str | Sequence[str] | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mask_ratios: Sequence[float] = DEFAULT_MASK_RATIOS,
    seconds: float = DEFAULT_SECONDS,
    seed: int = 0,
    progress: bool = True,
    peaks: Mapping[str, Peak] | None = None,
    roofline: bool = True,
) -> list[dict[str, Any]]:
    """`mae.runtime.bench.bench` for a bundle, weights or a preset name (random weights exported, unverified: the
    benchmark compares every engine with PyTorch itself, and the export checks add minutes on big models).
    progress: bars and a line per row as they are measured (`BenchBars`), and the preset's export steps."""
    labels = default_engines(model)[0] if engines is None else parse_engines(engines)
    if BASELINE not in labels:
        labels.insert(0, BASELINE)
    options = dict(batch_size=batch_size, mask_ratios=mask_ratios, seconds=seconds, seed=seed,
                   progress=BenchBars() if progress else None, peaks=peaks, roofline=roofline)  # fmt: skip
    if model not in PRESETS:
        return measure(prepare_model(model, labels), labels, **options)
    with tempfile.TemporaryDirectory(prefix="mae-bench-") as temp:
        # The encoder alone: the benchmark times the embedding path.
        checkpoint = save_random_weights(PRESETS[model], Path(temp) / f"{model}-random.pt", seed, decoder=False)
        bundle = None
        if any(ENGINE_SPECS[label][0] != "torch" for label in labels):
            exported = export_bundle(
                checkpoint,
                Path(temp) / "bundle",
                precisions=graph_precisions(labels),
                verify=False,
                progress=ExportSpinner() if progress else None,
            )
            bundle = str(exported.path)
        prepared = Prepared(bundle, str(checkpoint), [f"{model}: random weights (seed {seed})"])
        return measure(prepared, labels, **options)


def results_table(rows: list[dict[str, Any]], title: str):  # noqa: ANN201 - rich Table

    table = Table(title=title, title_justify="left")
    for name in TABLE_COLUMNS:
        table.add_column(name, justify="left" if name == "engine" else "right", no_wrap=name == "engine")
    if any(row.get("below_gate") for row in rows):
        table.caption = f"! pooled cosine below {GATE} (the int8 export's gate): not accurate enough to be picked"
    for row in rows:
        head = (row["engine"], f"{row['mask_ratio']:g}", str(row["kept"]))
        if "error" in row:
            table.add_row(*head, "[dim]not run[/dim]", "", "", "", "", "", "")
            continue
        speedup = row.get("time_vs_mask0")
        fraction = row.get("fraction_of_peak")
        mark = "[red]![/red] " if row.get("below_gate") else ""  # below the int8 gate: see the table's caption
        table.add_row(
            *head,
            f"{row['images_per_s']:.1f}",
            f"{row['ratio_vs_torch']:.2f}x",
            f"{mark}{row['cosine_cls']:.6f}",
            f"{mark}{row['cosine_mean']:.6f}",
            "" if speedup is None else f"{speedup:.3f}",
            gflops_text(row["effective_gflops"]) if "effective_gflops" in row else "",
            "" if fraction is None else f"{fraction:.0%} {row['peak_kind']}",
        )
    return table


def run_bench(
    model: str = DEFAULT_MODEL,
    engines: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mask_ratio: Sequence[float] = DEFAULT_MASK_RATIOS,
    seconds: float = DEFAULT_SECONDS,
    json_out: Path | None = None,
    roofline: bool = True,
) -> list[dict[str, Any]]:
    """`mae bench`: print the engines chosen, the peaks, the table (and the engines' descriptions); write JSON.

    engines: None runs every engine that can run here, and says which were left out and why.
    """
    console = Console()
    if not console.is_terminal:  # piped or logged: no terminal width to fit, keep the table on one line per row
        console = Console(width=120)
    left_out: dict[str, str] = {}
    if engines is None:
        labels, left_out = default_engines(model)
        console.print(describe_choice(labels, left_out), highlight=False)
    else:
        labels = parse_engines(engines)
    peaks, missing = measure_peaks() if roofline else ({}, {})
    if roofline:
        console.print(peaks_line(peaks, missing), highlight=False)
    rows = bench(model, labels, batch_size=batch_size, mask_ratios=mask_ratio, seconds=seconds, peaks=peaks)
    stored = remember(model, rows)
    title = f"Encoder throughput, {model}, batch {batch_size} (median of interleaved rounds)"
    console.print(results_table(rows, title))
    for line in summary_lines(rows):
        console.print(line, highlight=False)
    descriptions = dict.fromkeys(f"{r['engine']}: {r['description']}" for r in rows if "description" in r)
    descriptions.update(dict.fromkeys(f"{r['engine']}: not run: {r['error']}" for r in rows if "error" in r))
    for line in descriptions:
        console.print(f"  {line}", highlight=False)
    console.print(
        f"  cos: minimum over the batch of the cosine between pooled features and PyTorch eager fp32; "
        f"CPU threads available: {os.cpu_count()} (other jobs on the machine move absolute numbers; ratios travel)"
    )
    if roofline:
        console.print(
            "  GFLOP/s: encoder FLOPs per image (matrix products) x img/s; of peak: that over this CPU's peak GEMM of "
            "the precision the engine computes in"
        )
    if stored is not None:
        console.print(f"  stored for --engine auto on this machine: {stored}", highlight=False)
    if json_out is not None:
        payload = {
            "model": model,
            "batch_size": batch_size,
            "engines_left_out": left_out,
            "peaks": {kind: peak.to_dict() for kind, peak in peaks.items()},
            "peaks_not_measured": missing,
            "cpu": hardware.cpu_info().to_dict(),
            "rows": rows,
        }
        atomic_write_text(Path(json_out), json.dumps(payload, indent=2) + "\n")
        console.print(f"  results: {json_out}")
    return rows
