"""`mae index` and `mae search` for a person: stage bars on stderr, then tables (or JSON) on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..core.errors import MAEError
from ..core.files import size_text


class StageBar:
    """An `IndexProgress` for a terminal: one bar per stage (read, train, add, recall, write) on stderr."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task: Any = None

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def stage(self, name: str, total: int) -> None:
        if self.bar is None:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.bar.start()
        elif self.task is not None:
            self.bar.update(self.task, completed=self.bar.tasks[-1].total)
        self.task = self.bar.add_task(name, total=max(1, total))

    def advance(self, count: int) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


# ---------------------------------------------------------------------------------------------------- index
def run_index(embeddings: list[str], out: str, metric: str, kind: str, max_memory: str | None, seed: int,
              verify: bool, json_output: bool, rerank: int | None = None) -> dict[str, Any]:  # fmt: skip
    """`mae index`: build (or find up to date) the index, then say what it is and how good its recall is."""
    from mae.runtime.index import build_index  # faiss and the runtime only when the command runs

    manifest = build_index(embeddings, out, metric, kind, max_memory, seed, verify, StageBar(), rerank)
    if json_output:
        print(json.dumps(manifest, indent=2))
    else:
        print_index(manifest, out)
    return manifest


def print_index(manifest: dict[str, Any], out: str) -> None:
    console = Console()
    plan, recall, settings = manifest["plan"], manifest["recall"], manifest["settings"]
    state = "up to date (nothing rebuilt)" if manifest.get("up_to_date") else f"built in {manifest['build_seconds']} s"
    table = Table(title=f"mae index: {out}", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("index", f"{manifest['factory']} ({plan['kind']}), {state}")
    table.add_row("vectors", f"{manifest['count']} of dimension {manifest['dim']}, {manifest['metric']} similarity")
    table.add_row("memory", f"about {size_text(plan['memory_bytes'])}")
    if recall["exact"]:
        table.add_row("recall", "exact search (recall 1 by construction)")
    else:
        tried = ", ".join(f"nprobe {t['nprobe']}: {t['recall']:.3f}" for t in recall["tried"])
        table.add_row(
            f"recall@{recall['k']}",
            f"{recall['recall']:.3f} against exact search on {recall['sample']} indexed vectors at nprobe "
            f"{recall['nprobe']} ({tried})",
        )
        if recall.get("rerank"):
            table.add_row(
                "re-ranking",
                f"{recall['k']} x {recall['rerank']} candidates by their exact vectors (the codes alone: recall "
                f"{recall['recall_codes']:.3f}; score error {recall['score_error']:.4f}, 99th percentile)",
            )
    if manifest.get("warning"):
        table.add_row("[red]warning[/red]", manifest["warning"].removeprefix("warning: "))
    table.add_row("embeddings", ", ".join(f"{s['path']} ({s['rows']} rows)" for s in manifest["sources"]))
    table.add_row(
        "made with",
        f"{settings['engine']} {settings['precision']}, pool {settings['pool']}, l2_normalize "
        f"{settings['l2_normalize']}, model sha256 {str(settings['model_sha256'])[:12]}…",
    )
    console.print(table)


# --------------------------------------------------------------------------------------------------- search
def run_search(queries: list[str], index: str, k: int, ids: list[int], model: str | None, out: str,
               duplicates: bool, threshold: float, sheet: bool, json_output: bool) -> dict[str, Any]:  # fmt: skip
    """`mae search`: neighbours of the queries (table + contact sheet), or with --duplicates the groups above the
    threshold (parquet + picture)."""
    from mae.runtime.search import find_duplicates, load_index, search  # as above
    from mae.runtime.sheets import search_sheet  # as above

    loaded = load_index(index)
    for note in loaded.notes:
        print(note, file=sys.stderr)
    if duplicates:
        if queries or ids:
            raise MAEError("--duplicates searches the whole index: it takes no queries.", hint="drop the queries")
        summary = find_duplicates(loaded, threshold, out, progress=StageBar())
        if json_output:
            print(json.dumps(summary, indent=2))
        else:
            print_duplicates(summary)
        return summary
    result = search(queries, loaded, k=k, ids=ids, model=model)
    if sheet:
        result["sheet"] = str(search_sheet(result, Path(out) / "contact_sheet.png"))
    if json_output:
        print(json.dumps(result, indent=2))
    else:
        print_search(result)
    return result


def print_search(result: dict[str, Any]) -> None:
    console = Console()
    for query in result["queries"]:
        table = Table(title=f"{query['query']}", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column(f"{result['metric']}", justify="right")
        table.add_column("id", justify="right")
        table.add_column("path", overflow="fold")
        for item in query["neighbours"]:
            table.add_row(str(item["rank"]), f"{item['score']:.4f}", str(item["id"]), item["path"])
        console.print(table)
    if result.get("sheet"):
        console.print(f"contact sheet: {result['sheet']}")


def print_duplicates(summary: dict[str, Any]) -> None:
    console = Console()
    console.print(
        f"{summary['pairs']} pairs above {summary['threshold']} ({summary['metric']}) in {summary['groups']} groups "
        f"of {summary['images_in_groups']} images, out of {summary['images']}."
    )
    table = Table(title="largest groups")
    table.add_column("group", justify="right")
    table.add_column("size", justify="right")
    table.add_column("members (best score in the group)", overflow="fold")
    for group in summary["largest_groups"]:
        members = ", ".join(f"{Path(m['path']).name} {m['score']:.4f}" for m in group["members"][:6])
        more = f" … and {group['size'] - 6} more" if group["size"] > 6 else ""
        table.add_row(str(group["group"]), str(group["size"]), members + more)
    if summary["largest_groups"]:
        console.print(table)
    for name, path in summary["files"].items():
        console.print(f"{name}: {path}")
