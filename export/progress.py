"""Step-by-step progress on stderr for exports: a spinner while a step runs, a tick and its duration after."""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator
from typing import Any


class Steps:
    """`with steps.step("exporting encoder"): ...` shows a spinner, then "✓ exporting encoder (2.1 s)".

    Silent when `enabled` is False (library calls, tests). Seconds per step are kept in `durations`.
    """

    def __init__(self, enabled: bool = True, console: Any = None) -> None:
        self.enabled = enabled
        self.durations: dict[str, float] = {}
        self.console = console
        if enabled and console is None:
            from rich.console import Console

            self.console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        start = time.perf_counter()
        if not self.enabled:
            yield
            self.durations[text] = time.perf_counter() - start
            return
        with self.console.status(text + " ..."):
            try:
                yield
            except BaseException:
                self.console.print(f"[red]✗[/red] {text}")
                raise
        seconds = self.durations[text] = time.perf_counter() - start
        self.console.print(f"[green]✓[/green] {text} [dim]({seconds:.1f} s)[/dim]")

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text)


@contextlib.contextmanager
def quiet(*logger_names: str) -> Iterator[None]:
    """Silence warnings and the named loggers below ERROR; errors still propagate.

    The exporter logs optional-dependency notes (torchvision ops) and the converters warn about each value they
    clamp or skip: not the user's business, since verification judges the result.
    """
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
