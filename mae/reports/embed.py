"""`mae embed` for a person: the run's notes and a progress bar on stderr, then a short report on stdout."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mae.runtime.embed import EmbedFailures, embed


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        return Text(f"{speed:6.1f} img/s" if speed else "     - img/s", style="progress.data.speed")


class EmbedBar:
    """An `EmbedProgress` for a terminal: notes as lines on stderr and a rich bar (images, images/s, failures, ETA),
    none when there is nothing to embed."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: Any = None
        self.failed = 0

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def start(self, total: int, label: str) -> None:
        if total == 0:
            return
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(label, total=total, failed=0)
        self.bar.start()

    def advance(self, count: int, failed: bool = False) -> None:
        if self.bar is None:
            return
        self.failed += count if failed else 0
        self.bar.update(self.task, advance=count, failed=self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_embed(**options: Any) -> dict[str, Any]:
    """`mae embed`: the run (options as `mae.runtime.embed.embed` takes them: plain strings), with its progress on
    stderr, then the report on stdout, also when some inputs failed with --strict."""
    try:
        summary = embed(**options, progress=EmbedBar())
    except EmbedFailures as exc:
        print_report(exc.summary)
        raise
    print_report(summary)
    return summary


def print_report(summary: dict[str, Any]) -> None:
    """The summary as a two-column table on stdout."""
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for name, text in report_rows(summary):
        table.add_row(name, text)
    Console().print(table)


def report_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, text) for each line of the report."""
    counts, this_run, stages = summary["counts"], summary["this_run"], summary["stages"]
    rows = []
    worker = summary["worker"]
    if worker["count"] > 1:
        rows.append(("worker", f"{worker['index']}/{worker['count']} (from {worker['from']})"))
    rows.append(("engine", summary["engine"]["description"]))
    embedding = summary["embedding"]
    l2 = ", l2-normalized" if embedding["l2_normalize"] else ""
    rows.append(("embedding", f"{embedding['pool']} {embedding['shape']} {embedding['dtype']}{l2}"))
    output = summary["output"]
    rows.append(("files", f"{output['files']} ({output['written_now']} written now, {output['resumed']} already done)"))
    rows.append(("images", f"{counts['embedded']} embedded, {counts['failed']} failed of {counts['assigned']}"))
    if counts["failed_by_reason"]:
        rows.append(("failures", ", ".join(f"{n} {reason}" for reason, n in counts["failed_by_reason"].items())))
    if this_run["images"]:
        speed = (
            f"{this_run['images_per_second']} img/s overall; inference {stages['inference']['images_per_second']}"
            f" img/s; decode {stages['decode']['images_per_worker_second']} img/s per worker"
        )
        rows.append(("speed", speed))
    plan = summary.get("plan")
    if plan and plan["done"] < plan["files"]:
        rest = plan["files"] - plan["done"]
        who = f"the other {plan['workers'] - 1} workers' part, or " if plan["workers"] > 1 else ""
        text = f"{plan['done']} of {plan['files']} output files done; {rest} still to write ({who}run again)"
        rows.append(("job", text))
    rows.append(("output", output["folder"]))
    return rows
