"""Run the `mae` command in-process, as a user's shell would, and collect its exit status and output."""

from __future__ import annotations

import sys

import pytest


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: object) -> tuple[int, str]:
    """(exit status, stdout + stderr) of `mae ARGS...` through the real entry point (`mae.cli.main`)."""
    from mae import cli

    monkeypatch.setattr(sys, "argv", ["mae", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err
