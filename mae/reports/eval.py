"""`mae eval` for a person: progress bars on stderr (embedding, pixels, classifiers), then model vs raw pixels on
stdout as a rich table, or the report as JSON (`--json`, nothing else on stdout)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mae.runtime.evaluate import evaluate

from .embed import EmbedBar


class EvalBar(EmbedBar):
    """The progress of every stage: `mae embed`'s bar (images/s, failures, ETA) for embedding and pixels, and a
    plain count for the classifiers (queries for knn, fits for the linear probe)."""

    def start(self, total: int, label: str) -> None:
        self.failed = 0
        if label.startswith(("embed", "pixels")):
            super().start(total, label)
            return
        if total == 0:
            return
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.task = self.bar.add_task(label, total=total, failed=0)
        self.bar.start()

    def close(self) -> None:
        super().close()
        self.bar = None  # each stage draws its own bar


def run_eval(json_out: bool = False, **options: Any) -> dict[str, Any]:
    """`mae eval`: the evaluation (options as `mae.runtime.evaluate.evaluate` takes them: plain strings), then the
    report on stdout: a table, or JSON with `json_out`."""
    report = evaluate(**options, progress=EvalBar())
    if json_out:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        print_eval_report(report)
    return report


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _classifier_line(report: dict[str, Any]) -> str:
    if report["kind"] == "knn":
        return f"k-NN, cosine, k = {report['k']}, weights exp(cos / {report['temperature']:g}) (DINO)"
    chosen = report["C"]
    return (
        f"linear probe: standardized features + logistic regression, C = {chosen['model']:g} (model), "
        f"{chosen['pixels']:g} (pixels), chosen on held-out train images"
    )


def print_eval_report(report: dict[str, Any]) -> None:
    """Model vs raw pixels: top-1, top-5, mean per-class accuracy, then each class; the settings and files below."""
    console = Console()
    model, pixels = report["model"], report["pixels"]
    table = Table(title=f"mae eval {report['kind']}", title_justify="left")
    table.add_column("")
    table.add_column(f"model ({report['pool']})", justify="right")
    table.add_column("raw pixels", justify="right")
    table.add_column("val images", justify="right")
    val_counts = report["counts"]["val"]["per_class"]
    table.add_row("top-1", _percent(model["top1"]), _percent(pixels["top1"]), str(report["counts"]["val"]["images"]))
    table.add_row("top-5", _percent(model["top5"]), _percent(pixels["top5"]), "")
    table.add_row("mean per class", _percent(model["mean_per_class"]), _percent(pixels["mean_per_class"]), "")
    table.add_section()
    for name in report["classes"]:
        if val_counts.get(name):
            table.add_row(name, _percent(model["per_class"][name]), _percent(pixels["per_class"][name]),
                          str(val_counts[name]))  # fmt: skip
    console.print(table)
    lines = [
        ("classifier", _classifier_line(report)),
        ("engine", f"{report['engine']} {report['precision']}"),
        ("train", f"{report['counts']['train']['images']} images, {len(report['classes'])} classes"),
        ("picture", report["picture"]),
        ("report", str(_report_path(report))),
    ]
    lines += [("note", note) for note in report["notes"]]
    details = Table(show_header=False, box=None, pad_edge=False)
    details.add_column(style="bold")
    details.add_column()
    for name, text in lines:
        details.add_row(name, text)
    console.print(details)


def _report_path(report: dict[str, Any]) -> str:
    return str(Path(report["picture"]).with_name(f"report-{report['kind']}.json"))
