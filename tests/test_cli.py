"""Usage mistakes through the real `mae` entry point, with the typer and click a fresh install resolves: one line
saying what is wrong plus a hint, exit status 2, never a traceback (typer >= 0.26 vendors click as typer._click)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mae.cli import click_exception_types

COMMANDS = {  # command -> arguments that satisfy its required ones (the files need not exist: parsing fails first)
    "train": ["--data", "photos"],
    "export": ["weights.pt"],
    "reconstruct": ["cat.jpg", "--model", "bundle"],
    "embed": ["photos", "--model", "bundle", "--out", "emb"],
    "bench": [],
    "info": ["bundle"],
    "demo": [],
}
BAD_CHOICES = {
    "train": ["--precision", "fp8"],
    "export": ["--format", "tflite"],
    "reconstruct": ["--engine", "ort"],
    "embed": ["--pool", "max"],
    "bench": ["--batch-size", "zero"],
    "info": ["--num-heads", "many"],
    "demo": ["--minutes", "soon"],
}
MISSING = {
    "train": ([], "Missing option '--data'"),
    "export": ([], "Missing argument 'weights'"),
    "reconstruct": (["cat.jpg"], "Missing option '--model'"),
    "embed": (["photos", "--out", "emb"], "Missing option '--model'"),
}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mae.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def assert_usage_error(done: subprocess.CompletedProcess, *messages: str) -> None:
    text = done.stdout + done.stderr
    assert done.returncode == 2, text
    assert "Traceback" not in text, text
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("  hint: "), text
    assert all(m.lower() in lines[0].lower() for m in messages), text  # the wording differs a little between clicks


def test_both_clicks_are_caught() -> None:
    names = {f"{t.__module__}.{t.__name__}" for t in click_exception_types()}
    import typer

    if hasattr(typer, "_click"):
        assert "typer._click.exceptions.ClickException" in names
    try:
        import click  # noqa: F401
    except ImportError:
        return
    assert "click.exceptions.ClickException" in names


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_typo_in_an_option(command: str) -> None:
    assert_usage_error(run(command, *COMMANDS[command], "--bogus"), "No such option", "--bogus")


@pytest.mark.parametrize("command", sorted(BAD_CHOICES))
def test_a_bad_value(command: str) -> None:
    option = BAD_CHOICES[command][0]
    assert_usage_error(run(command, *COMMANDS[command], *BAD_CHOICES[command]), f"Invalid value for '{option}'")


@pytest.mark.parametrize("command", sorted(MISSING))
def test_a_missing_argument(command: str) -> None:
    args, message = MISSING[command]
    assert_usage_error(run(command, *args), message)


def test_top_level_mistakes() -> None:
    assert_usage_error(run("recon"), "No such command", "recon")
    assert_usage_error(run("--bogus"), "No such option", "--bogus")
    assert_usage_error(run("reconstruct", "cat.jpg", "--model", "b", "--mask-ratio", "1.5"), "'--mask-ratio'")
    bare = run()  # no arguments: the help, and the status of a usage error
    assert bare.returncode == 2 and "Traceback" not in bare.stdout + bare.stderr
    assert "Usage: mae" in bare.stdout + bare.stderr and "reconstruct" in bare.stdout + bare.stderr


def test_help_is_readable_at_80_columns() -> None:
    """No option name or preset cut short, no `<bool>` for flags."""
    import os

    for command in COMMANDS:
        done = subprocess.run(
            [sys.executable, "-m", "mae.cli", command, "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "COLUMNS": "80", "TERM": "xterm-256color"},
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "…" not in done.stdout and "<bool>" not in done.stdout, done.stdout
        assert max(len(line) for line in done.stdout.splitlines()) <= 80, done.stdout
    train_help = run("train", "--help").stdout
    assert "--checkpoint-minutes" in train_help and "mae_vit_base_patch16" in train_help


def test_info_on_a_bundle_needs_no_torch(tmp_path) -> None:
    """`mae info BUNDLE` reads mae.json and the graphs' metadata: no PyTorch import (it took seconds)."""
    import textwrap

    from mae.checkpoint import save_random_weights
    from mae.core.config import get_preset
    from mae.export import export_bundle

    weights = save_random_weights(get_preset("mae_vit_test_patch8"), tmp_path / "w.pt")
    bundle = export_bundle(weights, tmp_path / "bundle", verify=False)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch now fails
        from mae.cli import main
        sys.argv = ["mae", "info", {str(bundle.path)!r}]
        main()
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "encoder.onnx" in done.stdout and "decoder.onnx" in done.stdout
