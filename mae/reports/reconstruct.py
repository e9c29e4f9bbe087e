"""`mae reconstruct` for a person: the pictures (and arrays) written, then a table of PSNR / MSE and what to know."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from mae.runtime.reconstruct import ReconstructionResult, SavedPictures, reconstruct, save_pictures, write_arrays


class BatchBar:
    """A `ReconstructProgress` for a terminal: a bar over the batches that goes when they are done (none for one)."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: Any = None

    def start(self, total: int, label: str) -> None:
        if total < 2:
            return
        columns = (BarColumn(), TaskProgressColumn(show_speed=True), TimeRemainingColumn(elapsed_when_finished=True))
        self.bar = Progress(TextColumn("[progress.description]{task.description}"), *columns, transient=True)
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def advance(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_reconstruct(
    images: Sequence[Path],
    model: str,
    out: Path = Path("reconstructions"),
    save_arrays: Path | None = None,
    **options: Any,
) -> ReconstructionResult:
    """`mae reconstruct`: `mae.runtime.reconstruct.reconstruct` with `options` (plain strings), then the 4-panel
    pictures (and arrays) written and PSNR / MSE on the removed patches printed."""
    result = reconstruct([Path(p) for p in images], model, progress=BatchBar(), **options)
    out = Path(out)
    arrays = Path(save_arrays) if save_arrays is not None else None
    saved = save_pictures(result, out, arrays)
    console = Console()
    console.print(metrics_table(result, saved))
    console.print("PSNR and MSE: [0, 1] pixels on the removed patches; loss: the training loss there.")
    for description in dict.fromkeys(result.engines):
        console.print(f"engine: {description}")
    for note in result.notes:
        console.print(f"note: {note}")
    if arrays is not None:
        console.print(f"arrays: {write_arrays(result, arrays)}")
    for path in saved.replaced:  # named by the user, so replaced, but never silently
        console.print(f"replaced {path} (it existed; name a new file to keep both)", soft_wrap=True)
    if saved.numbered:
        console.print(
            f"numbered {saved.numbered} picture(s), so as to overwrite no file of the same name in {out}",
            soft_wrap=True,
        )
    return result


def metrics_table(result: ReconstructionResult, saved: SavedPictures) -> Table:
    """One row per image: its size, PSNR, MSE and loss on the removed patches, and its picture file."""
    table = Table(title=f"Masked reconstruction, {result.mask_ratio:.0%} of patches removed", title_justify="left")
    for column, justify in (("image", "left"), ("size", "right"), ("PSNR dB", "right"), ("MSE", "right")):
        table.add_column(column, justify=justify)
    table.add_column("loss", justify="right")
    table.add_column("picture", justify="left", overflow="fold")
    for index, name in enumerate(result.names):
        width, height = result.original_sizes[index]
        psnr, mse, loss = (
            float(values[index]) for values in (result.metrics.psnr, result.metrics.mse, result.metrics.loss)
        )
        cells = ("-", "-", "-") if np.isnan(mse) else (f"{psnr:.2f}", f"{mse:.5f}", f"{loss:.4f}")
        table.add_row(name, f"{width}x{height}", *cells, str(saved.files[index]))
    return table
