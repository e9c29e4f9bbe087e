"""`mae train` for a person: the opening lines, notes, skipped files, the progress bar and the end summary, on
stderr with rich (what `mae.train.TrainReporter` hears, printed)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from ..train import StepReport, TrainOptions, TrainReporter, TrainResult, TrainStart

SKIPPED_SHOWN = 5  # unreadable files named in the summary; the log lists every one


class RichTrainReporter(TrainReporter):
    """Prints a training as `mae train` shows it; `console` defaults to stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self._bar: Progress | None = None
        self._task: TaskID | None = None

    def note(self, text: str) -> None:
        self.console.print(f"[yellow]note:[/] {text}")

    def skipped(self, message: str) -> None:
        self.console.print(f"[yellow]skipped[/] {message}")

    def started(self, start: TrainStart) -> None:
        for line in start_lines(start):
            self.console.print(line)

    @contextlib.contextmanager
    def progress(self, total: int, completed: int) -> Iterator[None]:
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._task = bar.add_task("", total=total, completed=completed)
        with bar:
            self._bar = bar
            try:
                yield
            finally:
                self._bar = None

    def advanced(self, epoch: int, epochs: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=f"epoch {epoch}/{epochs}")

    def stepped(self, step: StepReport) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=step_line(step))

    def finished(self, result: TrainResult, opts: TrainOptions) -> None:
        for line in end_lines(result, opts):
            self.console.print(line)


def start_lines(start: TrainStart) -> list[str]:
    """What the run is: the model, the data, the processes and the recipe's numbers, then the notes."""
    cfg = start.config
    held = "held out" if start.previews_held_out else "from the training set (too few images to hold out)"
    effective = start.batch_size * start.accum_iter * start.world_size
    lines = [
        f"[bold]mae train[/] {start.name}: {cfg.img_size} px, patch {cfg.patch_size}, "
        f"{start.trainable_parameters / 1e6:.2f} M trainable parameters, norm_pix_loss={cfg.norm_pix_loss}, "
        f"mask {start.mask_ratio:.0%}",
        f"data: {start.num_images} images in {start.data} ({start.train_images} for training, "
        f"{start.preview_images} previews {held})",
        f"{start.world_size} process(es) on {start.device}, {start.precision}; batch {start.batch_size} x accum "
        f"{start.accum_iter} x {start.world_size} = {effective}, peak lr {start.peak_lr:.3e}, "
        f"{start.optimizer_steps_per_epoch} optimizer steps per epoch",
    ]
    if start.resumed_at is not None:
        epoch, step = start.resumed_at
        lines.append(f"resuming at epoch {epoch:.3f}, optimizer step {step}")
    return lines + [f"[yellow]note:[/] {note}" for note in start.notes]


def step_line(step: StepReport) -> str:
    loss_text = f"{step.loss:.4f}" if step.loss is not None else "n/a"
    return f"epoch {step.epoch}/{step.epochs}  loss {loss_text}  lr {step.lr:.2e}  {step.images_per_s:.1f} img/s"


def end_lines(result: TrainResult, opts: TrainOptions) -> list[str]:
    """How the session ended, where it got to, what was skipped, where the files are (and how to go on)."""
    if result.stopped == "already_complete":
        return [f"The run in {result.out} has already done its {opts.epochs} epochs."]
    how = {
        "completed": "done",
        "max_minutes": f"stopped after --max-minutes {opts.max_minutes}",
        "max_steps": f"stopped after --max-steps {opts.max_steps}",
        "interrupted": "interrupted",
    }[result.stopped]
    loss_text = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    lines = [
        f"[bold green]{how}[/]: epoch {result.epoch_position:.3f}/{opts.epochs}, optimizer step {result.global_step}, "
        f"loss {loss_text} (mean of the epoch), {result.images_per_s:.1f} images/s over {result.seconds:.0f} s"
    ]
    skipped = result.skipped_files
    if skipped:
        shown = skipped[:SKIPPED_SHOWN]
        more = f" (+{len(skipped) - len(shown)} more in {result.log})" if len(skipped) > SKIPPED_SHOWN else ""
        listed = ", ".join(f"{Path(path).name} ({reason})" for path, reason in shown)
        lines.append(f"[yellow]{len(skipped)} unreadable file(s) skipped:[/] {listed}{more}")
    lines.append(f"checkpoint: {result.checkpoint}  log: {result.log}")
    if result.stopped != "completed":
        lines.append(f"continue with: mae train ... --out {result.out} --resume")
    return lines
