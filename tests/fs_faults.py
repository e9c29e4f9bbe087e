"""Real file-system faults for tests: a small tmpfs (full disk), a read-only mount, and a process without root's
permission override. Each skips with the reason where the machine does not allow it (CI runs as root)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(path: Path, size_kib: int, read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of `size_kib` KiB at `path` (created) for the block; skip where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave_kib: int) -> Path:
    """Fill the file system of `folder` with one file until about `leave_kib` KiB are free."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_kib * 1024))
    return filler


def without_permission_override() -> list[str]:
    """A command prefix that runs a child without CAP_DAC_OVERRIDE (so root obeys file permissions)."""
    if os.geteuid() != 0:
        return []  # an ordinary user obeys permissions already
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's permission override")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def run_mae(*args: object, prefix: list[str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`mae ARGS` in a child process (exit status, stdout, stderr)."""
    command = [*(prefix or []), sys.executable, "-m", "mae.cli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
