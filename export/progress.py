"""How an export reports its progress: each step (which the app shows as a spinner, then a tick and its seconds)
and notes, through `ExportProgress`; and `quiet`, which keeps the converters' own logging out of the way."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


class ExportProgress:
    """What an export tells the person running it. This one says nothing (library calls, tests); `mae export`
    passes one that prints (`mae.reports.export.ExportSpinner`)."""

    @contextlib.contextmanager
    def step(self, text: str) -> Iterator[None]:
        """One step of the export ("exporting fp32 encoder -> encoder.onnx") runs inside the `with`; an exception
        out of it is the step's failure."""
        yield

    def note(self, text: str) -> None:
        """A line for the person running the export (a verification's numbers, what was left out and why)."""


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
