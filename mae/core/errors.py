"""User-facing errors: a message that says what is wrong and how to fix it.

The CLI catches `MAEError` and prints it without a traceback. Library callers get an ordinary exception.
"""

from __future__ import annotations


class MAEError(Exception):
    """Bad input or an unmet requirement. `hint` says how to fix it."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class MissingDependency(MAEError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the Python package '{module}', which is not installed.",
            hint=f"pip install 'mae-toolkit[{extra}]'  (or: pip install -e '.[{extra}]' in a checkout)",
        )
        self.module = module
        self.extra = extra


def require(module: str, extra: str, purpose: str):  # noqa: ANN201 - returns a module
    """Import an optional dependency or raise `MissingDependency` naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependency(module, extra, purpose) from exc
